package nft

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/metald/metald/internal/network"
	"github.com/metald/metald/internal/network/nftgen"
)

// TestReconcileSkipsWhileOnlyMetaldCommitted: with a generation tracker, a
// reconcile after a full comparison does not even list the desired NICs
// while every commit since was the Firewall's own; a change made with the
// nft CLI is found and repaired on the next pass.
func TestReconcileSkipsWhileOnlyMetaldCommitted(t *testing.T) {
	t.Parallel()
	tp := newTopo(t, allOn())
	tr, err := nftgen.New(tp.host.Fd())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close() })
	tp.fw.SetGenTracker(tr)
	listed := 0
	list := func(context.Context) ([]network.NICPlan, error) {
		listed++
		return tp.plans[:], nil
	}
	ctx := context.Background()
	if r, err := tp.fw.ReconcileFunc(ctx, list); err != nil || !r.Empty() {
		t.Fatalf("first reconcile: %v %s", err, r)
	}
	if listed != 1 {
		t.Fatalf("first reconcile listed %d times, want 1", listed)
	}
	// metald's own commits (a NIC updated twice) keep the pass cheap.
	for range 2 {
		if err := tp.fw.AddNIC(tp.plans[0]); err != nil {
			t.Fatal(err)
		}
	}
	if r, err := tp.fw.ReconcileFunc(ctx, list); err != nil || !r.Empty() {
		t.Fatalf("reconcile after own commits: %v %s", err, r)
	}
	if listed != 1 {
		t.Fatalf("reconcile after own commits compared (listed %d times)", listed)
	}
	// A foreign change: the next pass compares and repairs it.
	tp.host.MustRun(t, "nft", "flush", "chain", "netdev", TableFor(tp.plans[0]), network.NamesFor(tp.plans[0].HostDevice).FromChain())
	r, err := tp.fw.ReconcileFunc(ctx, list)
	if err != nil {
		t.Fatal(err)
	}
	if listed != 2 || !strings.Contains(r.String(), "rules differ") {
		t.Fatalf("foreign flush not repaired (listed %d): %s", listed, r)
	}
	if r, err := tp.fw.ReconcileFunc(ctx, list); err != nil || !r.Empty() || listed != 2 {
		t.Fatalf("pass after the repair: listed %d, %v %s", listed, err, r)
	}
}

// TestReconcileSparesNICsProgrammedAfterListing: a NIC programmed while a
// reconcile runs (after its list of desired NICs was taken, as when a VM is
// created during a pass) keeps its rules, and programming it does not wait
// for the pass.
func TestReconcileSparesNICsProgrammedAfterListing(t *testing.T) {
	t.Parallel()
	tp := newTopo(t, allOn())
	late := otherPlans(1)[0]
	list := func(context.Context) ([]network.NICPlan, error) {
		desired := tp.plans[:] // taken before the new VM exists
		done := make(chan error, 1)
		go func() { done <- tp.fw.AddNIC(late) }()
		select {
		case err := <-done:
			if err != nil {
				t.Error(err)
			}
		case <-time.After(10 * time.Second):
			t.Error("AddNIC waited for the reconcile")
		}
		return desired, nil
	}
	r, err := tp.fw.ReconcileFunc(context.Background(), list)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Removed) != 0 {
		t.Fatalf("reconcile removed a NIC programmed after its listing: %s", r)
	}
	nics, err := tp.fw.NICs()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(strings.Join(nics, " "), late.HostDevice) {
		t.Fatalf("NIC %s lost its rules: table has %v", late.HostDevice, nics)
	}
	// The next pass, listing it, finds nothing to do; one not listing it
	// (the VM was deleted in the store) removes it.
	if r, err := tp.fw.Reconcile(context.Background(), append(tp.plans[:], late)); err != nil || !r.Empty() {
		t.Fatalf("pass listing the new NIC: %v %s", err, r)
	}
	r, err = tp.fw.Reconcile(context.Background(), tp.plans[:])
	if err != nil || len(r.Removed) != 1 || r.Removed[0] != late.HostDevice {
		t.Fatalf("pass without the NIC: %v %s", err, r)
	}
}

// TestManyNICsAtOnce: Apply adds 1000 NICs in one call, and Reconcile
// and Apply remove them in one call. One batch for all of them overflows
// the socket's receive buffer with the kernel's acknowledgements (ENOBUFS);
// they go in batches.
func TestManyNICsAtOnce(t *testing.T) {
	t.Parallel()
	tp := newTopo(t, allOn())
	all := append(tp.plans[:], otherPlans(1000)...)
	add := func() {
		if err := tp.fw.Apply(context.Background(), all); err != nil {
			t.Fatal(err)
		}
		if nics, err := tp.fw.NICs(); err != nil || len(nics) != len(all) {
			t.Fatalf("after adding: %d NICs (%v), want %d", len(nics), err, len(all))
		}
	}
	want := []string{tp.plans[0].HostDevice, tp.plans[1].HostDevice}
	check := func(what string) {
		nics, err := tp.fw.NICs()
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(nics, want) {
			t.Fatalf("after %s: table has %d NICs, want %v", what, len(nics), want)
		}
	}
	add()
	r, err := tp.fw.Reconcile(context.Background(), tp.plans[:])
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Removed) != len(all)-2 {
		t.Fatalf("reconcile removed %d NICs, want %d", len(r.Removed), len(all)-2)
	}
	check("reconcile")
	add()
	if err := tp.fw.Apply(context.Background(), tp.plans[:]); err != nil {
		t.Fatal(err)
	}
	check("apply")
}
