package policy

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func mustParseList(t *testing.T, texts ...string) []Rule {
	t.Helper()
	rules, err := ParseList("rules", texts, ParseOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return rules
}

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

func tcp(src string, sport uint16, dst string, dport uint16) Packet {
	return Packet{Proto: ProtoTCP, Src: addr(src), Dst: addr(dst), SrcPort: sport, DstPort: dport}
}

func udp(src string, sport uint16, dst string, dport uint16) Packet {
	return Packet{Proto: ProtoUDP, Src: addr(src), Dst: addr(dst), SrcPort: sport, DstPort: dport}
}

func icmp(src, dst string, typ uint8) Packet {
	return Packet{Proto: ProtoICMPv6, Src: addr(src), Dst: addr(dst), ICMPType: typ}
}

var testResolver = Resolver{
	Prefix: func(text string) (netip.Prefix, error) {
		switch strings.ToLower(text) {
		case "2600:beef:1000:mgmt::/64":
			return netip.MustParsePrefix("2600:beef:1000:ff::/64"), nil
		}
		return netip.Prefix{}, errors.New("unknown label")
	},
	Group: func(name string) ([]netip.Prefix, error) {
		switch name {
		case "web":
			return []netip.Prefix{netip.MustParsePrefix("2001:db8:1::10/128"), netip.MustParsePrefix("2001:db8:1::11/128")}, nil
		case "empty":
			return nil, nil
		}
		return nil, errors.New("no such group")
	},
}

func TestMatch(t *testing.T) {
	// Example 1 (high-security web server) ingress rules, with the mgmt
	// label resolved.
	web, err := Resolve(mustParseList(t,
		"allow icmpv6 type destination-unreachable,packet-too-big,time-exceeded from any to any",
		"allow tcp from any to any port 80,443",
		"allow tcp from 2600:BEEF:1000:mgmt::/64 to any port 22",
		"deny all from any to any",
	), testResolver)
	if err != nil {
		t.Fatal(err)
	}
	noDefault := mustParseList(t,
		"allow tcp from any to any port 80",
		"deny tcp from 2001:db8:bad::/48 to any port 1-1024",
		"allow tcp from 2001:db8::/32 port 1024-65535 to any port 22,1000-2000,3000",
		"allow udp from any port 53 to any",
		"allow icmpv6 type 128,echo-reply from any to any",
		"deny icmpv6 from any to ff02::/16",
		"allow icmpv6 from fe80::/10 to any",
		"allow all from 2001:db8:a::1 to 2001:db8:b::/64",
	)
	groups, err := Resolve(mustParseList(t,
		"deny tcp from sg:empty to any",
		"allow tcp from sg:web to any port 5432",
		"deny all from sg:web to any",
	), testResolver)
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name    string
		rules   []Rule
		pkt     Packet
		index   int
		allowed bool
	}{
		{"empty list allows", nil, tcp("2001:db8::1", 1234, "2001:db8::2", 22), -1, true},
		{"empty non-nil list allows", []Rule{}, udp("2001:db8::1", 1, "2001:db8::2", 2), -1, true},

		{"web: http", web, tcp("2001:db8::1", 40000, "2600:beef:1000::10", 80), 1, true},
		{"web: https", web, tcp("2001:db8::1", 40000, "2600:beef:1000::10", 443), 1, true},
		{"web: ssh from mgmt", web, tcp("2600:beef:1000:ff::5", 40000, "2600:beef:1000::10", 22), 2, true},
		{"web: ssh from elsewhere", web, tcp("2600:beef:1000:fe::5", 40000, "2600:beef:1000::10", 22), 3, false},
		{"web: packet too big", web, icmp("2001:db8::1", "2600:beef:1000::10", 2), 0, true},
		{"web: echo request denied", web, icmp("2001:db8::1", "2600:beef:1000::10", 128), 3, false},
		{"web: udp 80 denied", web, udp("2001:db8::1", 1, "2600:beef:1000::10", 80), 3, false},

		{"first match wins over later deny", noDefault, tcp("2001:db8:bad::1", 5, "2001:db8::2", 80), 0, true},
		{"deny before allow", noDefault, tcp("2001:db8:bad::1", 5000, "2001:db8::2", 22), 1, false},
		{"src and dst ports", noDefault, tcp("2001:db8::1", 5000, "2001:db8::2", 22), 2, true},
		{"dst range low edge", noDefault, tcp("2001:db8::1", 5000, "2001:db8::2", 1000), 2, true},
		{"dst range high edge", noDefault, tcp("2001:db8::1", 5000, "2001:db8::2", 2000), 2, true},
		{"dst range past end", noDefault, tcp("2001:db8::1", 5000, "2001:db8::2", 2001), -1, false},
		{"dst single after range", noDefault, tcp("2001:db8::1", 5000, "2001:db8::2", 3000), 2, true},
		{"src port below range", noDefault, tcp("2001:db8::1", 1023, "2001:db8::2", 22), -1, false},
		{"src prefix mismatch", noDefault, tcp("2001:db9::1", 5000, "2001:db8::2", 22), -1, false},
		{"default deny", noDefault, tcp("2001:db8::1", 5000, "2001:db8::2", 443), -1, false},
		{"udp source port", noDefault, udp("2001:4860:4860::8888", 53, "2001:db8::2", 40000), 3, true},
		{"udp wrong source port", noDefault, udp("2001:4860:4860::8888", 54, "2001:db8::2", 53), -1, false},
		{"tcp rule does not match udp", noDefault, udp("2001:db8::1", 5000, "2001:db8::2", 80), -1, false},
		{"icmp type by number", noDefault, icmp("2001:db8::1", "ff02::1", 128), 4, true},
		{"icmp type by name", noDefault, icmp("2001:db8::1", "ff02::1", 129), 4, true},
		{"icmp other type to multicast", noDefault, icmp("fe80::1", "ff02::1", 135), 5, false},
		{"icmp from link-local", noDefault, icmp("fe80::1", "2001:db8::2", 135), 6, true},
		{"icmp from link-local with zone", noDefault, icmp("fe80::1%eth0", "2001:db8::2", 135), 6, true},
		{"icmp rule does not match tcp with same type byte", noDefault,
			Packet{Proto: ProtoTCP, Src: addr("2001:db9::1"), Dst: addr("2001:db8::2"), DstPort: 9, ICMPType: 128}, -1, false},
		{"all matches any protocol", noDefault,
			Packet{Proto: 50, Src: addr("2001:db8:a::1"), Dst: addr("2001:db8:b::9")}, 7, true},
		{"all with /128 source mismatch", noDefault,
			Packet{Proto: 50, Src: addr("2001:db8:a::2"), Dst: addr("2001:db8:b::9")}, -1, false},

		{"group member", groups, tcp("2001:db8:1::10", 1, "2001:db8::2", 5432), 1, true},
		{"group member wrong port", groups, tcp("2001:db8:1::11", 1, "2001:db8::2", 22), 2, false},
		{"not a group member", groups, tcp("2001:db8:1::12", 1, "2001:db8::2", 5432), -1, false},
	}
	for _, tt := range tests {
		i, ok := Match(tt.rules, tt.pkt)
		if i != tt.index || ok != tt.allowed {
			t.Errorf("%s: Match = (%d, %v), want (%d, %v)", tt.name, i, ok, tt.index, tt.allowed)
		}
	}
}

func TestMatchUnresolvedFailsClosed(t *testing.T) {
	rules := mustParseList(t,
		"allow udp from any to any port 53",
		"allow tcp from 2600:BEEF:1000:mgmt::/64 to any port 22",
		"allow tcp from sg:web to 2001:db8::/64",
		"allow tcp from any to any",
	)
	tests := []struct {
		name    string
		pkt     Packet
		index   int
		allowed bool
	}{
		{"earlier rule still decides", udp("2001:db8::1", 1, "2001:db8::2", 53), 0, true},
		{"unresolved symbolic stops and denies", tcp("2001:db8::1", 1, "2001:db8::2", 22), 1, false},
		{"ports rule out the unresolved rule", tcp("2001:db8::1", 1, "2001:db9::2", 80), 3, true},
		{"resolved side rules out the unresolved rule", tcp("2001:db8::1", 1, "2001:db9::2", 23), 3, true},
		{"unresolved group stops and denies", tcp("2001:db8::1", 1, "2001:db8::2", 23), 2, false},
	}
	for _, tt := range tests {
		i, ok := Match(rules, tt.pkt)
		if i != tt.index || ok != tt.allowed {
			t.Errorf("%s: Match = (%d, %v), want (%d, %v)", tt.name, i, ok, tt.index, tt.allowed)
		}
	}
	// A zero Rule has an invalid endpoint kind: never silently matched.
	if i, ok := Match([]Rule{{Action: ActionAllow, Proto: ProtoAll}}, tcp("::1", 1, "::2", 2)); i != 0 || ok {
		t.Errorf("zero endpoints: Match = (%d, %v), want (0, false)", i, ok)
	}
}

func TestResolve(t *testing.T) {
	rules := mustParseList(t,
		"allow tcp from 2600:BEEF:1000:mgmt::/64 to sg:web port 22",
		"allow tcp from sg:empty to any",
		"allow tcp from 2001:db8::/32 to any",
	)
	out, err := Resolve(rules, testResolver)
	if err != nil {
		t.Fatal(err)
	}
	if rules[0].Src.Resolved() || rules[0].Dst.Resolved() {
		t.Errorf("Resolve modified its input")
	}
	if got := out[0].Src.Prefix; got != netip.MustParsePrefix("2600:beef:1000:ff::/64") {
		t.Errorf("Src.Prefix = %v", got)
	}
	if got := out[0].Dst.Members; len(got) != 2 {
		t.Errorf("Dst.Members = %v", got)
	}
	if m := out[1].Src.Members; m == nil || len(m) != 0 || !out[1].Src.Resolved() {
		t.Errorf("empty group: Members = %#v", m)
	}
	if !out[2].Equal(rules[2]) {
		t.Errorf("plain rule changed")
	}
	// Resolution does not change the canonical text.
	if out[0].String() != rules[0].String() {
		t.Errorf("String changed: %q vs %q", out[0].String(), rules[0].String())
	}

	// Partial resolver: groups only.
	part, err := Resolve(rules, Resolver{Group: testResolver.Group})
	if err != nil {
		t.Fatal(err)
	}
	if part[0].Src.Resolved() || !part[0].Dst.Resolved() {
		t.Errorf("partial resolve: %+v", part[0])
	}

	for _, tt := range []struct {
		rule string
		res  Resolver
		want string
	}{
		{"allow tcp from 2600:beef:1:web::/64 to any", testResolver,
			`rule 0 ("allow tcp from 2600:beef:1:web::/64 to any"): resolve "2600:beef:1:web::/64": unknown label`},
		{"allow tcp from sg:nope to any", testResolver,
			`rule 0 ("allow tcp from sg:nope to any"): resolve security group "nope": no such group`},
		{"allow tcp from 2600:beef:1:web::/64 to any",
			Resolver{Prefix: func(string) (netip.Prefix, error) { return netip.MustParsePrefix("2600:beef:1:1::1/64"), nil }},
			`rule 0 ("allow tcp from 2600:beef:1:web::/64 to any"): resolve "2600:beef:1:web::/64": 2600:beef:1:1::1/64 has host bits set`},
		{"allow tcp from 2600:beef:1:web::/64 to any",
			Resolver{Prefix: func(string) (netip.Prefix, error) { return netip.MustParsePrefix("10.0.0.0/8"), nil }},
			`rule 0 ("allow tcp from 2600:beef:1:web::/64 to any"): resolve "2600:beef:1:web::/64": 10.0.0.0/8 is not IPv6`},
		{"allow tcp from sg:web to any",
			Resolver{Group: func(string) ([]netip.Prefix, error) { return []netip.Prefix{{}}, nil }},
			`rule 0 ("allow tcp from sg:web to any"): resolve security group "web": member invalid Prefix is not an IPv6 prefix`},
	} {
		_, err := Resolve(mustParseList(t, tt.rule), tt.res)
		if err == nil || err.Error() != tt.want {
			t.Errorf("Resolve(%q) = %v, want %s", tt.rule, err, tt.want)
		}
	}
}
