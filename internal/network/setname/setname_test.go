package setname

import (
	"strings"
	"testing"

	"github.com/google/nftables"
)

func TestNamesAreUniqueAndExplicit(t *testing.T) {
	a, b := New(), New()
	seen := map[string]bool{}
	ids := map[uint32]bool{}
	for _, n := range []*Namer{a, b, a, b} {
		for range 100 {
			s := &nftables.Set{Anonymous: true, Constant: true}
			n.Name(s)
			if strings.Contains(s.Name, "%") || !strings.HasPrefix(s.Name, "__m") {
				t.Fatalf("name %q is not explicit", s.Name)
			}
			if seen[s.Name] || ids[s.ID] {
				t.Fatalf("duplicate name %q or id %d", s.Name, s.ID)
			}
			if s.ID < idBase {
				t.Fatalf("id %d below %d", s.ID, idBase)
			}
			seen[s.Name], ids[s.ID] = true, true
		}
	}
	if a.run == b.run {
		t.Fatalf("two namers share run prefix %q", a.run)
	}
}

func TestAnonymous(t *testing.T) {
	n := New()
	s := &nftables.Set{Anonymous: true}
	n.Name(s)
	for name, want := range map[string]bool{s.Name: true, "__set3": true, "__map0": true, "tap-vm1-addrs": false, "priv_owned": false, "sg-web": false} {
		if got := Anonymous(name); got != want {
			t.Errorf("Anonymous(%q) = %v, want %v", name, got, want)
		}
	}
}
