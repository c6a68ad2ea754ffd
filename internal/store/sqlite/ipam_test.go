package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/metald/metald/internal/ipam"
	"github.com/metald/metald/internal/store/storetest"
)

func openIPAM(t testing.TB, path string, pools []ipam.PoolConfig) (*ipam.Manager, *Store) {
	t.Helper()
	ctx := context.Background()
	s, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	st, err := s.IPAM(ctx)
	if err != nil {
		t.Fatal(err)
	}
	m, err := ipam.Open(ctx, st, pools, ipam.Options{AutoSubnetNames: true})
	if err != nil {
		s.Close()
		t.Fatal(err)
	}
	return m, s
}

func TestIPAMRestartPersistence(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "metald.db")
	pools := []ipam.PoolConfig{
		{ID: "dmz", Prefixes: []string{"2600:BEEF:1000::/48"}, Description: "dmz"},
		{ID: "fin", Prefixes: []string{"2600:BEEF:2000::/48"}, TenantIDs: []string{"financial-services-corp"}, RateLimit: 2, MaxAllocations: 10},
	}
	m, s := openIPAM(t, path, pools)
	web, err := m.ResolvePrefix(ctx, "2600:BEEF:1000:web::10/64")
	if err != nil {
		t.Fatal(err)
	}
	gw, _ := m.ResolveAddr(ctx, "2600:BEEF:1000:web::1")
	if _, err := m.Reserve(ctx, ipam.Request{VMID: "vm-web", NICID: "eth0", TenantID: "secure-web-customer", Address: web, Gateway: gw}); err != nil {
		t.Fatal(err)
	}
	var first []netip.Addr
	for i := 0; i < 5; i++ {
		a, err := m.Reserve(ctx, ipam.Request{VMID: fmt.Sprint("vm", i), NICID: "eth0", TenantID: "t", Gateway: gw, Bridge: "br-dmz"})
		if err != nil {
			t.Fatal(err)
		}
		first = append(first, a.Address)
	}
	if _, err := m.Release(ctx, "vm2"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Reserve(ctx, ipam.Request{VMID: "f1", NICID: "eth0", TenantID: "financial-services-corp", PoolHint: "fin"}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Reserve(ctx, ipam.Request{VMID: "f2", NICID: "eth0", TenantID: "financial-services-corp", PoolHint: "fin"}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.CreatePool(ctx, ipam.Pool{ID: "api", Prefixes: []netip.Prefix{netip.MustParsePrefix("2600:beef:3000::/48")}, Description: "from the API", TenantIDs: []string{"a", "b"}}); err != nil {
		t.Fatal(err)
	}
	desc := "grown"
	if _, err := m.ExpandPool(ctx, "api", []netip.Prefix{netip.MustParsePrefix("2600:beef:3001::/48")}, &desc); err != nil {
		t.Fatal(err)
	}
	before := m.Allocations()
	names := m.SubnetNames()
	poolsBefore := m.Pools()
	s.Close()

	m, s = openIPAM(t, path, pools)
	defer s.Close()
	if got := m.Allocations(); fmt.Sprint(got) != fmt.Sprint(before) {
		t.Fatalf("allocations changed across restart:\n%v\n%v", before, got)
	}
	if got := m.SubnetNames(); fmt.Sprint(got) != fmt.Sprint(names) {
		t.Fatalf("names changed: %v vs %v", names, got)
	}
	if got := m.Pools(); fmt.Sprint(got) != fmt.Sprint(poolsBefore) {
		t.Fatalf("pools changed:\n%v\n%v", poolsBefore, got)
	}
	if p, _ := m.ResolvePrefix(ctx, "2600:BEEF:1000:web::/64"); p != web.Masked() {
		t.Fatalf("web moved to %s", p)
	}
	// The allocator continues without duplicates: the hole first, then onwards.
	a, err := m.Reserve(ctx, ipam.Request{VMID: "vm-new", NICID: "eth0", TenantID: "t", Bridge: "br-dmz"})
	if err != nil || a.Address != first[2] {
		t.Fatalf("after restart got %v %v, want the released %s", a.Address, err, first[2])
	}
	a, err = m.Reserve(ctx, ipam.Request{VMID: "vm-new2", NICID: "eth0", TenantID: "t", Gateway: gw})
	if err != nil || a.Address.Compare(first[4]) <= 0 {
		t.Fatalf("after restart got %v %v", a.Address, err)
	}
	// The rate limit survives too.
	if _, err := m.Reserve(ctx, ipam.Request{VMID: "f3", NICID: "eth0", TenantID: "financial-services-corp", PoolHint: "fin"}); !errors.Is(err, ipam.ErrRateLimited) {
		t.Fatalf("rate limit after restart: %v", err)
	}
	// Direct store conflict: the UNIQUE address constraint holds.
	st, _ := s.IPAM(ctx)
	err = st.InsertAllocations(ctx, []ipam.Allocation{{Address: first[0], PrefixLen: 64, PoolID: "dmz", VMID: "x", NICID: "y", CreatedAt: time.Now()}}, nil)
	if !errors.Is(err, ipam.ErrConflict) {
		t.Fatalf("duplicate insert: %v", err)
	}
}

func TestIPAMConcurrentDurable(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "metald.db")
	m, s := openIPAM(t, path, nil) // default ULA pool
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := m.Reserve(ctx, ipam.Request{VMID: fmt.Sprint("vm", i), NICID: "eth0", TenantID: "t"}); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	s.Close()
	m, s = openIPAM(t, path, nil)
	defer s.Close()
	got := m.Allocations()
	seen := map[netip.Addr]bool{}
	for _, a := range got {
		seen[a.Address] = true
	}
	if len(got) != 64 || len(seen) != 64 || len(m.Pools()) != 1 {
		t.Fatalf("%d allocations (%d distinct), %d pools after reopen", len(got), len(seen), len(m.Pools()))
	}
}

// BenchmarkReserve100k measures durable single-allocation transactions
// with 100k allocations already in the pool (committed, WAL,
// synchronous=NORMAL).
func BenchmarkReserve100k(b *testing.B) {
	m, s := benchSetup(b)
	defer s.Close()
	ctx := context.Background()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := m.Reserve(ctx, ipam.Request{VMID: fmt.Sprint("b", i), NICID: "eth0", TenantID: "t"}); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "allocs/s")
}

// BenchmarkReserve100kBatch64 is the grouped-commit path: 64 NICs per
// transaction through ReserveBatch.
func BenchmarkReserve100kBatch64(b *testing.B) {
	m, s := benchSetup(b)
	defer s.Close()
	ctx := context.Background()
	b.ResetTimer()
	n := 0
	for n < b.N {
		reqs := make([]ipam.Request, 0, 64)
		for j := 0; j < 64 && n < b.N; j++ {
			reqs = append(reqs, ipam.Request{VMID: fmt.Sprint("b", n), NICID: "eth0", TenantID: "t"})
			n++
		}
		if _, err := m.ReserveBatch(ctx, reqs); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "allocs/s")
}

func benchSetup(b *testing.B) (*ipam.Manager, *Store) {
	b.Helper()
	ctx := context.Background()
	path := filepath.Join(b.TempDir(), "metald.db")
	pools := []ipam.PoolConfig{{ID: "default", Prefixes: []string{"2600:beef::/48"}}}
	m, s := openIPAM(b, path, pools)
	for i := 0; i < 100_000; i += 1000 {
		reqs := make([]ipam.Request, 1000)
		for j := range reqs {
			reqs[j] = ipam.Request{VMID: fmt.Sprint("pre", i+j), NICID: "eth0", TenantID: "t"}
		}
		if _, err := m.ReserveBatch(ctx, reqs); err != nil {
			b.Fatal(err)
		}
	}
	// Leave holes so allocation exercises the free-range tree.
	for i := 0; i < 100_000; i += 97 {
		if _, err := m.Release(ctx, fmt.Sprint("pre", i)); err != nil {
			b.Fatal(err)
		}
	}
	return m, s
}

func TestIPAMConformance(t *testing.T) {
	storetest.RunIPAM(t, func(t *testing.T) ipam.Store {
		s, err := Open(context.Background(), filepath.Join(t.TempDir(), "metald.db"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		st, err := s.IPAM(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		return st
	})
}

// A name a failed request assigned is gone from the database too: a
// restart does not bring it back, and its value goes to the next new name.
func TestIPAMNameRollbackDurable(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "metald.db")
	pools := []ipam.PoolConfig{{ID: "dmz", Prefixes: []string{"2600:BEEF:1000::/48"}}}
	m, s := openIPAM(t, path, pools)
	kept := m.BeginNames(ctx)
	if _, err := kept.ResolvePrefix("2600:BEEF:1000:web::10/64"); err != nil {
		t.Fatal(err)
	}
	kept.Commit()
	failed := m.BeginNames(ctx)
	p, err := failed.ResolvePrefix("2600:BEEF:1000:dmz::100/64")
	if err != nil || p != netip.MustParsePrefix("2600:beef:1000:2::100/64") {
		t.Fatalf("dmz resolved to %v, %v", p, err)
	}
	failed.Rollback()
	s.Close()

	m, s = openIPAM(t, path, pools)
	defer s.Close()
	var got []string
	for _, n := range m.SubnetNames() {
		got = append(got, fmt.Sprint(n.Name, "=", n.Value))
	}
	if fmt.Sprint(got) != "[web=1]" {
		t.Fatalf("names after restart: %v, want [web=1]", got)
	}
	if p, err := m.ResolvePrefix(ctx, "2600:BEEF:1000:app::/64"); err != nil || p != netip.MustParsePrefix("2600:beef:1000:2::/64") {
		t.Fatalf("next new name got %v, %v; want the freed value 2", p, err)
	}
}

// A database written before subnet names recorded tentativeness migrates
// with every existing name confirmed: a restart on the new schema keeps
// them all, and new rows record the mark.
func TestIPAMMigrationConfirmsExistingNames(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "metald.db")
	before := slices.IndexFunc(migrations, func(m string) bool {
		return strings.Contains(m, "ipam_subnet_names ADD COLUMN tentative")
	})
	if before < 0 {
		t.Fatal("no migration adds ipam_subnet_names.tentative")
	}
	// The schema as it was before that migration, with names in it.
	db, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	for i, m := range migrations[:before] {
		if _, err := db.ExecContext(ctx, m); err != nil {
			t.Fatalf("migration %d: %v", i+1, err)
		}
	}
	if _, err := db.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", before)); err != nil {
		t.Fatal(err)
	}
	for i, n := range []string{"web", "dmz"} {
		if _, err := db.ExecContext(ctx, `INSERT INTO ipam_subnet_names (parent, name, value, created_at) VALUES (?, ?, ?, ?)`,
			"2600:beef:1000::/48", n, i+1, time.Now().UnixNano()); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()

	pools := []ipam.PoolConfig{{ID: "dmz", Prefixes: []string{"2600:BEEF:1000::/48"}}}
	m, s := openIPAM(t, path, pools)
	defer s.Close()
	var v int
	if err := s.DB().QueryRow("PRAGMA user_version").Scan(&v); err != nil || v != len(migrations) {
		t.Fatalf("user_version %d (%v), want %d", v, err, len(migrations))
	}
	var got []string
	for _, n := range m.SubnetNames() {
		got = append(got, fmt.Sprint(n.Name, "=", n.Value, " tentative=", n.Tentative))
	}
	if want := "[dmz=2 tentative=false web=1 tentative=false]"; fmt.Sprint(got) != want {
		t.Fatalf("names after the migration: %v, want %s", got, want)
	}
	var marked int
	if err := s.DB().QueryRow(`SELECT count(*) FROM ipam_subnet_names WHERE tentative != 0`).Scan(&marked); err != nil || marked != 0 {
		t.Fatalf("%d tentative rows after the migration (%v), want 0", marked, err)
	}
	// New rows record the mark.
	tx := m.BeginNames(ctx)
	if _, err := tx.ResolvePrefix("2600:beef:1000:app::/64"); err != nil {
		t.Fatal(err)
	}
	if err := s.DB().QueryRow(`SELECT tentative FROM ipam_subnet_names WHERE name = 'app'`).Scan(&marked); err != nil || marked != 1 {
		t.Fatalf("app's tentative column %d (%v), want 1", marked, err)
	}
	tx.Commit()
	if err := s.DB().QueryRow(`SELECT tentative FROM ipam_subnet_names WHERE name = 'app'`).Scan(&marked); err != nil || marked != 0 {
		t.Fatalf("app's tentative column after commit %d (%v), want 0", marked, err)
	}
}
