package secpolicy

import (
	"bufio"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/metald/metald/internal/network/ns"
)

// TestBlockedSources: an element added with the nft CLI blocks that source
// to and from every VM (bridged and routed), and 20 metald updates later it
// is still there and still blocking.
func TestBlockedSources(t *testing.T) {
	tp := newTopo(t, 2)
	v1, v2, bad := tp.addVM("v1", 0, 0x10), tp.addVM("v2", 1, 0x10), tp.addVM("bad", 0, 0x11)
	for _, v := range []*vm{v1, v2, bad} {
		tp.upsert(v.plan("t1"))
		v.serve(t, "tcp:80")
	}
	expectFlows(t, flow{bad, v1, 80, true}, flow{bad, v2, 80, true}, flow{v1, bad, 80, true})
	tp.host.MustRun(t, "nft", "add", "element", "ip6", TableName, BlockedSources, "{ "+bad.addr.String()+" }")
	check := func() {
		t.Helper()
		expectFlows(t,
			flow{bad, v1, 80, false}, flow{bad, v2, 80, false}, // from: bridged, routed
			flow{v1, bad, 80, false}, flow{v2, bad, 80, false}, // to
			flow{v1, v2, 80, true}, flow{v2, v1, 80, true})
	}
	check()
	for i := range 20 {
		p := v1.plan("t1")
		if i%2 == 0 {
			p.Ingress = rules(t, "ingress", "allow tcp from any to any port 80", "deny all from any to any")
		}
		tp.upsert(p)
	}
	// A full Apply (as after a restart) keeps it too.
	m2, err := New(tp.host.Fd())
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	if err := m2.Apply(context.Background(), []NICPolicy{v1.plan("t1"), v2.plan("t1"), bad.plan("t1")}); err != nil {
		t.Fatal(err)
	}
	out := tp.host.MustRun(t, "nft", "list", "set", "ip6", TableName, BlockedSources)
	if !strings.Contains(out, bad.addr.String()) {
		t.Fatalf("operator element gone after updates:\n%s", out)
	}
	check()
}

// TestTenantIsolation exercises strict, moderate and none between a VM
// of tenant t1 and VMs of t1 and t2 (same bridge and routed).
func TestTenantIsolation(t *testing.T) {
	tp := newTopo(t, 2)
	a, b, c, d := tp.addVM("a", 0, 0x10), tp.addVM("b", 0, 0x11), tp.addVM("c", 0, 0x12), tp.addVM("d", 1, 0x12)
	for _, v := range []*vm{a, b, c, d} {
		v.serve(t, "tcp:80")
	}
	tp.upsert(b.plan("t1"))
	tp.upsert(c.plan("t2"))
	tp.upsert(d.plan("t2"))

	pa := a.plan("t1")
	pa.TenantIsolation = IsolationNone
	tp.upsert(pa)
	expectFlows(t, flow{a, b, 80, true}, flow{a, c, 80, true}, flow{a, d, 80, true}, flow{c, a, 80, true})

	pa.TenantIsolation = IsolationStrict
	tp.upsert(pa)
	expectFlows(t, flow{a, b, 80, true}, flow{b, a, 80, true},
		flow{a, c, 80, false}, flow{a, d, 80, false}, flow{c, a, 80, false}, flow{d, a, 80, false})

	// moderate with open (empty) lists: a default allow does not count
	// for another tenant's VMs.
	pa.TenantIsolation = IsolationModerate
	tp.upsert(pa)
	expectFlows(t, flow{a, b, 80, true}, flow{a, c, 80, false}, flow{d, a, 80, false})
	// An explicit allow on a's side opens a -> c; c's side (open, none)
	// allows it too. d's ingress says no: both sides must allow.
	pa.Egress = rules(t, "egress", "allow tcp from any to 2001:db8:1::12 port 80", "allow tcp from any to 2001:db8:2::12 port 80")
	tp.upsert(pa)
	pd := d.plan("t2")
	pd.Ingress = rules(t, "ingress", "deny tcp from 2001:db8:1::/64 to any", "allow all from any to any")
	tp.upsert(pd)
	expectFlows(t, flow{a, c, 80, true}, flow{a, d, 80, false}, flow{a, b, 80, false} /* egress list now default deny */)
}

// TestMicrosegmentation: same tenant, same bridge needs an explicit allow;
// same tenant on another bridge does not.
func TestMicrosegmentation(t *testing.T) {
	tp := newTopo(t, 2)
	a, b, c := tp.addVM("a", 0, 0x10), tp.addVM("b", 0, 0x11), tp.addVM("c", 1, 0x10)
	for _, v := range []*vm{a, b, c} {
		v.serve(t, "tcp:80", "tcp:81")
		p := v.plan("t1")
		p.Microsegmentation = true
		tp.upsert(p)
	}
	expectFlows(t, flow{a, b, 80, false}, flow{a, c, 80, true}, flow{c, a, 80, true})
	pa, pb := a.plan("t1"), b.plan("t1")
	pa.Microsegmentation, pb.Microsegmentation = true, true
	pa.Egress = rules(t, "egress", "allow tcp from any to 2001:db8:1::11 port 80", "allow all from any to any")
	pb.Ingress = rules(t, "ingress", "allow tcp from 2001:db8:1::10 to any port 80", "allow all from any to any")
	tp.upsert(pa)
	tp.upsert(pb)
	expectFlows(t, flow{a, b, 80, true}, flow{a, b, 81, true})
}

func chainHandles(t *testing.T, m *Manager, vmID string) []uint64 {
	t.Helper()
	c, err := m.RuleCounters(vmID, "eth0")
	if err != nil {
		t.Fatal(err)
	}
	var h []uint64
	for _, r := range c {
		h = append(h, r.Handles...)
	}
	return h
}

// TestSecurityGroupMembership: sg: membership changes (by a NIC joining a
// group and by SetGroupMembers) take effect without rewriting any rule.
func TestSecurityGroupMembership(t *testing.T) {
	tp := newTopo(t, 2)
	srv, a, b := tp.addVM("srv", 0, 0x10), tp.addVM("a", 0, 0x11), tp.addVM("b", 1, 0x11)
	srv.serve(t, "tcp:80")
	p := srv.plan("t1")
	p.Ingress = rules(t, "ingress", "allow tcp from sg:trusted to any port 80", "deny all from any to any")
	tp.upsert(p)
	tp.upsert(a.plan("t1"))
	tp.upsert(b.plan("t1"))
	before := chainHandles(t, tp.mgr, "srv")
	expectFlows(t, flow{a, srv, 80, false}, flow{b, srv, 80, false})

	pa := a.plan("t1")
	pa.SecurityGroups = []string{"trusted"}
	tp.upsert(pa) // a joins: a's own chains are rebuilt, srv's are not
	expectFlows(t, flow{a, srv, 80, true}, flow{b, srv, 80, false})

	if err := tp.mgr.SetGroupMembers(context.Background(), "trusted", []netip.Addr{b.addr}); err != nil {
		t.Fatal(err)
	}
	expectFlows(t, flow{a, srv, 80, true}, flow{b, srv, 80, true})
	tp.upsert(a.plan("t1")) // a leaves
	if err := tp.mgr.SetGroupMembers(context.Background(), "trusted", nil); err != nil {
		t.Fatal(err)
	}
	expectFlows(t, flow{a, srv, 80, false}, flow{b, srv, 80, false})
	if after := chainHandles(t, tp.mgr, "srv"); !slices.Equal(before, after) {
		t.Errorf("srv's rules were rewritten: handles %v -> %v", before, after)
	}
}

// scapy runs a scapy script inside v.
func scapy(t *testing.T, v *vm, script string) string {
	t.Helper()
	prelude := `
import logging
logging.getLogger("scapy").setLevel(logging.ERROR)
from scapy.all import *
conf.verb = 0
`
	out, err := ns.Command(v.ns.Fd(), exec.Command(py, "-c", prelude+script))
	if err != nil {
		t.Fatalf("scapy: %v\n%s", err, out)
	}
	return string(out)
}

// TestNDSurvivesDenyAll: with deny all both ways, the VM still resolves its
// gateway's link-local (NS -> NA) and a peer's address, while ping6 (a user
// flow) is denied; an RA from the VM does not reach its neighbour.
func TestNDSurvivesDenyAll(t *testing.T) {
	tp := newTopo(t, 1)
	a, b := tp.addVM("a", 0, 0x10), tp.addVM("b", 0, 0x11)
	p := a.plan("t1")
	p.Ingress = rules(t, "ingress", "deny all from any to any")
	p.Egress = rules(t, "egress", "deny all from any to any")
	tp.upsert(p)
	tp.upsert(b.plan("t1"))
	out := scapy(t, a, `
def ns(target, dst):
    snm = in6_getnsma(inet_pton(socket.AF_INET6, target))
    mac = in6_getnsmac(snm)
    r = srp1(Ether(src=get_if_hwaddr("eth0"), dst=mac)/IPv6(src="`+a.ll.String()+`", dst=inet_ntop(socket.AF_INET6, snm), hlim=255)/ICMPv6ND_NS(tgt=target)/ICMPv6NDOptSrcLLAddr(lladdr=get_if_hwaddr("eth0")), iface="eth0", timeout=2)
    return r is not None and r.haslayer(ICMPv6ND_NA)
print("gw", ns("fe80::1", None), "peer", ns("`+b.ll.String()+`", None))
`)
	if !strings.Contains(out, "gw True") || !strings.Contains(out, "peer True") {
		t.Fatalf("ND under deny all: %s", out)
	}
	if _, err := a.ns.Run("ping", "-6", "-c", "1", "-W", "1", "fe80::1%eth0"); err == nil {
		t.Errorf("ping6 of the gateway passed a deny all")
	}
	if _, err := b.ns.Run("ping", "-6", "-c", "1", "-W", "1", "fe80::1%eth0"); err != nil {
		t.Errorf("ping6 of the gateway from an open VM failed: %v", err)
	}
	// RA from a VM (open b) toward a: dropped in forward.
	b.ns.MustRun(t, "sysctl", "-q", "-w", "net.ipv6.conf.eth0.forwarding=0")
	cnt := func() string {
		return tp.host.MustRun(t, "sh", "-c", "nft list chain ip6 "+TableName+" forward | grep 'ra redirect'")
	}
	scapy(t, b, `sendp(Ether(src=get_if_hwaddr("eth0"), dst="33:33:00:00:00:01")/IPv6(src="`+b.ll.String()+`", dst="ff02::1", hlim=255)/ICMPv6ND_RA(), iface="eth0")`)
	if !strings.Contains(cnt(), "packets 1 ") {
		t.Errorf("RA from a VM not dropped: %s", cnt())
	}
}

// TestKernelLogPrefix: with logging on, a denied packet produces a kernel
// log line with metald-ipv6-deny.
func TestKernelLogPrefix(t *testing.T) {
	const knob = "/proc/sys/net/netfilter/nf_log_all_netns"
	old, err := os.ReadFile(knob)
	if err != nil {
		t.Skipf("no %s: %v", knob, err)
	}
	if err := os.WriteFile(knob, []byte("1"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.WriteFile(knob, old, 0o644) })
	tp := newTopo(t, 1)
	a, b := tp.addVM("a", 0, 0x10), tp.addVM("b", 0, 0x11)
	p := a.plan("t1")
	p.LogSecurityEvents = true
	p.Ingress = rules(t, "ingress", "deny tcp from any to any port 4242", "allow all from any to any")
	tp.upsert(p)
	tp.upsert(b.plan("t1"))

	kmsg, err := os.Open("/dev/kmsg")
	if err != nil {
		t.Skipf("no /dev/kmsg: %v", err)
	}
	defer kmsg.Close()
	kmsg.Seek(0, 2) // SEEK_END: only new records
	lines := make(chan string, 100)
	go func() {
		sc := bufio.NewScanner(kmsg)
		for sc.Scan() {
			select {
			case lines <- sc.Text():
			default:
			}
		}
	}()
	b.connect(t, target{a.addr, 4242})
	want := fmt.Sprintf("SRC=%s", b.addr.StringExpanded())
	deadline := time.After(3 * time.Second)
	for {
		select {
		case l := <-lines:
			if strings.Contains(l, "metald-ipv6-deny") && strings.Contains(strings.ToLower(l), strings.ToLower(want)) && strings.Contains(l, "DPT=4242") {
				t.Logf("kernel log: %s", l)
				return
			}
		case <-deadline:
			t.Fatal("no metald-ipv6-deny kernel log line for the denied packet")
		}
	}
}

var _ = sync.Mutex{}

// TestSingleTableLayoutCleanedUp: a main table left by the single-table
// layout (NIC chains, maps, log chains and managed sets in
// metald_security) is cleaned up by the first commit: the operator's
// blocked_sources and its elements stay, vm_addrs follows the NICs, and the
// NICs are enforced from their shards.
func TestSingleTableLayoutCleanedUp(t *testing.T) {
	tp := newTopo(t, 1)
	a, b := tp.addVM("a", 0, 0x10), tp.addVM("b", 0, 0x11)
	old := `table ip6 metald_security {
	set blocked_sources { type ipv6_addr; flags interval; elements = { 2001:db8:9::1 } }
	set vm_addrs { type ipv6_addr; elements = { 2001:db8:1::10, 2001:db8:1::99 } }
	set tenant-t1 { type ipv6_addr; elements = { 2001:db8:1::10 } }
	chain log_deny { drop; }
	chain vm-old.eth0-in-g1 { goto log_deny; }
	chain vm-old.eth0-in-g0 { jump vm-old.eth0-in-g1; }
	map egress_by_src { type ipv6_addr : verdict; elements = { 2001:db8:1::99 : jump vm-old.eth0-in-g0 } }
	map ingress_by_dst { type ipv6_addr : verdict; }
	chain forward { type filter hook forward priority 0; policy accept; ip6 saddr vmap @egress_by_src; }
}
`
	f := t.TempDir() + "/old.nft"
	if err := os.WriteFile(f, []byte(old), 0o644); err != nil {
		t.Fatal(err)
	}
	tp.host.MustRun(t, "nft", "-f", f)
	m, err := New(tp.host.Fd())
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if n := m.NICs(); len(n) != 0 {
		t.Fatalf("NICs of the old layout loaded: %v", n)
	}
	pb := b.plan("t1")
	pb.Ingress = rules(t, "ingress", "allow tcp from any to any port 80", "deny all from any to any")
	for _, p := range []NICPolicy{a.plan("t1"), pb} {
		if err := m.Upsert(context.Background(), p); err != nil {
			t.Fatal(err)
		}
	}
	main := tp.host.MustRun(t, "nft", "list", "table", "ip6", TableName)
	for _, gone := range []string{"vm-old", "egress_by_src", "ingress_by_dst", "tenant-t1", "log_deny", "2001:db8:1::99"} {
		if strings.Contains(main, gone) {
			t.Errorf("main table still has %s:\n%s", gone, main)
		}
	}
	for _, kept := range []string{"2001:db8:9::1", a.addr.String(), b.addr.String()} {
		if !strings.Contains(main, kept) {
			t.Errorf("main table lacks %s:\n%s", kept, main)
		}
	}
	b.serve(t, "tcp:80", "tcp:81")
	expectFlows(t, flow{a, b, 80, true}, flow{a, b, 81, false})
}

// TestTrampolineLayoutMoved: a NIC of the layout before this one (its
// maps point at generation-0 chains whose only rule jumps to the main
// rules in a generation-N chain) is loaded after a restart, enforced as it
// was, and moved by its next update: the main rules go into the
// generation-0 chains and the generation-N chains are deleted.
func TestTrampolineLayoutMoved(t *testing.T) {
	tp, a, b, pb := port80Pair(t)
	// Turn b's chains into the earlier layout: the main chains become
	// generation 1, new generation-0 chains jump to them, and the maps
	// point at those (the rename keeps the map's references on the renamed
	// chain, so the elements are replaced).
	k := Key(b.name, "eth0")
	tbl := ShardTable(Shard(k))
	for _, d := range []struct{ dir, set string }{{dirIn, IngressMap}, {dirOut, ""}} {
		g0, g1 := chainName(k, d.dir, 0), chainName(k, d.dir, 1)
		tp.host.MustRun(t, "nft", "rename", "chain", "ip6", tbl, g0, g1)
		tp.host.MustRun(t, "nft", "add", "chain", "ip6", tbl, g0)
		tp.host.MustRun(t, "nft", "add", "rule", "ip6", tbl, g0, "jump", g1)
		if d.set == "" {
			continue // egress: the MAC map, below
		}
		for _, addr := range []netip.Addr{b.addr, b.ll} {
			tp.host.MustRun(t, "nft", "delete", "element", "ip6", tbl, d.set, "{", addr.String(), "}")
			tp.host.MustRun(t, "nft", "add", "element", "ip6", tbl, d.set, "{", addr.String(), ":", "jump", g0, "}")
		}
	}
	// That layout had no MAC dispatch.
	tp.host.MustRun(t, "nft", "delete", "element", "ip6", tbl, EgressMACMap, "{", b.mac.String(), "}")
	chains := func() int { return strings.Count(listTable(t, tp.host), "chain vm-b.eth0-") }
	if n := chains(); n != 4 {
		t.Fatalf("%d chains of b in the earlier layout, want 4", n)
	}
	expectFlows(t, flow{a, b, 80, true}, flow{a, b, 81, false})

	m := restartWith81(t, tp, pb)
	if n := chains(); n != 2 {
		t.Errorf("%d chains of b after its update, want its 2 generation-0 chains:\n%s", n, listTable(t, tp.host))
	}
	expectFlows(t, flow{a, b, 80, false}, flow{a, b, 81, true})
	if rc, err := m.RuleCounters(b.name, "eth0"); err != nil || len(rc) == 0 {
		t.Errorf("rule counters after the move: %v %v", rc, err)
	}
}
