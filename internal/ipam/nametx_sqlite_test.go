package ipam_test

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"testing"

	"github.com/metald/metald/internal/ipam"
	"github.com/metald/metald/internal/store/sqlite"
)

// crashPools is the one pool of the crash tests.
var crashPools = []ipam.PoolConfig{{ID: "dmz", Prefixes: []string{"2600:BEEF:1000::/48"}}}

// openOnFile opens a Manager on the SQLite database at path, as the daemon
// does at start. Closing the database without finishing a transaction is
// what a crash leaves: every store write is committed when it returns.
func openOnFile(t *testing.T, path string) (*ipam.Manager, *sqlite.Store) {
	t.Helper()
	ctx := context.Background()
	s, err := sqlite.Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	st, err := s.IPAM(ctx)
	if err != nil {
		t.Fatal(err)
	}
	m, err := ipam.Open(ctx, st, crashPools, ipam.Options{AutoSubnetNames: true})
	if err != nil {
		t.Fatal(err)
	}
	return m, s
}

// registry lists the manager's names as "name=value", "?" marking the
// tentative ones.
func registry(m *ipam.Manager) []string {
	var out []string
	for _, n := range m.SubnetNames() {
		s := fmt.Sprintf("%s=%d", n.Name, n.Value)
		if n.Tentative {
			s += "?"
		}
		out = append(out, s)
	}
	slices.Sort(out)
	return out
}

func wantRegistry(t *testing.T, m *ipam.Manager, when string, want ...string) {
	t.Helper()
	slices.Sort(want)
	if got := registry(m); !slices.Equal(got, want) {
		t.Fatalf("%s: names %v, want %v", when, got, want)
	}
}

// A name assigned by a request the daemon never finished (the transaction
// is neither committed nor rolled back) is gone after a restart on the same
// database, and its value goes to the next new name; a committed name and
// a pinned one stay.
func TestNameTxAbandonedAcrossRestart(t *testing.T) {
	ctx := context.Background()
	resolve := func(t *testing.T, tx *ipam.NameTx, s string) netip.Prefix {
		t.Helper()
		p, err := tx.ResolvePrefix(s)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}

	t.Run("abandoned", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "metald.db")
		m, s := openOnFile(t, path)
		if _, err := m.ResolvePrefix(ctx, "2600:beef:1000:web::/64"); err != nil {
			t.Fatal(err)
		}
		tx := m.BeginNames(ctx)
		if p := resolve(t, tx, "2600:beef:1000:dmz::10/64"); p != netip.MustParsePrefix("2600:beef:1000:2::10/64") {
			t.Fatalf("dmz = %s", p)
		}
		wantRegistry(t, m, "before the crash", "web=1", "dmz=2?")
		s.Close() // crash: tx never finishes

		m, _ = openOnFile(t, path)
		wantRegistry(t, m, "after the restart", "web=1")
		p, err := m.ResolvePrefix(ctx, "2600:beef:1000:app::/64")
		if err != nil || p != netip.MustParsePrefix("2600:beef:1000:2::/64") {
			t.Fatalf("next new name got %v, %v; want the freed value 2", p, err)
		}
	})

	t.Run("committed", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "metald.db")
		m, s := openOnFile(t, path)
		tx := m.BeginNames(ctx)
		resolve(t, tx, "2600:beef:1000:dmz::10/64")
		tx.Commit()
		s.Close()

		m, _ = openOnFile(t, path)
		wantRegistry(t, m, "after the restart", "dmz=1")
	})

	t.Run("pinned", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "metald.db")
		m, s := openOnFile(t, path)
		// Each name is assigned by a transaction that never finishes and
		// pinned by something else meanwhile.
		pins := map[string]func(name string) error{
			"bytx": func(name string) error {
				other := m.BeginNames(ctx)
				_, err := other.ResolvePrefix("2600:beef:1000:" + name + "::/64")
				other.Commit()
				return err
			},
			"byopentx": func(name string) error { // itself never finished either
				_, err := m.BeginNames(ctx).ResolvePrefix("2600:beef:1000:" + name + "::/64")
				return err
			},
			"byplain": func(name string) error {
				_, err := m.ResolveAddr(ctx, "2600:beef:1000:"+name+"::1")
				return err
			},
			"bydeclare": func(name string) error {
				_, err := m.DeclareSubnetName(ctx, netip.MustParsePrefix("2600:beef:1000::/48"), name, nil)
				return err
			},
		}
		var want []string
		for _, name := range []string{"bytx", "byopentx", "byplain", "bydeclare"} {
			tx := m.BeginNames(ctx)
			p := resolve(t, tx, "2600:beef:1000:"+name+"::/64")
			if err := pins[name](name); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			want = append(want, fmt.Sprintf("%s=%d", name, p.Addr().As16()[7]))
		}
		// A foreign allocation in the subnet pins too.
		tx := m.BeginNames(ctx)
		p := resolve(t, tx, "2600:beef:1000:byalloc::/64")
		if _, err := m.Reserve(ctx, ipam.Request{VMID: "vm-other", NICID: "eth0", TenantID: "t",
			Address: netip.PrefixFrom(p.Addr().Next(), 64)}); err != nil {
			t.Fatal(err)
		}
		want = append(want, "byalloc=5")
		wantRegistry(t, m, "before the crash", want...)
		s.Close()

		m, _ = openOnFile(t, path)
		wantRegistry(t, m, "after the restart", want...)
	})

	t.Run("own allocation", func(t *testing.T) {
		// The interrupted request had reserved an address under its name:
		// the name stays, tentative, until crash recovery releases the
		// address, and then goes with it.
		path := filepath.Join(t.TempDir(), "metald.db")
		m, s := openOnFile(t, path)
		tx := m.BeginNames(ctx)
		p := resolve(t, tx, "2600:beef:1000:dmz::10/64")
		if _, err := m.Reserve(tx.Bind(ctx), ipam.Request{VMID: "vm-crashed", NICID: "eth0", TenantID: "t", Address: p}); err != nil {
			t.Fatal(err)
		}
		s.Close()

		m, s = openOnFile(t, path)
		wantRegistry(t, m, "after the restart", "dmz=1?")
		if _, err := m.Release(ctx, "vm-crashed"); err != nil {
			t.Fatal(err)
		}
		wantRegistry(t, m, "after the release")
		s.Close()
		m, _ = openOnFile(t, path)
		wantRegistry(t, m, "after a second restart")
		if p, err := m.ResolvePrefix(ctx, "2600:beef:1000:app::/64"); err != nil || p != netip.MustParsePrefix("2600:beef:1000:1::/64") {
			t.Fatalf("next new name got %v, %v; want the freed value 1", p, err)
		}
	})
}
