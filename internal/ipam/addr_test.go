package ipam

import (
	"net/netip"
	"strings"
	"testing"
)

func TestParseAddr(t *testing.T) {
	tests := []struct {
		in     string
		plain  string // canonical plain form, or ""
		name   string
		parent string
		err    string
	}{
		{in: "2600:BEEF:1000::1", plain: "2600:beef:1000::1"},
		{in: "2600:BEEF:1002:db::1", plain: "2600:beef:1002:db::1"},
		{in: "2600:beef:1000:beef::1", plain: "2600:beef:1000:beef::1"},
		{in: "2600:BEEF:1000:web::1", name: "web", parent: "2600:beef:1000::/48"},
		{in: "2600:BEEF:1002:mgmt::1", name: "mgmt", parent: "2600:beef:1002::/48"},
		{in: "2600:BEEF:2001:backup::1", name: "backup", parent: "2600:beef:2001::/48"},
		{in: "2600:beef:WEB::1", name: "web", parent: "2600:beef::/32"},
		{in: "2600:beef:1:2:3:4:5:last", name: "last", parent: "2600:beef:1:2:3:4:5:0/112"},
		{in: "2600:beef:1:2:3:4:web:1", name: "web", parent: "2600:beef:1:2:3:4::/96"},
		{in: "web::1", err: "at least one explicit group"},
		{in: "2600::web:1", err: "before any"},
		{in: "2600:web:app::1", err: "more than one"},
		{in: "2600:web:1:2:3:4:5:6:7", err: "parse address"},
		{in: "2600:0web::1", err: "ParseAddr"},
		{in: "2600:w_b::1", err: "ParseAddr"},
		{in: "2600:" + strings.Repeat("a", 33) + "::1", err: "ParseAddr"},
		{in: "2600:we%b::1", err: "ParseAddr"},
		{in: "", err: "ParseAddr"},
		{in: "fe80::1%eth0", plain: "fe80::1%eth0"},
		{in: "10.0.0.1", plain: "10.0.0.1"},
	}
	for _, tc := range tests {
		a, err := ParseAddr(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("ParseAddr(%q) = %v, %v; want error containing %q", tc.in, a, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("ParseAddr(%q): %v", tc.in, err)
			continue
		}
		if tc.plain != "" {
			if ip, ok := a.Plain(); !ok || ip.String() != tc.plain || a.String() != tc.plain {
				t.Errorf("ParseAddr(%q) = %v (plain %v); want plain %s", tc.in, a, ok, tc.plain)
			}
			continue
		}
		if a.Name() != tc.name || a.Parent().String() != tc.parent {
			t.Errorf("ParseAddr(%q): name %q parent %s; want %q %s", tc.in, a.Name(), a.Parent(), tc.name, tc.parent)
		}
	}
}

func TestParsePrefix(t *testing.T) {
	p, err := ParsePrefix("2600:BEEF:1000:web::10/64")
	if err != nil {
		t.Fatal(err)
	}
	if !p.IsSymbolic() || p.Name() != "web" || p.Parent() != netip.MustParsePrefix("2600:beef:1000::/48") || p.Bits() != 64 {
		t.Fatalf("got %v name %q parent %s bits %d", p, p.Name(), p.Parent(), p.Bits())
	}
	if got := p.With(7).String(); got != "2600:beef:1000:7::10/64" {
		t.Fatalf("With(7) = %s", got)
	}
	if p.String() != "2600:beef:1000:web::10/64" {
		t.Fatalf("String() = %s", p)
	}
	if _, err := ParsePrefix("2600:beef:web::/32"); err == nil || !strings.Contains(err.Error(), "outside the prefix length") {
		t.Fatalf("label beyond prefix length: %v", err)
	}
	for _, bad := range []string{"2600:beef:1000:web::/064", "2600:beef:1000:web::/129", "2600:beef:1000:web::/", "2600:beef:1000:web::/x"} {
		if _, err := ParsePrefix(bad); err == nil {
			t.Errorf("ParsePrefix(%q) accepted", bad)
		}
	}
	q, err := ParsePrefix("2600:BEEF:1001::/48")
	if err != nil || q.IsSymbolic() || q.String() != "2600:beef:1001::/48" {
		t.Fatalf("plain prefix: %v %v", q, err)
	}
	if pp, _ := CheckPrefixSyntax("2600:BEEF:1000:dmz::/64"); pp.IsValid() {
		t.Fatalf("CheckPrefixSyntax returned a valid prefix for a symbolic one")
	}
	if _, err := CheckAddrSyntax("2600:BEEF:1000:web::1"); err != nil {
		t.Fatal(err)
	}
}

func TestIsLabel(t *testing.T) {
	for s, want := range map[string]bool{
		"web": true, "WEB": true, "db": false, "beef": false, "cafe1": true, "a-b": true,
		"-a": false, "1a": false, "": false, strings.Repeat("x", 32): true, strings.Repeat("x", 33): false,
		"fin": true, "app": true, "add": false, "a_b": false,
	} {
		if got := IsLabel(s); got != want {
			t.Errorf("IsLabel(%q) = %v, want %v", s, got, want)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"2600:BEEF:1000:web::10/64", "2600:BEEF:1000:web::1", "2600:BEEF:1002:mgmt::/64",
		"2600:BEEF:1002:db::100/64", "2001:4860:4860::8888", "2600:BEEF:2001:backup::1",
		"::", "::1/128", "fe80::1%eth0", "1.2.3.4", "::ffff:1.2.3.4", "2600:web::/32", "a:b:c:d:e:f:0:1",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if a, err := ParseAddr(s); err == nil {
			if ip, ok := a.Plain(); ok {
				want, err := netip.ParseAddr(s)
				if err != nil || want != ip || a.String() != want.String() {
					t.Fatalf("plain %q: got %v, netip %v %v", s, a, want, err)
				}
			} else {
				b, err := ParseAddr(a.String())
				if err != nil || b != a {
					t.Fatalf("symbolic %q does not round-trip: %v → %v %v", s, a, b, err)
				}
				if !a.Parent().Contains(a.With(0xabcd)) || a.With(1) == a.With(2) {
					t.Fatalf("symbolic %q: bad parent %s", s, a.Parent())
				}
			}
		}
		if p, err := ParsePrefix(s); err == nil {
			if pp, ok := p.Plain(); ok {
				want, err := netip.ParsePrefix(s)
				if err != nil || want != pp || p.String() != want.String() {
					t.Fatalf("plain prefix %q: got %v, netip %v %v", s, p, want, err)
				}
			} else {
				q, err := ParsePrefix(p.String())
				if err != nil || q != p {
					t.Fatalf("symbolic prefix %q does not round-trip: %v → %v %v", s, p, q, err)
				}
				if p.With(5).Bits() < p.Parent().Bits()+16 {
					t.Fatalf("symbolic prefix %q: name outside the prefix", s)
				}
			}
		}
	})
}
