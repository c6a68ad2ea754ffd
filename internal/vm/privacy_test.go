package vm

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	vmv1 "github.com/metald/metald/internal/gen/vmprovisioner/v1"
	"github.com/metald/metald/internal/store"
	"github.com/metald/metald/internal/store/sqlite"
)

// privacyStore returns a manager on a fresh database holding n VMs of
// Example 1's shape, every other one with privacy extensions on its NIC.
func privacyStore(tb testing.TB, n int, state func(i int) string) *Manager {
	tb.Helper()
	ctx := context.Background()
	db, err := sqlite.Open(ctx, filepath.Join(tb.TempDir(), "metald.db"))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { db.Close() })
	for i := range n {
		cfg := &vmv1.VmConfig{TenantId: "t1", Network: []*vmv1.NetworkInterface{{
			Id: "eth0", BridgeName: "br0",
			Ipv6: &vmv1.Ipv6Config{Address: fmt.Sprintf("2001:db8:1::%x/64", i+1), Gateway: "2001:db8:1::ffff",
				EnablePrivacyExtensions: proto.Bool(i%2 == 0)},
			SecurityPolicy: &vmv1.SecurityPolicy{
				IngressRules: []string{"allow tcp from any to any port 80,443", "allow tcp from 2001:db8:4::/64 to any port 22", "deny all from any to any"},
				EgressRules:  []string{"allow tcp from any to any port 53,80,443", "deny all from any to any"},
			},
		}}}
		raw, err := protojson.Marshal(cfg)
		if err != nil {
			tb.Fatal(err)
		}
		id := fmt.Sprintf("vm-%d", i)
		row := &store.VM{ID: id, TenantID: "t1", State: state(i), Config: raw, Backend: "netns",
			NICs: []store.NIC{{ID: "eth0", HostDevice: "tap-" + id, MAC: fmt.Sprintf("02:00:00:00:%02x:%02x", i>>8, i&0xff), Bridge: "br0"}}}
		if err := db.CreateVM(ctx, row); err != nil {
			tb.Fatal(err)
		}
	}
	return NewManager(Options{Store: db})
}

// PrivacyDevices lists the ports of NICs with privacy extensions, leaving
// out VMs being created or deleted.
func TestPrivacyDevices(t *testing.T) {
	states := []string{store.StateCreated, store.StateRunning, store.StateCreating, store.StateRunning, store.StateDeleting, store.StateShutdown}
	m := privacyStore(t, len(states), func(i int) string { return states[i] })
	got, err := m.PrivacyDevices(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(got)
	// Privacy on even indexes: 0 (created), 2 (creating: left out), 4 (deleting: left out).
	if want := []string{"tap-vm-0"}; !slices.Equal(got, want) {
		t.Fatalf("privacy devices %v, want %v", got, want)
	}
}

// BenchmarkPrivacyDevices is the daemon's periodic scan for privacy NICs
// (every TempAddrInterval) at 1000 VMs.
func BenchmarkPrivacyDevices(b *testing.B) {
	m := privacyStore(b, 1000, func(int) string { return store.StateRunning })
	ctx := context.Background()
	for b.Loop() {
		devs, err := m.PrivacyDevices(ctx)
		if err != nil || len(devs) != 500 {
			b.Fatalf("%d devices, %v", len(devs), err)
		}
	}
}
