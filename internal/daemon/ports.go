package daemon

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"

	"github.com/metald/metald/internal/network/link"
	"github.com/metald/metald/internal/network/secpolicy"
	"github.com/metald/metald/internal/network/shape"
)

// ports adapts link.Manager to the VM manager's Ports contract.
type ports struct {
	m *link.Manager
	// hostFd is the host namespace; bridges pass IPv6 to the ip6 hooks
	// there (br_netfilter) so the per-VM policy sees bridged traffic.
	hostFd int
	// netfiltered remembers bridges already switched to the ip6 hooks in
	// this process (the hot path of CreateVm need not ask again).
	netfiltered *sync.Map
	// shaper applies bandwidth and packet-rate limits.
	shaper *shape.Shaper
}

func (p ports) EnsureBridge(name string) error {
	if _, err := p.m.EnsureBridge(name); err != nil {
		return err
	}
	if p.netfiltered == nil {
		return nil
	}
	if _, done := p.netfiltered.Load(name); done {
		return nil
	}
	if err := secpolicy.EnsureBridgeNetfilter(p.hostFd, name); err != nil {
		return fmt.Errorf("pass bridged IPv6 of %s to the policy hooks: %w", name, err)
	}
	p.netfiltered.Store(name, true)
	return nil
}

func (p ports) EnsureGateway(bridge string, gw netip.Prefix) (bool, error) {
	_, err := p.m.EnsureGateway(bridge, gw)
	if errors.Is(err, link.ErrAddressInUse) {
		return false, nil
	}
	return err == nil, err
}

func (p ports) RemoveGateway(bridge string, gw netip.Prefix) error {
	return p.m.RemoveGateway(bridge, gw)
}

func (p ports) AttachPort(dev, bridge string) error { return p.m.AttachPort(dev, bridge) }

func (p ports) PortAttached(dev, bridge string) (bool, bool, error) {
	info, err := p.m.Port(dev)
	if errors.Is(err, link.ErrNotFound) {
		return false, false, nil
	}
	if err != nil {
		return false, false, err
	}
	return true, info.Master == bridge, nil
}

func (p ports) DeletePort(dev string) error { return p.m.DeletePort(dev) }

func (p ports) OwnedPorts() (map[string]string, error) {
	infos, err := p.m.OwnedPorts()
	if err != nil {
		return nil, err
	}
	out := make(map[string]string, len(infos))
	for _, i := range infos {
		if vmID, _, ok := link.ParsePortAlias(i.Alias); ok {
			out[i.Name] = vmID
		}
	}
	return out, nil
}

func (p ports) RemoveBridgeIfUnused(name string) error {
	_, err := p.m.DeleteBridgeIfUnused(name)
	return err
}

// EnableSnooping turns on MLD snooping and a querier on the bridge and caps
// the groups one port may join.
func (p ports) EnableSnooping(bridge, port string) error {
	if err := p.m.EnsureMulticastSnooping(bridge, true); err != nil {
		return err
	}
	return p.m.SetPortMulticastMaxGroups(port, link.DefaultPortMaxGroups)
}

// ApplyLimits limits a VM port in both directions (bandwidth: HTB on the
// port toward the VM, an nftables policer on its ingress hook from the VM;
// packet rate: nftables).
func (p ports) ApplyLimits(dev string, mbps, pps uint32) error {
	if mbps == 0 && pps == 0 {
		return p.shaper.Remove(dev)
	}
	return p.shaper.Apply(dev, shape.Limits{Mbps: mbps, PPS: pps})
}

// RemoveLimits removes a port's limits.
func (p ports) RemoveLimits(dev string) error { return p.shaper.Remove(dev) }
