package fhmetrics

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/vishvananda/netlink"

	"github.com/metald/metald/internal/netnstest"
	"github.com/metald/metald/internal/network"
	"github.com/metald/metald/internal/network/nft"
	"github.com/metald/metald/internal/network/ns"
)

func TestMain(m *testing.M) { os.Exit(netnstest.Main(m)) }

func mac(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

func plan(i int) network.NICPlan {
	return network.NICPlan{
		VMID: fmt.Sprintf("vm%d", i), TenantID: fmt.Sprintf("tenant-%d", i%2), NICID: "eth0",
		HostDevice: fmt.Sprintf("tap-vm%d", i), MAC: mac(fmt.Sprintf("02:00:00:00:01:%02x", i)),
		Addresses: []netip.Addr{netip.MustParseAddr(fmt.Sprintf("2001:db8:1::%x", 0x10+i))},
		Controls: network.Controls{RAGuard: true, SourceGuard: true, BlockRouting: true,
			AllowedRASources: []netip.Addr{netip.MustParseAddr("fe80::1")}},
	}
}

type env struct {
	host, vm1 *netnstest.NS
	fw        *nft.Firewall
	reg       *prometheus.Registry
	plans     []network.NICPlan
}

// newEnv programs NICs for vm1..vm3 (tenants 1, 0, 1) on bridge br0 in a
// private host namespace; only vm1 has a namespace and a port.
func newEnv(t *testing.T, perVM bool) *env {
	t.Helper()
	e := &env{host: netnstest.New(t), vm1: netnstest.New(t), reg: prometheus.NewRegistry()}
	fw, err := nft.New(e.host.Fd())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fw.Close() })
	e.fw = fw
	e.plans = []network.NICPlan{plan(1), plan(2), plan(3)}
	if err := fw.Apply(context.Background(), e.plans); err != nil {
		t.Fatal(err)
	}
	byDev := map[string]Labels{}
	for _, p := range e.plans {
		byDev[p.HostDevice] = Labels{TenantID: p.TenantID, VMID: p.VMID}
	}
	col, err := New(e.reg, fw, Options{PerVMLabels: perVM, Labels: func(dev string) (Labels, bool) {
		l, ok := byDev[dev]
		return l, ok
	}})
	if err != nil {
		t.Fatal(err)
	}
	fw.SetObserver(col)
	if err := e.host.Handle(t).LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}); err != nil {
		t.Fatal(err)
	}
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0", HardwareAddr: mac("02:00:00:00:01:01")},
		PeerName: "tap-vm1", PeerNamespace: netlink.NsFd(e.host.Fd())}
	if err := e.vm1.Handle(t).LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	e.host.MustRun(t, "ip", "link", "set", "br0", "up")
	e.host.MustRun(t, "ip", "link", "set", "tap-vm1", "master", "br0", "up")
	e.vm1.MustRun(t, "ip", "link", "set", "eth0", "up")
	return e
}

// send runs scapy in vm1 (sendp on eth0; M1 is vm1's MAC).
func (e *env) send(t *testing.T, pkt string, n int) {
	t.Helper()
	script := fmt.Sprintf(`
import logging
logging.getLogger("scapy").setLevel(logging.ERROR)
from scapy.all import *
M1 = "02:00:00:00:01:01"
sendp([%s]*%d, iface="eth0", verbose=False)
`, pkt, n)
	if out, err := ns.Command(e.vm1.Fd(), exec.Command("/usr/bin/python3", "-c", script)); err != nil {
		t.Fatalf("scapy: %v\n%s", err, out)
	}
}

const rogueRA = `Ether(src=M1, dst="33:33:00:00:00:01")/IPv6(src="fe80::ff:fe00:101", dst="ff02::1", hlim=255)/ICMPv6ND_RA()`

// value returns the value of the metric name with exactly the given labels
// (0 when absent).
func (e *env) value(t *testing.T, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := e.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			if len(m.GetLabel()) != len(labels) {
				continue
			}
			for _, lp := range m.GetLabel() {
				if labels[lp.GetName()] != lp.GetValue() {
					continue metrics
				}
			}
			return metricValue(m)
		}
	}
	return 0
}

func metricValue(m *dto.Metric) float64 {
	if m.GetCounter() != nil {
		return m.GetCounter().GetValue()
	}
	return m.GetGauge().GetValue()
}

func TestMetricsExactFromCounters(t *testing.T) {
	t.Parallel()
	e := newEnv(t, false)
	t1 := map[string]string{"tenant_id": "tenant-1"}
	raBlocks := func() float64 { return e.value(t, "metald_ipv6_ra_guard_blocks_total", t1) }
	sg := func() float64 { return e.value(t, "metald_ipv6_source_guard_violations_total", t1) }
	eh := func() float64 {
		return e.value(t, "metald_ipv6_extension_header_blocks_total", map[string]string{"tenant_id": "tenant-1", "header": "routing"})
	}
	b0, s0, h0 := raBlocks(), sg(), eh()

	e.send(t, rogueRA, 7)
	e.send(t, `Ether(src=M1, dst="02:00:00:00:01:02")/IPv6(src="2001:db8:1::99", dst="2001:db8:1::12")/ICMPv6EchoRequest()`, 4)                  // spoofed IPv6 source
	e.send(t, `Ether(src="02:00:00:00:09:09", dst="02:00:00:00:01:02")/IPv6(src="2001:db8:1::11", dst="2001:db8:1::12")/ICMPv6EchoRequest()`, 2) // spoofed MAC
	e.send(t, `Ether(src=M1, dst="02:00:00:00:01:02")/IPv6(src="2001:db8:1::11", dst="2001:db8:1::12")/IPv6ExtHdrRouting(addresses=["2001:db8:1::1"])/ICMPv6EchoRequest()`, 3)
	if d := raBlocks() - b0; d != 7 {
		t.Errorf("ra_guard_blocks_total moved by %v, want 7", d)
	}
	if d := sg() - s0; d != 6 {
		t.Errorf("source_guard_violations_total moved by %v, want 6 (4 source + 2 mac)", d)
	}
	if d := eh() - h0; d != 3 {
		t.Errorf("extension_header_blocks_total{header=routing} moved by %v, want 3", d)
	}
	if v := e.value(t, "metald_ipv6_ra_guard_blocks_total", map[string]string{"tenant_id": "tenant-0"}); v != 0 {
		t.Errorf("tenant-0 ra blocks %v, want 0", v)
	}

	// Removing the NIC keeps the total; its counters are gone from the kernel.
	before := raBlocks()
	if err := e.fw.RemoveNIC("tap-vm1"); err != nil {
		t.Fatal(err)
	}
	if v := raBlocks(); v != before {
		t.Errorf("after RemoveNIC ra blocks %v, want %v (never backwards)", v, before)
	}
	// Re-added with fresh counters: the new blocks add on top.
	if err := e.fw.AddNIC(e.plans[0]); err != nil {
		t.Fatal(err)
	}
	e.send(t, rogueRA, 5)
	if v := raBlocks(); v != before+5 {
		t.Errorf("after re-add and 5 RAs: %v, want %v", v, before+5)
	}

	// An operator deletes the NICs' tables: the counters vanish; Reconcile
	// recreates them and counts the repair; totals stay.
	before = raBlocks()
	deleted := map[string]bool{}
	for _, p := range e.plans {
		if tbl := nft.TableFor(p); !deleted[tbl] {
			deleted[tbl] = true
			e.host.MustRun(t, "nft", "delete", "table", "netdev", tbl)
		}
	}
	if v := raBlocks(); v != before {
		t.Errorf("after table deletion %v, want %v", v, before)
	}
	if _, err := e.fw.Reconcile(context.Background(), e.plans); err != nil {
		t.Fatal(err)
	}
	if v := e.value(t, "metald_firewall_repairs_total", map[string]string{"kind": "table"}); v != 1 {
		t.Errorf("repairs{kind=table} = %v, want 1", v)
	}
	e.send(t, rogueRA, 2)
	if v := raBlocks(); v != before+2 {
		t.Errorf("after repair and 2 RAs: %v, want %v", v, before+2)
	}
}

func TestMetricsPerVMLabels(t *testing.T) {
	t.Parallel()
	e := newEnv(t, true)
	l := map[string]string{"tenant_id": "tenant-1", "vm_id": "vm1"}
	b0 := e.value(t, "metald_ipv6_ra_guard_blocks_total", l)
	e.send(t, rogueRA, 3)
	if d := e.value(t, "metald_ipv6_ra_guard_blocks_total", l) - b0; d != 3 {
		t.Errorf("vm1 ra blocks moved by %v, want 3", d)
	}
	if v := e.value(t, "metald_ipv6_ra_guard_blocks_total", map[string]string{"tenant_id": "tenant-1", "vm_id": "vm3"}); v != 0 {
		t.Errorf("vm3 ra blocks %v, want 0", v)
	}
	if v := e.value(t, "metald_ipv6_rate_limit_exceeded_total", map[string]string{"tenant_id": "tenant-0", "vm_id": "vm2", "kind": "icmpv6"}); v != 0 {
		t.Errorf("vm2 icmpv6 rate %v", v)
	}
	// one series per (VM, label value). (prometheus/testutil needs a
	// go.sum entry this module does not have; the registry is gathered
	// directly.)
	mfs, err := e.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "metald_ipv6_rate_limit_exceeded_total" && len(mf.GetMetric()) != 3*4 {
			t.Errorf("%d rate limit series, want 12 (3 VMs x 4 kinds)", len(mf.GetMetric()))
		}
	}
}
