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
