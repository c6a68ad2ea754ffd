package storetest

import (
	"context"
	"errors"
	"fmt"
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

	t.Run("SubnetNameTentative", func(t *testing.T) {
		s := open(t)
		// marks lists the names as "parent name=value" plus "?" when tentative.
		marks := func(t *testing.T) []string {
			t.Helper()
			snap, err := s.Load(ctx, now.Add(-time.Hour))
			if err != nil {
				t.Fatal(err)
			}
			var out []string
			for _, n := range snap.SubnetNames {
				m := fmt.Sprintf("%s %s=%d", n.Parent, n.Name, n.Value)
				if n.Tentative {
					m += "?"
				}
				out = append(out, m)
			}
			slices.Sort(out)
			return out
		}
		want := func(t *testing.T, when string, w ...string) {
			t.Helper()
			if got := marks(t); !slices.Equal(got, w) {
				t.Fatalf("%s:\n got %v\nwant %v", when, got, w)
			}
		}
		tent := func(n ipam.SubnetName) ipam.SubnetName { n.Tentative = true; return n }
		for _, n := range []ipam.SubnetName{name(p48, "web", 1), tent(name(p48, "dmz", 2)), tent(name(p48, "app", 3)), tent(name(other, "dmz", 2))} {
			if err := s.PutSubnetName(ctx, n); err != nil {
				t.Fatalf("put %+v: %v", n, err)
			}
		}
		want(t, "after put",
			"2600:beef:1000::/48 app=3?", "2600:beef:1000::/48 dmz=2?", "2600:beef:1000::/48 web=1", "2600:beef:2000::/48 dmz=2?")
		// A tentative name holds its name and value like any other.
		if err := s.PutSubnetName(ctx, name(p48, "dmz", 9)); !errors.Is(err, ipam.ErrSubnetNameTaken) {
			t.Fatalf("name of a tentative name: got %v, want ErrSubnetNameTaken", err)
		}
		if err := s.PutSubnetName(ctx, name(p48, "other", 3)); !errors.Is(err, ipam.ErrSubnetNameTaken) {
			t.Fatalf("value of a tentative name: got %v, want ErrSubnetNameTaken", err)
		}
		// Confirming clears the mark of that name under that parent only,
		// and keeps everything else about it.
		if err := s.ConfirmSubnetName(ctx, p48, "dmz"); err != nil {
			t.Fatalf("confirm: %v", err)
		}
		want(t, "after confirm",
			"2600:beef:1000::/48 app=3?", "2600:beef:1000::/48 dmz=2", "2600:beef:1000::/48 web=1", "2600:beef:2000::/48 dmz=2?")
		snap, err := s.Load(ctx, now.Add(-time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range snap.SubnetNames {
			if !n.CreatedAt.Equal(now) {
				t.Fatalf("created_at changed: %+v", n)
			}
		}
		// Confirming a confirmed name is not an error; an absent one is
		// ErrNotFound.
		if err := s.ConfirmSubnetName(ctx, p48, "dmz"); err != nil {
			t.Fatalf("confirm again: %v", err)
		}
		if err := s.ConfirmSubnetName(ctx, p48, "web"); err != nil {
			t.Fatalf("confirm a name put confirmed: %v", err)
		}
		if err := s.ConfirmSubnetName(ctx, p48, "nope"); !errors.Is(err, ipam.ErrNotFound) {
			t.Fatalf("confirm an absent name: got %v, want ErrNotFound", err)
		}
		if err := s.ConfirmSubnetName(ctx, netip.MustParsePrefix("2600:beef:3000::/48"), "dmz"); !errors.Is(err, ipam.ErrNotFound) {
			t.Fatalf("confirm under an unknown parent: got %v, want ErrNotFound", err)
		}
		// A tentative name deletes like any other, freeing its value.
		if err := s.DeleteSubnetName(ctx, p48, "app"); err != nil {
			t.Fatalf("delete a tentative name: %v", err)
		}
		if err := s.ConfirmSubnetName(ctx, p48, "app"); !errors.Is(err, ipam.ErrNotFound) {
			t.Fatalf("confirm a deleted name: got %v, want ErrNotFound", err)
		}
		if err := s.PutSubnetName(ctx, tent(name(p48, "db", 3))); err != nil {
			t.Fatalf("reuse a deleted tentative name's value: %v", err)
		}
		want(t, "after delete and reuse",
			"2600:beef:1000::/48 db=3?", "2600:beef:1000::/48 dmz=2", "2600:beef:1000::/48 web=1", "2600:beef:2000::/48 dmz=2?")
	})
}
