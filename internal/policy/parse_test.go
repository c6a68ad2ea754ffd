package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

// seedRules are every distinct ingress_rules / egress_rules string in the
// metald IPv6 security examples (shared seed 000_e3af946772c8f1a4).
var seedRules = []string{
	"allow icmpv6 type destination-unreachable,packet-too-big,time-exceeded from any to any",
	"allow tcp from any to any port 80,443",
	"allow tcp from 2600:BEEF:1000:mgmt::/64 to any port 22",
	"deny all from any to any",
	"allow tcp from any to any port 53,80,443",
	"allow icmpv6 type neighbor-solicitation,neighbor-advertisement from any to any",
	"allow icmpv6 type destination-unreachable,packet-too-big from any to any",
	"allow tcp from any to 2600:BEEF:1001:app::/64 port 8080",
	"allow tcp from any to 2001:4860:4860::/48 port 53",
	"allow tcp from 2600:BEEF:1000:dmz::/64 to any port 8080",
	"allow tcp from 2600:BEEF:1002:mgmt::/64 to any port 22",
	"allow tcp from any to 2600:BEEF:1002:db::/64 port 5432",
	"allow tcp from 2600:BEEF:1001:app::/64 to any port 5432",
	"allow tcp from 2600:BEEF:2000:fin::/64 to any port 443,8443",
	"allow tcp from any to 2600:BEEF:2000:fin::/64 port 443,8443,5432",
	"allow tcp from any to 2001:4860:4860::/48 port 853",
	"allow tcp from 2600:BEEF:2000:fin::/64 to any port 22",
	"allow tcp from any to 2600:BEEF:3000:backup::/64 port 443",
	"allow tcp from 2600:BEEF:1000::/64 to any port 80,443",
	"allow icmpv6 from any to any",
}

// moreValidRules exercise the rest of the grammar.
var moreValidRules = []string{
	"ALLOW TCP FROM ANY TO ANY PORT 80 LOG",
	"Deny Ip From Any To Any",
	"deny any from any to any log",
	"allow udp from any port 53 to any port 1024-65535",
	"allow udp from any port 1-65535 to any port 65535",
	"allow tcp from 2001:db8::1 to 2001:db8::2/128 port 22",
	"allow tcp from ::/0 to ::1",
	"allow icmpv6 type 128,129,1,200 from fe80::/10 to ff02::1",
	"allow icmpv6 type ECHO-REQUEST from any to any",
	"allow icmpv6 type router-solicitation,router-advertisement,redirect from fe80::/10 to any",
	"allow icmpv6 type mld-listener-query,mld-listener-report,mld-listener-done,mldv2-listener-report from any to ff02::/16",
	"allow icmpv6 type parameter-problem,echo-reply from any to any",
	"allow tcp from sg:dmz-web-servers to sg:db-tier port 5432 log",
	"allow tcp from SG:web.tier_1 to any",
	"deny tcp from sg:0 to any",
	"allow tcp from 2600:beef:1000:MGMT:0:0:0:0/64 to any",
	"allow tcp from 2600:beef:0000:mgmt::/64 to any",
	"allow tcp from mgmt::/16 to any",
	"allow tcp from 2600:beef:1000:mgmt::10 to any",
	"allow tcp from 2600:beef:1000:mgmt:0:0:0:10 to any",
	"allow tcp from 2600:beef:0:0:1:mgmt::/96 to any",
	"allow tcp from 2001:db8::zz to any",
	"allow tcp from ::ffff:10.0.0.0/104 to any",
	"  allow\ttcp   from any\nto any  ",
	"allow tcp from any to any port 80,80,443,1-1024",
	"allow tcp from any to any port 080",
}

func mustPrefix(s string) netip.Prefix { return netip.MustParsePrefix(s) }

var anyEP = Endpoint{Kind: EndpointAny, Text: "any"}

func TestParseSeedRules(t *testing.T) {
	rules, err := ParseList("security_policy.ingress_rules", seedRules, ParseOptions{})
	if err != nil {
		t.Fatalf("ParseList(seed) = %v", err)
	}
	if len(rules) != len(seedRules) {
		t.Fatalf("got %d rules, want %d", len(rules), len(seedRules))
	}
	for i, r := range rules {
		if r.Text != seedRules[i] {
			t.Errorf("rule %d Text = %q, want %q", i, r.Text, seedRules[i])
		}
	}
}

func TestParseTyped(t *testing.T) {
	tests := []struct {
		text string
		want Rule
	}{
		{
			"allow icmpv6 type destination-unreachable,packet-too-big,time-exceeded from any to any",
			Rule{Action: ActionAllow, Proto: ProtoICMPv6, ICMPTypes: []uint8{1, 2, 3}, Src: anyEP, Dst: anyEP},
		},
		{
			"allow tcp from any to any port 80,443",
			Rule{Action: ActionAllow, Proto: ProtoTCP, Src: anyEP, Dst: anyEP,
				DstPorts: []PortRange{{80, 80}, {443, 443}}},
		},
		{
			"allow tcp from 2600:BEEF:1000:mgmt::/64 to any port 22",
			Rule{Action: ActionAllow, Proto: ProtoTCP,
				Src:      Endpoint{Kind: EndpointPrefix, Text: "2600:BEEF:1000:mgmt::/64", Symbolic: true},
				Dst:      anyEP,
				DstPorts: []PortRange{{22, 22}}},
		},
		{
			"deny all from any to any",
			Rule{Action: ActionDeny, Proto: ProtoAll, Src: anyEP, Dst: anyEP},
		},
		{
			"allow icmpv6 type neighbor-solicitation,neighbor-advertisement from any to any",
			Rule{Action: ActionAllow, Proto: ProtoICMPv6, ICMPTypes: []uint8{135, 136}, Src: anyEP, Dst: anyEP},
		},
		{
			"allow tcp from any to 2001:4860:4860::/48 port 53",
			Rule{Action: ActionAllow, Proto: ProtoTCP, Src: anyEP,
				Dst:      Endpoint{Kind: EndpointPrefix, Text: "2001:4860:4860::/48", Prefix: mustPrefix("2001:4860:4860::/48")},
				DstPorts: []PortRange{{53, 53}}},
		},
		{
			// "db" is all hex digits, so this is a plain prefix.
			"allow tcp from any to 2600:BEEF:1002:db::/64 port 5432",
			Rule{Action: ActionAllow, Proto: ProtoTCP, Src: anyEP,
				Dst:      Endpoint{Kind: EndpointPrefix, Text: "2600:BEEF:1002:db::/64", Prefix: mustPrefix("2600:beef:1002:db::/64")},
				DstPorts: []PortRange{{5432, 5432}}},
		},
		{
			"allow tcp from any to 2600:BEEF:2000:fin::/64 port 443,8443,5432",
			Rule{Action: ActionAllow, Proto: ProtoTCP, Src: anyEP,
				Dst:      Endpoint{Kind: EndpointPrefix, Text: "2600:BEEF:2000:fin::/64", Symbolic: true},
				DstPorts: []PortRange{{443, 443}, {8443, 8443}, {5432, 5432}}},
		},
		{
			"allow icmpv6 from any to any",
			Rule{Action: ActionAllow, Proto: ProtoICMPv6, Src: anyEP, Dst: anyEP},
		},
		{
			"Deny Ip From ANY To Any",
			Rule{Action: ActionDeny, Proto: ProtoAll,
				Src: Endpoint{Kind: EndpointAny, Text: "ANY"}, Dst: Endpoint{Kind: EndpointAny, Text: "Any"}},
		},
		{
			"allow udp from any port 53 to any port 1024-65535 log",
			Rule{Action: ActionAllow, Proto: ProtoUDP, Src: anyEP, Dst: anyEP,
				SrcPorts: []PortRange{{53, 53}}, DstPorts: []PortRange{{1024, 65535}}, Log: true},
		},
		{
			"allow tcp from sg:dmz-web-servers to 2001:db8::1 port 5432",
			Rule{Action: ActionAllow, Proto: ProtoTCP,
				Src:      Endpoint{Kind: EndpointGroup, Text: "sg:dmz-web-servers", Group: "dmz-web-servers"},
				Dst:      Endpoint{Kind: EndpointPrefix, Text: "2001:db8::1", Prefix: mustPrefix("2001:db8::1/128")},
				DstPorts: []PortRange{{5432, 5432}}},
		},
		{
			"allow icmpv6 type 128,echo-reply,200 from fe80::/10 to any",
			Rule{Action: ActionAllow, Proto: ProtoICMPv6, ICMPTypes: []uint8{128, 129, 200},
				Src: Endpoint{Kind: EndpointPrefix, Text: "fe80::/10", Prefix: mustPrefix("fe80::/10")}, Dst: anyEP},
		},
	}
	for _, tt := range tests {
		got, err := Parse(tt.text, ParseOptions{})
		if err != nil {
			t.Errorf("Parse(%q) = %v", tt.text, err)
			continue
		}
		tt.want.Text = tt.text
		if !got.Equal(tt.want) || !equalExact(got, tt.want) {
			t.Errorf("Parse(%q) =\n  %#v\nwant\n  %#v", tt.text, got, tt.want)
		}
	}
}

// equalExact compares every field, Text included, with nil and empty
// slices equal.
func equalExact(a, b Rule) bool {
	return a.Equal(b) && a.Text == b.Text && a.Src.Text == b.Src.Text && a.Dst.Text == b.Dst.Text
}

func TestParseValid(t *testing.T) {
	for _, text := range slices.Concat(seedRules, moreValidRules) {
		if _, err := Parse(text, ParseOptions{}); err != nil {
			t.Errorf("Parse(%q) = %v", text, err)
		}
	}
}

func TestCanonicalString(t *testing.T) {
	tests := []struct{ in, want string }{
		{"ALLOW TCP FROM ANY TO ANY PORT 80 LOG", "allow tcp from any to any port 80 log"},
		{"Deny Ip From Any To Any", "deny all from any to any"},
		{"deny any from any to any log", "deny all from any to any log"},
		{"  allow\ttcp   from any\nto any  ", "allow tcp from any to any"},
		{"allow tcp from 2600:BEEF:1000:mgmt::/64 to any port 22", "allow tcp from 2600:beef:1000:mgmt::/64 to any port 22"},
		{"allow tcp from any to 2600:BEEF:1002:db::/64 port 5432", "allow tcp from any to 2600:beef:1002:db::/64 port 5432"},
		{"allow tcp from 2600:beef:1000:MGMT:0:0:0:0/64 to any", "allow tcp from 2600:beef:1000:mgmt::/64 to any"},
		{"allow tcp from 2600:beef:0000:mgmt::/64 to any", "allow tcp from 2600:beef:0:mgmt::/64 to any"},
		{"allow tcp from 2600:beef:0:0:1:mgmt::/96 to any", "allow tcp from 2600:beef::1:mgmt:0:0/96 to any"},
		{"allow tcp from 2600:beef:1000:mgmt:0:0:0:10 to any", "allow tcp from 2600:beef:1000:mgmt::10 to any"},
		{"allow tcp from 2001:db8::1 to 2001:db8::2/128 port 22", "allow tcp from 2001:db8::1 to 2001:db8::2 port 22"},
		{"allow icmpv6 type 128,129,1,200 from fe80::/10 to ff02::1", "allow icmpv6 type echo-request,echo-reply,destination-unreachable,200 from fe80::/10 to ff02::1"},
		{"allow tcp from SG:web.tier_1 to any", "allow tcp from sg:web.tier_1 to any"},
		{"allow udp from any port 1-65535 to any port 65535", "allow udp from any port 1-65535 to any port 65535"},
		{"allow tcp from any to any port 080", "allow tcp from any to any port 80"},
		{"allow tcp from any to any port 80-80", "allow tcp from any to any port 80"},
	}
	for _, tt := range tests {
		r, err := Parse(tt.in, ParseOptions{})
		if err != nil {
			t.Errorf("Parse(%q) = %v", tt.in, err)
			continue
		}
		if got := r.String(); got != tt.want {
			t.Errorf("Parse(%q).String() = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestRoundTrip(t *testing.T) {
	for _, text := range slices.Concat(seedRules, moreValidRules) {
		checkRoundTrip(t, text, ParseOptions{})
	}
}

// checkRoundTrip checks that a rule that parses re-parses from its String
// to an Equal rule and that String is a fixed point.
func checkRoundTrip(t *testing.T, text string, opts ParseOptions) {
	t.Helper()
	r, err := Parse(text, opts)
	if err != nil {
		t.Errorf("Parse(%q) = %v", text, err)
		return
	}
	s := r.String()
	r2, err := Parse(s, opts)
	if err != nil {
		t.Errorf("Parse(%q) ok but its String %q does not re-parse: %v", text, s, err)
		return
	}
	if !r2.Equal(r) {
		t.Errorf("round trip of %q via %q:\n  got  %#v\n  want %#v", text, s, r2, r)
	}
	if s2 := r2.String(); s2 != s {
		t.Errorf("String not canonical for %q: %q then %q", text, s, s2)
	}
}

var invalidRules = []struct{ text, want string }{
	{``,
		`col 1: expected "allow" or "deny", got end of rule`},
	{`   `,
		`col 4: expected "allow" or "deny", got end of rule`},
	{`permit tcp from any to any`,
		`col 1: expected "allow" or "deny", got "permit"`},
	{`alow tcp from any to any`,
		`col 1: expected "allow" or "deny", got "alow"`},
	{`allow`,
		`col 6: expected "tcp", "udp", "icmpv6" or "all", got end of rule`},
	{`allow tcpp from any to any`,
		`col 7: expected "tcp", "udp", "icmpv6" or "all", got "tcpp"`},
	{`allow icmp from any to any`,
		`col 7: expected "tcp", "udp", "icmpv6" or "all", got "icmp"`},
	{`allow tcp`,
		`col 10: expected "from", got end of rule`},
	{`allow tcp form any to any`,
		`col 11: expected "from", got "form"`},
	{`allow tcp any to any`,
		`col 11: expected "from", got "any"`},
	{`allow tcp from`,
		`col 15: expected endpoint ("any", IPv6 address, prefix or "sg:GROUP"), got end of rule`},
	{`allow tcp from to any`,
		`col 16: expected endpoint ("any", IPv6 address, prefix or "sg:GROUP"), got "to"`},
	{`allow tcp from any`,
		`col 19: expected "to", got end of rule`},
	{`allow tcp from any any`,
		`col 20: expected "to", got "any"`},
	{`allow tcp from any too any`,
		`col 20: expected "to", got "too"`},
	{`allow tcp from any to`,
		`col 22: expected endpoint ("any", IPv6 address, prefix or "sg:GROUP"), got end of rule`},
	{`allow tcp from any to port 80`,
		`col 23: expected endpoint ("any", IPv6 address, prefix or "sg:GROUP"), got "port"`},
	{`allow tcp from any to any port`,
		`col 31: expected port list, got end of rule`},
	{`allow tcp from any to any port log`,
		`col 32: expected port list, got "log"`},
	{`allow tcp from any to any port 80 extra`,
		`col 35: unexpected "extra" after end of rule`},
	{`allow tcp from any to any log extra`,
		`col 31: unexpected "extra" after end of rule`},
	{`allow tcp from any to any log log`,
		`col 31: unexpected "log" after end of rule`},
	{`allow tcp from any to any port 80 port 443`,
		`col 35: unexpected "port" after end of rule`},
	{`allow tcp type 1 from any to any`,
		`col 11: "type" is only valid with icmpv6`},
	{`deny all type echo-request from any to any`,
		`col 10: "type" is only valid with icmpv6`},
	{`allow udp type 128 from any to any`,
		`col 11: "type" is only valid with icmpv6`},
	{`allow icmpv6 type from any to any`,
		`col 19: expected icmpv6 type list, got "from"`},
	{`allow icmpv6 type`,
		`col 18: expected icmpv6 type list, got end of rule`},
	{`allow icmpv6 type echo-requst from any to any`,
		`col 19: unknown icmpv6 type "echo-requst" (did you mean "echo-request"?)`},
	{`allow icmpv6 type neighbour-solicitation from any to any`,
		`col 19: unknown icmpv6 type "neighbour-solicitation" (did you mean "neighbor-solicitation"?)`},
	{`allow icmpv6 type ping from any to any`,
		`col 19: unknown icmpv6 type "ping"`},
	{`allow icmpv6 type 256 from any to any`,
		`col 19: icmpv6 type 256 out of range 0..255`},
	{`allow icmpv6 type 1,,2 from any to any`,
		`col 21: empty element in icmpv6 type list "1,,2"`},
	{`allow icmpv6 type 1, 2 from any to any`,
		`col 20: icmpv6 type list "1," ends with "," (lists must not contain blanks)`},
	{`allow icmpv6 type ,1 from any to any`,
		`col 19: empty element in icmpv6 type list ",1"`},
	{`allow icmpv6 type echo-request,echo-replly from any to any`,
		`col 32: unknown icmpv6 type "echo-replly" (did you mean "echo-reply"?)`},
	{`allow icmpv6 type -1 from any to any`,
		`col 19: unknown icmpv6 type "-1"`},
	{`allow icmpv6 from any to any port 80`,
		`col 30: "port" is only valid with tcp or udp`},
	{`allow all from any to any port 80`,
		`col 27: "port" is only valid with tcp or udp`},
	{`allow icmpv6 from any port 80 to any`,
		`col 23: "port" is only valid with tcp or udp`},
	{`allow tcp from any to any port 70000`,
		`col 32: port 70000 out of range 1..65535`},
	{`allow tcp from any to any port 0`,
		`col 32: port 0 out of range 1..65535`},
	{`allow tcp from any to any port 65536`,
		`col 32: port 65536 out of range 1..65535`},
	{`allow tcp from any to any port 99999999999999999999999`,
		`col 32: port 99999999999999999999999 out of range 1..65535`},
	{`allow tcp from any to any port http`,
		`col 32: expected port number, got "http"`},
	{`allow tcp from any to any port 80,http`,
		`col 35: expected port number, got "http"`},
	{`allow tcp from any to any port 443-80`,
		`col 32: invalid port range "443-80": 443 > 80`},
	{`allow tcp from any to any port 80-`,
		`col 32: incomplete port range "80-"`},
	{`allow tcp from any to any port -80`,
		`col 32: incomplete port range "-80"`},
	{`allow tcp from any to any port 1-2-3`,
		`col 34: expected port number, got "2-3"`},
	{`allow tcp from any to any port 1-70000`,
		`col 34: port 70000 out of range 1..65535`},
	{`allow tcp from any to any port 80,,443`,
		`col 35: empty element in port list "80,,443"`},
	{`allow tcp from any to any port 80, 443`,
		`col 34: port list "80," ends with "," (lists must not contain blanks)`},
	{`allow tcp from any to any port ,80`,
		`col 32: empty element in port list ",80"`},
	{`allow udp from any port 0 to any`,
		`col 25: port 0 out of range 1..65535`},
	{`allow tcp from 10.0.0.1 to any`,
		`col 16: IPv4 address "10.0.0.1" not supported; rules are IPv6-only`},
	{`allow tcp from 10.0.0.0/8 to any`,
		`col 16: IPv4 prefix "10.0.0.0/8" not supported; rules are IPv6-only`},
	{`allow tcp from anyy to any`,
		`col 16: expected endpoint ("any", IPv6 address, prefix or "sg:GROUP"), got "anyy"`},
	{`allow tcp from web to any`,
		`col 16: expected endpoint ("any", IPv6 address, prefix or "sg:GROUP"), got "web"`},
	{`allow tcp from fe80::1%eth0 to any`,
		`col 16: invalid address "fe80::1%eth0": zoned addresses are not allowed`},
	{`allow tcp from 2001:db8::/129 to any`,
		`col 16: invalid prefix "2001:db8::/129": prefix length out of range`},
	{`allow tcp from 2001:db8::1/64 to any`,
		`col 16: prefix "2001:db8::1/64" has host bits set (did you mean "2001:db8::/64"?)`},
	{`allow tcp from 2001:db8:::1 to any`,
		`col 16: invalid address "2001:db8:::1": each colon-separated field must have at least one digit (at ":1")`},
	{`allow tcp from 2001:db8::1::2 to any`,
		`col 16: invalid address "2001:db8::1::2": multiple :: in address (at ":2")`},
	{`allow tcp from 2001:db8::/64/64 to any`,
		`col 16: invalid prefix "2001:db8::/64/64": more than one "/"`},
	{`allow tcp from 2600:BEEF:1000:mgmt::10/64 to any`,
		`col 16: prefix "2600:BEEF:1000:mgmt::10/64" has host bits set (did you mean "2600:beef:1000:mgmt::/64"?)`},
	{`allow tcp from 2600:beef:1000:mgmt::/48 to any`,
		`col 16: prefix "2600:beef:1000:mgmt::/48" puts label "mgmt" in the host part of /48`},
	{`allow tcp from 2600:BEEF:1000:mgmt:web::/64 to any`,
		`col 16: invalid prefix "2600:BEEF:1000:mgmt:web::/64": 2 symbolic labels ("mgmt", "web"); at most one group may be a label`},
	{`allow tcp from 2600:beef:1000:mgmt::/064 to any`,
		`col 16: invalid prefix "2600:beef:1000:mgmt::/064": invalid prefix length "064"`},
	{`allow tcp from 2600:beef:1000:mgmt::/200 to any`,
		`col 16: invalid prefix "2600:beef:1000:mgmt::/200": prefix length 200 out of range 0..128`},
	{`allow tcp from 2600:beef:1:2:3:4:5:mgmt:6 to any`,
		`col 16: invalid address "2600:beef:1:2:3:4:5:mgmt:6": 9 groups, want 8 (or fewer with "::")`},
	{`allow tcp from 2600:beef:mgmt to any`,
		`col 16: invalid address "2600:beef:mgmt": 3 groups, want 8 (or fewer with "::")`},
	{`allow tcp from 2600:beef:12345:mgmt::/64 to any`,
		`col 16: invalid prefix "2600:beef:12345:mgmt::/64": hex group "12345" longer than 4 digits`},
	{`allow tcp from 2600:beef:1g:mgmt::/64 to any`,
		`col 16: invalid prefix "2600:beef:1g:mgmt::/64": invalid group "1g" (want 1-4 hex digits or a label [a-z][a-z0-9-]{0,31})`},
	{`allow tcp from a123456789012345678901234567890123::/64 to any`,
		`col 16: invalid prefix "a123456789012345678901234567890123::/64": each group must have 4 or less digits (at "a123456789012345678901234567890123::")`},
	{`allow tcp from sg: to any`,
		`col 16: missing security group name after "sg:"`},
	{`allow tcp from sg:Web to any`,
		`col 16: invalid security group name "Web" (want [a-z0-9]([a-z0-9-_.]{0,61}[a-z0-9])?) (did you mean "sg:web"?)`},
	{`allow tcp from sg:-web to any`,
		`col 16: invalid security group name "-web" (want [a-z0-9]([a-z0-9-_.]{0,61}[a-z0-9])?)`},
	{`allow tcp from sg:web_ to any`,
		`col 16: invalid security group name "web_" (want [a-z0-9]([a-z0-9-_.]{0,61}[a-z0-9])?)`},
	{`allow tcp from any to sg:web/64`,
		`col 23: invalid security group name "web/64" (want [a-z0-9]([a-z0-9-_.]{0,61}[a-z0-9])?)`},
	{`allow tcp from :: to any port 80x`,
		`col 31: expected port number, got "80x"`},
	{`allow tcp from any to any port 80 log extra`,
		`col 39: unexpected "extra" after end of rule`},
	{`ALLOW TCP FROM ANY TO ANY PORT 80 LOG BOGUS`,
		`col 39: unexpected "BOGUS" after end of rule`},
	{`allow tcp from any port 22 to any port 22 log now`,
		`col 47: unexpected "now" after end of rule`},
	{`allow tcp from any to 2001:db8::/32 port 80 tcp`,
		`col 45: unexpected "tcp" after end of rule`},
	{`allow tcp from 2600:beef:abcdefghijklmnopqrstuvwxyzabcdefg::/64 to any`,
		`col 16: invalid prefix "2600:beef:abcdefghijklmnopqrstuvwxyzabcdefg::/64": label "abcdefghijklmnopqrstuvwxyzabcdefg" longer than 32 characters`},
	{`allow tcp from 2001:db8::g/64 to any`,
		`col 16: prefix "2001:db8::g/64" puts label "g" in the host part of /64`},
	{`allow tcp from ::ffff:10.0.0.0/104 to any port 1-65535,0`,
		`col 56: port 0 out of range 1..65535`},
}

func TestParseInvalid(t *testing.T) {
	if len(invalidRules) < 60 {
		t.Fatalf("only %d invalid rules", len(invalidRules))
	}
	for _, tt := range invalidRules {
		r, err := Parse(tt.text, ParseOptions{})
		if err == nil {
			t.Errorf("Parse(%q) = %v, want error %q", tt.text, r, tt.want)
			continue
		}
		var pe *ParseError
		if !errors.As(err, &pe) {
			t.Errorf("Parse(%q) error %T is not a *ParseError", tt.text, err)
		}
		if got := err.Error(); got != tt.want {
			t.Errorf("Parse(%q) error\n  got  %s\n  want %s", tt.text, got, tt.want)
		}
	}
}

func TestParseErrorFields(t *testing.T) {
	_, err := Parse("allow tcp form any to any", ParseOptions{})
	var pe *ParseError
	if !errors.As(err, &pe) {
		t.Fatalf("error %v is not a *ParseError", err)
	}
	want := ParseError{Col: 11, Expected: `"from"`, Got: "form"}
	if *pe != want {
		t.Errorf("got %+v, want %+v", *pe, want)
	}

	_, err = Parse("allow icmpv6 type 1,echo-requst from any to any", ParseOptions{})
	if !errors.As(err, &pe) {
		t.Fatalf("error %v is not a *ParseError", err)
	}
	want = ParseError{Col: 21, Got: "echo-requst", Msg: `unknown icmpv6 type "echo-requst"`, Hint: "echo-request"}
	if *pe != want {
		t.Errorf("got %+v, want %+v", *pe, want)
	}

	_, err = Parse("allow tcp from any to", ParseOptions{})
	if !errors.As(err, &pe) {
		t.Fatalf("error %v is not a *ParseError", err)
	}
	if pe.Col != 22 || pe.Got != "" || !strings.HasPrefix(pe.Expected, "endpoint") {
		t.Errorf("got %+v", *pe)
	}
}

func TestParseErrorLongToken(t *testing.T) {
	long := strings.Repeat("x", 100)
	_, err := Parse("allow tcp from any to any "+long, ParseOptions{})
	want := `col 27: unexpected "` + strings.Repeat("x", 64) + `"... after end of rule`
	if err == nil || err.Error() != want {
		t.Errorf("got %v, want %s", err, want)
	}
}

func TestParseList(t *testing.T) {
	_, err := ParseList("security_policy.ingress_rules", []string{
		"allow tcp from any to any port 80",
		"deny all from any to any",
		"allow udp from any to any form",
	}, ParseOptions{})
	want := `security_policy.ingress_rules[2]: col 27: unexpected "form" after end of rule`
	if err == nil || err.Error() != want {
		t.Fatalf("got %v, want %s", err, want)
	}
	var le *ListError
	if !errors.As(err, &le) || le.Field != "security_policy.ingress_rules" || le.Index != 2 {
		t.Fatalf("got %#v", err)
	}
	var pe *ParseError
	if !errors.As(err, &pe) || pe.Col != 27 {
		t.Fatalf("ListError does not unwrap to the ParseError: %#v", err)
	}

	rules, err := ParseList("security_policy.egress_rules", []string{
		"allow tcp form any to any",
		"allow tcp from any to any",
		"permit tcp from any to any",
	}, ParseOptions{})
	if rules != nil {
		t.Errorf("rules = %v, want nil on error", rules)
	}
	want = `security_policy.egress_rules[0]: col 11: expected "from", got "form"` + "\n" +
		`security_policy.egress_rules[2]: col 1: expected "allow" or "deny", got "permit"`
	if err == nil || err.Error() != want {
		t.Fatalf("got %v, want %s", err, want)
	}
	if !errors.As(err, &le) || le.Index != 0 {
		t.Errorf("errors.As found %#v, want index 0", le)
	}

	rules, err = ParseList("x", nil, ParseOptions{})
	if err != nil || len(rules) != 0 {
		t.Errorf("ParseList(nil) = %v, %v", rules, err)
	}
}

func TestCheck(t *testing.T) {
	var check func(string) error = ParseOptions{}.Check
	if err := check("allow tcp from any to any"); err != nil {
		t.Error(err)
	}
	if err := check("allow tcp form any to any"); err == nil {
		t.Error("Check accepted a bad rule")
	}
}

func TestSymbolicEndpoints(t *testing.T) {
	tests := []struct {
		text     string
		symbolic bool
		prefix   string // "" for unresolved
	}{
		{"2600:BEEF:1000:mgmt::/64", true, ""},
		{"2600:BEEF:1000:web::10", true, ""},
		{"MGMT::/16", true, ""},
		{"2001:db8::zz", true, ""},
		{"2600:BEEF:1002:db::/64", false, "2600:beef:1002:db::/64"},
		{"2600:beef:cafe:face::/64", false, "2600:beef:cafe:face::/64"},
		{"2001:db8::1", false, "2001:db8::1/128"},
	}
	for _, tt := range tests {
		r, err := Parse("allow tcp from "+tt.text+" to any", ParseOptions{})
		if err != nil {
			t.Errorf("%s: %v", tt.text, err)
			continue
		}
		e := r.Src
		if e.Kind != EndpointPrefix || e.Text != tt.text || e.Symbolic != tt.symbolic {
			t.Errorf("%s: got %+v", tt.text, e)
		}
		if tt.prefix == "" {
			if e.Prefix.IsValid() || e.Resolved() {
				t.Errorf("%s: symbolic prefix resolved to %v", tt.text, e.Prefix)
			}
		} else if e.Prefix != mustPrefix(tt.prefix) || !e.Resolved() {
			t.Errorf("%s: prefix %v, want %s", tt.text, e.Prefix, tt.prefix)
		}
	}
}

func TestDefaultParsePrefix(t *testing.T) {
	tests := []struct {
		in, want, err string
	}{
		{"2001:db8::/32", "2001:db8::/32", ""},
		{"2001:db8::1", "2001:db8::1/128", ""},
		{"2600:BEEF:1000:mgmt::/64", "invalid Prefix", ""},
		{"fe80::1%eth0", "", "zoned addresses are not allowed"},
		{"2600:beef:web:mgmt::/64", "", `2 symbolic labels ("web", "mgmt"); at most one group may be a label`},
		{"2001:db8::/129", "", "prefix length out of range"},
	}
	for _, tt := range tests {
		p, err := DefaultParsePrefix(tt.in)
		if tt.err != "" {
			if err == nil || err.Error() != tt.err {
				t.Errorf("DefaultParsePrefix(%q) error = %v, want %s", tt.in, err, tt.err)
			}
			continue
		}
		if err != nil || p.String() != tt.want {
			t.Errorf("DefaultParsePrefix(%q) = %v, %v; want %s", tt.in, p, err, tt.want)
		}
	}
}

// labelHook resolves the labels of the examples the way a metald host
// might: label -> 16-bit subnet id.
func labelHook(labels map[string]string) func(string) (netip.Prefix, error) {
	return func(s string) (netip.Prefix, error) {
		for l, hex := range labels {
			if i := strings.Index(strings.ToLower(s), ":"+l+":"); i >= 0 {
				return netip.ParsePrefix(s[:i+1] + hex + s[i+1+len(l):])
			}
		}
		if p, err := DefaultParsePrefix(s); err != nil || p.IsValid() {
			return p, err
		}
		return netip.Prefix{}, fmt.Errorf("unknown label in %q", s)
	}
}

func TestParsePrefixHook(t *testing.T) {
	opts := ParseOptions{ParsePrefix: labelHook(map[string]string{"mgmt": "f00d", "v4": "0", "host": "1"})}

	r, err := Parse("allow tcp from 2600:BEEF:1000:mgmt::/64 to any port 22", opts)
	if err != nil {
		t.Fatal(err)
	}
	want := Endpoint{Kind: EndpointPrefix, Text: "2600:BEEF:1000:mgmt::/64", Symbolic: true, Prefix: mustPrefix("2600:beef:1000:f00d::/64")}
	if !r.Src.Equal(want) || !r.Src.Resolved() {
		t.Errorf("Src = %+v, want %+v", r.Src, want)
	}
	if got := r.String(); got != "allow tcp from 2600:beef:1000:mgmt::/64 to any port 22" {
		t.Errorf("String() = %q", got)
	}
	checkRoundTrip(t, r.Text, opts)

	for _, tt := range []struct{ text, want string }{
		{"allow tcp from 2600:beef:1000:web::/64 to any",
			`col 16: invalid prefix "2600:beef:1000:web::/64": unknown label in "2600:beef:1000:web::/64"`},
		{"allow tcp from 2600:beef:1000:host::/56 to any",
			`col 16: prefix "2600:beef:1000:host::/56" has host bits set`},
	} {
		_, err := Parse(tt.text, opts)
		if err == nil || err.Error() != tt.want {
			t.Errorf("Parse(%q) = %v, want %s", tt.text, err, tt.want)
		}
	}

	v4 := ParseOptions{ParsePrefix: func(string) (netip.Prefix, error) { return mustPrefix("10.0.0.0/8"), nil }}
	_, err = Parse("allow tcp from 2001:db8::/32 to any", v4)
	if want := `col 16: prefix "2001:db8::/32" is not IPv6`; err == nil || err.Error() != want {
		t.Errorf("got %v, want %s", err, want)
	}
	none := ParseOptions{ParsePrefix: func(string) (netip.Prefix, error) { return netip.Prefix{}, nil }}
	_, err = Parse("allow tcp from 2001:db8::/32 to any", none)
	if want := `col 16: invalid prefix "2001:db8::/32": ParsePrefix returned no prefix`; err == nil || err.Error() != want {
		t.Errorf("got %v, want %s", err, want)
	}
	if _, err := Parse("allow tcp from 2600:beef:1:mgmt::/64 to any", none); err != nil {
		t.Errorf("hook leaving a symbolic prefix unresolved: %v", err)
	}
}

func TestEndpointEqual(t *testing.T) {
	a := Endpoint{Kind: EndpointPrefix, Text: "2600:BEEF:1000:MGMT:0::/64", Symbolic: true}
	b := Endpoint{Kind: EndpointPrefix, Text: "2600:beef:1000:mgmt::/64", Symbolic: true}
	c := Endpoint{Kind: EndpointPrefix, Text: "2600:beef:1000:web::/64", Symbolic: true}
	if !a.Equal(b) || a.Equal(c) {
		t.Errorf("symbolic equality wrong")
	}
	p1 := Endpoint{Kind: EndpointPrefix, Text: "2001:DB8::1", Prefix: mustPrefix("2001:db8::1/128")}
	p2 := Endpoint{Kind: EndpointPrefix, Text: "2001:db8::1/128", Prefix: mustPrefix("2001:db8::1/128")}
	if !p1.Equal(p2) {
		t.Errorf("plain endpoints differing only in spelling are not Equal")
	}
	g := Endpoint{Kind: EndpointGroup, Text: "sg:web", Group: "web"}
	g2 := g
	g2.Members = []netip.Prefix{}
	if g.Equal(g2) {
		t.Errorf("resolved and unresolved groups are Equal")
	}
	if (Endpoint{}).Resolved() || (Endpoint{}).String() != "invalid-endpoint" {
		t.Errorf("zero Endpoint misbehaves")
	}
}

func TestICMPTypeNames(t *testing.T) {
	for _, e := range icmpTypes {
		if got, ok := LookupICMPType(e.name); !ok || got != e.typ {
			t.Errorf("LookupICMPType(%q) = %d, %v", e.name, got, ok)
		}
		if got := ICMPTypeName(e.typ); got != e.name {
			t.Errorf("ICMPTypeName(%d) = %q", e.typ, got)
		}
	}
	if got := ICMPTypeName(200); got != "200" {
		t.Errorf("ICMPTypeName(200) = %q", got)
	}
	if _, ok := LookupICMPType("128"); ok {
		t.Errorf("LookupICMPType accepted a number")
	}
	for in, want := range map[string]string{
		"neighbour-advertisement": "neighbor-advertisement",
		"Echo-Requets":            "echo-request",
		"redirct":                 "redirect",
		"mldv2-listener-reprot":   "mldv2-listener-report",
		"ping":                    "",
		"echo":                    "",
	} {
		if got := suggestICMPType(in); got != want {
			t.Errorf("suggestICMPType(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestStringers(t *testing.T) {
	for _, tt := range []struct{ got, want string }{
		{ActionAllow.String(), "allow"},
		{ActionDeny.String(), "deny"},
		{Action(0).String(), "action(0)"},
		{ProtoAll.String(), "all"},
		{ProtoICMPv6.String(), "icmpv6"},
		{Proto(50).String(), "proto(50)"},
		{PortRange{1, 2}.String(), "1-2"},
		{PortRange{7, 7}.String(), "7"},
	} {
		if tt.got != tt.want {
			t.Errorf("got %q, want %q", tt.got, tt.want)
		}
	}
}

// TestAddressWithPrefixParser: an address endpoint means its /128 also
// when the caller's ParsePrefix accepts prefixes only (the daemon's, which
// resolves symbolic subnet names).
func TestAddressWithPrefixParser(t *testing.T) {
	strict := ParseOptions{ParsePrefix: func(s string) (netip.Prefix, error) { return netip.ParsePrefix(s) }}
	r, err := Parse("allow tcp from 2001:db8::1 to any port 22", strict)
	if err != nil {
		t.Fatal(err)
	}
	if r.Src.Prefix != netip.MustParsePrefix("2001:db8::1/128") {
		t.Fatalf("source %v, want 2001:db8::1/128", r.Src.Prefix)
	}
	if _, err := Parse("allow tcp from 2001:db8::zz to any", strict); err == nil || !strings.Contains(err.Error(), `invalid address "2001:db8::zz"`) {
		t.Fatalf("bad address: %v", err)
	}
}
