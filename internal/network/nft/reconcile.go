package nft

import (
	"bytes"
	"context"
	"fmt"
	"maps"
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
	// Table is true when a table was missing and was recreated: the
	// bridge table, or the shard table of NICs (each then rewritten and
	// listed in NICs).
	Table bool
	// Base lists drifted shared objects (the bridge table's chain and
	// leftovers of an older layout in it, shards' priv_owned sets).
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

// Reconcile compares the kernel's tables with the desired NICs and repairs
// drift (in batches of at most nicsPerBatch NICs, each NIC within one
// batch): a missing table, the bridge table's input chain or leftovers of
// the older bridge layout in it, a shard's priv_owned set, a NIC chain
// missing, hooked differently or whose rules differ from the plan
// (deleted, added or changed rules), a NIC set whose elements differ, a
// missing counter, a NIC's objects in a shard other than its own, and
// NICs in the tables that are not desired. When the
// kernel already matches, Reconcile sends no change at all: rule handles
// and counter values stay as they are.
//
// Rules are compared expression by expression (netlink encoding, with the
// ids of sets blanked) together with their comments. Shared constant sets
// are compared by reference only: the kernel refuses changes to a constant
// set, so they cannot drift without their rule being replaced. Dynamic
// sets (learned privacy addresses) are compared by size only: their
// contents are packet-path state.
//
// Cost: a dump of every shard table's chains, sets and counters, one rule
// dump per NIC chain and one element dump per NIC set, a few milliseconds
// per NIC; a repaired NIC is rewritten whole (its
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
	want := map[string]int{}
	for _, p := range desired {
		want[p.HostDevice] = ShardOf(p)
	}
	base, err := f.baseDrift(rd, st)
	if err != nil {
		return r, err
	}
	r.Base = base
	if !st.bridge {
		r.Table = true
		if len(st.nics()) == 0 && !slices.ContainsFunc(desired, func(p network.NICPlan) bool { return !p.Pending }) {
			// A host with no port to protect and no table yet (a first
			// start): nothing has drifted, and the first NIC creates the
			// table.
			r.Table, r.Base = false, nil
		}
	}
	for _, dev := range st.nics() {
		if _, ok := want[dev]; !ok {
			r.Removed = append(r.Removed, dev)
		}
	}
	for _, p := range (network.Plan{NICs: desired}).Sorted() {
		if err := ctx.Err(); err != nil {
			return r, err
		}
		if p.Pending {
			continue // kept as it is (want), not compared
		}
		d, err := f.nicDrift(rd, st, p)
		if err != nil {
			return r, err
		}
		if len(d) > 0 {
			r.NICs[p.HostDevice] = d
			if st.shards[want[p.HostDevice]] == nil {
				r.Table = true
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
	queued := 0
	if len(st.bridgeExtra) > 0 {
		f.conn.DelTable(bridgeTable())
	}
	f.queueBase()
	// Shards of desired NICs get their shared objects back (priv_owned).
	wantShard := map[int]bool{}
	for _, p := range desired {
		if p.Pending {
			continue
		}
		if s := want[p.HostDevice]; !wantShard[s] {
			wantShard[s] = true
			if err := f.queueShard(s); err != nil {
				return r, f.abort(err)
			}
		}
	}
	// Remove only what this pass found removable (a NIC written since
	// list stays).
	keep := maps.Clone(want)
	for _, dev := range st.nics() {
		if _, ok := want[dev]; !ok && !slices.Contains(r.Removed, dev) {
			keep[dev] = -1
		}
	}
	gone, err := f.queueStale(st, keep, wantShard, &queued, "reconcile firewall")
	if err != nil {
		return r, err
	}
	for _, p := range (network.Plan{NICs: desired}).Sorted() {
		if _, ok := r.NICs[p.HostDevice]; ok {
			if err := f.queueMove(st, p, want[p.HostDevice]); err != nil {
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
	for _, g := range gone {
		f.notifyRemoved(g.dev, g.final)
	}
	if f.obs != nil {
		rr := r
		f.pendingRepairs = &rr // delivered by f.unlock, after f.mu is released
	}
	return r, nil
}

// baseDrift lists drifted shared objects: the bridge table's chains,
// objects of an older layout left in it, and shards of desired NICs that
// lack priv_owned.
func (f *Firewall) baseDrift(c *nftables.Conn, st kernelState) ([]string, error) {
	var out []string
	if !st.bridge {
		out = append(out, "table bridge "+TableName+" missing")
	} else {
		for _, b := range baseChains() {
			if !st.bridgeChains[b.name] {
				out = append(out, "chain "+b.name+" missing")
				continue
			}
			ok, err := chainMatches(c, bridgeTable(), b.name, b.rules)
			if err != nil {
				return nil, err
			}
			if !ok {
				out = append(out, "chain "+b.name+" rules differ")
			}
		}
		for _, x := range st.bridgeExtra {
			out = append(out, "bridge table holds "+x)
		}
	}
	for _, s := range st.shardList() {
		if ss := st.shards[s]; len(ss.nics()) > 0 && !ss.sets[PrivOwnedSet] {
			out = append(out, "set "+ShardName(s)+" "+PrivOwnedSet+" missing")
		}
	}
	return out, nil
}

// nicDrift lists what of p's objects differs from the kernel.
func (f *Firewall) nicDrift(c *nftables.Conn, st kernelState, p network.NICPlan) ([]string, error) {
	spec := buildNIC(p, f.logGroup)
	s := ShardOf(p)
	var out []string
	for _, o := range st.shardList() {
		if o != s && slices.Contains(st.shards[o].nics(), p.HostDevice) {
			out = append(out, "objects in "+ShardName(o)+", want "+ShardName(s))
		}
	}
	ss := st.shards[s]
	if ss == nil {
		return append(out, "table "+ShardName(s)+" missing"), nil
	}
	t := shardTable(s)
	byChain := map[string][]rule{}
	for _, r := range spec.rules {
		byChain[r.chain] = append(byChain[r.chain], r)
	}
	hooks := nicHooks(spec.names)
	for _, name := range spec.chains {
		ch := ss.chains[name]
		if ch == nil {
			out = append(out, "chain "+name+" missing")
			continue
		}
		if !hookMatches(ch, hooks[name]) {
			out = append(out, "chain "+name+" hook differs")
		}
		ok, err := chainMatches(c, t, name, byChain[name])
		if err != nil {
			return nil, err
		}
		if !ok {
			out = append(out, "chain "+name+" rules differ")
		}
	}
	for _, set := range spec.sets {
		if !ss.sets[set.name] {
			out = append(out, "set "+set.name+" missing")
			continue
		}
		if set.dynamic {
			if ss.setSize[set.name] != set.size {
				out = append(out, "set "+set.name+" size differs")
			}
			continue
		}
		els, err := c.GetSetElements(&nftables.Set{Table: t, Name: set.name, KeyType: set.keyType})
		if err != nil {
			return nil, fmt.Errorf("list set %s: %w", set.name, err)
		}
		var got [][]byte
		for _, e := range els {
			got = append(got, e.Key)
		}
		if !sameElems(got, set.elems) {
			out = append(out, "set "+set.name+" elements differ")
		}
	}
	for _, name := range countersOf(spec.names) {
		if _, ok := ss.counters[name]; !ok {
			out = append(out, "counter "+name+" missing")
		}
	}
	return out, nil
}

// hookMatches reports whether chain ch is hooked as want says (nil: a
// regular chain). The hook's device is not compared: google/nftables does
// not decode it, and the chain's name fixes it for chains metald made.
func hookMatches(ch *nftables.Chain, want *nftables.ChainHook) bool {
	if want == nil {
		return ch.Hooknum == nil
	}
	return ch.Hooknum != nil && *ch.Hooknum == *want && ch.Priority != nil &&
		*ch.Priority == *nftables.ChainPriorityRef(NICPriority) && ch.Type == nftables.ChainTypeFilter &&
		ch.Policy != nil && *ch.Policy == nftables.ChainPolicyAccept
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
func chainMatches(c *nftables.Conn, t *nftables.Table, chain string, want []rule) (bool, error) {
	got, err := c.GetRules(t, &nftables.Chain{Name: chain, Table: t})
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
		b, err := expr.Marshal(byte(nftables.TableFamilyNetdev), e)
		if err != nil {
			return nil, fmt.Errorf("encode %T: %w", e, err)
		}
		out = append(out, b...)
		out = append(out, 0xff)
	}
	return out, nil
}
