package secevent_test

import (
	"context"
	"testing"
	"time"

	"github.com/metald/metald/internal/secevent"
)

// batch_processing: off, every event is its own store transaction; on, the
// events of one flush window share one.
func TestBatchProcessingTransactions(t *testing.T) {
	h := start(t, t.TempDir(), secevent.Config{Window: 100 * time.Millisecond}, nil)
	burst := func(base int) {
		for i := range 40 {
			h.svc.Ingest(raRecord("tap-vm1", "fe80::"+itoa(base+i)))
		}
	}
	burst(1)
	h.waitWritten(32 + 1) // 32 sources tracked, the rest folded
	if st := h.svc.Stats(); st.Transactions != st.Written {
		t.Fatalf("batching off: %d events in %d transactions", st.Written, st.Transactions)
	}
	if err := h.svc.SetSettings(context.Background(), secevent.Settings{BatchProcessing: true}); err != nil {
		t.Fatal(err)
	}
	before := h.svc.Stats()
	burst(100)
	h.waitWritten(before.Written + 33)
	st := h.svc.Stats()
	if n := st.Transactions - before.Transactions; n < 1 || n > 2 {
		t.Fatalf("batching on: %d events in %d transactions", st.Written-before.Written, n)
	}
	if v := counter(t, h.reg, secevent.MetricTransactions, nil); v != float64(st.Transactions) {
		t.Fatalf("%s = %v, stats say %d", secevent.MetricTransactions, v, st.Transactions)
	}
	// Emitted events wait for the window's end too, then are stored.
	for i := range 5 {
		if err := h.svc.Emit(secevent.Event{Type: secevent.TypeVMIsolated, VMID: "vm-" + itoa(i)}); err != nil {
			t.Fatal(err)
		}
	}
	h.waitWritten(st.Written + 5)
	if n := h.svc.Stats().Transactions - st.Transactions; n != 1 {
		t.Fatalf("5 emitted events in %d transactions with batching", n)
	}
	evs, err := h.svc.Query(context.Background(), secevent.Filter{Type: secevent.TypeVMIsolated})
	if err != nil || len(evs) != 5 {
		t.Fatalf("stored emitted events: %d %v", len(evs), err)
	}
}

// A policy rule named in the prefix becomes details.rule; the control
// decides the type.
func TestRuleInPrefix(t *testing.T) {
	h := start(t, t.TempDir(), secevent.Config{Window: 50 * time.Millisecond}, nil)
	for _, c := range []struct{ control, typ, rule string }{
		{"policy_deny/egress_rules[2]", "policy_deny", "egress_rules[2]"},
		{"tenant_isolation/ingress_strict", "tenant_isolation_block", "ingress_strict"},
		{"allow_sample/ingress_default", "policy_allow_sample", "ingress_default"},
	} {
		p := "metald:tap-vm2:" + c.control
		if dev, ctl, err := secevent.ParsePrefix(p); err != nil || dev != "tap-vm2" || ctl != c.control {
			t.Fatalf("ParsePrefix(%q) = %q %q %v", p, dev, ctl, err)
		}
		if cl, ok := secevent.Classify(c.control); !ok || string(cl.Type) != c.typ {
			t.Fatalf("Classify(%q) = %+v %v", c.control, cl, ok)
		}
		r := raRecord("tap-vm2", "2001:db8::5")
		r.Prefix = p
		h.svc.Ingest(r)
	}
	h.waitWritten(3)
	evs, err := h.svc.Query(context.Background(), secevent.Filter{VMID: "vm-2"})
	if err != nil || len(evs) != 3 {
		t.Fatalf("%d events %v", len(evs), err)
	}
	for _, e := range evs {
		if e.TenantID != "tenant-b" || e.InterfaceID != "eth0" || e.Details.Rule == "" || e.Details.Src != "2001:db8::5" {
			t.Fatalf("event %+v", e)
		}
		if (e.Type == secevent.TypePolicyAllowSample) == e.Type.Violation() {
			t.Fatalf("%s violation=%v", e.Type, e.Type.Violation())
		}
	}
	// A blocked source (no device in the prefix) is attributed to the
	// output port when the input port is not a VM's.
	r := raRecord("", "2001:db8::bad")
	r.Prefix, r.InDev, r.OutDev = "metald::blocked_source", "uplink0", "tap-vm1"
	h.svc.Ingest(r)
	h.waitWritten(4)
	evs, _ = h.svc.Query(context.Background(), secevent.Filter{Type: secevent.TypeBlockedSource})
	if len(evs) != 1 || evs[0].VMID != "vm-1" {
		t.Fatalf("blocked_source: %+v", evs)
	}
}
