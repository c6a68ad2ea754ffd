package secpolicy

import (
	"net/netip"
	"testing"
)

// TestThreeTier is the seed's Example 2 with hex prefixes: web
// 2001:db8:1::/64 (dmz, br0), app 2001:db8:2::/64 (br1), db
// 2001:db8:3::/64 (br2), mgmt 2001:db8:4::/64, all in one tenant (the
// seed's own three strict tenants are TestStrictAcrossTenants here and
// TestThreeTierTenantsThroughDaemon through the API).
func TestThreeTier(t *testing.T) {
	tp := newTopo(t, 3)
	web, app, db := tp.addVM("web", 0, 0x100), tp.addVM("app", 1, 0x100), tp.addVM("db", 2, 0x100)
	pw := web.plan("app-customer")
	pw.Ingress = rules(t, "ingress", "allow tcp from any to any port 80,443",
		"allow icmpv6 type destination-unreachable,packet-too-big from any to any", "deny all from any to any")
	pw.Egress = rules(t, "egress", "allow tcp from any to 2001:db8:2::/64 port 8080",
		"allow tcp from any to 2001:4860:4860::/48 port 53",
		"allow icmpv6 type destination-unreachable,packet-too-big from any to any", "deny all from any to any")
	pa := app.plan("app-customer")
	pa.Ingress = rules(t, "ingress", "allow tcp from 2001:db8:1::/64 to any port 8080",
		"allow tcp from 2001:db8:4::/64 to any port 22",
		"allow icmpv6 type destination-unreachable,packet-too-big from any to any", "deny all from any to any")
	pa.Egress = rules(t, "egress", "allow tcp from any to 2001:db8:3::/64 port 5432",
		"allow tcp from any to 2001:4860:4860::/48 port 53",
		"allow icmpv6 type destination-unreachable,packet-too-big from any to any", "deny all from any to any")
	pd := db.plan("app-customer")
	pd.Ingress = rules(t, "ingress", "allow tcp from 2001:db8:2::/64 to any port 5432",
		"allow tcp from 2001:db8:4::/64 to any port 22",
		"allow icmpv6 type destination-unreachable,packet-too-big from any to any", "deny all from any to any")
	pd.Egress = rules(t, "egress", "allow tcp from any to 2001:4860:4860::/48 port 53",
		"allow icmpv6 type destination-unreachable,packet-too-big from any to any", "deny all from any to any")
	for _, p := range []*NICPolicy{&pw, &pa, &pd} {
		p.TenantIsolation, p.Microsegmentation, p.LogSecurityEvents = IsolationStrict, true, true
		tp.upsert(*p)
	}
	web.serve(t, "tcp:80", "tcp:5432")
	app.serve(t, "tcp:8080", "tcp:5432", "tcp:80")
	db.serve(t, "tcp:5432", "tcp:8080")
	expectFlows(t,
		flow{web, app, 8080, true},
		flow{web, db, 5432, false},
		flow{app, db, 5432, true},
		flow{app, db, 8080, false},  // app egress allows only 5432 to db
		flow{db, app, 8080, false},  // db egress denies
		flow{app, web, 80, false},   // app egress denies
		flow{web, app, 5432, false}, // web egress allows 8080 only
	)
	c, err := tp.mgr.RuleCounters("app", "eth0")
	if err != nil {
		t.Fatal(err)
	}
	var hit bool
	for _, r := range c {
		if r.Rule == "ingress[0]: allow tcp from 2001:db8:1::/64 to any port 8080" && r.Packets > 0 {
			hit = true
		}
	}
	if !hit {
		t.Errorf("app ingress[0] counter did not count: %+v", c)
	}
}

// TestStatefulReplies: ingress allows tcp 443 and egress denies all; a
// client still completes a connection (the replies are conntrack
// established), and the VM itself cannot open one.
func TestStatefulReplies(t *testing.T) {
	tp := newTopo(t, 2)
	srv, cli, far := tp.addVM("srv", 0, 0x10), tp.addVM("cli", 0, 0x11), tp.addVM("far", 1, 0x10)
	p := srv.plan("t1")
	p.Ingress = rules(t, "ingress", "allow tcp from any to any port 443", "deny all from any to any")
	p.Egress = rules(t, "egress", "deny all from any to any")
	tp.upsert(p)
	tp.upsert(cli.plan("t1"))
	tp.upsert(far.plan("t1"))
	srv.serve(t, "tcp:443", "tcp:80")
	cli.serve(t, "tcp:443")
	expectFlows(t,
		flow{cli, srv, 443, true}, // same bridge
		flow{far, srv, 443, true}, // routed
		flow{cli, srv, 80, false},
		flow{far, srv, 80, false},
		flow{srv, cli, 443, false},
	)
}

// TestSameBridgeAndRouted: one deny rule is enforced for a peer on the
// same bridge (br_netfilter) and for a routed peer alike.
func TestSameBridgeAndRouted(t *testing.T) {
	tp := newTopo(t, 2)
	b, same, routed := tp.addVM("b", 0, 0x10), tp.addVM("same", 0, 0x11), tp.addVM("routed", 1, 0x10)
	p := b.plan("t1")
	p.Ingress = rules(t, "ingress", "deny tcp from any to any port 22", "allow all from any to any")
	tp.upsert(p)
	tp.upsert(same.plan("t1"))
	tp.upsert(routed.plan("t1"))
	b.serve(t, "tcp:22", "tcp:80")
	expectFlows(t,
		flow{same, b, 22, false}, flow{same, b, 80, true},
		flow{routed, b, 22, false}, flow{routed, b, 80, true},
	)
	if st, err := BridgeNetfilterStatus(tp.host.Fd(), "br0"); err != nil || !st.Visible {
		t.Errorf("bridge status %+v %v", st, err)
	}
}

func TestListing(t *testing.T) {
	tp := newTopo(t, 1)
	a := tp.addVM("a", 0, 0x10)
	p := a.plan("t1")
	p.TenantIsolation, p.Microsegmentation, p.LogSecurityEvents = IsolationStrict, true, true
	p.AllowedDestinations = []netip.Prefix{netip.MustParsePrefix("2001:db8:1::/64"), netip.MustParsePrefix("2001:4860:4860::/48")}
	p.Ingress = rules(t, "ingress", "allow tcp from any to any port 80,443,8000-8100", "allow icmpv6 type destination-unreachable,packet-too-big from any to any", "allow tcp from sg:mgmt to any port 22 log", "deny all from any to any")
	tp.upsert(p)
	tp.upsert(p)
	t.Log(listTable(t, tp.host))
}
