package secevent

import (
	"encoding/binary"
	"net/netip"
	"slices"
	"testing"
)

// ip6 builds an IPv6 packet: fixed header + the given bytes after it.
func ip6(nh uint8, src, dst string, rest ...byte) []byte {
	b := make([]byte, 40, 40+len(rest))
	b[0] = 0x60
	b[1], b[2], b[3] = 0x0a, 0xbc, 0xde
	binary.BigEndian.PutUint16(b[4:6], uint16(len(rest)))
	b[6], b[7] = nh, 255
	s, d := netip.MustParseAddr(src).As16(), netip.MustParseAddr(dst).As16()
	copy(b[8:24], s[:])
	copy(b[24:40], d[:])
	return append(b, rest...)
}

func ext(next uint8, lenUnits uint8) []byte {
	h := make([]byte, 8*(int(lenUnits)+1))
	h[0], h[1] = next, lenUnits
	return h
}

func cat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

var parseCases = []struct {
	name  string
	pkt   []byte
	err   bool
	proto int
	exts  []uint8
	icmp  int
	sport uint16
	dport uint16
	trunc bool
	frag  bool
}{
	{name: "ra", pkt: ip6(58, "fe80::bad", "ff02::1", 134, 0, 0, 0), proto: 58, icmp: 134},
	{name: "echo", pkt: ip6(58, "2001:db8::1", "2001:db8::2", 128, 0, 0, 0, 0, 0, 0, 0), proto: 58, icmp: 128},
	{name: "udp dhcp", pkt: ip6(17, "fe80::1", "ff02::1:2", 0x02, 0x23, 0x02, 0x22, 0, 8, 0, 0), proto: 17, icmp: -1, sport: 547, dport: 546},
	{name: "tcp", pkt: ip6(6, "2001:db8::1", "2001:db8::2", 0x1f, 0x90, 0x00, 0x50), proto: 6, icmp: -1, sport: 8080, dport: 80},
	{name: "hbh then icmp", pkt: ip6(0, "fe80::1", "ff02::16", cat(ext(58, 0), []byte{143, 0, 0, 0})...), proto: 58, exts: []uint8{0}, icmp: 143},
	{name: "hbh routing dst udp", pkt: ip6(0, "2001:db8::1", "2001:db8::2", cat(ext(43, 0), ext(60, 1), ext(17, 0), []byte{0, 53, 0, 53})...), proto: 17, exts: []uint8{0, 43, 60}, icmp: -1, sport: 53, dport: 53},
	{name: "first fragment", pkt: ip6(44, "2001:db8::1", "2001:db8::2", cat([]byte{58, 0, 0, 1, 0, 0, 0, 1}, []byte{128, 0})...), proto: 58, exts: []uint8{44}, icmp: 128, frag: true},
	{name: "non-first fragment", pkt: ip6(44, "2001:db8::1", "2001:db8::2", cat([]byte{58, 0, 0x05, 0x00, 0, 0, 0, 1}, []byte{1, 2, 3, 4})...), proto: -1, exts: []uint8{44}, icmp: -1, frag: true},
	{name: "ah", pkt: ip6(51, "2001:db8::1", "2001:db8::2", cat([]byte{58, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, []byte{128, 0})...), proto: 58, exts: []uint8{51}, icmp: 128},
	{name: "esp", pkt: ip6(50, "2001:db8::1", "2001:db8::2", 1, 2, 3, 4), proto: 50, icmp: -1},
	{name: "truncated chain", pkt: ip6(0, "2001:db8::1", "2001:db8::2", 58, 4, 0, 0, 0, 0, 0, 0), proto: -1, exts: []uint8{0}, icmp: -1, trunc: true},
	{name: "hbh header short", pkt: ip6(0, "2001:db8::1", "2001:db8::2", 58, 0), proto: -1, exts: []uint8{0}, icmp: -1, trunc: true},
	{name: "icmp short", pkt: ip6(58, "2001:db8::1", "2001:db8::2", 134), proto: 58, icmp: -1, trunc: true},
	{name: "unknown nh 253", pkt: ip6(253, "2001:db8::1", "2001:db8::2", 1, 2), proto: 253, icmp: -1},
	{name: "ipv4", pkt: []byte{0x45, 0, 0, 20}, err: true},
	{name: "empty", pkt: nil, err: true},
	{name: "short header", pkt: []byte{0x60, 0, 0, 0}, err: true},
}

func TestParse(t *testing.T) {
	for _, c := range parseCases {
		t.Run(c.name, func(t *testing.T) {
			p, err := Parse(c.pkt)
			if (err != nil) != c.err {
				t.Fatalf("err = %v, want error %v", err, c.err)
			}
			if c.err {
				return
			}
			if p.Protocol != c.proto || p.ICMPv6Type != c.icmp || !slices.Equal(p.ExtHeaders, c.exts) ||
				p.SrcPort != c.sport || p.DstPort != c.dport || p.Truncated != c.trunc || p.Fragment != c.frag {
				t.Fatalf("got %+v", p)
			}
			if !p.Src.IsValid() || !p.Dst.IsValid() || p.FlowLabel != 0xabcde || p.HopLimit != 255 {
				t.Fatalf("header fields: %+v", p)
			}
		})
	}
}

func TestParseFrame(t *testing.T) {
	eth := []byte{0x33, 0x33, 0, 0, 0, 1, 0x02, 0, 0, 0, 1, 1, 0x86, 0xdd}
	f, err := ParseFrame(append(eth, ip6(58, "fe80::bad", "ff02::1", 134, 0, 0, 0)...))
	if err != nil || f.IPv6 == nil || f.IPv6.ICMPv6Type != 134 || f.Src.String() != "02:00:00:00:01:01" {
		t.Fatalf("frame: %+v %v", f, err)
	}
	tagged := cat(eth[:12], []byte{0x81, 0x00, 0x00, 0x64, 0x86, 0xdd}, ip6(58, "fe80::1", "ff02::1", 135, 0))
	f, err = ParseFrame(tagged)
	if err != nil || f.IPv6 == nil || !slices.Equal(f.VLANs, []uint16{100}) || f.IPv6.ICMPv6Type != 135 {
		t.Fatalf("tagged: %+v %v", f, err)
	}
	arp := cat(eth[:12], []byte{0x08, 0x06}, make([]byte, 28))
	f, err = ParseFrame(arp)
	if err != nil || f.IPv6 != nil || f.EtherType != 0x0806 {
		t.Fatalf("arp: %+v %v", f, err)
	}
}

func FuzzParse(f *testing.F) {
	for _, c := range parseCases {
		f.Add(c.pkt)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := Parse(b)
		if err == nil {
			if !p.Src.Is6() || !p.Dst.Is6() {
				t.Fatalf("addresses: %+v", p)
			}
			if len(p.ExtHeaders) > maxExtHeaders {
				t.Fatalf("walked %d headers", len(p.ExtHeaders))
			}
			var d Details
			p.fill(&d)
		}
		ParseFrame(b)
	})
}

func FuzzParsePrefix(f *testing.F) {
	f.Add("metald:tap-vm1:ra_guard")
	f.Add("metald::blocked_source")
	f.Add("metald:x:y:z")
	f.Fuzz(func(t *testing.T, s string) {
		dev, ctl, err := ParsePrefix(s)
		if err != nil {
			return
		}
		if got := Prefix(dev, ctl); got != s && got+" " != s && len(got) > MaxPrefixLen {
			t.Fatalf("round trip %q -> %q", s, got)
		}
	})
}

func TestPrefix(t *testing.T) {
	p := Prefix("tap-vm1", CtlRAGuard)
	if p != "metald:tap-vm1:ra_guard" {
		t.Fatal(p)
	}
	dev, ctl, err := ParsePrefix(p + " ")
	if err != nil || dev != "tap-vm1" || ctl != "ra_guard" {
		t.Fatal(dev, ctl, err)
	}
	longest := Prefix("abcdefghijklmno", "multicast_rate")
	if len(longest) > MaxPrefixLen {
		t.Fatal(len(longest))
	}
	for _, bad := range []string{"", "metald", "metald:tap", "other:tap:ra_guard", "metald:tap:", "metald:0123456789abcdefg:ra_guard"} {
		if _, _, err := ParsePrefix(bad); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
	for ctl, want := range map[string]EventType{
		"ra_guard": TypeRAGuardBlock, "mac_spoof": TypeSourceGuardViolation, "nd_strict": TypeSourceGuardViolation,
		"ext_routing": TypeExtensionHeaderBlock, "nd_rate": TypeNDRateLimitExceeded, "ra_rate": TypeRARateLimitExceeded,
		"icmpv6_rate": TypeICMPv6RateLimitExceeded, "multicast_rate": TypeMulticastRateLimitExceeded,
		"policy_deny": TypePolicyDeny, "blocked_source": TypeBlockedSource, "tenant_isolation": TypeTenantIsolationBlock,
		"something_new": TypeSecurityDrop,
	} {
		if c, _ := Classify(ctl); c.Type != want {
			t.Errorf("%s -> %s, want %s", ctl, c.Type, want)
		}
	}
	if c, _ := Classify("ext_hbh"); c.Header != "hop_by_hop" || c.Severity != SeverityMedium {
		t.Error(c)
	}
}
