package ipam

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"testing"
)

var namePools = []PoolConfig{{ID: "dmz", Prefixes: []string{"2600:BEEF:1000::/48"}}}

var parent48 = netip.MustParsePrefix("2600:beef:1000::/48")

// names lists the registry as "name=value" for the test parent, from the
// manager's memory and from a fresh load of its store, failing when they
// differ.
func names(t *testing.T, m *Manager) []string {
	t.Helper()
	var mem []string
	for _, n := range m.SubnetNames() {
		if n.Parent == parent48 {
			mem = append(mem, fmt.Sprintf("%s=%d", n.Name, n.Value))
		}
	}
	snap, err := m.st.Load(context.Background(), m.opts.Now())
	if err != nil {
		t.Fatal(err)
	}
	var stored []string
	for _, n := range snap.SubnetNames {
		if n.Parent == parent48 {
			stored = append(stored, fmt.Sprintf("%s=%d", n.Name, n.Value))
		}
	}
	slices.Sort(stored)
	if !slices.Equal(mem, stored) {
		t.Fatalf("memory %v and store %v disagree", mem, stored)
	}
	return mem
}

func wantNames(t *testing.T, m *Manager, want ...string) {
	t.Helper()
	slices.Sort(want)
	if got := names(t, m); !slices.Equal(got, want) {
		t.Fatalf("names %v, want %v", got, want)
	}
}

func txPrefix(t *testing.T, tx *NameTx, s string) netip.Prefix {
	t.Helper()
	p, err := tx.ResolvePrefix(s)
	if err != nil {
		t.Fatalf("tx.ResolvePrefix(%q): %v", s, err)
	}
	return p
}

func TestNameTxCommitKeeps(t *testing.T) {
	m, _ := newTestManager(t, NewMemStore(), namePools)
	tx := m.BeginNames(context.Background())
	if p := txPrefix(t, tx, "2600:BEEF:1000:dmz::100/64"); p != netip.MustParsePrefix("2600:beef:1000:1::100/64") {
		t.Fatalf("dmz = %s", p)
	}
	gw, err := tx.AddrParser()("2600:BEEF:1000:DMZ::1")
	if err != nil || gw != netip.MustParseAddr("2600:beef:1000:1::1") {
		t.Fatalf("gateway %v %v", gw, err)
	}
	if d := tx.Declared(); len(d) != 1 || d[0].Name != "dmz" || d[0].Value != 1 {
		t.Fatalf("declared %+v, want dmz=1 once", d)
	}
	tx.Commit()
	if d := tx.Declared(); len(d) != 0 {
		t.Fatalf("still tentative after commit: %+v", d)
	}
	tx.Rollback() // finished: no effect
	tx.Finish(false)
	wantNames(t, m, "dmz=1")
	if len(m.tentative) != 0 {
		t.Fatalf("tentative left after commit: %v", m.tentative)
	}
}

func TestNameTxRollbackRemovesAndFreesValue(t *testing.T) {
	ctx := context.Background()
	m, _ := newTestManager(t, NewMemStore(), namePools)
	mustPrefix(t, m, "2600:BEEF:1000:web::/64") // web=1, permanent
	tx := m.BeginNames(ctx)
	txPrefix(t, tx, "2600:BEEF:1000:dmz::100/64") // dmz=2
	txPrefix(t, tx, "2600:BEEF:1000:web::100/64") // existing: not the tx's
	if p := txPrefix(t, tx, "2600:BEEF:1000:app::/64"); p.Addr() != netip.MustParseAddr("2600:beef:1000:3::") {
		t.Fatalf("app = %s", p)
	}
	wantNames(t, m, "web=1", "dmz=2", "app=3")
	tx.Finish(false)
	wantNames(t, m, "web=1")
	tx.Commit() // finished: no effect
	wantNames(t, m, "web=1")
	// The freed values go to the next new names, lowest first.
	if p := mustPrefix(t, m, "2600:BEEF:1000:db-two::/64"); p.Addr() != netip.MustParseAddr("2600:beef:1000:2::") {
		t.Fatalf("next new name got %s, want the rolled-back value 2", p)
	}
	next := m.BeginNames(ctx)
	if p := txPrefix(t, next, "2600:BEEF:1000:dmz::/64"); p.Addr() != netip.MustParseAddr("2600:beef:1000:3::") {
		t.Fatalf("dmz again got %s, want 3", p)
	}
	next.Commit()
	wantNames(t, m, "web=1", "db-two=2", "dmz=3")
}

func TestNameTxPinnedByConcurrentTx(t *testing.T) {
	m, _ := newTestManager(t, NewMemStore(), namePools)
	a := m.BeginNames(context.Background())
	b := m.BeginNames(context.Background())
	txPrefix(t, a, "2600:BEEF:1000:dmz::100/64")
	if p := txPrefix(t, b, "2600:BEEF:1000:dmz::200/64"); p.Addr() != netip.MustParseAddr("2600:beef:1000:1::200") {
		t.Fatalf("b sees dmz at %s", p)
	}
	txPrefix(t, a, "2600:BEEF:1000:web::/64") // a's alone
	if d := a.Declared(); len(d) != 1 || d[0].Name != "web" {
		t.Fatalf("a still holds tentatively %+v, want only web", d)
	}
	if d := b.Declared(); len(d) != 0 {
		t.Fatalf("b declared %+v, want nothing", d)
	}
	a.Rollback()
	b.Rollback()
	wantNames(t, m, "dmz=1")
}

func TestNameTxPinnedByPlainResolution(t *testing.T) {
	ctx := context.Background()
	m, _ := newTestManager(t, NewMemStore(), namePools)
	for _, tc := range []struct {
		what string
		use  func() error
	}{
		{"ResolvePrefix", func() error { _, err := m.ResolvePrefix(ctx, "2600:beef:1000:n0::/64"); return err }},
		{"ResolveAddr", func() error { _, err := m.AddrParser(ctx)("2600:beef:1000:n1::5"); return err }},
		{"SubnetValue", func() error { _, err := m.SubnetValue(ctx, parent48, "N2"); return err }},
		{"DeclareSubnetName", func() error { _, err := m.DeclareSubnetName(ctx, parent48, "n3", nil); return err }},
	} {
		name := fmt.Sprintf("n%d", len(names(t, m)))
		tx := m.BeginNames(ctx)
		txPrefix(t, tx, "2600:beef:1000:"+name+"::/64")
		if err := tc.use(); err != nil {
			t.Fatalf("%s: %v", tc.what, err)
		}
		tx.Rollback()
		if got := names(t, m); !slices.Contains(got, fmt.Sprintf("%s=%d", name, len(got))) {
			t.Fatalf("%s did not pin %s: %v", tc.what, name, got)
		}
	}
	wantNames(t, m, "n0=1", "n1=2", "n2=3", "n3=4")
	// Plan parsers read a tentative name without pinning it.
	tx := m.BeginNames(ctx)
	txPrefix(t, tx, "2600:beef:1000:plan::/64")
	if a, err := m.PlanAddrParser()("2600:beef:1000:plan::7"); err != nil || a != netip.MustParseAddr("2600:beef:1000:5::7") {
		t.Fatalf("plan parser: %v %v", a, err)
	}
	if p, err := m.PlanPrefixParser()("2600:beef:1000:PLAN::/64"); err != nil || p.Addr() != netip.MustParseAddr("2600:beef:1000:5::") {
		t.Fatalf("plan prefix parser: %v %v", p, err)
	}
	tx.Rollback()
	wantNames(t, m, "n0=1", "n1=2", "n2=3", "n3=4")
}

func TestNameTxBoundContextAndAllocations(t *testing.T) {
	ctx := context.Background()
	m, _ := newTestManager(t, NewMemStore(), namePools)

	// The request's own allocation (under tx.Bind) does not pin; once it is
	// released the rollback removes the name.
	tx := m.BeginNames(ctx)
	bound := tx.Bind(ctx)
	p, err := m.ResolvePrefix(bound, "2600:beef:1000:own::10/64") // as the daemon's address adapter does
	if err != nil {
		t.Fatal(err)
	}
	if d := tx.Declared(); len(d) != 1 || d[0].Name != "own" {
		t.Fatalf("bound resolution did not go through the tx: %+v", d)
	}
	if _, err := m.Reserve(bound, Request{VMID: "vm1", NICID: "eth0", TenantID: "t", Address: p}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Release(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	tx.Rollback()
	wantNames(t, m)

	// Someone else's allocation in the subnet pins it.
	tx = m.BeginNames(ctx)
	p = txPrefix(t, tx, "2600:beef:1000:shared::10/64")
	if _, err := m.Reserve(ctx, Request{VMID: "vm2", NICID: "eth0", TenantID: "t", Address: netip.PrefixFrom(p.Masked().Addr().Next().Next(), 64)}); err != nil {
		t.Fatal(err)
	}
	if d := tx.Declared(); len(d) != 0 {
		t.Fatalf("foreign allocation did not pin: %+v", d)
	}
	tx.Rollback()
	wantNames(t, m, "shared=1")

	// An allocation elsewhere does not.
	tx = m.BeginNames(ctx)
	txPrefix(t, tx, "2600:beef:1000:alone::10/64")
	if _, err := m.Reserve(ctx, Request{VMID: "vm3", NICID: "eth0", TenantID: "t", Gateway: netip.MustParseAddr("2600:beef:1000:1::1")}); err != nil {
		t.Fatal(err)
	}
	if d := tx.Declared(); len(d) != 1 {
		t.Fatalf("allocation in another subnet pinned: %+v", d)
	}
	// The request's own allocation still held at rollback (its release
	// failed) keeps the name: the subnet is in use.
	own, err := m.Reserve(tx.Bind(ctx), Request{VMID: "vm4", NICID: "eth0", TenantID: "t", Address: txPrefix(t, tx, "2600:beef:1000:alone::10/64")})
	if err != nil {
		t.Fatal(err)
	}
	tx.Rollback()
	wantNames(t, m, "shared=1", "alone=2")
	if own.Address != netip.MustParseAddr("2600:beef:1000:2::10") {
		t.Fatalf("own allocation %s", own.Address)
	}
}

func TestNameTxRollbackStoreFailure(t *testing.T) {
	ctx := context.Background()
	st := NewMemStore()
	m, _ := newTestManager(t, st, namePools)
	tx := m.BeginNames(ctx)
	txPrefix(t, tx, "2600:beef:1000:dmz::/64")
	st.Fail = errors.New("disk gone")
	tx.Rollback() // logged, not fatal
	st.Fail = nil
	// Store and memory still agree: the name stays, tentative and owned by
	// no transaction, so the next start removes it.
	wantNames(t, m, "dmz=1")
	if owner := m.tentative[nameKey{parent48, "dmz"}]; owner != m.orphans {
		t.Fatalf("dmz after the failed delete: owner %p, want the orphans %p", owner, m.orphans)
	}
	wantStored(t, st, "dmz=1?")
	// A finished transaction resolves plainly: its new names are permanent.
	txPrefix(t, tx, "2600:beef:1000:late::/64")
	tx.Rollback()
	wantNames(t, m, "dmz=1", "late=2")
	wantStored(t, st, "dmz=1?", "late=2")
	// A cancelled request's context does not stop the rollback.
	cctx, cancel := context.WithCancel(ctx)
	tx = m.BeginNames(cctx)
	txPrefix(t, tx, "2600:beef:1000:gone::/64")
	cancel()
	tx.Rollback()
	wantNames(t, m, "dmz=1", "late=2")
	// A restart removes the name the rollback could not.
	m, _ = newTestManager(t, st, namePools)
	wantNames(t, m, "late=2")
	if len(m.tentative) != 0 {
		t.Fatalf("tentative left after the restart: %v", m.tentative)
	}
}

func TestNameTxAutoNamesOff(t *testing.T) {
	m, err := Open(context.Background(), NewMemStore(), namePools, Options{})
	if err != nil {
		t.Fatal(err)
	}
	tx := m.BeginNames(context.Background())
	_, err = tx.ResolvePrefix("2600:beef:1000:dmz::/64")
	var unk *UnknownSubnetNameError
	if !errors.As(err, &unk) || unk.Name != "dmz" {
		t.Fatalf("got %v, want UnknownSubnetNameError for dmz", err)
	}
	tx.Rollback()
	if n := m.SubnetNames(); len(n) != 0 {
		t.Fatalf("names %v", n)
	}
}

// Transactions racing for the same names: whatever the interleaving, a
// name survives exactly when a transaction that used it committed, and
// memory and store agree.
func TestNameTxConcurrent(t *testing.T) {
	ctx := context.Background()
	m, _ := newTestManager(t, NewMemStore(), namePools)
	const workers = 16
	var wg sync.WaitGroup
	var mu sync.Mutex
	committed := map[string]bool{}
	for i := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tx := m.BeginNames(ctx)
			used := []string{fmt.Sprintf("s%d", i%4), fmt.Sprintf("u%d", i)}
			for _, n := range used {
				if _, err := tx.ResolvePrefix("2600:beef:1000:" + n + "::/64"); err != nil {
					t.Error(err)
				}
			}
			ok := i%2 == 0
			tx.Finish(ok)
			if ok {
				mu.Lock()
				for _, n := range used {
					committed[n] = true
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	got := map[string]bool{}
	for _, n := range names(t, m) {
		name, _, _ := cut(n)
		got[name] = true
	}
	for n := range committed {
		if !got[n] {
			t.Errorf("committed name %s lost (have %v)", n, got)
		}
	}
	for i := 1; i < workers; i += 2 {
		if n := fmt.Sprintf("u%d", i); got[n] {
			t.Errorf("rolled-back name %s kept", n)
		}
	}
	if len(m.tentative) != 0 {
		t.Fatalf("tentative left: %v", m.tentative)
	}
}

func cut(s string) (string, string, bool) {
	for i := range s {
		if s[i] == '=' {
			return s[:i], s[i+1:], true
		}
	}
	return s, "", false
}
