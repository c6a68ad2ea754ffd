package nft

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"testing"

	"github.com/metald/metald/internal/netnstest"
	"github.com/metald/metald/internal/network"
)

// handles lists the table with rule handles (`nft -a`), counters zeroed.
func handles(t *testing.T, tp *topo) string {
	t.Helper()
	return counterValues.ReplaceAllString(listTables(t, tp.host, "-a"), "packets 0 bytes 0")
}

// TestReconcileNoChange: a restarted daemon (a new Firewall) reconciling
// a matching kernel changes nothing: every rule keeps its handle.
func TestReconcileNoChange(t *testing.T) {
	t.Parallel()
	tp := newTopo(t, allOn())
	before := handles(t, tp)
	fw2, err := New(tp.host.Fd())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fw2.Close() })
	r, err := fw2.Reconcile(context.Background(), tp.plans[:])
	if err != nil {
		t.Fatal(err)
	}
	if !r.Empty() {
		t.Fatalf("reconcile of a matching kernel repaired: %s", r)
	}
	if after := handles(t, tp); after != before {
		t.Errorf("listing with handles changed:\n--- before\n%s\n--- after\n%s", before, after)
	}
}

var handleRE = regexp.MustCompile(`# handle (\d+)`)

// ruleHandle returns the handle of the first rule of chain (in table
// netdev tbl) whose line contains all of want.
func ruleHandle(t *testing.T, tp *topo, tbl, chain string, want ...string) string {
	t.Helper()
	out := tp.host.MustRun(t, "nft", "-a", "list", "chain", "netdev", tbl, chain)
	for _, line := range strings.Split(out, "\n") {
		ok := true
		for _, w := range want {
			ok = ok && strings.Contains(line, w)
		}
		if m := handleRE.FindStringSubmatch(line); ok && m != nil && !strings.Contains(line, "chain ") {
			return m[1]
		}
	}
	t.Fatalf("no rule with %q in %s:\n%s", want, chain, out)
	return ""
}

// TestReconcileRepairsDrift: operator edits with the nft CLI are found and
// repaired in one Reconcile, after which a rogue RA is blocked again
// (counted on tap-vm1, never seen at VM2).
func TestReconcileRepairsDrift(t *testing.T) {
	t.Parallel()
	tp := newTopo(t, allOn())
	cap := startCapture(t, tp.vm2, "eth0")
	nftCmd := func(args ...string) { tp.host.MustRun(t, "nft", args...) }
	t1, t2 := TableFor(tp.plans[0]), TableFor(tp.plans[1])
	drifts := []struct {
		name  string
		edit  func()
		want  string // substring of Repairs.String()
		leaks bool   // the rogue RA reaches VM2 while drifted
		// opens says the edit stops VM1's from-VM RA guard from counting.
		opens bool
	}{
		{"tables flushed", func() {
			nftCmd("flush", "table", "netdev", t1)
			if t2 != t1 {
				nftCmd("flush", "table", "netdev", t2)
			}
		}, "rules differ", true, true},
		{"tables deleted", func() {
			nftCmd("delete", "table", "netdev", t1)
			if t2 != t1 {
				nftCmd("delete", "table", "netdev", t2)
			}
		}, "table recreated", true, true},
		{"bridge table deleted", func() { nftCmd("delete", "table", "bridge", TableName) }, "table recreated", false, false},
		{"NIC chain deleted", func() {
			nftCmd("flush", "chain", "netdev", t1, "vm-tap-vm1-out")
			nftCmd("delete", "chain", "netdev", t1, "vm-tap-vm1-out")
		}, "chain vm-tap-vm1-out missing", false, true},
		{"rule deleted", func() {
			h := ruleHandle(t, tp, t1, "vm-tap-vm1-out", "control=ra_guard", "nd-router-advert")
			nftCmd("delete", "rule", "netdev", t1, "vm-tap-vm1-out", "handle", h)
		}, "chain vm-tap-vm1-out rules differ", false, true},
		{"rule inserted", func() {
			nftCmd("insert", "rule", "netdev", t1, "vm-tap-vm1-out", "accept")
		}, "chain vm-tap-vm1-out rules differ", false, true},
		{"hook replaced by a regular chain", func() {
			nftCmd("flush", "chain", "netdev", t1, "vm-tap-vm1-out")
			nftCmd("delete", "chain", "netdev", t1, "vm-tap-vm1-out")
			nftCmd("add", "chain", "netdev", t1, "vm-tap-vm1-out")
		}, "chain vm-tap-vm1-out hook differs", false, true},
		{"address set emptied", func() {
			nftCmd("flush", "set", "netdev", t1, "tap-vm1-addrs")
		}, "set tap-vm1-addrs elements differ", false, false},
		{"old bridge layout left over", func() {
			nftCmd("add", "chain", "bridge", TableName, "prerouting", "{ type filter hook prerouting priority -300; }")
			nftCmd("add", "chain", "bridge", TableName, "vm-tap-vm1-out")
			nftCmd("add", "rule", "bridge", TableName, "prerouting", "iifname tap-vm1 goto vm-tap-vm1-out")
		}, "bridge table holds chain prerouting", false, false},
	}
	for i, d := range drifts {
		t.Run(d.name, func(t *testing.T) {
			fl := uint32(0x5000 + 2*i)
			d.edit()
			if d.leaks {
				sendAndMark(t, tp, cap, false, fl, `send(`+raMC+`/`+ra+`)`)
				if cap.count(fl) != 1 {
					t.Fatalf("drift %q did not open the RA guard (test is vacuous)", d.name)
				}
			} else if d.opens {
				// VM2's to-VM RA guard still stops the RA; VM1's from-VM
				// guard no longer counts it.
				b := tp.counters(t, "tap-vm1")
				sendAndMark(t, tp, cap, false, fl, `send(`+raMC+`/`+ra+`)`)
				if got := deltas(b, tp.counters(t, "tap-vm1")); got[network.CtlRAGuard] != 0 {
					t.Fatalf("drift %q did not open VM1's RA guard (test is vacuous)", d.name)
				}
			}
			r, err := tp.fw.Reconcile(context.Background(), tp.plans[:])
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("repaired: %s", r)
			if !strings.Contains(r.String(), d.want) {
				t.Errorf("repairs %q, want mention of %q", r, d.want)
			}
			// a second pass finds nothing
			if r2, err := tp.fw.Reconcile(context.Background(), tp.plans[:]); err != nil || !r2.Empty() {
				t.Fatalf("second reconcile: %v %s", err, r2)
			}
			before := tp.counters(t, "tap-vm1")
			sendAndMark(t, tp, cap, false, fl+1, fmt.Sprintf("send([%s/%s]*3)", raMC, ra))
			if n := cap.count(fl + 1); n != 0 {
				t.Errorf("%d rogue RAs reached VM2 after repair", n)
			}
			if got := deltas(before, tp.counters(t, "tap-vm1")); got[network.CtlRAGuard] != 3 || len(got) != 1 {
				t.Errorf("deltas %s, want ra_guard+3", fmtDeltas(got))
			}
		})
	}
}

// TestReconcileLeavesPendingNICs: a NIC whose VM is being created
// (NICPlan.Pending) is neither added, repaired nor removed by a reconcile,
// even by a Firewall that did not write it: a repair racing a failed
// create's rollback would leave the rules of a VM that does not exist.
func TestReconcileLeavesPendingNICs(t *testing.T) {
	t.Parallel()
	tp := newTopo(t, allOn())
	fw2, err := New(tp.host.Fd())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fw2.Close() })
	pending := tp.plans
	pending[1].Pending = true

	// Not yet programmed: not added.
	if err := tp.fw.RemoveNIC("tap-vm2"); err != nil {
		t.Fatal(err)
	}
	r, err := fw2.Reconcile(context.Background(), pending[:])
	if err != nil {
		t.Fatal(err)
	}
	if !r.Empty() || strings.Contains(listTables(t, tp.host), "tap-vm2") {
		t.Fatalf("reconcile programmed a pending NIC: %s", r)
	}
	// Programmed, then changed behind metald's back: neither repaired nor
	// removed.
	if err := tp.fw.UpdateNIC(tp.plans[1]); err != nil {
		t.Fatal(err)
	}
	tp.host.MustRun(t, "nft", "flush", "chain", "netdev", TableFor(tp.plans[1]), "vm-tap-vm2-out")
	if r, err = fw2.Reconcile(context.Background(), pending[:]); err != nil {
		t.Fatal(err)
	}
	out := tp.host.MustRun(t, "nft", "list", "chain", "netdev", TableFor(tp.plans[1]), "vm-tap-vm2-out")
	if !r.Empty() || strings.Contains(out, "control=") {
		t.Fatalf("reconcile touched a pending NIC: %s\n%s", r, out)
	}
	// Once the create is done, the same drift is repaired.
	if r, err = fw2.Reconcile(context.Background(), tp.plans[:]); err != nil {
		t.Fatal(err)
	}
	if len(r.NICs["tap-vm2"]) == 0 {
		t.Fatalf("drift of a created NIC not repaired: %s", r)
	}
}

// TestReconcileFreshHost: on a host with no table and no NIC to protect
// (a first start), Reconcile reports no drift and creates nothing; once a
// NIC is desired, a missing table is drift and is repaired.
func TestReconcileFreshHost(t *testing.T) {
	t.Parallel()
	host := netnstest.New(t)
	fw, err := New(host.Fd())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fw.Close() })
	r, err := fw.Reconcile(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if !r.Empty() {
		t.Fatalf("fresh host reported as drift: %s", r)
	}
	if out := host.MustRun(t, "nft", "list", "tables"); strings.Contains(out, "metald") {
		t.Fatalf("tables created with nothing to protect:\n%s", out)
	}
	p := vmPlan(1, allOn())
	r, err = fw.Reconcile(context.Background(), []network.NICPlan{p})
	if err != nil {
		t.Fatal(err)
	}
	if !r.Table || len(r.NICs[p.HostDevice]) == 0 {
		t.Fatalf("missing table and NIC with a NIC desired: %s", r)
	}
	if out := host.MustRun(t, "nft", "list", "table", "bridge", TableName); !strings.Contains(out, "chain input") {
		t.Fatalf("bridge table not repaired:\n%s", out)
	}
}
