package nft

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/metald/metald/internal/network"
	"github.com/metald/metald/internal/network/nftconn"
	"github.com/metald/metald/internal/network/nftgen"
)

// ErrNotFound reports a NIC that has no state in the tables.
var ErrNotFound = errors.New("nic not programmed")

// Firewall programs metald's tables (the bridge table and the netdev shard
// tables) through one nftables connection. Every change is one netlink
// batch (one Conn.Flush); methods are safe for concurrent use.
type Firewall struct {
	// logGroup, when not 0, makes counted drops log a rate-limited sample
	// to this NFLOG group (SetLogGroup).
	logGroup uint16
	mu       sync.Mutex
	conn     *nftables.Conn
	obs      Observer
	// pending are removal notifications queued under mu and delivered
	// after it is released (see notifyRemoved); pendingRepairs likewise
	// (Reconcile).
	pending        []removed
	pendingRepairs *Repairs
	// shared are the shared constant sets known to exist; pendingShared
	// those queued in the batch being built (-> batch id). Sets are
	// table-scoped: every shard has its own.
	shared        map[setKey]bool
	pendingShared map[setKey]uint32
	// absent are shard tables known not to exist (none of their shared
	// sets need asking about).
	absent map[int]bool
	// where maps each host device to the shard(s) holding its objects:
	// loaded from the kernel by every full read (start-up, Apply,
	// reconcile, NICs) and kept by metald's own commits. loaded is false
	// until the first read and after a failed commit.
	where  map[string][]int
	loaded bool
	// batch is what the batch being built changes (applied on success).
	batch batchState
	// opts re-open the connection (abort); nil for NewWithConn.
	opts []nftables.ConnOption

	// seq counts metald's writes; lastWrite is the seq of the last write of
	// each host device (see ReconcileFunc).
	seq       uint64
	lastWrite map[string]uint64
	// recMu serializes reconciles; rd is their read connection, opened on
	// first use (nil with NewWithConn: they read on conn under mu).
	recMu sync.Mutex
	rd    *nftables.Conn
	gens  *nftgen.Tracker
}

// SetGenTracker makes every commit note the ruleset generation, and lets
// Reconcile skip comparing while only metald has committed (see package
// nftgen). Call it before using the Firewall.
func (f *Firewall) SetGenTracker(t *nftgen.Tracker) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.gens = t
}

// wrote records a write of devs. The caller holds mu.
func (f *Firewall) wrote(devs ...string) {
	f.seq++
	for _, d := range devs {
		f.lastWrite[d] = f.seq
	}
}

// pruneWrites forgets writes a finished comparison has covered.
func (f *Firewall) pruneWrites(mark uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for d, s := range f.lastWrite {
		if s <= mark {
			delete(f.lastWrite, d)
		}
	}
}

// reader returns the connection a reconcile reads the kernel on, and a
// release function (idempotent). The caller holds recMu.
func (f *Firewall) reader() (*nftables.Conn, func(), error) {
	if f.opts == nil {
		f.mu.Lock()
		var once sync.Once
		return f.conn, func() { once.Do(f.mu.Unlock) }, nil
	}
	if f.rd == nil {
		c, err := nftconn.Open(f.opts)
		if err != nil {
			return nil, nil, err
		}
		f.rd = c
	}
	return f.rd, func() {}, nil
}

// New returns a Firewall for the network namespace open at nsFd (or the
// caller's namespace when nsFd < 0).
func New(nsFd int) (*Firewall, error) {
	opts := nftconn.Options(nsFd)
	c, err := nftconn.Open(opts)
	if err != nil {
		return nil, err
	}
	f := newFirewall(c)
	f.opts = opts
	return f, nil
}

// Close releases the netlink connection; the tables stay.
func (f *Firewall) Close() error {
	f.recMu.Lock()
	defer f.recMu.Unlock()
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.rd != nil {
		f.rd.CloseLasting()
		f.rd = nil
	}
	return f.conn.CloseLasting()
}

// NewWithConn wraps an existing connection.
func NewWithConn(c *nftables.Conn) *Firewall { return newFirewall(c) }

func newFirewall(c *nftables.Conn) *Firewall {
	f := &Firewall{conn: c, lastWrite: map[string]uint64{}}
	f.forget()
	f.batch = newBatch()
	return f
}

// SetLogGroup makes every counted drop of NICs programmed from now on also
// log a rate-limited sample (at most 10 packets per second per rule) to
// NFLOG group g, with the prefix LogPrefix(device, control). 0 turns
// logging off. Call it before programming NICs.
func (f *Firewall) SetLogGroup(g uint16) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.logGroup = g
}

// setKey names a set in one table.
type setKey struct{ table, name string }

// batchState records what the batch being built does, to be learned once
// it commits.
type batchState struct {
	shards  map[int]bool     // shard tables (re)declared
	dropped map[int]bool     // shard tables deleted
	where   map[string][]int // host device -> shards after the batch (nil: none)
	queued  bool             // anything queued at all
}

func newBatch() batchState {
	return batchState{shards: map[int]bool{}, dropped: map[int]bool{}, where: map[string][]int{}}
}

// forget drops everything learned about the kernel: the next operation
// reads it again. The caller holds mu (or owns f).
func (f *Firewall) forget() {
	f.shared = map[setKey]bool{}
	f.pendingShared = map[setKey]uint32{}
	f.absent = map[int]bool{}
	f.where = map[string][]int{}
	f.loaded = false
}

// learn records what a full read of the kernel found. The caller holds mu.
func (f *Firewall) learn(st kernelState) {
	f.shared = map[setKey]bool{}
	f.absent = map[int]bool{}
	for i := range Shards {
		ss := st.shards[i]
		if ss == nil {
			f.absent[i] = true
			continue
		}
		for name := range ss.sets {
			f.shared[setKey{ShardName(i), name}] = true
		}
	}
	f.where = st.where()
	f.loaded = true
}

// readState reads every metald table on the batch connection and learns
// from it. The caller holds mu.
func (f *Firewall) readState() (kernelState, error) {
	st, err := readKernel(f.conn)
	if err != nil {
		f.forget()
		return st, err
	}
	f.learn(st)
	return st, nil
}

// load reads the kernel unless the Firewall already knows where every NIC
// is. The caller holds mu.
func (f *Firewall) load() error {
	if f.loaded {
		return nil
	}
	_, err := f.readState()
	return err
}

// dynamicSet is an address set filled from the packet path, with
// per-element timeouts, holding at most size elements (0: unbounded).
// Adding it again with another size changes the size and keeps the
// elements.
func dynamicSet(t *nftables.Table, name string, size uint32) *nftables.Set {
	return &nftables.Set{Table: t, Name: name, KeyType: nftables.TypeIP6Addr, Dynamic: true, HasTimeout: true, Size: size}
}

// queueBase queues the bridge table and its input chain. Re-adding
// existing objects is a no-op, so every batch starts with it; the input
// chain's single rule is rewritten each time.
func (f *Firewall) queueBase() {
	c := f.conn
	c.AddTable(bridgeTable())
	accept := nftables.ChainPolicyAccept
	for _, b := range baseChains() {
		ch := c.AddChain(&nftables.Chain{
			Name: b.name, Table: bridgeTable(), Type: nftables.ChainTypeFilter,
			Hooknum: b.hook, Priority: nftables.ChainPriorityRef(BasePriority), Policy: &accept,
		})
		c.FlushChain(ch)
		for _, r := range b.rules {
			c.AddRule(&nftables.Rule{Table: bridgeTable(), Chain: ch, Exprs: r.exprs, UserData: commentData(r.comment)})
		}
	}
	f.batch.queued = true
}

type baseSpec struct {
	name  string
	hook  *nftables.ChainHook
	rules []rule
}

// baseChains are the bridge table's chains and their fixed rules.
func baseChains() []baseSpec {
	return []baseSpec{
		// VLAN marks stay inside the bridge.
		{ChainInput, nftables.ChainHookInput, []rule{{exprs: append(markTagged(), setMark(0)...), comment: "metald vlan mark clear"}}},
	}
}

// queueShard queues shard table s and its priv_owned set (once a batch).
func (f *Firewall) queueShard(s int) error {
	if f.batch.shards[s] {
		return nil
	}
	t := shardTable(s)
	f.conn.AddTable(t)
	if err := f.conn.AddSet(dynamicSet(t, PrivOwnedSet, 0), nil); err != nil {
		return fmt.Errorf("add set %s: %w", PrivOwnedSet, err)
	}
	f.batch.shards[s] = true
	f.batch.queued = true
	return nil
}

// queueDropShard queues the deletion of shard table s with everything in it.
func (f *Firewall) queueDropShard(s int) {
	f.conn.DelTable(shardTable(s))
	f.batch.dropped[s] = true
	delete(f.batch.shards, s)
	f.batch.queued = true
}

// queueNIC queues the complete state of one NIC in shard s, replacing
// what it had there. carry gives counters their starting values (a NIC
// moving between shards keeps its counts); counters that exist keep theirs.
func (f *Firewall) queueNIC(p network.NICPlan, s int, carry map[string]counterVal) error {
	if err := p.Validate(); err != nil {
		return err
	}
	if err := f.queueShard(s); err != nil {
		return err
	}
	c := f.conn
	t := shardTable(s)
	spec := buildNIC(p, f.logGroup)
	// Counters first: rules refer to them.
	for _, name := range countersOf(spec.names) {
		v := carry[name]
		c.AddObj(&nftables.CounterObj{Table: t, Name: name, Packets: v.packets, Bytes: v.bytes})
	}
	for _, s := range spec.sets {
		if s.dynamic {
			// packet-path state: created once, never flushed
			if err := c.AddSet(dynamicSet(t, s.name, s.size), nil); err != nil {
				return fmt.Errorf("add set %s: %w", s.name, err)
			}
			continue
		}
		set := &nftables.Set{Table: t, Name: s.name, KeyType: s.keyType}
		if err := c.AddSet(set, nil); err != nil {
			return fmt.Errorf("add set %s: %w", s.name, err)
		}
		c.FlushSet(set)
		if len(s.elems) > 0 {
			var el []nftables.SetElement
			for _, e := range s.elems {
				el = append(el, nftables.SetElement{Key: e})
			}
			if err := c.SetAddElements(set, el); err != nil {
				return fmt.Errorf("add elements to %s: %w", s.name, err)
			}
		}
	}
	// Helper chains first, the hooked chains last: a new NIC's hooks
	// appear with their rules in the same commit either way.
	chains := map[string]*nftables.Chain{}
	from, to := spec.names.FromChain(), spec.names.ToChain()
	for _, name := range spec.chains {
		var ch *nftables.Chain
		switch name {
		case from:
			ch = c.AddChain(nicBaseChain(t, name, nftables.ChainHookIngress, p.HostDevice))
		case to:
			ch = c.AddChain(nicBaseChain(t, name, nftables.ChainHookEgress, p.HostDevice))
		default:
			ch = c.AddChain(&nftables.Chain{Name: name, Table: t})
		}
		c.FlushChain(ch)
		chains[name] = ch
	}
	for _, r := range spec.rules {
		for _, a := range r.anons {
			id, err := f.ensureShared(s, a)
			if err != nil {
				return err
			}
			a.lookup.SetID = id
		}
		c.AddRule(&nftables.Rule{Table: t, Chain: chains[r.chain], Exprs: r.exprs, UserData: commentData(r.comment)})
	}
	if slices.Contains(f.where[p.HostDevice], s) {
		// An update: helper chains the NIC no longer uses go. Each is
		// created if missing (a no-op otherwise) so the delete cannot
		// fail, and all are emptied before any is deleted (one may jump
		// to another; the used chains that jumped to them were flushed
		// above).
		var unused []*nftables.Chain
		for _, name := range chainsOf(spec.names) {
			if chains[name] == nil {
				ch := c.AddChain(&nftables.Chain{Name: name, Table: t})
				c.FlushChain(ch)
				unused = append(unused, ch)
			}
		}
		for _, ch := range unused {
			c.DelChain(ch)
		}
	}
	f.batch.where[p.HostDevice] = []int{s}
	f.batch.queued = true
	return nil
}

// queueRemove queues the removal of everything hostDev owns in shard s
// that exists. Unless ss lists the table's chains, a helper chain the NIC
// may not have is created first (a no-op when it exists), so its delete
// cannot fail; the hooked chains always exist.
func (f *Firewall) queueRemove(s int, ss *shardState, hostDev string) {
	c := f.conn
	t := shardTable(s)
	n := network.NamesFor(hostDev)
	var chs []*nftables.Chain
	for _, name := range chainsOf(n) {
		ch := &nftables.Chain{Name: name, Table: t}
		switch {
		case ss.chainsKnown && ss.chains[name] == nil:
			continue
		case !ss.chainsKnown && name != n.FromChain() && name != n.ToChain():
			ch = c.AddChain(ch)
		}
		c.FlushChain(ch)
		chs = append(chs, ch)
	}
	for _, ch := range chs {
		c.DelChain(ch)
	}
	for _, name := range setsOf(n) {
		if ss.sets[name] {
			c.DelSet(&nftables.Set{Table: t, Name: name})
		}
	}
	for _, name := range countersOf(n) {
		if _, ok := ss.counters[name]; ok {
			c.DeleteObject(&nftables.CounterObj{Table: t, Name: name})
		}
	}
	if _, ok := f.batch.where[hostDev]; !ok {
		f.batch.where[hostDev] = slices.DeleteFunc(slices.Clone(f.where[hostDev]), func(x int) bool { return x == s })
	} else {
		f.batch.where[hostDev] = slices.DeleteFunc(f.batch.where[hostDev], func(x int) bool { return x == s })
	}
	f.batch.queued = true
}

// ensureShared queues the creation of the shared constant set a rule of
// shard s looks up unless it exists (known from an earlier batch, asked of
// the kernel once, or queued in this batch). It returns the batch id of a
// set queued now, 0 for one that exists.
func (f *Firewall) ensureShared(s int, a anonSet) (uint32, error) {
	t := shardTable(s)
	k := setKey{t.Name, a.name}
	if id, ok := f.pendingShared[k]; ok {
		return id, nil
	}
	if !f.absent[s] && !f.batch.dropped[s] {
		if f.shared[k] {
			return 0, nil
		}
		if _, err := f.conn.GetSetByName(t, a.name); err == nil {
			f.shared[k] = true
			return 0, nil
		} else if !errors.Is(err, unix.ENOENT) {
			return 0, fmt.Errorf("look up set %s: %w", a.name, err)
		}
	}
	set := &nftables.Set{Table: t, Name: a.name, KeyType: a.keyType, Constant: true}
	var el []nftables.SetElement
	for _, e := range a.elems {
		el = append(el, nftables.SetElement{Key: e})
	}
	if err := f.conn.AddSet(set, el); err != nil {
		return 0, fmt.Errorf("add set %s: %w", a.name, err)
	}
	f.pendingShared[k] = set.ID
	return set.ID, nil
}

// abort discards the batch being built after a build error: queued
// messages cannot be taken back, so the connection is replaced.
func (f *Firewall) abort(err error) error {
	f.pendingShared = map[setKey]uint32{}
	f.batch = newBatch()
	if f.opts == nil {
		return err
	}
	c, cerr := nftconn.Open(f.opts)
	if cerr != nil {
		return errors.Join(err, cerr)
	}
	f.conn.CloseLasting()
	f.conn = c
	return err
}

// nicsPerBatch bounds how many NICs one batch of Apply or Reconcile
// changes: the kernel acknowledges every message of a batch, and the acks
// of a thousand NICs' objects overflow even a 16 MiB receive buffer.
const nicsPerBatch = 50

// chunk counts a NIC queued in a multi-NIC batch and commits the batch
// when it holds nicsPerBatch NICs. Each NIC's change stays in one batch.
func (f *Firewall) chunk(queued *int, what string) error {
	if *queued++; *queued%nicsPerBatch != 0 {
		return nil
	}
	return f.flush(what)
}

// flush commits the batch and learns what it did.
func (f *Firewall) flush(what string) error {
	pending, b := f.pendingShared, f.batch
	f.pendingShared, f.batch = map[setKey]uint32{}, newBatch()
	if !b.queued {
		return nil
	}
	if err := f.conn.Flush(); err != nil {
		// What exists is unknown now: ask the kernel again next time.
		f.forget()
		return fmt.Errorf("%s: %w", what, err)
	}
	if f.gens != nil {
		f.gens.Note()
	}
	f.applied(pending, b)
	return nil
}

// applied records what a committed batch did. The caller holds mu.
func (f *Firewall) applied(pending map[setKey]uint32, b batchState) {
	for s := range b.dropped {
		name := ShardName(s)
		for k := range f.shared {
			if k.table == name {
				delete(f.shared, k)
			}
		}
		f.absent[s] = true
	}
	for s := range b.shards {
		delete(f.absent, s)
	}
	for k := range pending {
		f.shared[k] = true
	}
	for dev, shards := range b.where {
		if len(shards) == 0 {
			delete(f.where, dev)
		} else {
			f.where[dev] = shards
		}
	}
}

// AddNIC installs (or replaces) the chains, sets and counters of one NIC in
// its shard table, in one batch; a NIC whose shard changed (its privacy
// setting or first privacy prefix did) is deleted from the old shard in
// the same batch and keeps its counter values. It may run before the port
// exists: the hooked chains attach when the device appears.
func (f *Firewall) AddNIC(p network.NICPlan) error {
	if err := p.Validate(); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.unlock()
	f.wrote(p.HostDevice)
	if err := f.load(); err != nil {
		return err
	}
	// What the batch relied on (a shared set, the old shard's objects, the
	// kind of a chain) may have changed behind metald's back.
	return f.retryRead(func(st *kernelState) error { return f.addNIC(p, st) })
}

// shardOf returns shard s as st (a full read) has it, or reads what a
// change of dev needs of it (readShard) when st is nil. The caller holds
// mu.
func (f *Firewall) shardOf(st *kernelState, s int, dev string) (*shardState, error) {
	if st != nil {
		return st.shards[s], nil
	}
	return readShard(f.conn, s, dev)
}

// retryRead runs change on metald's knowledge of the kernel (st nil); when
// its commit fails, it reads the whole kernel and runs it once more with
// that exact knowledge. The caller holds mu.
func (f *Firewall) retryRead(change func(st *kernelState) error) error {
	err := change(nil)
	if err != nil && errors.Is(err, errCommit) {
		st, rerr := f.readState()
		if rerr != nil {
			return rerr
		}
		err = change(&st)
	}
	return err
}

// errCommit marks a failed commit (as opposed to a failure to build).
var errCommit = errors.New("commit failed")

// addNIC builds and commits AddNIC's batch, reading the shards p leaves
// (or taking them from st, a full read, which also lets it replace chains
// of the wrong kind).
func (f *Firewall) addNIC(p network.NICPlan, st *kernelState) error {
	if err := f.stageAdd(p, st); err != nil {
		return f.abort(err)
	}
	if err := f.flush("add nic " + p.HostDevice); err != nil {
		return fmt.Errorf("%w (%w)", err, errCommit)
	}
	return nil
}

// StageNICs queues AddNIC's change for each of plans on c, a connection
// the caller flushes with other changes as one transaction (nf_tables walks
// every chain of the namespace once per commit, whatever the commit
// holds), and returns done, which the caller must call once with the
// flush's result (nil: committed). The Firewall stays locked until then.
// On an error nothing is locked and c holds part of the change: discard c.
func (f *Firewall) StageNICs(plans []network.NICPlan, c *nftables.Conn) (done func(error), err error) {
	if err := (network.Plan{NICs: plans}).Validate(); err != nil {
		return nil, err
	}
	f.mu.Lock()
	for _, p := range plans {
		f.wrote(p.HostDevice)
	}
	if err := f.load(); err != nil {
		f.unlock()
		return nil, err
	}
	own := f.conn
	f.conn = c
	for _, p := range plans {
		if err = f.stageAdd(p, nil); err != nil {
			break
		}
	}
	f.conn = own
	pending, b := f.pendingShared, f.batch
	f.pendingShared, f.batch = map[setKey]uint32{}, newBatch()
	if err != nil {
		f.unlock()
		return nil, err
	}
	return func(ferr error) {
		if ferr != nil {
			f.forget()
		} else {
			f.applied(pending, b)
		}
		f.unlock()
	}, nil
}

// stageAdd queues AddNIC's batch on f.conn, reading the shards p leaves
// (or taking them from st, a full read, which also lets it replace chains
// of the wrong kind). The caller discards the batch on an error.
func (f *Firewall) stageAdd(p network.NICPlan, st *kernelState) error {
	dev := p.HostDevice
	s := ShardOf(p)
	carry := map[string]counterVal{}
	type old struct {
		s  int
		ss *shardState
	}
	var olds []old
	for _, o := range f.where[dev] {
		if o == s {
			continue
		}
		ss, err := f.shardOf(st, o, dev)
		if err != nil {
			return err
		}
		if ss == nil || !ss.exists {
			continue
		}
		maps.Copy(carry, ss.countersOf(dev))
		olds = append(olds, old{o, ss})
	}
	f.queueBase()
	for _, o := range olds {
		if others := slices.DeleteFunc(f.shardNICs(o.s, o.ss), func(d string) bool { return d == dev }); len(others) == 0 {
			f.queueDropShard(o.s)
			f.batch.where[dev] = nil
		} else {
			f.queueRemove(o.s, o.ss, dev)
		}
	}
	if st != nil && st.shards[s] != nil {
		f.queueFixHooks(s, st.shards[s], dev)
	}
	return f.queueNIC(p, s, carry)
}

// shardNICs lists the NICs of shard s: those with objects in ss and those
// the Firewall has put there.
func (f *Firewall) shardNICs(s int, ss *shardState) []string {
	out := ss.nics()
	for dev, shards := range f.where {
		if slices.Contains(shards, s) {
			out = append(out, dev)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// UpdateNIC replaces one NIC's rules and sets in one batch; its counters
// keep their values.
func (f *Firewall) UpdateNIC(p network.NICPlan) error { return f.AddNIC(p) }

// RemoveNIC removes everything one NIC owns in one batch, reading only its
// shard table; the shard table goes too when it holds no other NIC.
// Removing a NIC that has no state is not an error.
func (f *Firewall) RemoveNIC(hostDev string) error {
	f.mu.Lock()
	defer f.unlock()
	f.wrote(hostDev)
	if err := f.load(); err != nil {
		return err
	}
	// Some object assumed to exist may not.
	return f.retryRead(func(st *kernelState) error { return f.removeNIC(hostDev, st) })
}

// removeNIC removes hostDev from every shard holding it, reading each
// (unless st, a full read, is given).
func (f *Firewall) removeNIC(hostDev string, st *kernelState) error {
	shards := slices.Clone(f.where[hostDev])
	if len(shards) == 0 {
		return nil
	}
	final := map[network.Control]uint64{}
	n := network.NamesFor(hostDev)
	for _, s := range shards {
		ss, err := f.shardOf(st, s, hostDev)
		if err != nil {
			return f.abort(err)
		}
		if ss == nil || !ss.exists {
			continue
		}
		for _, c := range network.AllControls {
			if v, ok := ss.counters[n.Counter(c)]; ok {
				final[c] += v.packets
			}
		}
		if others := slices.DeleteFunc(f.shardNICs(s, ss), func(d string) bool { return d == hostDev }); len(others) == 0 {
			f.queueDropShard(s)
		} else {
			f.queueRemove(s, ss, hostDev)
		}
	}
	f.batch.where[hostDev] = nil
	f.batch.queued = true
	if err := f.flush("remove nic " + hostDev); err != nil {
		return fmt.Errorf("%w (%w)", err, errCommit)
	}
	f.notifyRemoved(hostDev, final)
	return nil
}

// Apply makes the tables hold exactly the desired NICs: NICs not desired
// are removed (shard tables left without NICs are deleted), desired ones
// are (re)written, in batches of at most nicsPerBatch NICs (each NIC's
// change, a move between shards included, within one batch). Counters of
// NICs that stay keep their values. Apply also repairs drift (flushed or
// deleted tables, chains, sets; objects of an older layout in the bridge
// table).
func (f *Firewall) Apply(ctx context.Context, desired []network.NICPlan) error {
	if err := (network.Plan{NICs: desired}).Validate(); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.unlock()
	st, err := f.readState()
	if err != nil {
		return err
	}
	f.wrote(st.nics()...)
	want := map[string]int{}
	wantShard := map[int]bool{}
	for _, p := range desired {
		f.wrote(p.HostDevice)
		want[p.HostDevice] = ShardOf(p)
		wantShard[want[p.HostDevice]] = true
	}
	var gone []removed
	queued := 0
	if len(st.bridgeExtra) > 0 {
		f.conn.DelTable(bridgeTable())
	}
	f.queueBase()
	gone, err = f.queueStale(st, want, wantShard, &queued, "apply firewall")
	if err != nil {
		return err
	}
	for _, p := range (network.Plan{NICs: desired}).Sorted() {
		if err := f.queueMove(st, p, want[p.HostDevice]); err != nil {
			return f.abort(err)
		}
		if err := f.chunk(&queued, "apply firewall"); err != nil {
			return err
		}
	}
	if err := f.flush("apply firewall"); err != nil {
		return err
	}
	for _, g := range gone {
		f.notifyRemoved(g.dev, g.final)
	}
	return nil
}

// queueStale queues the removal of every NIC in st that is not desired
// (want maps desired devices to their shards): a shard holding only such
// NICs, and no desired one, is deleted whole. It returns the removed NICs
// with their final counters.
func (f *Firewall) queueStale(st kernelState, want map[string]int, wantShard map[int]bool, queued *int, what string) ([]removed, error) {
	var gone []removed
	for _, s := range st.shardList() {
		ss := st.shards[s]
		var stale []string
		keep := false
		for _, dev := range ss.nics() {
			if _, ok := want[dev]; ok {
				keep = true
			} else {
				stale = append(stale, dev)
			}
		}
		for _, dev := range stale {
			gone = append(gone, removed{dev: dev, final: finalCounters(ss, dev)})
		}
		if !keep && !wantShard[s] {
			f.queueDropShard(s)
			for _, dev := range stale {
				f.batch.where[dev] = nil
			}
			if err := f.chunk(queued, what); err != nil {
				return nil, err
			}
			continue
		}
		for _, dev := range stale {
			f.queueRemove(s, ss, dev)
			if err := f.chunk(queued, what); err != nil {
				return nil, err
			}
		}
	}
	return gone, nil
}

// queueMove queues p in shard s, removing it from any other shard st shows
// it in (carrying its counters over).
func (f *Firewall) queueMove(st kernelState, p network.NICPlan, s int) error {
	carry := map[string]counterVal{}
	for _, o := range st.shardList() {
		ss := st.shards[o]
		if o == s || !slices.Contains(ss.nics(), p.HostDevice) {
			continue
		}
		maps.Copy(carry, ss.countersOf(p.HostDevice))
		f.queueRemove(o, ss, p.HostDevice)
	}
	if ss := st.shards[s]; ss != nil {
		f.queueFixHooks(s, ss, p.HostDevice)
	}
	return f.queueNIC(p, s, carry)
}

// nicHooks maps every chain of a NIC to the hook it must have (nil: none).
func nicHooks(n network.Names) map[string]*nftables.ChainHook {
	out := map[string]*nftables.ChainHook{}
	for _, name := range chainsOf(n) {
		out[name] = nil
	}
	out[n.FromChain()] = nftables.ChainHookIngress
	out[n.ToChain()] = nftables.ChainHookEgress
	return out
}

// queueFixHooks queues the deletion of dev's chains in shard s that are
// hooked other than queueNIC makes them (the kernel does not turn a
// regular chain into a base chain or back), after flushing all of dev's
// chains so no jump holds them. queueNIC then creates them afresh.
func (f *Firewall) queueFixHooks(s int, ss *shardState, dev string) {
	n := network.NamesFor(dev)
	var bad []string
	for name, hook := range nicHooks(n) {
		if ch := ss.chains[name]; ch != nil && !hookMatches(ch, hook) {
			bad = append(bad, name)
		}
	}
	if len(bad) == 0 {
		return
	}
	t := shardTable(s)
	for _, name := range chainsOf(n) {
		if ss.chains[name] != nil {
			f.conn.FlushChain(&nftables.Chain{Name: name, Table: t})
		}
	}
	for _, name := range bad {
		f.conn.DelChain(&nftables.Chain{Name: name, Table: t})
	}
	f.batch.queued = true
}

func finalCounters(ss *shardState, dev string) map[network.Control]uint64 {
	n := network.NamesFor(dev)
	out := map[network.Control]uint64{}
	for _, c := range network.AllControls {
		if v, ok := ss.counters[n.Counter(c)]; ok {
			out[c] = v.packets
		}
	}
	return out
}

// NICs lists the host devices that have state in the tables.
func (f *Firewall) NICs() ([]string, error) {
	f.mu.Lock()
	defer f.unlock()
	st, err := f.readState()
	if err != nil {
		return nil, err
	}
	return st.nics(), nil
}

// Counters returns the packet count of every control counter of hostDev,
// each read by name from its shard table (ErrNotFound when one is missing).
func (f *Firewall) Counters(hostDev string) (map[network.Control]uint64, error) {
	f.mu.Lock()
	defer f.unlock()
	s, err := f.nicShard(hostDev)
	if err != nil {
		return nil, fmt.Errorf("read counters of %s: %w", hostDev, err)
	}
	byName, err := readNICCounters(f.conn, s, hostDev)
	if err != nil {
		return nil, fmt.Errorf("read counters of %s: %w", hostDev, err)
	}
	n := network.NamesFor(hostDev)
	out := map[network.Control]uint64{}
	for _, ctl := range network.AllControls {
		v, ok := byName[n.Counter(ctl)]
		if !ok {
			return nil, fmt.Errorf("read counters of %s: %w", hostDev, ErrNotFound)
		}
		out[ctl] = v.packets
	}
	return out, nil
}

// TempBindings returns the temporary addresses hostDev's guest has bound
// by its DAD (privacy extensions, the port's <dev>-temp set) and not yet
// expired, with the time each binding has left.
func (f *Firewall) TempBindings(hostDev string) (map[netip.Addr]time.Duration, error) {
	f.mu.Lock()
	defer f.unlock()
	s, err := f.nicShard(hostDev)
	if err != nil {
		return nil, fmt.Errorf("read temporary addresses of %s: %w", hostDev, err)
	}
	n := network.NamesFor(hostDev)
	els, err := f.conn.GetSetElements(&nftables.Set{Table: shardTable(s), Name: n.TempSet(), KeyType: nftables.TypeIP6Addr})
	if err != nil {
		return nil, fmt.Errorf("read temporary addresses of %s: %w", hostDev, err)
	}
	out := map[netip.Addr]time.Duration{}
	for _, e := range els {
		if a, ok := netip.AddrFromSlice(e.Key); ok && a.Is6() {
			out[a] = e.Expires
		}
	}
	return out, nil
}

// RestoreTemp binds temporary addresses to hostDev's port again (its
// <dev>-temp set and its shard's priv_owned), each for the time it had
// left: metald's record of bindings a repair lost (the table was deleted
// and rewritten empty). An address another port bound meanwhile stays
// that port's (it is skipped). One batch.
func (f *Firewall) RestoreTemp(hostDev string, left map[netip.Addr]time.Duration) error {
	f.mu.Lock()
	defer f.unlock()
	s, err := f.nicShard(hostDev)
	if err != nil {
		return fmt.Errorf("restore temporary addresses of %s: %w", hostDev, err)
	}
	t := shardTable(s)
	owned, err := f.conn.GetSetElements(&nftables.Set{Table: t, Name: PrivOwnedSet, KeyType: nftables.TypeIP6Addr})
	if err != nil {
		return fmt.Errorf("restore temporary addresses of %s: %w", hostDev, err)
	}
	taken := map[netip.Addr]bool{}
	for _, e := range owned {
		if a, ok := netip.AddrFromSlice(e.Key); ok {
			taken[a] = true
		}
	}
	n := network.NamesFor(hostDev)
	var els []nftables.SetElement
	for a, d := range left {
		if d <= 0 || taken[a] {
			continue
		}
		els = append(els, nftables.SetElement{Key: a.AsSlice(), Timeout: d})
	}
	if len(els) == 0 {
		return nil
	}
	for _, set := range []string{n.TempSet(), PrivOwnedSet} {
		if err := f.conn.SetAddElements(&nftables.Set{Table: t, Name: set, KeyType: nftables.TypeIP6Addr, HasTimeout: true}, els); err != nil {
			return fmt.Errorf("restore temporary addresses of %s: %w", hostDev, err)
		}
	}
	f.batch.queued = true
	return f.flush("restore temporary addresses of " + hostDev)
}

// EvictTemp unbinds temporary addresses from hostDev's port (its
// <dev>-temp set and its shard's priv_owned), in one batch: metald found
// them bound to another NIC (its configured address), which the first
// come, first served learning cannot know. An address no longer in the sets
// (its binding expired meanwhile) is not an error.
func (f *Firewall) EvictTemp(hostDev string, addrs []netip.Addr) error {
	f.mu.Lock()
	defer f.unlock()
	s, err := f.nicShard(hostDev)
	if err != nil {
		return fmt.Errorf("evict temporary addresses of %s: %w", hostDev, err)
	}
	n := network.NamesFor(hostDev)
	var errs []error
	for _, a := range addrs {
		// One batch per element: a missing one fails its batch only.
		els := []nftables.SetElement{{Key: a.AsSlice()}}
		for _, set := range []string{n.TempSet(), PrivOwnedSet} {
			if err := f.conn.SetDeleteElements(&nftables.Set{Table: shardTable(s), Name: set, KeyType: nftables.TypeIP6Addr}, els); err != nil {
				errs = append(errs, fmt.Errorf("evict %s from %s: %w", a, hostDev, err))
				continue
			}
			f.batch.queued = true
			if err := f.flush("evict " + a.String() + " from " + set); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// nicShard returns the shard holding hostDev's objects (ErrNotFound when
// none does). The caller holds mu.
func (f *Firewall) nicShard(hostDev string) (int, error) {
	if err := f.load(); err != nil {
		return 0, err
	}
	shards := f.where[hostDev]
	if len(shards) == 0 {
		return 0, ErrNotFound
	}
	return shards[0], nil
}
