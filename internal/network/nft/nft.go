package nft

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/metald/metald/internal/network"
	"github.com/metald/metald/internal/network/nftconn"
	"github.com/metald/metald/internal/network/nftgen"
)

// ErrNotFound reports a NIC that has no state in the table.
var ErrNotFound = errors.New("nic not programmed")

// Firewall programs metald's bridge table through one nftables connection.
// Every method is one netlink batch (one Conn.Flush); methods are safe for
// concurrent use.
type Firewall struct {
	// logGroup, when not 0, makes counted drops log a rate-limited sample
	// to this NFLOG group (SetLogGroup).
	logGroup uint16
	mu       sync.Mutex
	conn     *nftables.Conn
	obs      Observer
	// pending are removal notifications queued under mu and delivered
	// after it is released (see notifyRemoved).
	pending []removed
	// shared are the shared constant sets known to exist; pendingShared
	// those queued in the batch being built (name -> batch id).
	shared        map[string]bool
	pendingShared map[string]uint32
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

// Close releases the netlink connection; the table stays.
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
	return &Firewall{conn: c, shared: map[string]bool{}, pendingShared: map[string]uint32{}, lastWrite: map[string]uint64{}}
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

func baseChain(name string, hook *nftables.ChainHook) *nftables.Chain {
	accept := nftables.ChainPolicyAccept
	return &nftables.Chain{
		Name: name, Table: table(), Type: nftables.ChainTypeFilter,
		Hooknum: hook, Priority: nftables.ChainPriorityRef(BasePriority), Policy: &accept,
	}
}

func vmap(name string) *nftables.Set {
	// ifname keys are strings: nft expects host byte order to print them.
	return &nftables.Set{Table: table(), Name: name, IsMap: true, KeyType: nftables.TypeIFName,
		DataType: nftables.TypeVerdict, KeyByteOrder: binaryutil.NativeEndian}
}

// dynamicSet is an address set filled from the packet path, with
// per-element timeouts.
func dynamicSet(name string) *nftables.Set {
	return &nftables.Set{Table: table(), Name: name, KeyType: nftables.TypeIP6Addr, Dynamic: true, HasTimeout: true}
}

func dispatch(key expr.MetaKey, set string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Lookup{SourceRegister: 1, SetName: set, DestRegister: 0, IsDestRegSet: true},
	}
}

// queueBase queues the table, base chains and dispatch maps. Re-adding
// existing objects is a no-op, so every batch starts with it; the base
// chains' single dispatch rule is rewritten each time.
func (f *Firewall) queueBase() error {
	c := f.conn
	c.AddTable(table())
	for _, m := range []string{FromVMMap, ToVMMap} {
		if err := c.AddSet(vmap(m), nil); err != nil {
			return fmt.Errorf("add map %s: %w", m, err)
		}
	}
	if err := c.AddSet(dynamicSet(PrivOwnedSet), nil); err != nil {
		return fmt.Errorf("add set %s: %w", PrivOwnedSet, err)
	}
	for _, b := range baseChains() {
		ch := c.AddChain(baseChain(b.name, b.hook))
		c.FlushChain(ch)
		for _, r := range b.rules {
			c.AddRule(&nftables.Rule{Table: table(), Chain: ch, Exprs: r.exprs, UserData: commentData(r.comment)})
		}
	}
	return nil
}

type baseSpec struct {
	name  string
	hook  *nftables.ChainHook
	rules []rule
}

// baseChains are the hooked chains and their fixed rules.
func baseChains() []baseSpec {
	d := func(key expr.MetaKey, set string) []rule {
		return []rule{{exprs: dispatch(key, set), comment: "metald dispatch"}}
	}
	return []baseSpec{
		{ChainPrerouting, nftables.ChainHookPrerouting, d(expr.MetaKeyIIFNAME, FromVMMap)},
		{ChainForward, nftables.ChainHookForward, d(expr.MetaKeyOIFNAME, ToVMMap)},
		{ChainOutput, nftables.ChainHookOutput, d(expr.MetaKeyOIFNAME, ToVMMap)},
		// VLAN marks stay inside the bridge.
		{ChainInput, nftables.ChainHookInput, []rule{{exprs: append(markTagged(), setMark(0)...), comment: "metald vlan mark clear"}}},
	}
}

// queueNIC queues the complete state of one NIC, replacing what it had.
// The port's map entries are added last, after its chains are complete.
func (f *Firewall) queueNIC(p network.NICPlan) error {
	if err := p.Validate(); err != nil {
		return err
	}
	c := f.conn
	spec := buildNIC(p, f.logGroup)
	chains := map[string]*nftables.Chain{}
	for _, name := range spec.chains {
		ch := c.AddChain(&nftables.Chain{Name: name, Table: table()})
		c.FlushChain(ch)
		chains[name] = ch
	}
	for _, s := range spec.sets {
		set := &nftables.Set{Table: table(), Name: s.name, KeyType: s.keyType}
		if s.dynamic {
			// packet-path state: created once, never flushed
			if err := c.AddSet(dynamicSet(s.name), nil); err != nil {
				return fmt.Errorf("add set %s: %w", s.name, err)
			}
			continue
		}
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
	for _, name := range countersOf(spec.names) {
		c.AddObj(&nftables.CounterObj{Table: table(), Name: name})
	}
	for _, r := range spec.rules {
		for _, a := range r.anons {
			id, err := f.ensureShared(a)
			if err != nil {
				return err
			}
			a.lookup.SetID = id
		}
		c.AddRule(&nftables.Rule{Table: table(), Chain: chains[r.chain], Exprs: r.exprs, UserData: commentData(r.comment)})
	}
	key := ifnameKey(p.HostDevice)
	if err := c.SetAddElements(vmap(FromVMMap), []nftables.SetElement{{Key: key,
		VerdictData: &expr.Verdict{Kind: expr.VerdictGoto, Chain: spec.names.FromChain()}}}); err != nil {
		return fmt.Errorf("add %s to %s: %w", p.HostDevice, FromVMMap, err)
	}
	if err := c.SetAddElements(vmap(ToVMMap), []nftables.SetElement{{Key: key,
		VerdictData: &expr.Verdict{Kind: expr.VerdictGoto, Chain: spec.names.ToChain()}}}); err != nil {
		return fmt.Errorf("add %s to %s: %w", p.HostDevice, ToVMMap, err)
	}
	return nil
}

// kernelState is what the table holds now, as far as removal needs it.
type kernelState struct {
	exists   bool
	chains   map[string]bool
	sets     map[string]bool
	counters map[string]bool
	packets  map[string]uint64 // counter name -> packets
	fromKeys map[string]bool
	toKeys   map[string]bool
	// fromTarget and toTarget map a port to the chain its map entry jumps to.
	fromTarget map[string]string
	toTarget   map[string]string
}

// readState reads the kernel on the batch connection and re-learns which
// shared sets exist. The caller holds mu.
func (f *Firewall) readState() (kernelState, error) {
	st, err := readKernel(f.conn)
	f.shared = map[string]bool{}
	for name := range st.sets {
		f.shared[name] = true
	}
	return st, err
}

// readKernel reads what the table holds on connection c.
func readKernel(c *nftables.Conn) (kernelState, error) {
	st := kernelState{chains: map[string]bool{}, sets: map[string]bool{}, counters: map[string]bool{},
		packets: map[string]uint64{}, fromKeys: map[string]bool{}, toKeys: map[string]bool{},
		fromTarget: map[string]string{}, toTarget: map[string]string{}}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyBridge)
	if err != nil {
		return st, fmt.Errorf("list tables: %w", err)
	}
	for _, t := range tables {
		if t.Name == TableName {
			st.exists = true
		}
	}
	if !st.exists {
		return st, nil
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyBridge)
	if err != nil {
		return st, fmt.Errorf("list chains: %w", err)
	}
	for _, ch := range chains {
		if ch.Table.Name == TableName {
			st.chains[ch.Name] = true
		}
	}
	sets, err := c.GetSets(table())
	if err != nil {
		return st, fmt.Errorf("list sets: %w", err)
	}
	for _, s := range sets {
		st.sets[s.Name] = true
		if s.Name == FromVMMap || s.Name == ToVMMap {
			els, err := c.GetSetElements(s)
			if err != nil {
				return st, fmt.Errorf("list %s: %w", s.Name, err)
			}
			for _, e := range els {
				k := strings.TrimRight(string(e.Key), "\x00")
				target := ""
				if e.VerdictData != nil {
					target = e.VerdictData.Chain
				} else {
					target = verdictChain(e.Val)
				}
				if s.Name == FromVMMap {
					st.fromKeys[k] = true
					st.fromTarget[k] = target
				} else {
					st.toKeys[k] = true
					st.toTarget[k] = target
				}
			}
		}
	}
	objs, err := c.GetNamedObjects(table())
	if err != nil {
		return st, fmt.Errorf("list objects: %w", err)
	}
	for _, o := range objs {
		if co, ok := o.(*nftables.CounterObj); ok {
			st.counters[co.Name] = true
			st.packets[co.Name] = co.Packets
		} else if no, ok := o.(*nftables.NamedObj); ok && no.Type == nftables.ObjTypeCounter {
			st.counters[no.Name] = true
			if cnt, ok := no.Obj.(*expr.Counter); ok {
				st.packets[no.Name] = cnt.Packets
			}
		}
	}
	return st, nil
}

// nics returns the host devices with state in the table: every NIC owns a
// "<dev>-addrs" set, and map entries point at NIC chains.
func (st kernelState) nics() []string {
	seen := map[string]bool{}
	for s := range st.sets {
		if dev, ok := strings.CutSuffix(s, "-addrs"); ok && network.ValidHostDevice(dev) {
			seen[dev] = true
		}
	}
	for k := range st.fromKeys {
		seen[k] = true
	}
	for k := range st.toKeys {
		seen[k] = true
	}
	out := make([]string, 0, len(seen))
	for k := range seen {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// queueRemove queues the removal of everything hostDev owns that exists.
func (f *Firewall) queueRemove(st kernelState, hostDev string) error {
	c := f.conn
	n := network.NamesFor(hostDev)
	key := ifnameKey(hostDev)
	if st.fromKeys[hostDev] {
		if err := c.SetDeleteElements(vmap(FromVMMap), []nftables.SetElement{{Key: key}}); err != nil {
			return err
		}
	}
	if st.toKeys[hostDev] {
		if err := c.SetDeleteElements(vmap(ToVMMap), []nftables.SetElement{{Key: key}}); err != nil {
			return err
		}
	}
	var chs []*nftables.Chain
	for _, name := range chainsOf(n) {
		if st.chains[name] {
			ch := &nftables.Chain{Name: name, Table: table()}
			c.FlushChain(ch)
			chs = append(chs, ch)
		}
	}
	for _, ch := range chs {
		c.DelChain(ch)
	}
	for _, s := range setsOf(n) {
		if st.sets[s] {
			c.DelSet(&nftables.Set{Table: table(), Name: s})
		}
	}
	for _, o := range countersOf(n) {
		if st.counters[o] {
			c.DeleteObject(&nftables.CounterObj{Table: table(), Name: o})
		}
	}
	return nil
}

// ensureShared queues the creation of the shared constant set a rule looks
// up unless it exists (known from an earlier batch, asked of the kernel
// once, or queued in this batch). It returns the batch id of a set queued
// now, 0 for one that exists.
func (f *Firewall) ensureShared(a anonSet) (uint32, error) {
	if id, ok := f.pendingShared[a.name]; ok {
		return id, nil
	}
	if f.shared[a.name] {
		return 0, nil
	}
	if _, err := f.conn.GetSetByName(table(), a.name); err == nil {
		f.shared[a.name] = true
		return 0, nil
	} else if !errors.Is(err, unix.ENOENT) {
		return 0, fmt.Errorf("look up set %s: %w", a.name, err)
	}
	set := &nftables.Set{Table: table(), Name: a.name, KeyType: a.keyType, Constant: true}
	var el []nftables.SetElement
	for _, e := range a.elems {
		el = append(el, nftables.SetElement{Key: e})
	}
	if err := f.conn.AddSet(set, el); err != nil {
		return 0, fmt.Errorf("add set %s: %w", a.name, err)
	}
	f.pendingShared[a.name] = set.ID
	return set.ID, nil
}

// abort discards the batch being built after a build error: queued
// messages cannot be taken back, so the connection is replaced.
func (f *Firewall) abort(err error) error {
	f.pendingShared = map[string]uint32{}
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

func (f *Firewall) flush(what string) error {
	pending := f.pendingShared
	f.pendingShared = map[string]uint32{}
	if err := f.conn.Flush(); err != nil {
		// What exists is unknown now: ask the kernel again next time.
		f.shared = map[string]bool{}
		return fmt.Errorf("%s: %w", what, err)
	}
	if f.gens != nil {
		f.gens.Note()
	}
	for name := range pending {
		f.shared[name] = true
	}
	return nil
}

// AddNIC installs (or replaces) the chains, sets, counters and map entries
// of one NIC in one batch. It may run before the port exists.
func (f *Firewall) AddNIC(p network.NICPlan) error {
	f.mu.Lock()
	defer f.unlock()
	f.wrote(p.HostDevice)
	cached := len(f.shared) > 0
	if err := f.queueBase(); err != nil {
		return f.abort(err)
	}
	if err := f.queueNIC(p); err != nil {
		return f.abort(err)
	}
	err := f.flush("add nic " + p.HostDevice)
	if err != nil && cached {
		// A shared set this batch relied on may have gone with the table:
		// build again, asking the kernel.
		if err := f.queueBase(); err != nil {
			return f.abort(err)
		}
		if err := f.queueNIC(p); err != nil {
			return f.abort(err)
		}
		return f.flush("add nic " + p.HostDevice)
	}
	return err
}

// UpdateNIC replaces one NIC's rules and sets in one batch; its counters
// keep their values.
func (f *Firewall) UpdateNIC(p network.NICPlan) error { return f.AddNIC(p) }

// RemoveNIC removes everything one NIC owns in one batch. Removing a NIC
// that has no state is not an error.
func (f *Firewall) RemoveNIC(hostDev string) error {
	f.mu.Lock()
	defer f.unlock()
	f.wrote(hostDev)
	st, err := f.readState()
	if err != nil {
		return err
	}
	if !st.exists {
		return nil
	}
	if err := f.queueRemove(st, hostDev); err != nil {
		return f.abort(err)
	}
	if err := f.flush("remove nic " + hostDev); err != nil {
		return err
	}
	f.notifyRemoved(st, hostDev)
	return nil
}

// Apply makes the table hold exactly the desired NICs: NICs not desired
// are removed, desired ones are (re)written, in batches of at most
// nicsPerBatch NICs (each NIC's change within one batch). Counters of NICs
// that stay keep their values. Apply also repairs drift (flushed or deleted
// chains, sets, map entries).
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
	for _, p := range desired {
		f.wrote(p.HostDevice)
	}
	want := map[string]bool{}
	for _, p := range desired {
		want[p.HostDevice] = true
	}
	var gone []string
	queued := 0
	if err := f.queueBase(); err != nil {
		return f.abort(err)
	}
	for _, dev := range st.nics() {
		if !want[dev] {
			if err := f.queueRemove(st, dev); err != nil {
				return f.abort(err)
			}
			gone = append(gone, dev)
			if err := f.chunk(&queued, "apply firewall"); err != nil {
				return err
			}
		}
	}
	for _, p := range (network.Plan{NICs: desired}).Sorted() {
		if err := f.queueNIC(p); err != nil {
			return f.abort(err)
		}
		if err := f.chunk(&queued, "apply firewall"); err != nil {
			return err
		}
	}
	if err := f.flush("apply firewall"); err != nil {
		return err
	}
	for _, dev := range gone {
		f.notifyRemoved(st, dev)
	}
	return nil
}

// NICs lists the host devices that have state in the table.
func (f *Firewall) NICs() ([]string, error) {
	f.mu.Lock()
	defer f.unlock()
	st, err := f.readState()
	if err != nil {
		return nil, err
	}
	return st.nics(), nil
}

// Counters returns the packet count of every control counter of hostDev.
func (f *Firewall) Counters(hostDev string) (map[network.Control]uint64, error) {
	f.mu.Lock()
	defer f.unlock()
	objs, err := f.conn.GetNamedObjects(table())
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, fmt.Errorf("read counters of %s: %w", hostDev, ErrNotFound)
		}
		return nil, fmt.Errorf("read counters of %s: %w", hostDev, err)
	}
	byName := map[string]uint64{}
	for _, o := range objs {
		switch co := o.(type) {
		case *nftables.CounterObj:
			byName[co.Name] = co.Packets
		case *nftables.NamedObj:
			if cnt, ok := co.Obj.(*expr.Counter); ok {
				byName[co.Name] = cnt.Packets
			}
		}
	}
	n := network.NamesFor(hostDev)
	out := map[network.Control]uint64{}
	for _, ctl := range network.AllControls {
		v, ok := byName[n.Counter(ctl)]
		if !ok {
			return nil, fmt.Errorf("read counters of %s: %w", hostDev, ErrNotFound)
		}
		out[ctl] = v
	}
	return out, nil
}

// verdictChain extracts the chain of a map element's verdict data as
// google/nftables returns it (the NFTA_DATA_VERDICT attributes).
func verdictChain(b []byte) string {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return ""
	}
	for ad.Next() {
		if ad.Type() == unix.NFTA_VERDICT_CHAIN {
			return strings.TrimRight(ad.String(), "\x00")
		}
	}
	return ""
}
