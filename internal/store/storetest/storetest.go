// Package storetest owns the conformance suite every store.Store
// implementation must pass.
package storetest

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/metald/metald/internal/store"
)

// Run runs the conformance suite against stores made by open. Each subtest
// gets a fresh, empty store.
func Run(t *testing.T, open func(t *testing.T) store.Store) {
	ctx := context.Background()
	now := time.Now().UTC().Truncate(time.Microsecond)
	sample := func(id string, devs ...string) *store.VM {
		vm := &store.VM{ID: id, TenantID: "t1", State: store.StateCreating, Config: []byte(`{"tenant_id":"t1"}`),
			Backend: "netns", Instance: []byte(`{"backend":"netns"}`), CreatedAt: now, UpdatedAt: now}
		for i, d := range devs {
			vm.NICs = append(vm.NICs, store.NIC{ID: fmt.Sprintf("eth%d", i), Index: i, HostDevice: d, GuestDevice: fmt.Sprintf("eth%d", i),
				MAC: "02:00:00:00:00:01", Bridge: "br0", VLAN: "100", Address: "2001:db8::10/64", Gateway: "2001:db8::1", GatewayOnBridge: true, StableSecret: "::1", LinkLocal: "fe80::1"})
		}
		return vm
	}

	t.Run("CreateGetRoundTrip", func(t *testing.T) {
		s := open(t)
		want := sample("vm-a", "tap-vm-a", "tap-vm-a1")
		if err := s.CreateVM(ctx, want); err != nil {
			t.Fatal(err)
		}
		got, err := s.GetVM(ctx, "vm-a")
		if err != nil {
			t.Fatal(err)
		}
		if got.ID != want.ID || got.TenantID != want.TenantID || got.State != want.State || string(got.Config) != string(want.Config) ||
			string(got.Instance) != string(want.Instance) || !got.CreatedAt.Equal(want.CreatedAt) || !got.StartedAt.IsZero() {
			t.Fatalf("got %+v, want %+v", got, want)
		}
		if len(got.NICs) != 2 || got.NICs[0] != want.NICs[0] || got.NICs[1] != want.NICs[1] {
			t.Fatalf("nics: got %+v, want %+v", got.NICs, want.NICs)
		}
	})

	t.Run("Conflicts", func(t *testing.T) {
		s := open(t)
		if err := s.CreateVM(ctx, sample("vm-a", "tap-a")); err != nil {
			t.Fatal(err)
		}
		if err := s.CreateVM(ctx, sample("vm-a", "tap-b")); !errors.Is(err, store.ErrConflict) {
			t.Fatalf("duplicate id: got %v, want ErrConflict", err)
		}
		if err := s.CreateVM(ctx, sample("vm-b", "tap-a")); !errors.Is(err, store.ErrConflict) {
			t.Fatalf("duplicate host device: got %v, want ErrConflict", err)
		}
		if _, err := s.GetVM(ctx, "vm-b"); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("failed create left a row: %v", err)
		}
	})

	t.Run("UpdateListCountDelete", func(t *testing.T) {
		s := open(t)
		for _, id := range []string{"vm-1", "vm-2", "vm-3"} {
			if err := s.CreateVM(ctx, sample(id, "tap-"+id)); err != nil {
				t.Fatal(err)
			}
		}
		vm, _ := s.GetVM(ctx, "vm-2")
		vm.State, vm.StateReason, vm.StartedAt = store.StateTerminated, "guest vanished", now.Add(time.Second)
		vm.IsolatedReason, vm.IsolatedAt = "investigation", now.Add(2*time.Second)
		vm.NICs[0].Address, vm.NICs[0].GatewayOnBridge = "2001:db8::99/64", false
		if err := s.UpdateVM(ctx, vm); err != nil {
			t.Fatal(err)
		}
		got, _ := s.GetVM(ctx, "vm-2")
		if got.State != store.StateTerminated || got.StateReason != "guest vanished" || !got.StartedAt.Equal(now.Add(time.Second)) ||
			len(got.NICs) != 1 || got.NICs[0].Address != "2001:db8::99/64" || got.NICs[0].GatewayOnBridge ||
			got.IsolatedReason != "investigation" || !got.IsolatedAt.Equal(now.Add(2*time.Second)) {
			t.Fatalf("update not persisted: %+v", got)
		}
		list, err := s.ListVMs(ctx)
		if err != nil || len(list) != 3 || list[0].ID != "vm-1" || len(list[2].NICs) != 1 {
			t.Fatalf("list: %v %+v", err, list)
		}
		counts, err := s.CountVMsByState(ctx)
		if err != nil || counts[store.StateCreating] != 2 || counts[store.StateTerminated] != 1 {
			t.Fatalf("counts: %v %v", err, counts)
		}
		if err := s.DeleteVM(ctx, "vm-2"); err != nil {
			t.Fatal(err)
		}
		if err := s.DeleteVM(ctx, "vm-2"); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("second delete: %v", err)
		}
		if err := s.UpdateVM(ctx, vm); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("update deleted: %v", err)
		}
		// The deleted VM's host device name is free again.
		if err := s.CreateVM(ctx, sample("vm-4", "tap-vm-2")); err != nil {
			t.Fatalf("reuse freed device: %v", err)
		}
	})

	t.Run("NICLookups", func(t *testing.T) {
		s := open(t)
		a := sample("vm-a", "tap-a")
		a.NICs[0].Address, a.NICs[0].Bridge = "2001:db8::1/64", "br-x"
		b := sample("vm-b", "tap-b", "tap-b1")
		b.NICs[0].Address, b.NICs[0].Bridge = "2001:db8::10/64", "br-x"
		b.NICs[1].Address, b.NICs[1].Bridge = "2001:db8::1/128", "br-y"
		a.NICs[0].MAC, b.NICs[0].MAC, b.NICs[1].MAC = "02:00:00:00:0a:01", "02:00:00:00:0b:01", "02:00:00:00:0b:02"
		for _, vm := range []*store.VM{a, b} {
			if err := s.CreateVM(ctx, vm); err != nil {
				t.Fatal(err)
			}
		}
		for _, tc := range []struct {
			bridge, except string
			want           bool
		}{
			{"br-x", "", true}, {"br-x", "vm-a", true}, {"br-x", "vm-b", true},
			{"br-y", "", true}, {"br-y", "vm-a", true}, {"br-y", "vm-b", false}, // only vm-b's second NIC
			{"br-z", "", false},
		} {
			if used, err := s.BridgeUsedBy(ctx, tc.bridge, tc.except); err != nil || used != tc.want {
				t.Fatalf("%s used by a VM other than %q: %v %v, want %v", tc.bridge, tc.except, used, err, tc.want)
			}
		}
		for tenant, want := range map[string]bool{a.TenantID: true, "nobody": false} {
			if has, err := s.TenantHasVMs(ctx, tenant); err != nil || has != want {
				t.Fatalf("tenant %q has VMs: %v %v, want %v", tenant, has, err, want)
			}
		}
		for _, tc := range []struct{ mac, except, want string }{
			{a.NICs[0].MAC, "", "vm-a"}, {a.NICs[0].MAC, "vm-a", ""}, {b.NICs[1].MAC, "vm-a", "vm-b"}, {"02:00:00:00:ff:ff", "", ""},
		} {
			if got, err := s.VMWithMAC(ctx, tc.mac, tc.except); err != nil || got != tc.want {
				t.Fatalf("VM with MAC %s other than %q: %q %v, want %q", tc.mac, tc.except, got, err, tc.want)
			}
		}
		type held struct {
			bridge, gw, except string
			want               bool
		}
		checkHeld := func(cases ...held) {
			t.Helper()
			for _, tc := range cases {
				if got, err := s.GatewayOnBridgeBy(ctx, tc.bridge, tc.gw, tc.except); err != nil || got != tc.want {
					t.Fatalf("gateway %s on %s except %q: %v %v, want %v", tc.gw, tc.bridge, tc.except, got, err, tc.want)
				}
			}
		}
		checkHeld(held{"br-x", "2001:db8::ffff", "", false}) // no NIC put it there yet
		b.NICs[0].Gateway, b.NICs[0].GatewayOnBridge = "2001:db8::ffff", true
		if err := s.UpdateVM(ctx, b); err != nil {
			t.Fatal(err)
		}
		checkHeld(
			held{"br-x", "2001:db8::ffff", "", true},
			held{"br-x", "2001:db8::ffff", "vm-a", true},
			held{"br-x", "2001:db8::ffff", "vm-b", false}, // only vm-b holds it
			held{"br-x", "2001:db8::fffe", "", false},     // another gateway
			held{"br-y", "2001:db8::ffff", "", false},     // another bridge
		)
		with, err := s.NICsWithAddress(ctx, "2001:db8::1")
		if err != nil || len(with) != 2 || with[0].HostDevice != "tap-a" || with[1].HostDevice != "tap-b1" {
			t.Fatalf("with 2001:db8::1: %v %+v", err, with)
		}
		if none, _ := s.NICsWithAddress(ctx, "2001:db8::"); len(none) != 0 {
			t.Fatalf("prefix match leaked: %+v", none)
		}
		if ref, err := s.NICByHostDevice(ctx, "tap-b1"); err != nil || ref.VMID != "vm-b" || ref.Bridge != "br-y" || ref.Index != 1 {
			t.Fatalf("by host device tap-b1: %v %+v", err, ref)
		}
		if _, err := s.NICByHostDevice(ctx, "tap-none"); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("unknown host device: %v", err)
		}
	})

	t.Run("Audit", func(t *testing.T) {
		s := open(t)
		for i, a := range []string{"create", "boot", "delete"} {
			if err := s.AppendAudit(ctx, store.AuditEntry{VMID: "vm-a", At: now.Add(time.Duration(i) * time.Second), Action: a, Caller: "127.0.0.1:1 curl", Detail: "{}"}); err != nil {
				t.Fatal(err)
			}
		}
		s.AppendAudit(ctx, store.AuditEntry{VMID: "vm-b", At: now, Action: "create"})
		got, err := s.ListAudit(ctx, "vm-a")
		if err != nil || len(got) != 3 || got[0].Action != "create" || got[2].Action != "delete" || got[1].Caller != "127.0.0.1:1 curl" || !got[1].At.Equal(now.Add(time.Second)) {
			t.Fatalf("audit: %v %+v", err, got)
		}
		if all, _ := s.ListAudit(ctx, ""); len(all) != 4 {
			t.Fatalf("all audit entries: %d", len(all))
		}
	})

	t.Run("ConcurrentCreates", func(t *testing.T) {
		s := open(t)
		var wg sync.WaitGroup
		errs := make(chan error, 64)
		for i := range 64 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				id := fmt.Sprintf("vm-%02d", i)
				errs <- s.CreateVM(ctx, sample(id, "tap-"+id))
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		list, _ := s.ListVMs(ctx)
		if len(list) != 64 {
			t.Fatalf("got %d vms, want 64", len(list))
		}
	})
}
