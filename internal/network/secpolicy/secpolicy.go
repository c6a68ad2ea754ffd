package secpolicy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/metald/metald/internal/network/nftconn"
	"github.com/metald/metald/internal/network/nftgen"
	"github.com/metald/metald/internal/network/setname"
	"github.com/metald/metald/internal/policy"
)

func mainTable() *nftables.Table {
	return &nftables.Table{Name: TableName, Family: nftables.TableFamilyIPv6}
}

func shardTable(i int) *nftables.Table {
	return &nftables.Table{Name: ShardTable(i), Family: nftables.TableFamilyIPv6}
}

// nicTable is the shard table of NIC key k.
func nicTable(k string) *nftables.Table { return shardTable(Shard(k)) }

func addrSet(t *nftables.Table, name string) *nftables.Set {
	return &nftables.Set{Table: t, Name: name, KeyType: nftables.TypeIP6Addr}
}

func vmapSet(t *nftables.Table, name string) *nftables.Set {
	return &nftables.Set{Table: t, Name: name, IsMap: true, KeyType: nftables.TypeIP6Addr, DataType: nftables.TypeVerdict}
}

func macMapSet(t *nftables.Table) *nftables.Set {
	return &nftables.Set{Table: t, Name: EgressMACMap, IsMap: true, KeyType: nftables.TypeEtherAddr, DataType: nftables.TypeVerdict}
}

func blockedSet() *nftables.Set {
	return &nftables.Set{Table: mainTable(), Name: BlockedSources, KeyType: nftables.TypeIP6Addr, Interval: true}
}

// setTables returns the tables that hold a copy of managed set name: every
// shard (a NIC chain of any shard may look it up), and for vm_addrs the
// main table too (its base chains look it up). The copies have the same
// elements.
func setTables(name string) []*nftables.Table {
	out := make([]*nftables.Table, 0, Shards+1)
	if name == VMAddrsSet {
		out = append(out, mainTable())
	}
	for i := range Shards {
		out = append(out, shardTable(i))
	}
	return out
}

func key16(a netip.Addr) []byte { b := a.As16(); return b[:] }

// nicState is what the manager knows a NIC has in the kernel.
type nicState struct {
	plan   *NICPolicy // nil when loaded from the kernel
	gen    uint64
	chains []string // chains of generation gen (helpers; in an earlier layout also the main chains), longest name first
	addrs  []netip.Addr
	mac    net.HardwareAddr // the key of its egress_by_mac element, nil when it has none
	sets   []string         // named address sets its addresses are members of
	// tramp is true when the NIC's main chains (generation 0) exist and
	// the maps point at them (an earlier layout kept the main rules in
	// generation chains and only a jump to them in generation 0).
	tramp bool
}

// Manager programs the policy tables (the main `table ip6
// metald_security` and its shards, see doc.go) through one nftables
// connection. Each method is one netlink batch; methods are safe for
// concurrent use.
type Manager struct {
	mu   sync.Mutex
	conn *nftables.Conn
	opts []nftables.ConnOption
	// commits counts committed changes (Drifted tells a comparison that
	// raced one of them).
	commits uint64
	loaded  bool
	based   bool // base chains (re)written by this manager
	nics    map[string]*nicState
	sets    map[string]bool                               // managed named sets that exist in every table of setTables
	owners  map[string]map[netip.Addr]map[string]struct{} // set → addr → owning NIC keys ("" = explicit)
	byAddr  map[netip.Addr]string                         // addr → NIC key
	byMAC   map[string]string                             // MAC (its 6 bytes) → NIC key
	groups  map[string][]netip.Addr                       // explicit group members
	// present holds "<table>/<set>" for every set found or created.
	present map[string]bool
	// mainAddrs are the elements of the main table's vm_addrs as loaded;
	// queueBase makes them equal to the shards' copy.
	mainAddrs []netip.Addr
	// legacyChains and legacySets are objects of the single-table layout
	// (NIC chains, log chains, maps and managed sets in the main table);
	// queueBase deletes them.
	legacyChains, legacySets []string
	// legacyBase are the shard tables' base chains of the layout before
	// this one (filter chains at forward, input and output that judged
	// every packet); queueBase deletes them.
	legacyBase []shardChain
	// staleShards are shard tables of a layout with another shard count
	// (a NIC's chains in a table that is not its shard): nothing in them is
	// loaded, queueBase deletes and recreates them, and the Apply that
	// follows a start programs every NIC again in its shard, in the same
	// batch.
	staleShards []int
	// names names anonymous sets explicitly (see package setname).
	names *setname.Namer
	// gens, when set, notes the ruleset generation after each commit
	// (package nftgen), so other tables' drift checks know it was metald.
	gens *nftgen.Tracker
}

// SetGenTracker makes every commit note the ruleset generation. Call it
// before using the Manager.
func (m *Manager) SetGenTracker(t *nftgen.Tracker) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.gens = t
}

// New returns a Manager for the network namespace open at nsFd (the
// caller's namespace when nsFd < 0). It reads what the tables already hold,
// so a restarted metald continues from the kernel state.
func New(nsFd int) (*Manager, error) {
	opts := nftconn.Options(nsFd)
	c, err := nftconn.Open(opts)
	if err != nil {
		return nil, err
	}
	m := &Manager{conn: c, opts: opts, names: setname.New()}
	if err := m.load(); err != nil {
		c.CloseLasting()
		return nil, err
	}
	return m, nil
}

// Close releases the netlink connection. The tables stay.
func (m *Manager) Close() error { return m.conn.CloseLasting() }

func isManagedSet(name string) bool {
	return name == VMAddrsSet || strings.HasPrefix(name, "tenant-") || strings.HasPrefix(name, "bridge-") || strings.HasPrefix(name, "sg-")
}

func presentKey(t *nftables.Table, set string) string { return t.Name + "/" + set }

// load rebuilds the in-memory model from the kernel.
func (m *Manager) load() error {
	m.nics = map[string]*nicState{}
	m.sets = map[string]bool{}
	m.owners = map[string]map[netip.Addr]map[string]struct{}{}
	m.byAddr = map[netip.Addr]string{}
	m.byMAC = map[string]string{}
	m.present = map[string]bool{}
	m.mainAddrs, m.legacyChains, m.legacySets, m.legacyBase, m.staleShards = nil, nil, nil, nil, nil
	if m.groups == nil {
		m.groups = map[string][]netip.Addr{}
	}
	m.based = false
	tables, err := m.conn.ListTablesOfFamily(nftables.TableFamilyIPv6)
	if err != nil {
		return fmt.Errorf("list tables: %w", err)
	}
	hasMain := false
	var shards []int
	for _, t := range tables {
		if t.Name == TableName {
			hasMain = true
		} else if i, ok := shardIndex(t.Name); ok {
			shards = append(shards, i)
		}
	}
	slices.Sort(shards)
	if !hasMain && len(shards) == 0 {
		m.loaded = true
		return nil
	}
	chains, err := m.conn.ListChainsOfTableFamily(nftables.TableFamilyIPv6)
	if err != nil {
		return fmt.Errorf("list chains: %w", err)
	}
	for _, ch := range chains {
		if ch.Table.Name == TableName {
			if _, _, _, ok := parseChainName(ch.Name); ok || ch.Name == chainLogDeny || ch.Name == chainLogAllow {
				m.legacyChains = append(m.legacyChains, ch.Name)
			}
			continue
		}
		i, ok := shardIndex(ch.Table.Name)
		if !ok {
			continue
		}
		if ch.Hooknum != nil && slices.ContainsFunc(baseChains, func(b baseChain) bool { return b.name == ch.Name }) {
			m.legacyBase = append(m.legacyBase, shardChain{i, ch.Name})
			continue
		}
		if k, _, _, ok := parseChainName(ch.Name); ok && Shard(k) != i {
			m.staleShards = shards
		}
		if k, _, gen, ok := parseChainName(ch.Name); ok && gen == 0 {
			m.nic(k).tramp = true
		} else if ok {
			st := m.nic(k)
			if gen > st.gen {
				st.gen, st.chains = gen, nil
			}
			if gen == st.gen {
				st.chains = append(st.chains, ch.Name)
			}
		}
	}
	if m.staleShards != nil {
		m.nics, m.legacyBase, shards = map[string]*nicState{}, nil, nil
	}
	if hasMain {
		sets, err := m.conn.GetSets(mainTable())
		if err != nil {
			return fmt.Errorf("list sets of %s: %w", TableName, err)
		}
		for _, s := range sets {
			m.present[presentKey(mainTable(), s.Name)] = true
			switch {
			case s.Name == VMAddrsSet:
				els, err := m.conn.GetSetElements(s)
				if err != nil {
					return fmt.Errorf("list %s of %s: %w", s.Name, TableName, err)
				}
				for _, e := range els {
					if a, ok := netip.AddrFromSlice(e.Key); ok {
						m.mainAddrs = append(m.mainAddrs, a)
					}
				}
			case s.Name == EgressMap || s.Name == IngressMap || isManagedSet(s.Name):
				m.legacySets = append(m.legacySets, s.Name)
			}
		}
	}
	// Managed sets: the copy of the first shard that has one (the copies
	// are changed in one transaction, so they are equal).
	count := map[string]int{}
	first := map[string]*nftables.Set{}
	for _, i := range shards {
		sets, err := m.conn.GetSets(shardTable(i))
		if err != nil {
			return fmt.Errorf("list sets of %s: %w", ShardTable(i), err)
		}
		for _, s := range sets {
			m.present[presentKey(shardTable(i), s.Name)] = true
			count[s.Name]++
			if first[s.Name] == nil {
				first[s.Name] = s
			}
			if s.Name == EgressMACMap {
				els, err := m.conn.GetSetElements(s)
				if err != nil {
					return fmt.Errorf("list %s of %s: %w", s.Name, ShardTable(i), err)
				}
				for _, e := range els {
					if k, _, _, ok := parseChainName(verdictChain(e)); ok && len(e.Key) >= 6 {
						m.nic(k).mac = net.HardwareAddr(slices.Clone(e.Key[:6]))
						m.byMAC[string(e.Key[:6])] = k
					}
				}
				continue
			}
			if s.Name != IngressMap {
				continue
			}
			els, err := m.conn.GetSetElements(s)
			if err != nil {
				return fmt.Errorf("list %s of %s: %w", s.Name, ShardTable(i), err)
			}
			for _, e := range els {
				a, ok := netip.AddrFromSlice(e.Key)
				if !ok {
					continue
				}
				if k, _, _, ok := parseChainName(verdictChain(e)); ok {
					st := m.nic(k)
					st.addrs = append(st.addrs, a)
					m.byAddr[a] = k
				}
			}
		}
	}
	for name, s := range first {
		if !isManagedSet(name) {
			continue
		}
		m.sets[name] = count[name] == Shards && (name != VMAddrsSet || m.present[presentKey(mainTable(), name)])
		els, err := m.conn.GetSetElements(s)
		if err != nil {
			return fmt.Errorf("list %s: %w", name, err)
		}
		for _, e := range els {
			a, ok := netip.AddrFromSlice(e.Key)
			if !ok {
				continue
			}
			owner := m.byAddr[a]
			m.own(name, a, owner)
			if owner != "" {
				m.nics[owner].sets = append(m.nics[owner].sets, name)
			} else if g, ok := strings.CutPrefix(name, "sg-"); ok {
				m.groups[g] = append(m.groups[g], a)
			}
		}
	}
	for _, st := range m.nics {
		slices.SortFunc(st.chains, func(a, b string) int { return len(b) - len(a) })
		slices.Sort(st.sets)
		st.sets = slices.Compact(st.sets)
	}
	m.loaded = true
	return nil
}

func (m *Manager) nic(k string) *nicState {
	st := m.nics[k]
	if st == nil {
		st = &nicState{}
		m.nics[k] = st
	}
	return st
}

func (m *Manager) own(set string, a netip.Addr, owner string) {
	as := m.owners[set]
	if as == nil {
		as = map[netip.Addr]map[string]struct{}{}
		m.owners[set] = as
	}
	os := as[a]
	if os == nil {
		os = map[string]struct{}{}
		as[a] = os
	}
	os[owner] = struct{}{}
}

// batch is one netlink transaction under construction: element changes are
// collected per set and queued in order before Flush.
type batch struct {
	m       *Manager
	adds    map[string][]netip.Addr
	dels    map[string][]netip.Addr
	newSets []string
	// unused collects managed sets that may have lost their last member
	// or reference in this batch (collectSets).
	unused map[string]bool
}

func (m *Manager) newBatch() *batch {
	return &batch{m: m, adds: map[string][]netip.Addr{}, dels: map[string][]netip.Addr{}, unused: map[string]bool{}}
}

// collectSets queues, at the end of a batch, the deletion of every
// candidate managed set (tenant-, bridge- and sg- sets; never vm_addrs)
// that has no member left (neither a NIC's address nor an explicit group
// member) and that no NIC's policy references: otherwise the sets of
// every tenant, bridge and group ever seen would pile up (eight copies
// each). Nothing is collected while a NIC's policy is unknown (loaded
// from the kernel and not yet applied): its chains may use the set.
func (b *batch) collectSets() {
	m := b.m
	var refs map[string]bool
	names := make([]string, 0, len(b.unused))
	for n := range b.unused {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, name := range names {
		if name == VMAddrsSet || !m.sets[name] || len(m.owners[name]) > 0 {
			continue
		}
		if refs == nil {
			refs = map[string]bool{}
			for _, st := range m.nics {
				if st.plan == nil {
					return
				}
				for _, s := range referencedSets(st.plan) {
					refs[s] = true
				}
			}
		}
		if refs[name] {
			continue
		}
		for _, t := range setTables(name) {
			m.conn.DelSet(addrSet(t, name))
			delete(m.present, presentKey(t, name))
		}
		delete(m.sets, name)
		delete(m.owners, name)
		for g, members := range m.groups {
			if groupSet(g) == name && len(members) == 0 {
				delete(m.groups, g)
			}
		}
	}
}

// addSet queues the creation of set s unless it is known to exist.
func (m *Manager) addSet(s *nftables.Set) error {
	k := presentKey(s.Table, s.Name)
	if m.present[k] {
		return nil
	}
	if err := m.conn.AddSet(s, nil); err != nil {
		return fmt.Errorf("add set %s of %s: %w", s.Name, s.Table.Name, err)
	}
	m.present[k] = true
	return nil
}

// ensureSet queues the creation of a managed address set in every table
// of setTables.
func (b *batch) ensureSet(name string) error {
	if b.m.sets[name] {
		return nil
	}
	for _, t := range setTables(name) {
		if err := b.m.addSet(addrSet(t, name)); err != nil {
			return err
		}
	}
	b.m.sets[name] = true
	b.newSets = append(b.newSets, name)
	return nil
}

// setOwner changes owner's membership of a in set, recording kernel
// element changes when the address's presence changes.
func (b *batch) setOwner(set string, a netip.Addr, owner string, member bool) {
	as := b.m.owners[set]
	was := len(as[a]) > 0
	if member {
		b.m.own(set, a, owner)
	} else if as != nil && as[a] != nil {
		delete(as[a], owner)
		if len(as[a]) == 0 {
			delete(as, a)
		}
	}
	now := len(b.m.owners[set][a]) > 0
	switch {
	case !was && now:
		b.adds[set] = append(b.adds[set], a)
	case was && !now:
		b.dels[set] = append(b.dels[set], a)
		b.unused[set] = true
	}
}

// queueElements queues the collected element changes, to every copy of
// each set.
func (b *batch) queueElements() error {
	c := b.m.conn
	names := make([]string, 0, len(b.adds)+len(b.dels))
	for s := range b.adds {
		names = append(names, s)
	}
	for s := range b.dels {
		names = append(names, s)
	}
	slices.Sort(names)
	names = slices.Compact(names)
	for _, s := range names {
		// An address both removed and re-added nets out to nothing.
		add, del := b.adds[s], b.dels[s]
		var dels, adds []nftables.SetElement
		for _, a := range del {
			if !slices.Contains(add, a) {
				dels = append(dels, nftables.SetElement{Key: key16(a)})
			}
		}
		for _, a := range add {
			if !slices.Contains(del, a) {
				adds = append(adds, nftables.SetElement{Key: key16(a)})
			}
		}
		for _, t := range setTables(s) {
			if len(dels) > 0 {
				if err := c.SetDeleteElements(addrSet(t, s), dels); err != nil {
					return fmt.Errorf("delete elements of %s of %s: %w", s, t.Name, err)
				}
			}
			if len(adds) > 0 {
				if err := c.SetAddElements(addrSet(t, s), adds); err != nil {
					return fmt.Errorf("add elements to %s of %s: %w", s, t.Name, err)
				}
			}
		}
	}
	return nil
}

type baseChain struct {
	name string
	hook *nftables.ChainHook
}

var baseChains = []baseChain{
	{ChainForward, nftables.ChainHookForward},
	{ChainInput, nftables.ChainHookInput},
	{ChainOutput, nftables.ChainHookOutput},
}

// shardChain names a chain of shard table i.
type shardChain struct {
	shard int
	name  string
}

// shardBase is a shard table's base chain: type nat, so the kernel calls
// it for the first packet of each new connection only (nf_nat runs a
// hook's nat chains until a connection has its binding; ours make none,
// and the binding nf_nat then sets up ends the calls for the connection's
// later packets, both directions).
type shardBase struct {
	baseChain
	priority *nftables.ChainPriority
}

var shardBaseChains = []shardBase{
	// Forwarded (bridged and routed) and host-sent packets. A nat chain
	// must come after conntrack (-200); -150 puts ours before any other
	// table's source NAT (srcnat is 100), whose binding would end the
	// walk over the hook's nat chains before ours.
	{baseChain{ChainNewPostrouting, nftables.ChainHookPostrouting}, nftables.ChainPriorityRef(-150)},
	// Packets to the host, after the main table's input chain (filter, 0).
	{baseChain{ChainNewInput, nftables.ChainHookInput}, nftables.ChainPriorityRef(10)},
}

// queueBase queues (once per manager) the main table with its base chains,
// and every shard table with its maps, log chains and base chains.
// blocked_sources is created only when absent and never flushed. Objects of
// the single-table layout left in the main table are deleted.
func (m *Manager) queueBase() error {
	if m.based {
		return nil
	}
	c := m.conn
	main := mainTable()
	c.AddTable(main)
	if err := m.addSet(blockedSet()); err != nil {
		return err
	}
	if err := m.addSet(addrSet(main, VMAddrsSet)); err != nil {
		return err
	}
	bl := c.AddChain(&nftables.Chain{Name: chainBlocked, Table: main})
	c.FlushChain(bl)
	if err := m.queueRules(main, bl, blockedRules()); err != nil {
		return err
	}
	ra := c.AddChain(&nftables.Chain{Name: chainRAFromVM, Table: main})
	c.FlushChain(ra)
	if err := m.queueRules(main, ra, raFromVMRules()); err != nil {
		return err
	}
	accept := nftables.ChainPolicyAccept
	for _, b := range baseChains {
		ch := c.AddChain(&nftables.Chain{Name: b.name, Table: main, Type: nftables.ChainTypeFilter,
			Hooknum: b.hook, Priority: nftables.ChainPriorityFilter, Policy: &accept})
		c.FlushChain(ch)
		if err := m.queueRules(main, ch, baseRules(b.name)); err != nil {
			return err
		}
	}
	// The single-table layout: its dispatch rules are gone with the flush
	// above; NIC chains jump to each other and the maps to them, so flush
	// the chains, delete the sets and maps, then the chains.
	for _, n := range m.legacyChains {
		c.FlushChain(&nftables.Chain{Name: n, Table: main})
	}
	for _, s := range m.legacySets {
		c.DelSet(&nftables.Set{Table: main, Name: s})
		delete(m.present, presentKey(main, s))
	}
	for _, n := range m.legacyChains {
		c.DelChain(&nftables.Chain{Name: n, Table: main})
	}
	// The main copy of vm_addrs follows the shards' (it differs after the
	// single-table layout or when the main table was deleted).
	var extra, missing []nftables.SetElement
	want := m.owners[VMAddrsSet]
	for _, a := range m.mainAddrs {
		if len(want[a]) == 0 {
			extra = append(extra, nftables.SetElement{Key: key16(a)})
		}
	}
	for a := range want {
		if !slices.Contains(m.mainAddrs, a) {
			missing = append(missing, nftables.SetElement{Key: key16(a)})
		}
	}
	if len(extra) > 0 {
		if err := c.SetDeleteElements(addrSet(main, VMAddrsSet), extra); err != nil {
			return fmt.Errorf("delete elements of %s: %w", VMAddrsSet, err)
		}
	}
	if len(missing) > 0 {
		if err := c.SetAddElements(addrSet(main, VMAddrsSet), missing); err != nil {
			return fmt.Errorf("add elements to %s: %w", VMAddrsSet, err)
		}
	}
	for _, i := range m.staleShards {
		c.DelTable(shardTable(i))
	}
	// The former layout's shard base chains: their dispatch rules hold
	// references to the maps, so flush, then delete.
	for _, l := range m.legacyBase {
		ch := &nftables.Chain{Name: l.name, Table: shardTable(l.shard)}
		c.FlushChain(ch)
		c.DelChain(ch)
	}
	for i := range Shards {
		t := shardTable(i)
		c.AddTable(t)
		// The former layouts' source-address map (egress is dispatched by
		// MAC): no rule refers to it once the chains above are gone.
		if k := presentKey(t, EgressMap); m.present[k] {
			c.DelSet(vmapSet(t, EgressMap))
			delete(m.present, k)
		}
		if err := m.addSet(addrSet(t, VMAddrsSet)); err != nil {
			return err
		}
		if err := m.addSet(vmapSet(t, IngressMap)); err != nil {
			return err
		}
		if err := m.addSet(macMapSet(t)); err != nil {
			return err
		}
		for _, cs := range logChains() {
			ch := c.AddChain(&nftables.Chain{Name: cs.name, Table: t})
			c.FlushChain(ch)
			if err := m.queueRules(t, ch, cs.rules); err != nil {
				return err
			}
		}
		for _, b := range shardBaseChains {
			ch := c.AddChain(&nftables.Chain{Name: b.name, Table: t, Type: nftables.ChainTypeNAT,
				Hooknum: b.hook, Priority: b.priority, Policy: &accept})
			c.FlushChain(ch)
			if err := m.queueRules(t, ch, shardBaseRules(b.name)); err != nil {
				return err
			}
		}
	}
	m.sets[VMAddrsSet] = true
	return nil
}

func (m *Manager) queueRules(t *nftables.Table, ch *nftables.Chain, rules []nrule) error {
	c := m.conn
	for _, r := range rules {
		for _, a := range r.anons {
			set := &nftables.Set{Table: t, Anonymous: true, Constant: true, Interval: a.interval, KeyType: a.keyType}
			m.names.Name(set)
			if err := c.AddSet(set, a.elems); err != nil {
				return fmt.Errorf("add anonymous set: %w", err)
			}
			a.lookup.SetID, a.lookup.SetName = set.ID, set.Name
		}
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: r.exprs, UserData: commentData(r.comment)})
	}
	return nil
}

// memberships returns the named address sets p's addresses belong to.
func memberships(p *NICPolicy) []string {
	s := []string{VMAddrsSet}
	if p.Tenant != "" {
		s = append(s, tenantSet(p.Tenant))
	}
	if p.Bridge != "" {
		s = append(s, bridgeSet(p.Bridge))
	}
	for _, g := range p.SecurityGroups {
		s = append(s, groupSet(g))
	}
	slices.Sort(s)
	return slices.Compact(s)
}

// referencedSets returns the named sets p's chains look up.
func referencedSets(p *NICPolicy) []string {
	s := memberships(p)
	for _, l := range [][]policy.Rule{p.Ingress, p.Egress, p.ManagementIngress, p.ManagementEgress} {
		for _, r := range l {
			for _, e := range []policy.Endpoint{r.Src, r.Dst} {
				if e.Kind == policy.EndpointGroup {
					s = append(s, groupSet(e.Group))
				}
			}
		}
	}
	slices.Sort(s)
	return slices.Compact(s)
}

// queueNIC queues the replacement of p's state. The caller holds m.mu.
func (m *Manager) queueNIC(b *batch, p *NICPolicy) error {
	if err := p.Validate(); err != nil {
		return err
	}
	k := p.key()
	for _, a := range p.Addrs {
		if o, ok := m.byAddr[a]; ok && o != k {
			return fmt.Errorf("%w: %s: address %s belongs to %s", ErrInvalid, k, a, o)
		}
	}
	// The egress dispatch is by MAC: two NICs with one MAC would share a
	// map key (in one shard) or each be judged by the other's rules.
	if o, ok := m.byMAC[string(p.MAC)]; ok && o != k {
		return fmt.Errorf("%w: %s: MAC %s belongs to %s", ErrInvalid, k, p.MAC, o)
	}
	c := m.conn
	t := nicTable(k)
	st := m.nic(k)
	oldGen, hadChains := st.gen, st.gen > 0
	if st.plan != nil {
		for _, s := range referencedSets(st.plan) {
			b.unused[s] = true
		}
	}
	for _, s := range referencedSets(p) {
		if err := b.ensureSet(s); err != nil {
			return err
		}
	}
	// Membership: remove old contributions, add new ones.
	newSets := memberships(p)
	for _, s := range st.sets {
		for _, a := range st.addrs {
			if !slices.Contains(newSets, s) || !slices.Contains(p.Addrs, a) {
				b.setOwner(s, a, k, false)
			}
		}
	}
	for _, s := range newSets {
		for _, a := range p.Addrs {
			b.setOwner(s, a, k, true)
		}
	}
	if err := b.queueElements(); err != nil {
		return err
	}
	b.adds, b.dels = map[string][]netip.Addr{}, map[string][]netip.Addr{}

	gen := oldGen + 1
	in, out := buildChain(p, dirIn, chainName(k, dirIn, gen)), buildChain(p, dirOut, chainName(k, dirOut, gen))
	// Helper chains are per generation: the new ones go in before the
	// main rules that jump to them, the old ones are deleted after the
	// main rules that jumped to them are replaced.
	var names []string
	for _, cs := range append(slices.Clone(in.helpers), out.helpers...) {
		ch := c.AddChain(&nftables.Chain{Name: cs.name, Table: t})
		if err := m.queueRules(t, ch, cs.rules); err != nil {
			return err
		}
		names = append(names, cs.name)
	}
	slices.SortFunc(names, func(a, b string) int { return len(b) - len(a) })
	// The maps point at one stable chain per direction (generation 0)
	// that holds the NIC's main rules. An update rewrites them in place:
	// flush and add in the one transaction, generation-masked like every
	// rule change, so a packet sees the old rules or the new ones, never
	// neither. Map elements change only when the NIC's addresses do:
	// replacing the element of a key in the same transaction leaves an
	// instant where a lookup misses and the packet falls through the
	// dispatch. (Every nf_tables commit walks every chain of the
	// namespace, so a NIC has no chain it does not need.)
	tin, tout := chainName(k, dirIn, 0), chainName(k, dirOut, 0)
	for _, main := range []struct {
		name  string
		rules []nrule
	}{{tin, in.main.rules}, {tout, out.main.rules}} {
		ch := c.AddChain(&nftables.Chain{Name: main.name, Table: t})
		c.FlushChain(ch)
		if err := m.queueRules(t, ch, main.rules); err != nil {
			return err
		}
	}
	if !bytes.Equal(st.mac, p.MAC) {
		if st.mac != nil {
			if err := c.SetDeleteElements(macMapSet(t), []nftables.SetElement{{Key: st.mac}}); err != nil {
				return err
			}
		}
		if err := c.SetAddElements(macMapSet(t), []nftables.SetElement{{Key: p.MAC, VerdictData: &expr.Verdict{Kind: expr.VerdictJump, Chain: tout}}}); err != nil {
			return err
		}
	}
	var gone []nftables.SetElement
	for _, a := range st.addrs {
		if !slices.Contains(p.Addrs, a) || !st.tramp {
			gone = append(gone, nftables.SetElement{Key: key16(a)})
		}
	}
	if len(gone) > 0 {
		if err := c.SetDeleteElements(vmapSet(t, IngressMap), gone); err != nil {
			return err
		}
	}
	var ig []nftables.SetElement
	for _, a := range p.Addrs {
		if slices.Contains(st.addrs, a) && st.tramp {
			continue // already points at the NIC's chain
		}
		ig = append(ig, nftables.SetElement{Key: key16(a), VerdictData: &expr.Verdict{Kind: expr.VerdictJump, Chain: tin}})
	}
	if len(ig) > 0 {
		if err := c.SetAddElements(vmapSet(t, IngressMap), ig); err != nil {
			return err
		}
	}
	st.tramp = true
	if hadChains {
		m.queueDelChains(t, st.chains)
	}
	for _, a := range st.addrs {
		delete(m.byAddr, a)
	}
	for _, a := range p.Addrs {
		m.byAddr[a] = k
	}
	delete(m.byMAC, string(st.mac))
	m.byMAC[string(p.MAC)] = k
	cp := *p
	st.plan, st.gen, st.chains, st.addrs, st.sets, st.mac = &cp, gen, names, slices.Clone(p.Addrs), newSets, slices.Clone(p.MAC)
	return nil
}

// queueDelChains flushes every chain of t first (dropping the jumps
// between them), then deletes them.
func (m *Manager) queueDelChains(t *nftables.Table, names []string) {
	for _, n := range names {
		m.conn.FlushChain(&nftables.Chain{Name: n, Table: t})
	}
	for _, n := range names {
		m.conn.DelChain(&nftables.Chain{Name: n, Table: t})
	}
}

// queueRemove queues the removal of NIC k. The caller holds m.mu.
func (m *Manager) queueRemove(b *batch, k string) error {
	st, ok := m.nics[k]
	if !ok {
		return fmt.Errorf("%w: %s", ErrNotFound, k)
	}
	c := m.conn
	t := nicTable(k)
	if st.mac != nil {
		if err := c.SetDeleteElements(macMapSet(t), []nftables.SetElement{{Key: st.mac}}); err != nil {
			return err
		}
	}
	if len(st.addrs) > 0 {
		var els []nftables.SetElement
		for _, a := range st.addrs {
			els = append(els, nftables.SetElement{Key: key16(a)})
		}
		if err := c.SetDeleteElements(vmapSet(t, IngressMap), els); err != nil {
			return err
		}
	}
	for _, s := range st.sets {
		for _, a := range st.addrs {
			b.setOwner(s, a, k, false)
		}
		b.unused[s] = true
	}
	if st.plan != nil {
		for _, s := range referencedSets(st.plan) {
			b.unused[s] = true
		}
	}
	if err := b.queueElements(); err != nil {
		return err
	}
	b.adds, b.dels = map[string][]netip.Addr{}, map[string][]netip.Addr{}
	chains := slices.Clone(st.chains)
	if st.tramp {
		chains = append(chains, chainName(k, dirIn, 0), chainName(k, dirOut, 0))
	}
	m.queueDelChains(t, chains)
	for _, a := range st.addrs {
		delete(m.byAddr, a)
	}
	delete(m.byMAC, string(st.mac))
	delete(m.nics, k)
	return nil
}

// commit flushes the batch; on failure the kernel is unchanged and the
// model is reloaded from it.
func (m *Manager) commit(what string) error {
	if err := m.conn.Flush(); err != nil {
		if lerr := m.load(); lerr != nil {
			return errors.Join(fmt.Errorf("%s: %w", what, err), lerr)
		}
		return fmt.Errorf("%s: %w", what, err)
	}
	m.based = true
	m.commits++
	if m.gens != nil {
		m.gens.Note()
	}
	return nil
}

// abort discards queued messages after a build error.
func (m *Manager) abort(err error) error {
	// Queued messages cannot be taken back: start a new connection.
	if c, cerr := nftconn.Open(m.opts); cerr == nil {
		m.conn.CloseLasting()
		m.conn = c
	} else {
		err = errors.Join(err, cerr)
	}
	if lerr := m.load(); lerr != nil {
		return errors.Join(err, lerr)
	}
	return err
}

func (m *Manager) ensureLoaded() error {
	if m.loaded {
		return nil
	}
	return m.load()
}

// change runs one single-batch change: it takes the lock, loads the model
// when needed, queues the base objects and what queue adds, and commits
// (a queue error discards the batch).
func (m *Manager) change(ctx context.Context, what string, queue func(b *batch) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.ensureLoaded(); err != nil {
		return err
	}
	b := m.newBatch()
	if err := m.queueBase(); err != nil {
		return m.abort(err)
	}
	if err := queue(b); err != nil {
		return m.abort(err)
	}
	b.collectSets()
	return m.commit(what)
}

// Upsert installs or replaces one NIC's policy in one batch: new chains,
// switched map entries, deleted old chains, membership changes.
func (m *Manager) Upsert(ctx context.Context, p NICPolicy) error {
	if err := p.Validate(); err != nil {
		return err
	}
	return m.change(ctx, "update security policy of "+p.key(), func(b *batch) error { return m.queueNIC(b, &p) })
}

// Stage queues Upsert's change for each of ps on c, a connection the
// caller flushes with other changes as one transaction (nf_tables walks
// every chain of the namespace once per commit, whatever the commit
// holds), and returns done, which the caller must call once with the
// flush's result (nil: committed). The Manager stays locked until then. On
// an error nothing is locked and c holds part of the change: discard c.
func (m *Manager) Stage(ctx context.Context, ps []NICPolicy, c *nftables.Conn) (done func(error), err error) {
	for i := range ps {
		if err := ps[i].Validate(); err != nil {
			return nil, err
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	m.mu.Lock()
	if err := m.ensureLoaded(); err != nil {
		m.mu.Unlock()
		return nil, err
	}
	own := m.conn
	m.conn = c
	err = m.queueBase()
	for i := 0; err == nil && i < len(ps); i++ {
		err = m.queueNIC(m.newBatch(), &ps[i])
	}
	m.conn = own
	// resync reads the kernel again after a change that did not commit
	// (queueing changed the model).
	resync := func() {
		if m.load() != nil {
			m.loaded = false
		}
	}
	if err != nil {
		resync()
		m.mu.Unlock()
		return nil, err
	}
	return func(ferr error) {
		if ferr != nil {
			resync()
		} else {
			m.based = true
			m.commits++
		}
		m.mu.Unlock()
	}, nil
}

// Remove deletes a NIC's chains, map entries and memberships. It returns
// ErrNotFound when the NIC has no state.
func (m *Manager) Remove(ctx context.Context, vmID, nic string) error {
	k := Key(vmID, nic)
	// Answer "not found" without building (and discarding) a batch.
	m.mu.Lock()
	err := m.ensureLoaded()
	_, ok := m.nics[k]
	m.mu.Unlock()
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("%w: %s", ErrNotFound, k)
	}
	return m.change(ctx, "remove security policy of "+k, func(b *batch) error { return m.queueRemove(b, k) })
}

// applyChunk is how many NICs Apply puts in one netlink batch.
const applyChunk = 100

// Apply makes the tables hold exactly the given NICs' policies. NICs whose
// policy is unchanged are not rewritten. Every NIC's change is atomic; a
// large Apply is committed in batches of applyChunk NICs (a netlink batch is
// one sendmsg), so a failure part way leaves earlier NICs updated, later
// ones as they were, and returns the error.
func (m *Manager) Apply(ctx context.Context, desired []NICPolicy) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	want := map[string]*NICPolicy{}
	for i := range desired {
		p := &desired[i]
		if err := p.Validate(); err != nil {
			return err
		}
		if _, dup := want[p.key()]; dup {
			return fmt.Errorf("%w: %s listed twice", ErrInvalid, p.key())
		}
		want[p.key()] = p
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.ensureLoaded(); err != nil {
		return err
	}
	b := m.newBatch()
	if err := m.queueBase(); err != nil {
		return m.abort(err)
	}
	var stale []string
	for k := range m.nics {
		if want[k] == nil {
			stale = append(stale, k)
		}
	}
	slices.Sort(stale)
	for _, k := range stale {
		if err := m.queueRemove(b, k); err != nil {
			return m.abort(err)
		}
	}
	keys := make([]string, 0, len(want))
	for k := range want {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	queued := len(stale)
	for _, k := range keys {
		if st := m.nics[k]; st != nil && st.plan != nil && reflect.DeepEqual(st.plan, want[k]) && m.based {
			continue
		}
		if err := m.queueNIC(b, want[k]); err != nil {
			return m.abort(err)
		}
		// One sendmsg carries a batch; keep batches well under its limit.
		// Each NIC's change stays within one batch.
		if queued++; queued%applyChunk == 0 {
			if err := m.commit("apply security policies"); err != nil {
				return err
			}
		}
	}
	// Every managed set is a candidate: Apply also collects what earlier
	// runs left.
	for name := range m.sets {
		b.unused[name] = true
	}
	b.collectSets()
	return m.commit("apply security policies")
}

// Resync programs every desired NIC's policy again as after a restart:
// the kernel's tables are read again, the tables, base chains, maps and
// sets are queued again (what is missing is created), and every NIC's
// chains, map elements and memberships are rewritten, whatever the kernel
// holds. It undoes foreign changes (an operator's nft command that
// flushed a chain or deleted a table) that Apply, which skips NICs whose
// policy did not change, would not see. Committed like Apply, in batches
// of applyChunk NICs; rule counters start again from zero.
func (m *Manager) Resync(ctx context.Context, desired []NICPolicy) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	m.mu.Lock()
	err := m.load() // loaded NICs have no plan: Apply rewrites every one
	if err == nil {
		// A set missing from a table (the table was deleted) is created
		// there again, empty: its members are queued again, to every
		// copy (adding an element a copy has is a no-op).
		for name := range m.owners {
			if !m.sets[name] {
				delete(m.owners, name)
				for _, st := range m.nics {
					st.sets = slices.DeleteFunc(st.sets, func(s string) bool { return s == name })
				}
			}
		}
	} else {
		m.loaded = false
	}
	m.mu.Unlock()
	if err != nil {
		return err
	}
	return m.Apply(ctx, desired)
}

// SetGroupMembers sets the explicit members of security group group (in
// addition to the addresses of NICs that list the group). It changes set
// elements only.
func (m *Manager) SetGroupMembers(ctx context.Context, group string, addrs []netip.Addr) error {
	return m.change(ctx, "set members of security group "+group, func(b *batch) error {
		s := groupSet(group)
		if err := b.ensureSet(s); err != nil {
			return err
		}
		for _, a := range m.groups[group] {
			if !slices.Contains(addrs, a) {
				b.setOwner(s, a, "", false)
			}
		}
		for _, a := range addrs {
			b.setOwner(s, a, "", true)
		}
		if err := b.queueElements(); err != nil {
			return err
		}
		m.groups[group] = slices.Clone(addrs)
		return nil
	})
}

// RuleCounter is the hit count of one counted rule of a NIC chain.
type RuleCounter struct {
	// Direction is "ingress" or "egress".
	Direction string
	// Rule names the rule: "ingress[2]: allow tcp from any to any port 443",
	// or a control (default, tenant-strict, allowed-destinations, ...).
	Rule string
	// Handles are the kernel rule handles (a rule with a port or ICMPv6
	// type list is one kernel rule per element).
	Handles []uint64
	Packets uint64
	Bytes   uint64
}

// RuleCounters returns the counters of a NIC's current chains: per policy
// rule (kernel rules of one expanded rule summed) and per control, in rule
// order, ingress first.
func (m *Manager) RuleCounters(vmID, nic string) ([]RuleCounter, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.ensureLoaded(); err != nil {
		return nil, err
	}
	k := Key(vmID, nic)
	st, ok := m.nics[k]
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, k)
	}
	var out []RuleCounter
	idx := map[string]int{}
	// main chains first (ingress, egress), then helpers
	chains := slices.Clone(st.chains)
	if st.tramp {
		chains = append(chains, chainName(k, dirIn, 0), chainName(k, dirOut, 0))
	}
	slices.SortFunc(chains, func(a, b string) int { return len(a) - len(b) })
	for _, name := range chains {
		_, dir, _, _ := parseChainName(name)
		direction := "egress"
		if dir == dirIn {
			direction = "ingress"
		}
		t := nicTable(k)
		rules, err := m.conn.GetRules(t, &nftables.Chain{Name: name, Table: t})
		if err != nil {
			return nil, fmt.Errorf("list rules of %s: %w", k, err)
		}
		for _, r := range rules {
			for _, e := range r.Exprs {
				cn, ok := e.(*expr.Counter)
				if !ok {
					continue
				}
				comment, _ := userdata.GetString(r.UserData, userdata.TypeComment)
				id := direction + "|" + comment
				if i, ok := idx[id]; ok {
					// an expanded rule (one per port or ICMPv6 type)
					out[i].Packets += cn.Packets
					out[i].Bytes += cn.Bytes
					out[i].Handles = append(out[i].Handles, r.Handle)
					continue
				}
				idx[id] = len(out)
				out = append(out, RuleCounter{Direction: direction, Rule: comment, Handles: []uint64{r.Handle}, Packets: cn.Packets, Bytes: cn.Bytes})
			}
		}
	}
	return out, nil
}

// NICs returns the keys (see Key) of the NICs with state in the tables.
func (m *Manager) NICs() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	for k := range m.nics {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// verdictChain returns the chain of a vmap element read from the kernel
// (the library leaves the nested NFTA_DATA_VERDICT attributes in Val).
func verdictChain(e nftables.SetElement) string {
	if e.VerdictData != nil {
		return e.VerdictData.Chain
	}
	ad, err := netlink.NewAttributeDecoder(e.Val)
	if err != nil {
		return ""
	}
	for ad.Next() {
		if ad.Type() == unix.NFTA_VERDICT_CHAIN {
			return ad.String()
		}
	}
	return ""
}
