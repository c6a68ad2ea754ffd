package nft

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"

	"github.com/metald/metald/internal/network"
	"github.com/metald/metald/internal/network/setname"
)

// Repairs says what Reconcile found drifted and rewrote, for logging and
// for metald_firewall_repairs_total.
type Repairs struct {
	// Table is true when the table was missing and was recreated (every
	// NIC is then rewritten too, and listed in NICs).
	Table bool
	// Base lists drifted shared objects (base chains, dispatch maps).
	Base []string
	// NICs maps each rewritten NIC's host device to what had drifted.
	NICs map[string][]string
	// Removed lists NICs that were in the table but not desired.
	Removed []string
}

// Empty reports whether nothing was repaired.
func (r Repairs) Empty() bool {
	return !r.Table && len(r.Base) == 0 && len(r.NICs) == 0 && len(r.Removed) == 0
}

// Kinds counts repaired items by kind: "table", "base", "nic", "removed".
func (r Repairs) Kinds() map[string]int {
	out := map[string]int{}
	if r.Table {
		out["table"] = 1
	}
	if len(r.Base) > 0 {
		out["base"] = len(r.Base)
	}
	if len(r.NICs) > 0 {
		out["nic"] = len(r.NICs)
	}
	if len(r.Removed) > 0 {
		out["removed"] = len(r.Removed)
	}
	return out
}

func (r Repairs) String() string {
	if r.Empty() {
		return "no drift"
	}
	var parts []string
	if r.Table {
		parts = append(parts, "table recreated")
	}
	if len(r.Base) > 0 {
		parts = append(parts, "base: "+strings.Join(r.Base, ", "))
	}
	devs := make([]string, 0, len(r.NICs))
	for d := range r.NICs {
		devs = append(devs, d)
	}
	sort.Strings(devs)
	for _, d := range devs {
		parts = append(parts, "nic "+d+": "+strings.Join(r.NICs[d], ", "))
	}
	if len(r.Removed) > 0 {
		parts = append(parts, "removed: "+strings.Join(r.Removed, ", "))
	}
	return strings.Join(parts, "; ")
}

// Reconcile compares the kernel's table with the desired NICs and repairs
// drift (in batches of at most nicsPerBatch NICs, each NIC within one
// batch): a missing table, base chain, dispatch rule or map, a
// NIC chain whose rules differ from the plan (deleted, added or changed
// rules), a NIC set whose elements differ, a missing counter, a missing or
// wrong map entry, and NICs in the table that are not desired. When the
// kernel already matches, Reconcile sends no change at all: rule handles
// and counter values stay as they are.
//
// Rules are compared expression by expression (netlink encoding, with the
// ids of sets blanked) together with their comments. Shared constant sets
// are compared by reference only: the kernel refuses changes to a constant
// set, so they cannot drift without their rule being replaced. Dynamic
// sets (learned privacy addresses) are not compared: their contents are
// packet-path state.
//
// Cost: one rule dump per NIC chain and one element dump per NIC set, a
// few milliseconds per NIC; a repaired NIC is rewritten whole (its
// counters keep their values).
func (f *Firewall) Reconcile(ctx context.Context, desired []network.NICPlan) (Repairs, error) {
	return f.ReconcileFunc(ctx, func(context.Context) ([]network.NICPlan, error) { return desired, nil })
}

// fullCompareEvery bounds how long a foreign change can hide behind
// metald's own commits (see package nftgen).
const fullCompareEvery = time.Minute

// ReconcileFunc is Reconcile with the desired NICs listed by list, which is
// called only when a comparison is needed. It is built for a daemon that
// programs NICs while it reconciles:
//
//   - With a generation tracker (SetGenTracker), the comparison is skipped
//     when every commit since the last one was metald's own, except once a
//     minute.
//   - The comparison reads the kernel on its own connection without
//     holding the lock AddNIC and RemoveNIC take, so programming a NIC never
//     waits for a comparison of the whole table.
//   - A NIC that metald programmed or removed after list was called is
//     left alone (list may predate it); the next pass looks at it.
func (f *Firewall) ReconcileFunc(ctx context.Context, list func(context.Context) ([]network.NICPlan, error)) (Repairs, error) {
	r := Repairs{NICs: map[string][]string{}}
	f.recMu.Lock()
	defer f.recMu.Unlock()
	if f.gens != nil && !f.gens.Due(fullCompareEvery) && f.gens.Unchanged() {
		return Repairs{}, nil
	}
	f.mu.Lock()
	mark := f.seq
	f.mu.Unlock()
	desired, err := list(ctx)
	if err != nil {
		return r, err
	}
	if err := (network.Plan{NICs: desired}).Validate(); err != nil {
		return r, err
	}
	if err := ctx.Err(); err != nil {
		return r, err
	}
	rd, release, err := f.reader()
	if err != nil {
		return r, err
	}
	defer release()
	if f.gens != nil {
		f.gens.BeginCompare()
	}
	compared := false
	defer func() {
		if !compared && f.gens != nil {
			f.gens.Abandon()
		}
	}()
	st, err := readKernel(rd)
	if err != nil {
		return r, err
	}
	want := map[string]bool{}
	for _, p := range desired {
		want[p.HostDevice] = true
	}
	if !st.exists {
		r.Table = true
		for _, p := range desired {
			r.NICs[p.HostDevice] = []string{"table missing"}
		}
	} else {
		base, err := f.baseDrift(rd, st)
		if err != nil {
			return r, err
		}
		r.Base = base
		for _, dev := range st.nics() {
			if !want[dev] {
				r.Removed = append(r.Removed, dev)
			}
		}
		for _, p := range (network.Plan{NICs: desired}).Sorted() {
			if err := ctx.Err(); err != nil {
				return r, err
			}
			d, err := f.nicDrift(rd, st, p)
			if err != nil {
				return r, err
			}
			if len(d) > 0 {
				r.NICs[p.HostDevice] = d
			}
		}
	}
	release()
	if r.Empty() {
		compared = true
		f.pruneWrites(mark)
		return Repairs{}, nil
	}

	f.mu.Lock()
	defer f.unlock()
	// Leave NICs metald wrote since list to the next pass.
	for dev := range r.NICs {
		if f.lastWrite[dev] > mark {
			delete(r.NICs, dev)
		}
	}
	r.Removed = slices.DeleteFunc(r.Removed, func(dev string) bool { return f.lastWrite[dev] > mark })
	if r.Empty() {
		compared = true
		return Repairs{}, nil
	}
	// Repair from the kernel as it is now.
	st, err = f.readState()
	if err != nil {
		return r, err
	}
	var gone []string
	queued := 0
	if err := f.queueBase(); err != nil {
		return r, f.abort(err)
	}
	if st.exists {
		for _, dev := range r.Removed {
			if err := f.queueRemove(st, dev); err != nil {
				return r, f.abort(err)
			}
			gone = append(gone, dev)
			if err := f.chunk(&queued, "reconcile firewall"); err != nil {
				return r, err
			}
		}
	} else {
		r.Table, r.Removed = true, nil
	}
	for _, p := range (network.Plan{NICs: desired}).Sorted() {
		if _, ok := r.NICs[p.HostDevice]; ok {
			if err := f.queueNIC(p); err != nil {
				return r, f.abort(err)
			}
			if err := f.chunk(&queued, "reconcile firewall"); err != nil {
				return r, err
			}
		}
	}
	if len(r.NICs) == 0 {
		r.NICs = nil
	}
	if err := f.flush("reconcile firewall"); err != nil {
		return r, err
	}
	compared = true
	for _, dev := range gone {
		f.notifyRemoved(st, dev)
	}
	if f.obs != nil {
		o := f.obs
		rr := r
		defer o.Repaired(rr) // runs after f.unlock (deferred earlier, so later)
	}
	return r, nil
}

// baseDrift lists drifted shared objects.
func (f *Firewall) baseDrift(c *nftables.Conn, st kernelState) ([]string, error) {
	var out []string
	for _, m := range []string{FromVMMap, ToVMMap} {
		if !st.sets[m] {
			out = append(out, "map "+m+" missing")
		}
	}
	if !st.sets[PrivOwnedSet] {
		out = append(out, "set "+PrivOwnedSet+" missing")
	}
	for _, b := range baseChains() {
		if !st.chains[b.name] {
			out = append(out, "chain "+b.name+" missing")
			continue
		}
		ok, err := chainMatches(c, b.name, b.rules)
		if err != nil {
			return nil, err
		}
		if !ok {
			out = append(out, "chain "+b.name+" rules differ")
		}
	}
	return out, nil
}

// nicDrift lists what of p's objects differs from the kernel.
func (f *Firewall) nicDrift(c *nftables.Conn, st kernelState, p network.NICPlan) ([]string, error) {
	spec := buildNIC(p, f.logGroup)
	var out []string
	byChain := map[string][]rule{}
	for _, r := range spec.rules {
		byChain[r.chain] = append(byChain[r.chain], r)
	}
	for _, name := range spec.chains {
		if !st.chains[name] {
			out = append(out, "chain "+name+" missing")
			continue
		}
		ok, err := chainMatches(c, name, byChain[name])
		if err != nil {
			return nil, err
		}
		if !ok {
			out = append(out, "chain "+name+" rules differ")
		}
	}
	for _, s := range spec.sets {
		if !st.sets[s.name] {
			out = append(out, "set "+s.name+" missing")
			continue
		}
		if s.dynamic {
			continue
		}
		els, err := c.GetSetElements(&nftables.Set{Table: table(), Name: s.name, KeyType: s.keyType})
		if err != nil {
			return nil, fmt.Errorf("list set %s: %w", s.name, err)
		}
		var got [][]byte
		for _, e := range els {
			got = append(got, e.Key)
		}
		if !sameElems(got, s.elems) {
			out = append(out, "set "+s.name+" elements differ")
		}
	}
	for _, name := range countersOf(spec.names) {
		if !st.counters[name] {
			out = append(out, "counter "+name+" missing")
		}
	}
	if st.fromTarget[p.HostDevice] != spec.names.FromChain() {
		out = append(out, "map "+FromVMMap+" entry wrong or missing")
	}
	if st.toTarget[p.HostDevice] != spec.names.ToChain() {
		out = append(out, "map "+ToVMMap+" entry wrong or missing")
	}
	return out, nil
}

func sameElems(a, b [][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	a, b = slices.Clone(a), slices.Clone(b)
	slices.SortFunc(a, bytes.Compare)
	slices.SortFunc(b, bytes.Compare)
	for i := range a {
		if !bytes.Equal(a[i], b[i]) {
			return false
		}
	}
	return true
}

// chainMatches reports whether chain holds exactly the rules want.
func chainMatches(c *nftables.Conn, chain string, want []rule) (bool, error) {
	got, err := c.GetRules(table(), &nftables.Chain{Name: chain, Table: table()})
	if err != nil {
		return false, fmt.Errorf("list rules of %s: %w", chain, err)
	}
	if len(got) != len(want) {
		return false, nil
	}
	for i := range want {
		if !bytes.Equal(got[i].UserData, commentData(want[i].comment)) {
			return false, nil
		}
		a, err := fingerprint(got[i].Exprs)
		if err != nil {
			return false, err
		}
		b, err := fingerprint(want[i].exprs)
		if err != nil {
			return false, err
		}
		if !bytes.Equal(a, b) {
			return false, nil
		}
	}
	return true, nil
}

// fingerprint encodes a rule's expressions as the kernel sees them, with
// the names and ids of anonymous sets blanked (they are assigned per
// batch).
func fingerprint(exprs []expr.Any) ([]byte, error) {
	var out []byte
	for _, e := range exprs {
		switch l := e.(type) {
		case *expr.Lookup:
			c := *l
			c.SetID = 0
			if setname.Anonymous(c.SetName) {
				c.SetName = ""
			}
			e = &c
		case *expr.Dynset:
			c := *l
			c.SetID = 0
			e = &c
		}
		b, err := expr.Marshal(byte(nftables.TableFamilyBridge), e)
		if err != nil {
			return nil, fmt.Errorf("encode %T: %w", e, err)
		}
		out = append(out, b...)
		out = append(out, 0xff)
	}
	return out, nil
}
