package secpolicy

import (
	"testing"
)

// TestStrictAcrossTenants is the seed's Example 2 with each tier in its own
// tenant, all strict: a cross-tenant flow passes only where the sender's
// egress rule and the receiver's ingress rule both name the peer; `any`
// covers the own tenant only.
func TestStrictAcrossTenants(t *testing.T) {
	tp := newTopo(t, 3)
	web, app, db := tp.addVM("web", 0, 0x100), tp.addVM("app", 1, 0x100), tp.addVM("db", 2, 0x100)
	web2 := tp.addVM("web2", 0, 0x101) // web's tenant, same tier
	pw := web.plan("t-web")
	pw.Ingress = rules(t, "ingress", "allow tcp from any to any port 80,443", "deny all from any to any")
	pw.Egress = rules(t, "egress", "allow tcp from any to 2001:db8:2::/64 port 8080",
		"allow tcp from any to any port 9000", "deny all from any to any")
	pa := app.plan("t-app")
	pa.Ingress = rules(t, "ingress", "allow tcp from 2001:db8:1::/64 to any port 8080",
		"allow tcp from any to any port 9000", "deny all from any to any")
	pa.Egress = rules(t, "egress", "allow tcp from any to 2001:db8:3::/64 port 5432", "deny all from any to any")
	pd := db.plan("t-db")
	pd.Ingress = rules(t, "ingress", "allow tcp from 2001:db8:2::/64 to any port 5432", "deny all from any to any")
	pd.Egress = rules(t, "egress", "deny all from any to any")
	pw2 := web2.plan("t-web")
	pw2.Ingress = rules(t, "ingress", "allow tcp from any to any port 9000", "deny all from any to any")
	for _, p := range []*NICPolicy{&pw, &pa, &pd, &pw2} {
		p.TenantIsolation = IsolationStrict
		tp.upsert(*p)
	}
	app.serve(t, "tcp:8080", "tcp:9000")
	db.serve(t, "tcp:5432")
	web2.serve(t, "tcp:9000")
	expectFlows(t,
		flow{web, app, 8080, true},  // both sides name the peer
		flow{web, db, 5432, false},  // neither side names it
		flow{app, db, 5432, true},   // both sides name the peer
		flow{web, app, 9000, false}, // both sides say only `any`
		flow{web, web2, 9000, true}, // own tenant: `any` suffices
	)
	// The receiver names the sender but the sender says `any`: blocked by
	// the sender's egress.
	pw.Egress = rules(t, "egress", "allow tcp from any to any port 8080,9000", "deny all from any to any")
	tp.upsert(pw)
	expectFlows(t, flow{web, app, 8080, false})
	// Moderate on both sides: an allow rule of any kind on each side
	// suffices.
	pw.TenantIsolation, pa.TenantIsolation = IsolationModerate, IsolationModerate
	tp.upsert(pw)
	tp.upsert(pa)
	expectFlows(t, flow{web, app, 8080, true}, flow{web, app, 9000, true}, flow{web, db, 5432, false})
}
