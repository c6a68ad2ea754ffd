package secpolicy

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables/expr"

	"github.com/metald/metald/internal/secevent"
)

// logPrefixes returns the NFLOG prefixes and rates of a chain's rules.
func logPrefixes(rules []nrule) map[string]uint64 {
	out := map[string]uint64{}
	for _, r := range rules {
		var rate uint64
		for _, e := range r.exprs {
			switch x := e.(type) {
			case *expr.Limit:
				rate = x.Rate
			case *expr.Log:
				if x.Group != 0 {
					out[string(x.Data)] = rate
				}
			}
		}
	}
	return out
}

// Every counted drop of a NIC chain is preceded by a rate-limited NFLOG
// rule whose prefix secevent attributes to the device and rule; monitoring
// raises the rate and samples allows.
func TestEventLogRules(t *testing.T) {
	if EventLogGroup != secevent.DefaultGroup {
		t.Fatalf("EventLogGroup %d, secevent.DefaultGroup %d", EventLogGroup, secevent.DefaultGroup)
	}
	a := netip.MustParseAddr("2001:db8::10")
	p := &NICPolicy{VMID: "vm-1", NIC: "eth0", Tenant: "t1", HostDevice: "tap-vm-1234567", Addrs: []netip.Addr{a},
		Ingress:         rules(t, "ingress", "allow tcp from any to any port 80,443", "deny udp from any to any port 53"),
		TenantIsolation: IsolationModerate, EventLogGroup: EventLogGroup}
	all := func(c nicChains) []nrule {
		var rs []nrule
		for _, cs := range append(slices.Clone(c.helpers), c.main) {
			rs = append(rs, cs.rules...)
		}
		return rs
	}
	in := logPrefixes(all(buildChain(p, dirIn, "x")))
	want := map[string]uint64{
		"metald:tap-vm-1234567:policy_deny/ingress_rules[1]": EventLogRate,
		"metald:tap-vm-1234567:policy_deny/ingress_default":  EventLogRate,
	}
	for k, v := range want {
		if in[k] != v {
			t.Fatalf("ingress log rules %v, want %s at %d/s", in, k, v)
		}
	}
	if len(in) != len(want) {
		t.Fatalf("ingress log rules %v, want %v", in, want)
	}
	out := logPrefixes(all(buildChain(p, dirOut, "x")))
	if out["metald:tap-vm-1234567:tenant_isolation/egress_moderate"] != EventLogRate {
		t.Fatalf("egress log rules %v", out)
	}
	// A session below DEBUG logs every drop, and samples nothing allowed.
	p.Monitor = true
	in = logPrefixes(all(buildChain(p, dirIn, "x")))
	if in["metald:tap-vm-1234567:policy_deny/ingress_rules[1]"] != MonitorLogRate {
		t.Fatalf("monitored ingress log rules %v", in)
	}
	if _, ok := in["metald:tap-vm-1234567:allow_sample/ingress_rules[0]"]; ok {
		t.Fatalf("allowed packets sampled without SampleAllowed: %v", in)
	}
	// DEBUG: allowed packets are sampled too.
	p.SampleAllowed = true
	in = logPrefixes(all(buildChain(p, dirIn, "x")))
	if in["metald:tap-vm-1234567:policy_deny/ingress_rules[1]"] != MonitorLogRate || in["metald:tap-vm-1234567:allow_sample/ingress_rules[0]"] != AllowSampleRate {
		t.Fatalf("monitored (DEBUG) ingress log rules %v", in)
	}
	for pf := range in {
		dev, ctl, err := secevent.ParsePrefix(pf)
		if err != nil || dev != p.HostDevice {
			t.Fatalf("ParsePrefix(%q): %q %v", pf, dev, err)
		}
		if _, known := secevent.Classify(ctl); !known {
			t.Fatalf("control %q unknown to secevent", ctl)
		}
	}
	// Without a group nothing is added.
	p.EventLogGroup = 0
	if got := logPrefixes(all(buildChain(p, dirIn, "x"))); len(got) != 0 {
		t.Fatalf("log rules without a group: %v", got)
	}
	// The longest references fit the prefix limit.
	long := EventLogPrefix("tap-0123456789a", "policy_deny", "management_ingress[123]")
	if len(long) > secevent.MaxPrefixLen || strings.Count(long, ":") != 2 {
		t.Fatalf("prefix %q", long)
	}
}
