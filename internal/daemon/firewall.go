package daemon

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/metald/metald/internal/network"
	"github.com/metald/metald/internal/network/nft"
)

// firewall adapts the nftables first-hop firewall to the VM manager and
// times rule programming into metald_ipv6_security_processing_time.
type firewall struct {
	f   *nft.Firewall
	obs func(time.Duration)
}

func (w firewall) timed(start time.Time) {
	if w.obs != nil {
		w.obs(time.Since(start))
	}
}

func (w firewall) AddNIC(p network.NICPlan) error {
	defer w.timed(time.Now())
	return w.f.AddNIC(p)
}

func (w firewall) RemoveNIC(hostDev string) error {
	defer w.timed(time.Now())
	return w.f.RemoveNIC(hostDev)
}

func (w firewall) Reconcile(ctx context.Context, list func(context.Context) ([]network.NICPlan, error)) ([]string, error) {
	rep, err := w.f.ReconcileFunc(ctx, list)
	if !rep.Empty() {
		// Rule programming time: only passes that repaired something
		// programmed rules.
		defer w.timed(time.Now())
	}
	if rep.Empty() {
		return nil, err
	}
	return []string{rep.String()}, err
}

// router reads a bridge's MAC and link-local address in the host namespace,
// remembering each bridge's answer briefly: a reconcile pass asks once per
// NIC, and the answer only changes when the bridge is recreated.
type router struct {
	h     *netlink.Handle
	mu    *sync.Mutex
	cache map[string]routerInfo
}

type routerInfo struct {
	mac net.HardwareAddr
	ll  netip.Addr
	at  time.Time
}

func newRouter(h *netlink.Handle) router {
	return router{h: h, mu: &sync.Mutex{}, cache: map[string]routerInfo{}}
}

func (r router) BridgeRouter(bridge string) (net.HardwareAddr, netip.Addr, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if c, ok := r.cache[bridge]; ok && time.Since(c.at) < 2*time.Second {
		return c.mac, c.ll, nil
	}
	mac, ll, err := r.read(bridge)
	if err == nil {
		r.cache[bridge] = routerInfo{mac: mac, ll: ll, at: time.Now()}
	}
	return mac, ll, err
}

func (r router) read(bridge string) (net.HardwareAddr, netip.Addr, error) {
	l, err := r.h.LinkByName(bridge)
	if err != nil {
		return nil, netip.Addr{}, fmt.Errorf("bridge %s: %w", bridge, err)
	}
	addrs, err := r.h.AddrList(l, netlink.FAMILY_V6)
	if err != nil {
		return nil, netip.Addr{}, fmt.Errorf("addresses of bridge %s: %w", bridge, err)
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.IsLinkLocalUnicast() {
			return l.Attrs().HardwareAddr, ip, nil
		}
	}
	// No link-local yet (the bridge only just came up): the kernel derives
	// it from the MAC.
	return l.Attrs().HardwareAddr, network.EUI64LinkLocal(l.Attrs().HardwareAddr), nil
}
