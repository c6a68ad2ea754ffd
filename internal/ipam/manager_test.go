package ipam

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"
)

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

type testLogWriter struct{ t testing.TB }

func (w testLogWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func newTestManager(t testing.TB, st Store, pools []PoolConfig) (*Manager, *clock) {
	t.Helper()
	c := &clock{t: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)}
	m, err := Open(context.Background(), st, pools, Options{
		AutoSubnetNames: true, Now: c.Now,
		Logger: slog.New(slog.NewTextHandler(testLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		t.Fatal(err)
	}
	return m, c
}

// seedPools cover every prefix of the seed's examples.
var seedPools = []PoolConfig{
	{ID: "dmz", Prefixes: []string{"2600:BEEF:1000::/48"}, Description: "web and dmz tiers"},
	{ID: "app", Prefixes: []string{"2600:BEEF:1001::/48"}, TenantIDs: []string{"app-customer-app"}},
	{ID: "secure", Prefixes: []string{"2600:BEEF:1002::/48"}, TenantIDs: []string{"app-customer-db"}},
	{ID: "financial", Prefixes: []string{"2600:BEEF:2000::/48", "2600:BEEF:2001::/48"}, TenantIDs: []string{"financial-services-corp"}, RateLimit: 1000},
}

func mustPrefix(t testing.TB, m *Manager, s string) netip.Prefix {
	t.Helper()
	p, err := m.ResolvePrefix(context.Background(), s)
	if err != nil {
		t.Fatalf("ResolvePrefix(%q): %v", s, err)
	}
	return p
}

func mustAddr(t testing.TB, m *Manager, s string) netip.Addr {
	t.Helper()
	a, err := m.ResolveAddr(context.Background(), s)
	if err != nil {
		t.Fatalf("ResolveAddr(%q): %v", s, err)
	}
	return a
}

func TestSeedExamples(t *testing.T) {
	ctx := context.Background()
	m, _ := newTestManager(t, NewMemStore(), seedPools)
	nics := []struct{ vm, nic, tenant, addr, gw string }{
		{"web", "eth0", "secure-web-customer", "2600:BEEF:1000:web::10/64", "2600:BEEF:1000:web::1"},
		{"dmz", "dmz", "app-customer-web", "2600:BEEF:1000:dmz::100/64", "2600:BEEF:1000:dmz::1"},
		{"app", "app", "app-customer-app", "2600:BEEF:1001:app::100/64", "2600:BEEF:1001:app::1"},
		{"db", "db", "app-customer-db", "2600:BEEF:1002:db::100/64", "2600:BEEF:1002:db::1"},
		{"fin", "primary", "financial-services-corp", "2600:BEEF:2000:fin::100/64", "2600:BEEF:2000:fin::1"},
		{"fin", "backup", "financial-services-corp", "2600:BEEF:2001:backup::100/64", "2600:BEEF:2001:backup::1"},
	}
	got := map[string]string{}
	for _, n := range nics {
		a, err := m.Reserve(ctx, Request{VMID: n.vm, NICID: n.nic, TenantID: n.tenant, Address: mustPrefix(t, m, n.addr), Gateway: mustAddr(t, m, n.gw)})
		if err != nil {
			t.Fatalf("%s/%s: %v", n.vm, n.nic, err)
		}
		// The gateway, RA source and policy prefixes resolve into the same subnet.
		base := n.addr[:strings.Index(n.addr, "::")]
		if p := mustPrefix(t, m, base+"::/64"); p != a.Prefix().Masked() {
			t.Errorf("%s::/64 resolves to %s, not %s", base, p, a.Prefix().Masked())
		}
		if gw := mustAddr(t, m, n.gw); !a.Prefix().Contains(gw) || gw != a.Gateway {
			t.Errorf("%s resolves to %s, outside %s", n.gw, gw, a.Prefix())
		}
		got[n.vm+"/"+n.nic] = a.Prefix().String()
	}
	want := map[string]string{
		"web/eth0":    "2600:beef:1000:1::10/64",
		"dmz/dmz":     "2600:beef:1000:2::100/64",
		"app/app":     "2600:beef:1001:1::100/64",
		"db/db":       "2600:beef:1002:db::100/64", // db is hex
		"fin/primary": "2600:beef:2000:1::100/64",
		"fin/backup":  "2600:beef:2001:1::100/64",
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("%s = %s, want %s", k, got[k], w)
		}
	}
	// Names used only in rules resolve consistently and per parent.
	mgmt1000 := mustPrefix(t, m, "2600:BEEF:1000:mgmt::/64")
	mgmt1002 := mustPrefix(t, m, "2600:BEEF:1002:mgmt::/64")
	if mgmt1000 != mustPrefix(t, m, "2600:beef:1000:MGMT::/64") {
		t.Error("mgmt under 2600:beef:1000::/48 resolves differently by case")
	}
	if mgmt1000.Addr().As16()[7] == 0 || mgmt1000 == netip.MustParsePrefix("2600:beef:1000:1::/64") || mgmt1000 == netip.MustParsePrefix("2600:beef:1000:2::/64") {
		t.Errorf("mgmt under 1000 = %s collides with web/dmz", mgmt1000)
	}
	if mgmt1002.Masked() == netip.MustParsePrefix("2600:beef:1002:db::/64") {
		t.Errorf("mgmt under 1002 took db's value: %s", mgmt1002)
	}
	if g, w := mgmt1000.String(), "2600:beef:1000:3::/64"; g != w {
		t.Errorf("mgmt under 1000 = %s, want %s", g, w)
	}
	if g, w := mgmt1002.String(), "2600:beef:1002:1::/64"; g != w {
		t.Errorf("mgmt under 1002 = %s, want %s", g, w)
	}
	if g := mustPrefix(t, m, "2600:BEEF:3000:backup::/64").String(); g != "2600:beef:3000:1::/64" {
		t.Errorf("backup under 3000 = %s", g)
	}
	if g := mustPrefix(t, m, "2600:BEEF:1000:web::/64").String(); g != "2600:beef:1000:1::/64" {
		t.Errorf("web again = %s", g)
	}
	if n := len(m.SubnetNames()); n != 8 {
		t.Errorf("%d names: %v", n, m.SubnetNames())
	}
}

func TestNameAvoidsUsedSubnets(t *testing.T) {
	ctx := context.Background()
	m, _ := newTestManager(t, NewMemStore(), []PoolConfig{
		{ID: "a", Prefixes: []string{"2600:beef:1000::/48"}},
		{ID: "b", Prefixes: []string{"2600:beef:1001:1::/64", "2600:beef:1001:2::/63"}},
	})
	if _, err := m.Reserve(ctx, Request{VMID: "v", NICID: "n", Address: netip.MustParsePrefix("2600:beef:1000:1::5/64")}); err != nil {
		t.Fatal(err)
	}
	if g := mustPrefix(t, m, "2600:beef:1000:x::/64").String(); g != "2600:beef:1000:2::/64" {
		t.Errorf("x under 1000 = %s (value 1 holds an allocation)", g)
	}
	if g := mustPrefix(t, m, "2600:beef:1001:x::/64").String(); g != "2600:beef:1001:4::/64" {
		t.Errorf("x under 1001 = %s (values 1-3 are pool subnets)", g)
	}
	v := uint16(0x42)
	n, err := m.DeclareSubnetName(ctx, netip.MustParsePrefix("2600:beef:1000::/48"), "Ops", &v)
	if err != nil || n.Name != "ops" || n.Prefix().String() != "2600:beef:1000:42::/64" {
		t.Fatalf("declare: %+v %v", n, err)
	}
	if _, err := m.DeclareSubnetName(ctx, netip.MustParsePrefix("2600:beef:1000::/48"), "other", &v); !errors.Is(err, ErrSubnetNameTaken) {
		t.Fatalf("taken value: %v", err)
	}
	if _, err := m.DeclareSubnetName(ctx, netip.MustParsePrefix("2600:beef:1000::/48"), "db", nil); !errors.Is(err, ErrInvalid) {
		t.Fatalf("hex name: %v", err)
	}
}

func TestAutoNamesOff(t *testing.T) {
	m, err := Open(context.Background(), NewMemStore(), nil, Options{AutoSubnetNames: false})
	if err != nil {
		t.Fatal(err)
	}
	_, err = m.ResolvePrefix(context.Background(), "2600:BEEF:1000:web::10/64")
	var ue *UnknownSubnetNameError
	if !errors.As(err, &ue) || ue.Name != "web" || !strings.Contains(err.Error(), `"web"`) {
		t.Fatalf("got %v", err)
	}
	if _, err := m.ResolvePrefix(context.Background(), "2600:BEEF:1000:db::10/64"); err != nil {
		t.Fatalf("hex must not need a name: %v", err)
	}
}

func TestDefaultPool(t *testing.T) {
	st := NewMemStore()
	m, _ := newTestManager(t, st, nil)
	ps := m.Pools()
	if len(ps) != 1 || ps[0].ID != "default" || len(ps[0].Prefixes) != 1 {
		t.Fatalf("pools %+v", ps)
	}
	p := ps[0].Prefixes[0]
	if p.Bits() != 48 || p.Addr().As16()[0] != 0xfd {
		t.Fatalf("default prefix %s is not a ULA /48", p)
	}
	m2, _ := newTestManager(t, st, nil)
	if got := m2.Pools(); len(got) != 1 || got[0].Prefixes[0] != p {
		t.Fatalf("default pool not kept: %+v", got)
	}
	a, err := m2.Reserve(context.Background(), Request{VMID: "v", NICID: "eth0", TenantID: "t"})
	if err != nil || a.Address != p.Addr().Next() || a.PrefixLen != 64 || a.PoolID != "default" {
		t.Fatalf("first automatic address %+v %v", a, err)
	}
}

func TestExhaustion120(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		prefix string
		n      int
	}{{"2600:beef::100/120", 256}, {"2600:beef::/120", 255}} {
		m, _ := newTestManager(t, NewMemStore(), []PoolConfig{{ID: "default", Prefixes: []string{tc.prefix}}})
		seen := map[netip.Addr]bool{}
		for i := 0; i < tc.n; i++ {
			a, err := m.Reserve(ctx, Request{VMID: fmt.Sprint("vm", i), NICID: "eth0", TenantID: "t"})
			if err != nil {
				t.Fatalf("%s: allocation %d: %v", tc.prefix, i, err)
			}
			if seen[a.Address] || !netip.MustParsePrefix(tc.prefix).Contains(a.Address) || a.PrefixLen != 120 {
				t.Fatalf("bad allocation %+v", a)
			}
			seen[a.Address] = true
		}
		if st, _ := m.Pool("default"); st.Utilization != 1 || st.Available.Sign() != 0 || st.Allocated != int64(tc.n) {
			t.Fatalf("status %+v", st)
		}
		_, err := m.Reserve(ctx, Request{VMID: "one-more", NICID: "eth0", TenantID: "t"})
		var ex *ExhaustedError
		if !errors.As(err, &ex) || err.Error() != "no available IPv6 addresses in pool 'default'" {
			t.Fatalf("%s: got %v", tc.prefix, err)
		}
		// Release one, get exactly that one back.
		if _, err := m.Release(ctx, "vm7"); err != nil {
			t.Fatal(err)
		}
		a, err := m.Reserve(ctx, Request{VMID: "one-more", NICID: "eth0", TenantID: "t"})
		if err != nil {
			t.Fatal(err)
		}
		if want := netip.MustParsePrefix(tc.prefix).Addr(); a.Address.Compare(want) < 0 || a.Address.As16()[15] != byte(7+256-tc.n) {
			t.Fatalf("reused %s", a.Address)
		}
		// Expanding the pool makes room again (the seed's resolution).
		desc := "expanded"
		if _, err := m.ExpandPool(ctx, "default", []netip.Prefix{netip.MustParsePrefix("2600:beef:1001::/48")}, &desc); err != nil {
			t.Fatal(err)
		}
		a, err = m.Reserve(ctx, Request{VMID: "after-expand", NICID: "eth0", TenantID: "t"})
		if err != nil || a.Address != netip.MustParseAddr("2600:beef:1001::1") {
			t.Fatalf("after expansion: %+v %v", a, err)
		}
	}
}

func TestQuota(t *testing.T) {
	ctx := context.Background()
	m, _ := newTestManager(t, NewMemStore(), []PoolConfig{{ID: "q", Prefixes: []string{"2600:beef::/48"}, MaxAllocations: 3}})
	for i := 0; i < 3; i++ {
		if _, err := m.Reserve(ctx, Request{VMID: fmt.Sprint(i), NICID: "n", PoolHint: "q"}); err != nil {
			t.Fatal(err)
		}
	}
	st, _ := m.Pool("q")
	if st.Utilization != 1 || st.Available.Sign() != 0 {
		t.Fatalf("status %+v", st)
	}
	_, err := m.Reserve(ctx, Request{VMID: "x", NICID: "n", Address: netip.MustParsePrefix("2600:beef::99/64")})
	if err == nil || err.Error() != "no available IPv6 addresses in pool 'q'" || FailureReason(err) != "quota" {
		t.Fatalf("got %v", err)
	}
}

func TestRateLimit(t *testing.T) {
	ctx := context.Background()
	st := NewMemStore()
	pools := []PoolConfig{{ID: "default", Prefixes: []string{"2600:beef::/48"}, RateLimit: 3}}
	m, c := newTestManager(t, st, pools)
	for i := 0; i < 3; i++ {
		if _, err := m.Reserve(ctx, Request{VMID: fmt.Sprint(i), NICID: "n", TenantID: "t1"}); err != nil {
			t.Fatal(err)
		}
		c.Add(10 * time.Minute)
	}
	_, err := m.Reserve(ctx, Request{VMID: "x", NICID: "n", TenantID: "t1"})
	var re *RateLimitError
	if !errors.As(err, &re) || re.Tenant != "t1" || re.Current != 3 || re.Limit != 3 || re.RetryAfter != 30*time.Minute {
		t.Fatalf("got %#v", err)
	}
	if !strings.Contains(err.Error(), `tenant "t1"`) || !strings.Contains(err.Error(), "retry after 30m0s") {
		t.Fatalf("message %q", err)
	}
	// Another tenant is not affected.
	if _, err := m.Reserve(ctx, Request{VMID: "y", NICID: "n", TenantID: "t2"}); err != nil {
		t.Fatal(err)
	}
	// The limit survives a restart.
	m2, _ := Open(ctx, st, pools, Options{Now: c.Now})
	if _, err := m2.Reserve(ctx, Request{VMID: "x", NICID: "n", TenantID: "t1"}); !errors.Is(err, ErrRateLimited) {
		t.Fatalf("after restart: %v", err)
	}
	c.Add(30*time.Minute + time.Second)
	if _, err := m.Reserve(ctx, Request{VMID: "x", NICID: "n", TenantID: "t1"}); err != nil {
		t.Fatalf("after the window: %v", err)
	}
}

func TestPermissionAndNotInPool(t *testing.T) {
	ctx := context.Background()
	m, _ := newTestManager(t, NewMemStore(), seedPools)
	_, err := m.Reserve(ctx, Request{VMID: "v", NICID: "n", TenantID: "intruder", Address: mustPrefix(t, m, "2600:BEEF:2000:fin::100/64")})
	var pe *PermissionError
	if !errors.As(err, &pe) || pe.PoolID != "financial" || pe.Tenant != "intruder" || strings.Join(pe.Allowed, ",") != "dmz" {
		t.Fatalf("got %v", err)
	}
	if !strings.Contains(err.Error(), `tenant "intruder" may not use address 2600:beef:2000:1::100 in pool 'financial' (pools allowed for the tenant: dmz)`) {
		t.Fatalf("message %q", err)
	}
	_, err = m.Reserve(ctx, Request{VMID: "v", NICID: "n", TenantID: "x", Address: netip.MustParsePrefix("2001:db8::10/64")})
	if !errors.Is(err, ErrNotInPool) || !strings.Contains(err.Error(), "not inside any pool") {
		t.Fatalf("got %v", err)
	}
	// Automatic allocation: a tenant with a dedicated pool gets it; others
	// need pool "default", which this configuration lacks.
	a, err := m.Reserve(ctx, Request{VMID: "v", NICID: "n", TenantID: "app-customer-app"})
	if err != nil || a.PoolID != "app" {
		t.Fatalf("dedicated pool: %+v %v", a, err)
	}
	if _, err := m.Reserve(ctx, Request{VMID: "w", NICID: "n", TenantID: "nobody"}); !errors.Is(err, ErrNotInPool) {
		t.Fatalf("no pool: %v", err)
	}
	if _, err := m.Reserve(ctx, Request{VMID: "w", NICID: "n", TenantID: "nobody", PoolHint: "secure"}); !errors.Is(err, ErrPermission) {
		t.Fatalf("hint: %v", err)
	}
	for _, bad := range []string{"fe80::1/64", "::1/128", "ff02::1/64", "::/64", "::ffff:10.0.0.1/120"} {
		if _, err := m.Reserve(ctx, Request{VMID: "w", NICID: "n", Address: netip.MustParsePrefix(bad)}); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v", bad, err)
		}
	}
}

func TestConflictAnycastGateway(t *testing.T) {
	ctx := context.Background()
	m, _ := newTestManager(t, NewMemStore(), seedPools)
	web := mustPrefix(t, m, "2600:BEEF:1000:web::10/64")
	gw := mustAddr(t, m, "2600:BEEF:1000:web::1")
	if _, err := m.Reserve(ctx, Request{VMID: "vm-a", NICID: "eth0", Address: web, Gateway: gw}); err != nil {
		t.Fatal(err)
	}
	// Idempotent retry.
	if a, err := m.Reserve(ctx, Request{VMID: "vm-a", NICID: "eth0", Address: web, Gateway: gw}); err != nil || a.Address != web.Addr() {
		t.Fatalf("retry: %v", err)
	}
	_, err := m.Reserve(ctx, Request{VMID: "vm-b", NICID: "eth1", Address: web, Gateway: gw})
	var ce *ConflictError
	if !errors.As(err, &ce) || ce.VMID != "vm-a" || ce.NICID != "eth0" || !strings.Contains(err.Error(), `vm "vm-a" interface "eth0"`) {
		t.Fatalf("got %v", err)
	}
	for _, tc := range []struct{ addr, gw, want string }{
		{"2600:BEEF:1000:web::/64", "", "subnet-router anycast"},
		{"2600:BEEF:1000:web::1/64", "2600:BEEF:1000:web::1", "is the gateway"},
		{"2600:BEEF:1000:web::1/64", "", "gateway of other interfaces"},
		{"2600:BEEF:1000:web::20/64", "2600:BEEF:1000:dmz::1", "outside the address's prefix"},
		// An on-link prefix wider than the subnet (a /16 route on the
		// bridge would take other pools and the outside world).
		{"2600:beef:1000:1::20/16", "", "wider than the address's subnet 2600:beef:1000:1::/64 (pool 'dmz'): use /64 or longer"},
		{"2600:beef:1000:1::20/56", "2600:beef:1000:1::1", "wider than the address's subnet"},
	} {
		req := Request{VMID: "vm-c", NICID: "eth0", Address: mustPrefix(t, m, tc.addr)}
		if tc.gw != "" {
			req.Gateway = mustAddr(t, m, tc.gw)
		}
		if _, err := m.Reserve(ctx, req); err == nil || !strings.Contains(err.Error(), tc.want) || !errors.Is(err, ErrInvalid) {
			t.Errorf("%s gw %s: %v, want %q", tc.addr, tc.gw, err, tc.want)
		}
	}
	// Automatic allocation in the gateway's subnet skips ::0, the gateway and ::10.
	var got []string
	for i := 0; i < 17; i++ {
		a, err := m.Reserve(ctx, Request{VMID: fmt.Sprint("auto", i), NICID: "eth0", TenantID: "t", Gateway: gw, Bridge: "br-dmz"})
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, a.Prefix().String())
	}
	if got[0] != "2600:beef:1000:1::2/64" || got[13] != "2600:beef:1000:1::f/64" || got[14] != "2600:beef:1000:1::11/64" {
		t.Fatalf("auto in gateway subnet: %v", got)
	}
	// Same bridge, no gateway: the bridge's subnet.
	a, err := m.Reserve(ctx, Request{VMID: "bridged", NICID: "eth0", TenantID: "t", Bridge: "br-dmz"})
	if err != nil || a.Address != netip.MustParseAddr("2600:beef:1000:1::14") {
		t.Fatalf("bridge subnet: %+v %v", a, err)
	}
	// Neither: the pool's first /64.
	a, err = m.Reserve(ctx, Request{VMID: "plain", NICID: "eth0", TenantID: "t", PoolHint: "dmz"})
	if err != nil || a.Address != netip.MustParseAddr("2600:beef:1000::1") {
		t.Fatalf("first /64: %+v %v", a, err)
	}
}

func TestOverlapAndPoolLifecycle(t *testing.T) {
	ctx := context.Background()
	m, _ := newTestManager(t, NewMemStore(), seedPools)
	_, err := m.CreatePool(ctx, Pool{ID: "x", Prefixes: []netip.Prefix{netip.MustParsePrefix("2600:beef:1000:5::/64")}})
	var oe *OverlapError
	if !errors.As(err, &oe) || oe.OtherPoolID != "dmz" {
		t.Fatalf("got %v", err)
	}
	if _, err := m.CreatePool(ctx, Pool{ID: "dmz", Prefixes: []netip.Prefix{netip.MustParsePrefix("2600:beef:9::/48")}}); !errors.Is(err, ErrPoolExists) {
		t.Fatalf("exists: %v", err)
	}
	if _, err := m.CreatePool(ctx, Pool{ID: "y", Prefixes: []netip.Prefix{netip.MustParsePrefix("2600:beef:9::1/48")}}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("host bits: %v", err)
	}
	if _, err := m.ExpandPool(ctx, "app", []netip.Prefix{netip.MustParsePrefix("2600:beef:1002:8000::/49")}, nil); !errors.Is(err, ErrOverlap) {
		t.Fatalf("expand overlap: %v", err)
	}
	if _, err := m.Reserve(ctx, Request{VMID: "v", NICID: "n", Address: netip.MustParsePrefix("2600:beef:1000::5/64")}); err != nil {
		t.Fatal(err)
	}
	if err := m.DeletePool(ctx, "dmz"); !errors.Is(err, ErrPoolNotEmpty) {
		t.Fatalf("delete non-empty: %v", err)
	}
	if _, err := m.Release(ctx, "v"); err != nil {
		t.Fatal(err)
	}
	if err := m.DeletePool(ctx, "dmz"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.CreatePool(ctx, Pool{ID: "x", Prefixes: []netip.Prefix{netip.MustParsePrefix("2600:beef:1000:5::/64")}}); err != nil {
		t.Fatalf("after delete: %v", err)
	}
}

func TestCleanup(t *testing.T) {
	ctx := context.Background()
	m, c := newTestManager(t, NewMemStore(), []PoolConfig{{ID: "default", Prefixes: []string{"2600:beef::/48"}}})
	for _, vm := range []string{"gone", "running", "terminated-long", "terminated-recent"} {
		if _, err := m.Reserve(ctx, Request{VMID: vm, NICID: "eth0"}); err != nil {
			t.Fatal(err)
		}
	}
	c.Add(2 * time.Hour)
	if _, err := m.Reserve(ctx, Request{VMID: "inflight", NICID: "eth0"}); err != nil {
		t.Fatal(err)
	}
	now := c.Now()
	live := func(vm string) (bool, time.Time) {
		switch vm {
		case "running":
			return true, time.Time{}
		case "terminated-long":
			return true, now.Add(-time.Hour)
		case "terminated-recent":
			return true, now.Add(-time.Minute)
		}
		return false, time.Time{}
	}
	out, err := m.Cleanup(ctx, live, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	var vms []string
	for _, a := range out {
		vms = append(vms, a.VMID)
	}
	if strings.Join(vms, ",") != "gone,terminated-long" {
		t.Fatalf("released %v", vms)
	}
	if n := len(m.Allocations()); n != 3 {
		t.Fatalf("%d left", n)
	}
}

func TestConcurrentReserve(t *testing.T) {
	ctx := context.Background()
	m, _ := newTestManager(t, NewMemStore(), []PoolConfig{{ID: "default", Prefixes: []string{"2600:beef::/48"}}})
	var wg sync.WaitGroup
	res := make([]Allocation, 64)
	errs := make([]error, 64)
	for i := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res[i], errs[i] = m.Reserve(ctx, Request{VMID: fmt.Sprint("vm", i), NICID: "eth0", TenantID: "t"})
		}()
	}
	wg.Wait()
	seen := map[netip.Addr]bool{}
	for i, a := range res {
		if errs[i] != nil || seen[a.Address] {
			t.Fatalf("%d: %+v %v", i, a, errs[i])
		}
		seen[a.Address] = true
	}
	if st, _ := m.Pool("default"); st.Allocated != 64 {
		t.Fatalf("allocated %d", st.Allocated)
	}
	// Dense: exactly ::1 .. ::40.
	for i := 1; i <= 64; i++ {
		if !seen[netip.MustParseAddr(fmt.Sprintf("2600:beef::%x", i))] {
			t.Fatalf("address ::%x lost", i)
		}
	}
}

func TestStoreFailureRollsBack(t *testing.T) {
	ctx := context.Background()
	st := NewMemStore()
	m, _ := newTestManager(t, st, []PoolConfig{{ID: "default", Prefixes: []string{"2600:beef::/48"}, RateLimit: 1}})
	st.Fail = errors.New("disk full")
	if _, err := m.Reserve(ctx, Request{VMID: "v", NICID: "n"}); err == nil {
		t.Fatal("no error")
	}
	st.Fail = nil
	a, err := m.Reserve(ctx, Request{VMID: "v", NICID: "n"})
	if err != nil || a.Address != netip.MustParseAddr("2600:beef::1") {
		t.Fatalf("after failure: %+v %v", a, err)
	}
	if got := m.Stats(); got.AllocationsLastHour != 1 || got.Pools[0].Allocated != 1 {
		t.Fatalf("stats %+v", got)
	}
}

func TestReserveBatchAllOrNothing(t *testing.T) {
	ctx := context.Background()
	m, _ := newTestManager(t, NewMemStore(), []PoolConfig{{ID: "default", Prefixes: []string{"2600:beef::/48"}}})
	_, err := m.ReserveBatch(ctx, []Request{
		{VMID: "v", NICID: "a"},
		{VMID: "v", NICID: "b", Address: netip.MustParsePrefix("2001:db8::1/64")},
	})
	if !errors.Is(err, ErrNotInPool) || len(m.Allocations()) != 0 {
		t.Fatalf("%v, %d left", err, len(m.Allocations()))
	}
}

// TestSubnetOnOneBridge: the host routes a subnet to one bridge, so an
// interface on another bridge may not take an address in it (explicitly
// or by its gateway); automatic allocation on a new bridge takes the
// pool's first subnet no other bridge uses, and a subnet whose last
// interface left is free for any bridge again.
func TestSubnetOnOneBridge(t *testing.T) {
	ctx := context.Background()
	m, _ := newTestManager(t, NewMemStore(), seedPools)
	a, err := m.Reserve(ctx, Request{VMID: "a", NICID: "eth0", Bridge: "br-a", Address: netip.MustParsePrefix("2600:beef:1000:5::10/64")})
	if err != nil {
		t.Fatal(err)
	}
	for _, req := range []Request{
		{VMID: "b", NICID: "eth0", Bridge: "br-b", Address: netip.MustParsePrefix("2600:beef:1000:5::20/64")},
		{VMID: "b", NICID: "eth0", Bridge: "br-b", Gateway: netip.MustParseAddr("2600:beef:1000:5::1"), PoolHint: "dmz"},
	} {
		_, err := m.Reserve(ctx, req)
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "subnet 2600:beef:1000:5::/64 is on bridge br-a (1 interface(s))") {
			t.Errorf("%+v: %v", req, err)
		}
	}
	// The same bridge may.
	if _, err := m.Reserve(ctx, Request{VMID: "c", NICID: "eth0", Bridge: "br-a", Address: netip.MustParsePrefix("2600:beef:1000:5::30/64")}); err != nil {
		t.Fatal(err)
	}
	// Automatic, no gateway: br-x takes the first /64, br-y the next.
	x, err := m.Reserve(ctx, Request{VMID: "x", NICID: "eth0", Bridge: "br-x", PoolHint: "dmz"})
	if err != nil {
		t.Fatal(err)
	}
	y, err := m.Reserve(ctx, Request{VMID: "y", NICID: "eth0", Bridge: "br-y", PoolHint: "dmz"})
	if err != nil {
		t.Fatal(err)
	}
	if x.Prefix().Masked().String() != "2600:beef:1000::/64" || y.Prefix().Masked().String() != "2600:beef:1000:1::/64" {
		t.Fatalf("automatic subnets %s and %s", x.Prefix(), y.Prefix())
	}
	// Once br-a's interfaces are gone, its subnet is anyone's.
	for _, id := range []string{"a", "c"} {
		if _, err := m.Release(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := m.Reserve(ctx, Request{VMID: "b", NICID: "eth0", Bridge: "br-b", Address: a.Prefix()}); err != nil {
		t.Fatalf("freed subnet: %v", err)
	}
}

// TestPoolFieldsChecked: a pool's id, limits and tenant ids are checked
// when it is created (config or API): a tenant id no VM could carry
// would make the pool unusable.
func TestPoolFieldsChecked(t *testing.T) {
	ctx := context.Background()
	m, _ := newTestManager(t, NewMemStore(), seedPools)
	pfx := []netip.Prefix{netip.MustParsePrefix("2600:beef:7000::/48")}
	for _, c := range []struct {
		p    Pool
		want string
	}{
		{Pool{ID: "bad id", Prefixes: pfx}, `pool id "bad id" must match`},
		{Pool{ID: "p", Prefixes: pfx, RateLimit: -1}, "rate_limit must not be negative"},
		{Pool{ID: "p", Prefixes: pfx, TenantIDs: []string{"Bad Tenant"}}, `tenant_ids: "Bad Tenant" is not a tenant id`},
		{Pool{ID: "p", Prefixes: pfx, TenantIDs: []string{""}}, `tenant_ids: "" is not a tenant id`},
	} {
		if _, err := m.CreatePool(ctx, c.p); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: %v, want %q", c.p, err, c.want)
		}
	}
	if _, err := m.CreatePool(ctx, Pool{ID: "p", Prefixes: pfx, TenantIDs: []string{"acme.prod-1"}}); err != nil {
		t.Fatal(err)
	}
}
