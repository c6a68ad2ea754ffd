package secpolicy

import (
	"context"
	"net/netip"
	"strings"
	"testing"
)

// TestUnusedSetsCollected: a tenant, bridge or security-group set goes
// (from every shard) with its last member and its last reference, so the
// sets of every tenant ever seen do not pile up; a set another NIC uses,
// or that has explicit members, stays, and so does vm_addrs. A restarted
// manager, which does not know the loaded NICs' policies, deletes nothing
// until Apply has programmed them. The remaining NIC's policy still holds
// (packets).
func TestUnusedSetsCollected(t *testing.T) {
	ctx := context.Background()
	tp := newTopo(t, 1)
	a, b, c := tp.addVM("a", 0, 0x10), tp.addVM("b", 0, 0x11), tp.addVM("c", 0, 0x12)
	pa := a.plan("ta")
	pa.SecurityGroups = []string{"web"}
	pa.Ingress = rules(t, "ingress", "allow tcp from sg:admins to any port 22", "deny all from any to any")
	tp.upsert(pa)
	pb := b.plan("tb")
	pb.Ingress = rules(t, "ingress", "allow tcp from any to any port 80", "deny all from any to any")
	tp.upsert(pb)
	if err := tp.mgr.SetGroupMembers(ctx, "ops", []netip.Addr{netip.MustParseAddr("2001:db8:9::1")}); err != nil {
		t.Fatal(err)
	}
	copies := func(name string) int { return strings.Count(listTable(t, tp.host), "set "+name+" {") }
	want := func(when string, sets map[string]int) {
		t.Helper()
		for name, n := range sets {
			if got := copies(name); got != n {
				t.Errorf("%s: %d copies of set %s, want %d", when, got, name, n)
			}
		}
	}
	want("two NICs", map[string]int{"tenant-ta": Shards, "tenant-tb": Shards, "bridge-br0": Shards, "sg-web": Shards, "sg-admins": Shards, "sg-ops": Shards, VMAddrsSet: Shards + 1})

	if err := tp.mgr.Remove(ctx, "a", "eth0"); err != nil {
		t.Fatal(err)
	}
	want("a removed", map[string]int{"tenant-ta": 0, "sg-web": 0, "sg-admins": 0, "tenant-tb": Shards, "bridge-br0": Shards, "sg-ops": Shards, VMAddrsSet: Shards + 1})

	// A restarted manager: b's policy is loaded from the kernel, not
	// known; emptying ops deletes nothing until Apply.
	m2, err := New(tp.host.Fd())
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	if err := m2.SetGroupMembers(ctx, "ops", nil); err != nil {
		t.Fatal(err)
	}
	want("restarted, before Apply", map[string]int{"sg-ops": Shards})
	if err := m2.Apply(ctx, []NICPolicy{pb}); err != nil {
		t.Fatal(err)
	}
	want("after Apply", map[string]int{"sg-ops": 0, "tenant-tb": Shards, "bridge-br0": Shards})

	// b's policy holds: port 80 from c connects, 22 does not.
	b.serve(t, "tcp:80", "tcp:22")
	got := c.connect(t, target{b.addr, 80}, target{b.addr, 22})
	if !got[0] || got[1] {
		t.Errorf("after the sets went: port 80 %v (want true), 22 %v (want false)", got[0], got[1])
	}

	if err := m2.Remove(ctx, "b", "eth0"); err != nil {
		t.Fatal(err)
	}
	want("b removed", map[string]int{"tenant-tb": 0, "bridge-br0": 0, VMAddrsSet: Shards + 1})
}

// TestResyncUndoesForeignChanges: an operator's nft commands that flush a
// NIC's chain, delete another NIC's whole shard table and flush the main
// forward chain open the policy up (packets prove it); Resync, given the
// desired policies, closes it again with every piece rebuilt: the flushed
// chain, the deleted table with its maps and sets (tenant isolation in it
// works again), the main chain.
func TestResyncUndoesForeignChanges(t *testing.T) {
	ctx := context.Background()
	tp := newTopo(t, 1)
	a, b, c := tp.addVM("a", 0, 0x10), tp.addVM("b", 0, 0x11), tp.addVM("c", 0, 0x12)
	pa := a.plan("ta")
	pa.Ingress = rules(t, "ingress", "allow tcp from any to any port 80", "deny all from any to any")
	pb := b.plan("ta")
	pb.TenantIsolation = IsolationStrict
	pc := c.plan("tc")
	for _, p := range []NICPolicy{pa, pb, pc} {
		tp.upsert(p)
	}
	a.serve(t, "tcp:80", "tcp:22")
	b.serve(t, "tcp:80")
	check := func(when string, want22, wantCrossTenant bool) {
		t.Helper()
		got := c.connect(t, target{a.addr, 80}, target{a.addr, 22}, target{b.addr, 80})
		if !got[0] || got[1] != want22 || got[2] != wantCrossTenant {
			t.Fatalf("%s: c->a:80 %v (want true), c->a:22 %v (want %v), c->b:80 (other tenant, b strict) %v (want %v)", when, got[0], got[1], want22, got[2], wantCrossTenant)
		}
		// b's own tenant reaches it (its shard's copy of tenant-ta holds a).
		if same := a.connect(t, target{b.addr, 80}); !same[0] {
			t.Fatalf("%s: a->b:80 (same tenant) refused", when)
		}
	}
	check("programmed", false, false)
	drifted := func(when string, want bool) {
		t.Helper()
		got, why, err := tp.mgr.Drifted()
		if err != nil || got != want {
			t.Fatalf("%s: Drifted %v (%q, %v), want %v", when, got, why, err, want)
		}
	}
	drifted("programmed", false)
	// An operator's blocked_sources element is not drift.
	tp.host.MustRun(t, "nft", "add", "element", "ip6", TableName, BlockedSources, "{ 2001:db8:bad::1 }")
	drifted("blocked_sources element added", false)

	ka, kb := Key("a", "eth0"), Key("b", "eth0")
	if Shard(ka) == Shard(kb) {
		t.Skip("a and b share a shard in this layout; the test needs two")
	}
	tp.host.MustRun(t, "nft", "flush", "chain", "ip6", ShardTable(Shard(ka)), chainName(ka, dirIn, 0))
	tp.host.MustRun(t, "nft", "delete", "table", "ip6", ShardTable(Shard(kb)))
	tp.host.MustRun(t, "nft", "flush", "chain", "ip6", TableName, ChainForward)
	check("after the operator's commands", true, true)
	drifted("after the operator's commands", true)

	if err := tp.mgr.Resync(ctx, []NICPolicy{pa, pb, pc}); err != nil {
		t.Fatal(err)
	}
	check("after Resync", false, false)
	drifted("after Resync", false)
	if out := tp.host.MustRun(t, "nft", "list", "set", "ip6", TableName, BlockedSources); !strings.Contains(out, "2001:db8:bad::1") {
		t.Fatalf("Resync lost the operator's blocked_sources:\n%s", out)
	}
	if out := tp.host.MustRun(t, "nft", "list", "chain", "ip6", TableName, ChainForward); !strings.Contains(out, "established") {
		t.Fatalf("main forward chain not rebuilt:\n%s", out)
	}
	// A second Resync of a matching kernel keeps it so.
	if err := tp.mgr.Resync(ctx, []NICPolicy{pa, pb, pc}); err != nil {
		t.Fatal(err)
	}
	check("after a second Resync", false, false)
}
