package ipam

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// stored lists the store's names under the test parent as "name=value",
// with "?" appended to the tentative ones.
func stored(t *testing.T, st Store) []string {
	t.Helper()
	snap, err := st.Load(context.Background(), time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, n := range snap.SubnetNames {
		if n.Parent != parent48 {
			continue
		}
		s := fmt.Sprintf("%s=%d", n.Name, n.Value)
		if n.Tentative {
			s += "?"
		}
		out = append(out, s)
	}
	slices.Sort(out)
	return out
}

func wantStored(t *testing.T, st Store, want ...string) {
	t.Helper()
	slices.Sort(want)
	if got := stored(t, st); !slices.Equal(got, want) {
		t.Fatalf("stored names %v, want %v", got, want)
	}
}

// lockedBuffer collects a Manager's log.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// logged reports whether one line of log holds every part.
func logged(log string, parts ...string) bool {
	for _, line := range strings.Split(log, "\n") {
		all := true
		for _, p := range parts {
			all = all && strings.Contains(line, p)
		}
		if all {
			return true
		}
	}
	return false
}

// reopen opens a new Manager on st, as a restart does, logging into log.
func reopen(t *testing.T, st Store, c *clock, log *lockedBuffer) *Manager {
	t.Helper()
	m, err := Open(context.Background(), st, namePools, Options{AutoSubnetNames: true, Now: c.Now,
		Logger: slog.New(slog.NewTextHandler(log, &slog.HandlerOptions{Level: slog.LevelInfo}))})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestNameTxTentativeInStore(t *testing.T) {
	st := NewMemStore()
	m, _ := newTestManager(t, st, namePools)
	mustPrefix(t, m, "2600:beef:1000:web::/64")
	wantStored(t, st, "web=1") // plain resolution: permanent at once
	tx := m.BeginNames(context.Background())
	txPrefix(t, tx, "2600:beef:1000:dmz::/64")
	wantStored(t, st, "web=1", "dmz=2?")
	if d := tx.Declared(); len(d) != 1 || d[0].Name != "dmz" || !d[0].Tentative {
		t.Fatalf("declared %+v, want dmz tentative", d)
	}
	for _, n := range m.SubnetNames() {
		if n.Tentative != (n.Name == "dmz") {
			t.Fatalf("SubnetNames reports %s tentative=%v", n.Name, n.Tentative)
		}
	}
	tx.Commit()
	wantStored(t, st, "web=1", "dmz=2")
	for _, n := range m.SubnetNames() {
		if n.Tentative {
			t.Fatalf("SubnetNames reports %s tentative after the commit", n.Name)
		}
	}
}

// Every way of pinning a tentative name confirms it in the store before
// its transaction finishes; what does not pin leaves it tentative there.
func TestNameTxPinConfirmsInStore(t *testing.T) {
	ctx := context.Background()
	st := NewMemStore()
	m, _ := newTestManager(t, st, namePools)
	pins := []struct {
		what string
		use  func(name string) error
	}{
		{"another transaction", func(name string) error {
			other := m.BeginNames(ctx)
			defer other.Rollback()
			_, err := other.ResolvePrefix("2600:beef:1000:" + name + "::/64")
			return err
		}},
		{"ResolvePrefix", func(name string) error { _, err := m.ResolvePrefix(ctx, "2600:beef:1000:"+name+"::/64"); return err }},
		{"ResolveAddr", func(name string) error { _, err := m.ResolveAddr(ctx, "2600:beef:1000:"+name+"::1"); return err }},
		{"SubnetValue", func(name string) error { _, err := m.SubnetValue(ctx, parent48, name); return err }},
		{"DeclareSubnetName", func(name string) error { _, err := m.DeclareSubnetName(ctx, parent48, name, nil); return err }},
		{"a foreign allocation", func(name string) error {
			v, err := m.planValue(parent48, name) // reads without pinning
			if err != nil {
				return err
			}
			a := netip.MustParseAddr(fmt.Sprintf("2600:beef:1000:%x::10", v))
			_, err = m.Reserve(ctx, Request{VMID: "vm-" + name, NICID: "eth0", TenantID: "t", Address: netip.PrefixFrom(a, 64)})
			return err
		}},
	}
	var want []string
	for i, tc := range pins {
		name := fmt.Sprintf("p%d", i)
		tx := m.BeginNames(ctx)
		txPrefix(t, tx, "2600:beef:1000:"+name+"::/64")
		wantStored(t, st, append(slices.Clone(want), fmt.Sprintf("%s=%d?", name, i+1))...)
		if err := tc.use(name); err != nil {
			t.Fatalf("%s: %v", tc.what, err)
		}
		want = append(want, fmt.Sprintf("%s=%d", name, i+1))
		// Confirmed in the store while the transaction is still open.
		wantStored(t, st, want...)
		tx.Rollback()
		wantStored(t, st, want...)
	}
	// The plan parsers and the request's own allocation do not pin.
	tx := m.BeginNames(ctx)
	p := txPrefix(t, tx, "2600:beef:1000:own::10/64")
	if _, err := m.PlanPrefixParser()("2600:beef:1000:own::/64"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.PlanAddrParser()("2600:beef:1000:own::1"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Reserve(tx.Bind(ctx), Request{VMID: "vm-own", NICID: "eth0", TenantID: "t", Address: p}); err != nil {
		t.Fatal(err)
	}
	own := fmt.Sprintf("own=%d", len(pins)+1)
	wantStored(t, st, append(slices.Clone(want), own+"?")...)
	if _, err := m.Release(ctx, "vm-own"); err != nil {
		t.Fatal(err)
	}
	tx.Rollback()
	wantStored(t, st, want...)
}

// A pin the store refuses fails the resolution that pins and leaves the
// name tentative, with its transaction.
func TestNameTxPinStoreFailure(t *testing.T) {
	ctx := context.Background()
	st := NewMemStore()
	m, _ := newTestManager(t, st, namePools)
	tx := m.BeginNames(ctx)
	txPrefix(t, tx, "2600:beef:1000:dmz::/64")
	disk := errors.New("disk gone")
	st.Fail = disk
	if _, err := m.ResolvePrefix(ctx, "2600:beef:1000:dmz::/64"); !errors.Is(err, disk) {
		t.Fatalf("plain resolution with a failing store: %v, want %v", err, disk)
	}
	if _, err := m.DeclareSubnetName(ctx, parent48, "dmz", nil); !errors.Is(err, disk) {
		t.Fatalf("declaration with a failing store: %v, want %v", err, disk)
	}
	other := m.BeginNames(ctx)
	if _, err := other.ResolvePrefix("2600:beef:1000:dmz::/64"); !errors.Is(err, disk) {
		t.Fatalf("another transaction with a failing store: %v, want %v", err, disk)
	}
	other.Rollback()
	st.Fail = nil
	if d := tx.Declared(); len(d) != 1 || d[0].Name != "dmz" {
		t.Fatalf("declared after the failed pins %+v, want dmz", d)
	}
	wantStored(t, st, "dmz=1?")
	tx.Rollback()
	wantNames(t, m)
}

// A commit the store refuses leaves the name tentative without an owner:
// the next use confirms it, a restart before that removes it.
func TestNameTxCommitStoreFailure(t *testing.T) {
	ctx := context.Background()
	st := NewMemStore()
	m, c := newTestManager(t, st, namePools)
	tx := m.BeginNames(ctx)
	txPrefix(t, tx, "2600:beef:1000:used::/64")
	txPrefix(t, tx, "2600:beef:1000:idle::/64")
	st.Fail = errors.New("disk gone")
	tx.Commit()
	st.Fail = nil
	wantNames(t, m, "used=1", "idle=2")
	wantStored(t, st, "used=1?", "idle=2?")
	if d := tx.Declared(); len(d) != 0 {
		t.Fatalf("declared after the commit %+v, want none", d)
	}
	mustPrefix(t, m, "2600:beef:1000:used::/64")
	wantStored(t, st, "used=1", "idle=2?")
	var log lockedBuffer
	m = reopen(t, st, c, &log)
	wantNames(t, m, "used=1")
	if !logged(log.String(), `msg="removed tentative IPv6 subnet name"`, "name=idle ") {
		t.Fatalf("removal of idle not logged:\n%s", log.String())
	}
}

// Open treats the names still tentative in the store as a failed
// request's: removed, or kept only while their subnet holds allocations.
func TestOpenSettlesUnfinishedNames(t *testing.T) {
	ctx := context.Background()
	st := NewMemStore()
	m, c := newTestManager(t, st, namePools)
	mustPrefix(t, m, "2600:beef:1000:web::/64") // web=1, permanent
	committed := m.BeginNames(ctx)
	txPrefix(t, committed, "2600:beef:1000:done::/64") // done=2
	committed.Commit()
	// Requests the daemon never finished: neither commit nor rollback.
	abandon := func(name, vmID string) {
		tx := m.BeginNames(ctx)
		p := txPrefix(t, tx, "2600:beef:1000:"+name+"::10/64")
		if vmID != "" {
			if _, err := m.Reserve(tx.Bind(ctx), Request{VMID: vmID, NICID: "eth0", TenantID: "t", Address: p}); err != nil {
				t.Fatal(err)
			}
		}
	}
	abandon("gone", "")        // 3
	abandon("held", "vm-held") // 4
	abandon("used", "vm-used") // 5
	abandon("leak", "vm-leak") // 6
	abandon("shared", "vm-sh") // 7
	abandon("also", "")        // 8
	wantStored(t, st, "web=1", "done=2", "gone=3?", "held=4?", "used=5?", "leak=6?", "shared=7?", "also=8?")

	var log lockedBuffer
	m = reopen(t, st, c, &log)
	wantNames(t, m, "web=1", "done=2", "held=4", "used=5", "leak=6", "shared=7")
	wantStored(t, st, "web=1", "done=2", "held=4?", "used=5?", "leak=6?", "shared=7?")
	for _, n := range m.SubnetNames() {
		if want := n.Name != "web" && n.Name != "done"; n.Tentative != want {
			t.Fatalf("after the restart %s tentative=%v, want %v", n.Name, n.Tentative, want)
		}
	}
	for _, name := range []string{"gone", "also"} {
		if !logged(log.String(), `msg="removed tentative IPv6 subnet name"`, "name="+name+" ", `reason="the request that assigned it never finished"`) {
			t.Fatalf("removal of %s not logged with its reason:\n%s", name, log.String())
		}
	}
	for _, name := range []string{"held", "used", "leak", "shared"} {
		if !logged(log.String(), `msg="kept tentative IPv6 subnet name of an unfinished request while its subnet holds allocations"`, "name="+name+" ") {
			t.Fatalf("keeping %s not logged:\n%s", name, log.String())
		}
	}
	// The removed names' values are free again, lowest first.
	if p := mustPrefix(t, m, "2600:beef:1000:next::/64"); p.Addr() != netip.MustParseAddr("2600:beef:1000:3::") {
		t.Fatalf("next new name got %s, want the freed value 3", p)
	}

	// Something else using a kept name confirms it: plain resolution, a
	// foreign allocation in its subnet.
	mustPrefix(t, m, "2600:beef:1000:used::/64")
	if _, err := m.Reserve(ctx, Request{VMID: "vm-other", NICID: "eth0", TenantID: "t",
		Address: netip.MustParsePrefix("2600:beef:1000:7::20/64")}); err != nil {
		t.Fatal(err)
	}
	wantStored(t, st, "web=1", "done=2", "next=3", "held=4?", "used=5", "leak=6?", "shared=7")

	// The rest go with the last allocation in their subnet: Release...
	for _, vmID := range []string{"vm-held", "vm-used", "vm-sh"} {
		if _, err := m.Release(ctx, vmID); err != nil {
			t.Fatal(err)
		}
	}
	wantNames(t, m, "web=1", "done=2", "next=3", "used=5", "leak=6", "shared=7")
	wantStored(t, st, "web=1", "done=2", "next=3", "used=5", "leak=6?", "shared=7")
	// ...and the leak collector.
	c.Add(2 * time.Minute)
	live := func(vmID string) (bool, time.Time) { return vmID != "vm-leak", time.Time{} }
	if out, err := m.Cleanup(ctx, live, time.Hour); err != nil || len(out) != 1 || out[0].VMID != "vm-leak" {
		t.Fatalf("cleanup: %v %v", out, err)
	}
	wantNames(t, m, "web=1", "done=2", "next=3", "used=5", "shared=7")
	wantStored(t, st, "web=1", "done=2", "next=3", "used=5", "shared=7")
	if len(m.tentative) != 0 {
		t.Fatalf("tentative left: %v", m.tentative)
	}
	// A further restart changes nothing.
	m = reopen(t, st, c, &log)
	wantNames(t, m, "web=1", "done=2", "next=3", "used=5", "shared=7")
}

// A rollback that finds its name's subnet in use (its own release failed)
// keeps the name tentative until the allocation goes.
func TestNameTxRollbackInUseKeptUntilReleased(t *testing.T) {
	ctx := context.Background()
	st := NewMemStore()
	m, _ := newTestManager(t, st, namePools)
	tx := m.BeginNames(ctx)
	p := txPrefix(t, tx, "2600:beef:1000:dmz::10/64")
	if _, err := m.Reserve(tx.Bind(ctx), Request{VMID: "vm1", NICID: "eth0", TenantID: "t", Address: p}); err != nil {
		t.Fatal(err)
	}
	tx.Rollback()
	wantNames(t, m, "dmz=1")
	wantStored(t, st, "dmz=1?")
	if _, err := m.Release(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	wantNames(t, m)
}
