package daemon_test

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/metald/metald/internal/daemon"
	"github.com/metald/metald/internal/ipam"
)

// The guide's Example 2 verbatim through the API: web, app and db tiers,
// each in its own tenant at tenant_isolation_level strict, on their own
// bridges. Across tenants a flow passes only where the sender's egress rule
// and the receiver's ingress rule both name the peer (by prefix or sg:), so
// the example's own flows work: web -> app 8080 and app -> db 5432 connect,
// web -> db 5432 does not. A cross-tenant flow that both sides allow only
// through `any` is blocked under strict and passes once both sides are
// moderate.
func TestThreeTierTenantsThroughDaemon(t *testing.T) {
	e := newEnvWith(t, func(o *daemon.Options) {
		o.Pools = []ipam.PoolConfig{
			{ID: "dmz", Prefixes: []string{"2600:BEEF:1000::/48"}},
			{ID: "app", Prefixes: []string{"2600:BEEF:1001::/48"}},
			{ID: "db", Prefixes: []string{"2600:BEEF:1002::/48"}, TenantIDs: []string{"app-customer-db"}},
		}
	})
	ids, addrs := map[string]string{}, map[string]string{}
	for _, tier := range []string{"web", "app", "db"} {
		out := e.mustCall("CreateVm", loadExample(t, "example2-"+tier+"-tier"))
		id := out["vmId"].(string)
		ids[tier] = id
		st := list(e.getVM(id)["networkStatus"])
		p, err := netip.ParsePrefix(str(st[0], "ipv6Address"))
		if err != nil {
			t.Fatalf("%s: address %v", tier, st)
		}
		addrs[tier] = p.Addr().String()
		e.mustCall("BootVm", map[string]any{"vm_id": id})
	}
	t.Logf("web %s, app %s, db %s", addrs["web"], addrs["app"], addrs["db"])
	for _, id := range ids {
		e.waitDAD(id)
	}
	e.startListener(t, ids["web"], "80")
	e.startListener(t, ids["app"], "8080", "9000", "5432")
	e.startListener(t, ids["db"], "5432", "8080")

	type probe struct {
		from, to, port string
		want           bool
	}
	check := func(when string, probes ...probe) {
		t.Helper()
		for _, p := range probes {
			if got := e.tcpConnect(t, ids[p.from], addrs[p.to], p.port); got != p.want {
				t.Errorf("%s: %s -> %s port %s: connected=%v, want %v", when, p.from, p.to, p.port, got, p.want)
			}
		}
	}
	check("guide's example",
		probe{"web", "app", "8080", true},
		probe{"web", "db", "5432", false},
		probe{"app", "db", "5432", true},
		probe{"app", "db", "8080", false}, // app's egress names db for 5432 only
		probe{"web", "app", "5432", false},
	)

	// Both sides allow tcp/9000 only through `any`: across tenants under
	// strict that is not enough.
	e.mustCall("UpdateSecurityPolicy", map[string]any{"vm_id": ids["web"], "security_policy": map[string]any{"egress_rules": []any{
		"allow tcp from any to 2600:BEEF:1001:app::/64 port 8080", "allow tcp from any to any port 9000", "deny all from any to any"}}})
	e.mustCall("UpdateSecurityPolicy", map[string]any{"vm_id": ids["app"], "security_policy": map[string]any{"ingress_rules": []any{
		"allow tcp from 2600:BEEF:1000:dmz::/64 to any port 8080", "allow tcp from any to any port 9000", "deny all from any to any"}}})
	check("`any` under strict", probe{"web", "app", "9000", false}, probe{"web", "app", "8080", true})
	// The drop is the strict check's: its counter on app's ingress counts.
	out := e.policyTables(t)
	if !strings.Contains(out, `comment "tenant-strict"`) {
		t.Errorf("no tenant-strict rule:\n%s", out)
	}
	// Under moderate, an allowing rule of any kind on each side suffices.
	for _, tier := range []string{"web", "app"} {
		e.mustCall("UpdateSecurityPolicy", map[string]any{"vm_id": ids[tier], "security_policy": map[string]any{"tenant_isolation_level": "moderate"}})
	}
	check("`any` under moderate", probe{"web", "app", "9000", true}, probe{"web", "db", "5432", false})
}
