package storetest

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/metald/metald/internal/ipam"
)

// RunIPAM runs the conformance suite for ipam.Store implementations. Each
// subtest gets a fresh, empty store.
func RunIPAM(t *testing.T, open func(t *testing.T) ipam.Store) {
	ctx := context.Background()
	now := time.Now().UTC().Truncate(time.Second)
	p48 := netip.MustParsePrefix("2600:beef:1000::/48")
	other := netip.MustParsePrefix("2600:beef:2000::/48")
	name := func(parent netip.Prefix, n string, v uint16) ipam.SubnetName {
		return ipam.SubnetName{Parent: parent, Name: n, Value: v, CreatedAt: now}
	}
	loadNames := func(t *testing.T, s ipam.Store) []string {
		t.Helper()
		snap, err := s.Load(ctx, now.Add(-time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, n := range snap.SubnetNames {
			out = append(out, n.Parent.String()+" "+n.Name+" "+n.Prefix().String())
		}
		slices.Sort(out)
		return out
	}

	t.Run("SubnetNamePutLoad", func(t *testing.T) {
		s := open(t)
		for _, n := range []ipam.SubnetName{name(p48, "web", 1), name(p48, "dmz", 3), name(other, "web", 1)} {
			if err := s.PutSubnetName(ctx, n); err != nil {
				t.Fatalf("put %v: %v", n, err)
			}
		}
		snap, err := s.Load(ctx, now.Add(-time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		if len(snap.SubnetNames) != 3 {
			t.Fatalf("loaded %d names, want 3: %+v", len(snap.SubnetNames), snap.SubnetNames)
		}
		for _, n := range snap.SubnetNames {
			if n.Name == "dmz" && (n.Parent != p48 || n.Value != 3 || !n.CreatedAt.Equal(now)) {
				t.Fatalf("dmz round trip: %+v", n)
			}
		}
		if err := s.PutSubnetName(ctx, name(p48, "web", 7)); !errors.Is(err, ipam.ErrSubnetNameTaken) {
			t.Fatalf("same name under the same parent: got %v, want ErrSubnetNameTaken", err)
		}
		if err := s.PutSubnetName(ctx, name(p48, "app", 3)); !errors.Is(err, ipam.ErrSubnetNameTaken) {
			t.Fatalf("same value under the same parent: got %v, want ErrSubnetNameTaken", err)
		}
		want := []string{
			"2600:beef:1000::/48 dmz 2600:beef:1000:3::/64",
			"2600:beef:1000::/48 web 2600:beef:1000:1::/64",
			"2600:beef:2000::/48 web 2600:beef:2000:1::/64",
		}
		if got := loadNames(t, s); !slices.Equal(got, want) {
			t.Fatalf("names after rejected puts:\n got %v\nwant %v", got, want)
		}
	})

	t.Run("SubnetNameDelete", func(t *testing.T) {
		s := open(t)
		for _, n := range []ipam.SubnetName{name(p48, "web", 1), name(p48, "dmz", 2), name(other, "dmz", 2)} {
			if err := s.PutSubnetName(ctx, n); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.DeleteSubnetName(ctx, p48, "dmz"); err != nil {
			t.Fatalf("delete: %v", err)
		}
		// Only that name under that parent is gone.
		want := []string{"2600:beef:1000::/48 web 2600:beef:1000:1::/64", "2600:beef:2000::/48 dmz 2600:beef:2000:2::/64"}
		if got := loadNames(t, s); !slices.Equal(got, want) {
			t.Fatalf("after delete:\n got %v\nwant %v", got, want)
		}
		if err := s.DeleteSubnetName(ctx, p48, "dmz"); !errors.Is(err, ipam.ErrNotFound) {
			t.Fatalf("second delete: got %v, want ErrNotFound", err)
		}
		if err := s.DeleteSubnetName(ctx, netip.MustParsePrefix("2600:beef:3000::/48"), "web"); !errors.Is(err, ipam.ErrNotFound) {
			t.Fatalf("delete under an unknown parent: got %v, want ErrNotFound", err)
		}
		// The value is free again for another name, and the name for
		// another value.
		if err := s.PutSubnetName(ctx, name(p48, "app", 2)); err != nil {
			t.Fatalf("reuse the freed value: %v", err)
		}
		if err := s.PutSubnetName(ctx, name(p48, "dmz", 9)); err != nil {
			t.Fatalf("reuse the freed name: %v", err)
		}
		want = []string{
			"2600:beef:1000::/48 app 2600:beef:1000:2::/64",
			"2600:beef:1000::/48 dmz 2600:beef:1000:9::/64",
			"2600:beef:1000::/48 web 2600:beef:1000:1::/64",
			"2600:beef:2000::/48 dmz 2600:beef:2000:2::/64",
		}
		if got := loadNames(t, s); !slices.Equal(got, want) {
			t.Fatalf("after reuse:\n got %v\nwant %v", got, want)
		}
	})
}
