package nft

import (
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"strconv"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/metald/metald/internal/network"
)

// Shards is the number of netdev tables NICs are spread over. A commit
// validates only the tables it touches, walking every base chain of each,
// so a NIC's commit costs in proportion to the NICs of its shard (about
// NICs/Shards), not of the host; the number of tables (every message of a
// batch looks its table up by name in the namespace's table list) stays
// fixed.
const Shards = 64

// ShardPrefix starts the name of every shard table: `table netdev
// metald_00` ... `metald_63`.
const ShardPrefix = TableName + "_"

// ShardName is the name of shard table i.
func ShardName(i int) string { return fmt.Sprintf("%s%02d", ShardPrefix, i) }

// parseShard returns the shard index of a shard table name.
func parseShard(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, ShardPrefix)
	if !ok || len(rest) != 2 {
		return 0, false
	}
	i, err := strconv.Atoi(rest)
	if err != nil || i < 0 || i >= Shards {
		return 0, false
	}
	return i, true
}

// ShardOf is the shard of a NIC: FNV-1a of its host device name mod
// Shards, except for a NIC with PrivacyExtensions and a global address:
// FNV-1a of its first (lowest) privacy /64, so NICs that can contend for the
// same temporary address share their shard's priv_owned set.
func ShardOf(p network.NICPlan) int {
	h := fnv.New32a()
	if p.Controls.PrivacyExtensions {
		if pp := p.PrivacyPrefixes(); len(pp) > 0 {
			a := pp[0].Addr().As16()
			h.Write(a[:8])
			return int(h.Sum32() % Shards)
		}
	}
	h.Write([]byte(p.HostDevice))
	return int(h.Sum32() % Shards)
}

// TableFor is the name of the netdev table holding p's chains, sets and
// counters (`nft list table netdev <TableFor(p)>`).
func TableFor(p network.NICPlan) string { return ShardName(ShardOf(p)) }

// TableOf is the netdev table holding hostDev's objects as the Firewall
// last knew it (programmed by it or read from the kernel); ok is false for
// a device it knows nothing of.
func (f *Firewall) TableOf(hostDev string) (table string, ok bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if s := f.where[hostDev]; len(s) > 0 {
		return ShardName(s[0]), true
	}
	return "", false
}

func bridgeTable() *nftables.Table {
	return &nftables.Table{Name: TableName, Family: nftables.TableFamilyBridge}
}

func shardTable(i int) *nftables.Table {
	return &nftables.Table{Name: ShardName(i), Family: nftables.TableFamilyNetdev}
}

// nicBaseChain is a NIC's from-VM (ingress) or to-VM (egress) chain, hooked
// on its host device.
func nicBaseChain(t *nftables.Table, name string, hook *nftables.ChainHook, dev string) *nftables.Chain {
	accept := nftables.ChainPolicyAccept
	return &nftables.Chain{
		Name: name, Table: t, Type: nftables.ChainTypeFilter, Hooknum: hook,
		Priority: nftables.ChainPriorityRef(NICPriority), Policy: &accept, Device: dev,
	}
}

// counterVal is a named counter's value.
type counterVal struct{ packets, bytes uint64 }

// shardState is what one shard table holds.
type shardState struct {
	exists bool
	// chainsKnown: chains lists every chain of the table (a full read);
	// otherwise chains is empty and unknown.
	chainsKnown bool
	chains      map[string]*nftables.Chain
	sets        map[string]bool
	// setSize is each set's size as the kernel has it (0: unbounded).
	setSize  map[string]uint32
	counters map[string]counterVal
}

func newShardState() *shardState {
	return &shardState{chains: map[string]*nftables.Chain{}, sets: map[string]bool{}, setSize: map[string]uint32{}, counters: map[string]counterVal{}}
}

// nics lists the host devices with objects in the shard: every NIC owns a
// "<dev>-addrs" set and chains vm-<dev>-out and vm-<dev>-in.
func (ss *shardState) nics() []string {
	seen := map[string]bool{}
	for s := range ss.sets {
		if dev, ok := strings.CutSuffix(s, "-addrs"); ok && network.ValidHostDevice(dev) {
			seen[dev] = true
		}
	}
	for c := range ss.chains {
		rest, ok := strings.CutPrefix(c, "vm-")
		if !ok {
			continue
		}
		for _, suf := range []string{"-out", "-in"} {
			if dev, ok := strings.CutSuffix(rest, suf); ok && network.ValidHostDevice(dev) {
				seen[dev] = true
			}
		}
	}
	out := make([]string, 0, len(seen))
	for k := range seen {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// countersOf returns dev's counter values in the shard.
func (ss *shardState) countersOf(dev string) map[string]counterVal {
	out := map[string]counterVal{}
	for _, name := range countersOf(network.NamesFor(dev)) {
		if v, ok := ss.counters[name]; ok {
			out[name] = v
		}
	}
	return out
}

// kernelState is what metald's tables hold now.
type kernelState struct {
	// bridge: table bridge metald exists; bridgeChains its chains;
	// bridgeExtra lists objects in it that metald no longer puts there
	// (an older layout's per-NIC chains, maps and counters).
	bridge       bool
	bridgeChains map[string]bool
	bridgeExtra  []string
	shards       map[int]*shardState
}

// nics lists every host device with objects in any shard.
func (st kernelState) nics() []string {
	var out []string
	for _, ss := range st.shards {
		out = append(out, ss.nics()...)
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// where maps each host device to the shards holding its objects.
func (st kernelState) where() map[string][]int {
	out := map[string][]int{}
	for _, s := range st.shardList() {
		for _, dev := range st.shards[s].nics() {
			out[dev] = append(out[dev], s)
		}
	}
	return out
}

// shardList lists the existing shards in order.
func (st kernelState) shardList() []int {
	out := make([]int, 0, len(st.shards))
	for s := range st.shards {
		out = append(out, s)
	}
	slices.Sort(out)
	return out
}

// readKernel reads every metald table on connection c.
func readKernel(c *nftables.Conn) (kernelState, error) {
	st := kernelState{bridgeChains: map[string]bool{}, shards: map[int]*shardState{}}
	bt, err := c.ListTablesOfFamily(nftables.TableFamilyBridge)
	if err != nil {
		return st, fmt.Errorf("list tables: %w", err)
	}
	for _, t := range bt {
		if t.Name == TableName {
			st.bridge = true
		}
	}
	if st.bridge {
		chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyBridge)
		if err != nil {
			return st, fmt.Errorf("list chains: %w", err)
		}
		for _, ch := range chains {
			if ch.Table.Name != TableName {
				continue
			}
			st.bridgeChains[ch.Name] = true
			if ch.Name != ChainInput {
				st.bridgeExtra = append(st.bridgeExtra, "chain "+ch.Name)
			}
		}
		sets, err := c.GetSets(bridgeTable())
		if err != nil {
			return st, fmt.Errorf("list sets: %w", err)
		}
		for _, s := range sets {
			st.bridgeExtra = append(st.bridgeExtra, "set "+s.Name)
		}
		objs, err := c.GetNamedObjects(bridgeTable())
		if err != nil {
			return st, fmt.Errorf("list objects: %w", err)
		}
		if len(objs) > 0 {
			st.bridgeExtra = append(st.bridgeExtra, fmt.Sprintf("%d objects", len(objs)))
		}
	}
	nt, err := c.ListTablesOfFamily(nftables.TableFamilyNetdev)
	if err != nil {
		return st, fmt.Errorf("list tables: %w", err)
	}
	for _, t := range nt {
		if s, ok := parseShard(t.Name); ok {
			ss := newShardState()
			ss.exists, ss.chainsKnown = true, true
			st.shards[s] = ss
		}
	}
	if len(st.shards) == 0 {
		return st, nil
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyNetdev)
	if err != nil {
		return st, fmt.Errorf("list chains: %w", err)
	}
	for _, ch := range chains {
		if s, ok := parseShard(ch.Table.Name); ok && st.shards[s] != nil {
			st.shards[s].chains[ch.Name] = ch
		}
	}
	for _, s := range st.shardList() {
		if err := readShardObjects(c, s, st.shards[s]); err != nil {
			return st, err
		}
	}
	return st, nil
}

// readShard reads what a change of dev's objects in shard s needs: the
// shard's sets (every NIC owns one, so they also tell which NICs the shard
// holds) and dev's counters, each asked for by name. A dump of the shard's
// counters would make the kernel walk every object of every netdev table
// (its table filter is applied object by object), a cost that grows with
// the number of VMs. A missing shard reads as absent.
func readShard(c *nftables.Conn, s int, dev string) (*shardState, error) {
	t := shardTable(s)
	sets, err := c.GetSets(t)
	if err != nil {
		if isNotExist(err) {
			return newShardState(), nil
		}
		return nil, fmt.Errorf("list sets of %s: %w", t.Name, err)
	}
	ss := newShardState()
	ss.exists = true
	for _, set := range sets {
		ss.sets[set.Name] = true
		ss.setSize[set.Name] = set.Size
	}
	if ss.counters, err = readNICCounters(c, s, dev); err != nil {
		return nil, err
	}
	return ss, nil
}

// readNICCounters reads dev's counters in shard s one by one, by name
// (absent ones are left out): a dump of the table's objects would make the
// kernel walk every object of every netdev table.
func readNICCounters(c *nftables.Conn, s int, dev string) (map[string]counterVal, error) {
	t := shardTable(s)
	out := map[string]counterVal{}
	for _, name := range countersOf(network.NamesFor(dev)) {
		o, err := c.GetObject(&nftables.NamedObj{Table: t, Name: name, Type: nftables.ObjTypeCounter})
		if err != nil {
			if isNotExist(err) {
				continue
			}
			return nil, fmt.Errorf("read counter %s of %s: %w", name, t.Name, err)
		}
		if no, ok := o.(*nftables.NamedObj); ok {
			if cnt, ok := no.Obj.(*expr.Counter); ok {
				out[name] = counterVal{cnt.Packets, cnt.Bytes}
			}
		}
	}
	return out, nil
}

// isNotExist reports a kernel ENOENT answer. The nftables library reports
// some of them as text only ("netlink receive: no such file or directory").
func isNotExist(err error) bool {
	return errors.Is(err, unix.ENOENT) || strings.Contains(err.Error(), unix.ENOENT.Error())
}

func readShardObjects(c *nftables.Conn, s int, ss *shardState) error {
	t := shardTable(s)
	objs, err := c.GetNamedObjects(t)
	if err != nil {
		return fmt.Errorf("list objects of %s: %w", t.Name, err)
	}
	for name, v := range countersIn(objs) {
		ss.counters[name] = v
	}
	sets, err := c.GetSets(t)
	if err != nil {
		return fmt.Errorf("list sets of %s: %w", t.Name, err)
	}
	for _, set := range sets {
		ss.sets[set.Name] = true
		ss.setSize[set.Name] = set.Size
	}
	return nil
}

// countersIn extracts the named counters of an object dump.
func countersIn(objs []nftables.Obj) map[string]counterVal {
	out := map[string]counterVal{}
	for _, o := range objs {
		switch co := o.(type) {
		case *nftables.CounterObj:
			out[co.Name] = counterVal{co.Packets, co.Bytes}
		case *nftables.NamedObj:
			if cnt, ok := co.Obj.(*expr.Counter); ok {
				out[co.Name] = counterVal{cnt.Packets, cnt.Bytes}
			}
		}
	}
	return out
}
