package secpolicy

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
)

// port80Pair returns a topology with VMs a and b on br0 in tenant t1, b's
// ingress admitting TCP port 80 only (pb), and b serving ports 80 and 81.
func port80Pair(t *testing.T) (tp *topo, a, b *vm, pb NICPolicy) {
	t.Helper()
	tp = newTopo(t, 1)
	a, b = tp.addVM("a", 0, 0x10), tp.addVM("b", 0, 0x11)
	pb = b.plan("t1")
	pb.Ingress = rules(t, "ingress", "allow tcp from any to any port 80", "deny all from any to any")
	tp.upsert(a.plan("t1"))
	tp.upsert(pb)
	b.serve(t, "tcp:80", "tcp:81")
	return tp, a, b, pb
}

// restartWith81 changes pb to admit port 81 instead of 80 through a new
// Manager (a restarted metald), closed when the test ends, and returns it.
func restartWith81(t *testing.T, tp *topo, pb NICPolicy) *Manager {
	t.Helper()
	m, err := New(tp.host.Fd())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	pb.Ingress = rules(t, "ingress", "allow tcp from any to any port 81", "deny all from any to any")
	if err := m.Upsert(context.Background(), pb); err != nil {
		t.Fatal(err)
	}
	return m
}

// TestUntrackedNotLetThrough: the shards judge a connection by its first
// packet (nat chains), so a packet another table exempts from connection
// tracking would reach no NIC chain. Such packets from or to a VM are
// dropped by the main table and counted; with the exemption gone the
// policy applies as before.
func TestUntrackedNotLetThrough(t *testing.T) {
	tp, a, b, _ := port80Pair(t)
	expectFlows(t, flow{a, b, 80, true}, flow{a, b, 81, false})

	// Port 81 untracked both ways: unjudged, the SYN would pass and so
	// would b's reply (untracked too), and the connection would open.
	tp.host.MustRun(t, "nft", `add table ip6 notrack_probe
add chain ip6 notrack_probe pre { type filter hook prerouting priority -300; }
add rule ip6 notrack_probe pre tcp dport 81 notrack
add rule ip6 notrack_probe pre tcp sport 81 notrack`)
	before := untrackedDrops(t, tp)
	expectFlows(t, flow{a, b, 81, false})
	if after := untrackedDrops(t, tp); after <= before {
		t.Errorf("untracked drops %d -> %d, want more", before, after)
	}
	tp.host.MustRun(t, "nft", "delete", "table", "ip6", "notrack_probe")
	expectFlows(t, flow{a, b, 80, true}, flow{a, b, 81, false})
}

// untrackedDrops sums the packets of the main forward chain's untracked
// drop rules.
func untrackedDrops(t *testing.T, tp *topo) int {
	t.Helper()
	out := tp.host.MustRun(t, "nft", "list", "chain", "ip6", TableName, ChainForward)
	n := 0
	for _, l := range strings.Split(out, "\n") {
		if !strings.Contains(l, "untracked") || !strings.Contains(l, "drop") {
			continue
		}
		i := strings.Index(l, "counter packets ")
		if i < 0 {
			t.Fatalf("untracked rule without a counter: %s", l)
		}
		var p int
		fmt.Sscanf(l[i+len("counter packets "):], "%d", &p)
		n += p
	}
	return n
}

// TestFilterShardChainsReplaced: shard tables of the layout before this one
// (filter base chains at forward, input and output that every packet
// passed, and a map by source address) get the nat base chains on a
// restarted Manager's first commit, and their former base chains and map
// are deleted; the policy holds throughout.
func TestFilterShardChainsReplaced(t *testing.T) {
	tp, a, b, pb := port80Pair(t)
	// The former layout: every shard's dispatch in filter chains.
	var script strings.Builder
	for i := range Shards {
		tbl := ShardTable(i)
		for _, c := range []string{ChainNewPostrouting, ChainNewInput} {
			fmt.Fprintf(&script, "flush chain ip6 %s %s\ndelete chain ip6 %s %s\n", tbl, c, tbl, c)
		}
		// Its source-address map, which its chains looked up.
		fmt.Fprintf(&script, "add map ip6 %s %s { type ipv6_addr : verdict; }\n", tbl, EgressMap)
		for _, c := range []struct{ name, rules string }{
			{ChainForward, "ip6 saddr vmap @egress_by_src; ip6 daddr vmap @ingress_by_dst;"},
			{ChainInput, "ip6 saddr vmap @egress_by_src;"},
			{ChainOutput, "ip6 daddr vmap @ingress_by_dst;"},
		} {
			fmt.Fprintf(&script, "add chain ip6 %s %s { type filter hook %s priority 1; policy accept; ct state established,related accept; %s }\n", tbl, c.name, c.name, c.rules)
		}
	}
	f := t.TempDir() + "/old.nft"
	if err := os.WriteFile(f, []byte(script.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	tp.host.MustRun(t, "nft", "-f", f)
	expectFlows(t, flow{a, b, 80, true}, flow{a, b, 81, false})

	restartWith81(t, tp, pb)
	for i := range Shards {
		out := tp.host.MustRun(t, "nft", "list", "table", "ip6", ShardTable(i))
		for _, gone := range []string{"chain forward", "chain input", "chain output", "type filter", EgressMap} {
			if strings.Contains(out, gone) {
				t.Errorf("%s still has %q:\n%s", ShardTable(i), gone, out)
			}
		}
		for _, want := range []string{"chain " + ChainNewPostrouting, "chain " + ChainNewInput, "type nat hook postrouting", "type nat hook input"} {
			if !strings.Contains(out, want) {
				t.Errorf("%s lacks %q:\n%s", ShardTable(i), want, out)
			}
		}
	}
	expectFlows(t, flow{a, b, 80, false}, flow{a, b, 81, true})
}

const connectFromScript = `
import socket, sys
s = socket.socket(socket.AF_INET6)
s.settimeout(0.7)
s.bind((sys.argv[1], 0))
try:
    s.connect((sys.argv[2], int(sys.argv[3]))); s.sendall(b"ping"); print("ok" if s.recv(4) == b"ping" else "noecho")
except Exception:
    print("fail")
`

// TestEgressByMAC: a VM's egress chain is found by the frame's source MAC,
// so a packet from an address the policy was not given (a temporary
// address of privacy extensions, or any address when the source guard is
// off) is judged by the VM's egress rules like one from its own address.
func TestEgressByMAC(t *testing.T) {
	tp := newTopo(t, 1)
	a, b := tp.addVM("a", 0, 0x10), tp.addVM("b", 0, 0x11)
	pa := a.plan("t1")
	pa.Egress = rules(t, "egress", "allow tcp from any to any port 80", "deny all from any to any")
	tp.upsert(pa)
	tp.upsert(b.plan("t1"))
	b.serve(t, "tcp:80", "tcp:81")
	temp := "2001:db8:1::a7"
	a.ns.MustRun(t, "ip", "-6", "addr", "add", temp+"/64", "dev", "eth0", "nodad")
	from := func(src string, port int) string {
		t.Helper()
		out, err := a.ns.Run(py, "-c", connectFromScript, src, b.addr.String(), fmt.Sprint(port))
		if err != nil {
			t.Fatalf("connect: %v\n%s", err, out)
		}
		return strings.TrimSpace(out)
	}
	denied := func() uint64 {
		t.Helper()
		rc, err := tp.mgr.RuleCounters("a", "eth0")
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rc {
			if r.Direction == "egress" && strings.Contains(r.Rule, "deny all") {
				return r.Packets
			}
		}
		t.Fatalf("no egress deny counter in %+v", rc)
		return 0
	}
	before := denied()
	for _, c := range []struct {
		src  string
		port int
		want string
	}{{a.addr.String(), 80, "ok"}, {a.addr.String(), 81, "fail"}, {temp, 80, "ok"}, {temp, 81, "fail"}} {
		if got := from(c.src, c.port); got != c.want {
			t.Errorf("from %s to b port %d: %s, want %s", c.src, c.port, got, c.want)
		}
	}
	if after := denied(); after < before+2 {
		t.Errorf("egress deny counter %d -> %d, want both denied connections counted", before, after)
	}
}

// TestDuplicateMACRefused: two NICs cannot share a MAC (the egress
// dispatch key); the second is refused and nothing of it is programmed.
func TestDuplicateMACRefused(t *testing.T) {
	tp := newTopo(t, 1)
	a, b := tp.addVM("a", 0, 0x10), tp.addVM("b", 0, 0x11)
	tp.upsert(a.plan("t1"))
	pb := b.plan("t1")
	pb.MAC = a.mac
	if err := tp.mgr.Upsert(context.Background(), pb); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "MAC") {
		t.Fatalf("upsert with a's MAC: %v, want ErrInvalid naming the MAC", err)
	}
	if strings.Contains(listTable(t, tp.host), "vm-b.eth0") {
		t.Fatal("chains of the refused NIC exist")
	}
	tp.upsert(b.plan("t1")) // its own MAC is fine
}

// TestOtherShardCountReplaced: shard tables of a layout with another
// shard count (a NIC's chains in a table that is not its shard now) are
// not loaded; a restarted Manager's Apply recreates them in the same
// batch and programs every NIC in its shard. Here a stale NIC "ghost"
// holds b's address in a shard that is not its own, dropping everything.
func TestOtherShardCountReplaced(t *testing.T) {
	tp, a, b, pb := port80Pair(t)
	k := Key("ghost", "eth0")
	tbl := ShardTable((Shard(k) + 1) % Shards)
	in := chainName(k, dirIn, 0)
	tp.host.MustRun(t, "nft", "delete", "element", "ip6", NICTable(b.name, "eth0"), IngressMap, "{", b.addr.String(), "}")
	tp.host.MustRun(t, "nft", "add", "chain", "ip6", tbl, in)
	tp.host.MustRun(t, "nft", "add", "rule", "ip6", tbl, in, "drop")
	tp.host.MustRun(t, "nft", "add", "element", "ip6", tbl, IngressMap, "{", b.addr.String(), ":", "jump", in, "}")
	expectFlows(t, flow{a, b, 80, false})

	m, err := New(tp.host.Fd()) // a restarted metald
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if n := m.NICs(); len(n) != 0 {
		t.Fatalf("NICs loaded from a layout with another shard count: %v", n)
	}
	if err := m.Apply(context.Background(), []NICPolicy{a.plan("t1"), pb}); err != nil {
		t.Fatal(err)
	}
	if out := listTable(t, tp.host); strings.Contains(out, "ghost") {
		t.Errorf("stale chain left:\n%s", out)
	}
	expectFlows(t, flow{a, b, 80, true}, flow{a, b, 81, false})
}
