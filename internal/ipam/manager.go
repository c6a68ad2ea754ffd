package ipam

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"
)

// DefaultPoolID is the pool metald creates on a random ULA /48 when none is
// configured, and the pool automatic allocation falls back to.
const DefaultPoolID = "default"

// Log attribute keys.
const (
	logKeyPool    = "pool_id"
	logKeyPrefix  = "prefix"
	logKeyAddress = "address"
	logKeyVM      = "vm_id"
	logKeyCount   = "count"
	logKeyErr     = "err"
)

// PoolConfig is a pool as written in the configuration file. The config
// package embeds it; Open creates or updates these pools at start.
type PoolConfig struct {
	ID string `json:"id" yaml:"id"`
	// Prefixes are IPv6 prefixes without host bits; symbolic subnet names
	// are allowed (2600:beef:1000:web::/64).
	Prefixes       []string `json:"prefixes" yaml:"prefixes"`
	Description    string   `json:"description,omitempty" yaml:"description,omitempty"`
	TenantIDs      []string `json:"tenant_ids,omitempty" yaml:"tenant_ids,omitempty"`
	RateLimit      int      `json:"rate_limit,omitempty" yaml:"rate_limit,omitempty"`
	MaxAllocations int64    `json:"max_allocations,omitempty" yaml:"max_allocations,omitempty"`
}

// Observer receives allocation events (the metrics package implements it).
// Methods are called with the Manager's lock held and must not call back.
type Observer interface {
	// Allocated reports n new allocations in a pool.
	Allocated(poolID string, n int)
	// AllocationFailed reports a failed reservation; reason is FailureReason(err).
	AllocationFailed(reason string)
	// Reclaimed reports n leaked allocations released by Cleanup.
	Reclaimed(n int)
}

// Options tunes a Manager.
type Options struct {
	// AutoSubnetNames assigns unknown subnet names on first use
	// (config ipam.auto_subnet_names). When false, an unknown name is an
	// UnknownSubnetNameError.
	AutoSubnetNames bool
	// Observer, when set, receives allocation events.
	Observer Observer
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Now defaults to time.Now.
	Now func() time.Time
	// Rand supplies the default pool's random ULA bits; crypto/rand when nil.
	Rand io.Reader
	// OrphanMinAge protects allocations of VMs that do not exist (yet) from
	// Cleanup for this long after they were made, so a CreateVm in flight
	// keeps its addresses. Default 1 minute.
	OrphanMinAge time.Duration
}

// Request asks for one NIC's address.
type Request struct {
	VMID     string
	NICID    string
	TenantID string
	// Address, when valid, is the exact address to reserve with its
	// on-link prefix length (already resolved: see ResolvePrefix).
	Address netip.Prefix
	// Gateway, when valid, is the NIC's gateway; automatic allocation picks
	// from the gateway's subnet.
	Gateway netip.Addr
	// Bridge, when set and no gateway is given, keeps automatic allocation
	// in the subnet earlier NICs on the same bridge got.
	Bridge string
	// PoolHint, when set, names the pool to allocate from.
	PoolHint string
}

// PoolStatus is a pool with its usage.
type PoolStatus struct {
	Pool
	Allocated int64
	// Assignable is the number of addresses the prefixes hold, minus each
	// subnet's subnet-router anycast address.
	Assignable *big.Int
	// Available is min(Assignable, MaxAllocations) - Allocated.
	Available *big.Int
	// Utilization is Allocated / min(Assignable, MaxAllocations), 0..1.
	Utilization float64
}

// Stats is a snapshot for metrics.
type Stats struct {
	Pools []PoolStatus
	// AllocationsLastHour counts allocations made in the trailing hour.
	AllocationsLastHour int
}

// LiveFunc reports whether a VM exists and, when it is TERMINATED, since
// when (zero otherwise).
type LiveFunc func(vmID string) (exists bool, terminatedSince time.Time)

// Manager allocates addresses from pools. It is safe for concurrent use.
type Manager struct {
	st   Store
	opts Options
	log  *slog.Logger

	mu      sync.Mutex
	pools   map[string]*poolState
	byAddr  map[netip.Addr]*entry
	byVM    map[string]map[string]*entry // vm → nic → entry
	subnets map[netip.Prefix]*subnet
	names   map[netip.Prefix]map[string]SubnetName
	values  map[netip.Prefix]map[uint16]string
	// tentative holds the names a NameTx declared and has not finished,
	// with their transaction; a name leaves it when it is pinned.
	tentative map[nameKey]*NameTx
	// orphans owns, in tentative, the names of requests that failed or
	// never finished (found tentative in the store at Open) and that could
	// not be removed yet, mostly because their subnet held allocations:
	// they go with the last allocation in their subnet unless something
	// pins them first. It is never bound to a context.
	orphans *NameTx
	rate    map[rateKey][]time.Time // sorted; trailing hour only
	hour    []time.Time             // every allocation in the trailing hour
}

type poolState struct {
	Pool
	allocated  int64
	assignable *big.Int
	bridges    map[string]*subnet
}

type entry struct {
	Allocation
	sub *subnet
}

type rateKey struct{ tenant, pool string }

// subnet is one allocation domain: a /64 of a pool prefix, or the whole
// pool prefix when it is longer than /64. Offsets are relative to its base.
type subnet struct {
	prefix    netip.Prefix
	pool      *poolState
	hi, base  uint64 // high and low 64 bits of the prefix address
	max       uint64 // largest offset
	free      *freeSet
	gateways  map[uint64]int // offset → NICs using it as gateway
	allocated int
	// onBridge counts the subnet's allocations by bridge: a subnet is one
	// bridge's (the host routes it to one), so another bridge's NIC may
	// not take an address in it.
	onBridge map[string]int
}

// otherBridge returns a bridge other than bridge that holds addresses of
// s, and how many; "" when there is none (or bridge is "").
func (s *subnet) otherBridge(bridge string) (string, int) {
	if bridge == "" {
		return "", 0
	}
	for br, n := range s.onBridge {
		if br != bridge && n > 0 {
			return br, n
		}
	}
	return "", 0
}

func (s *subnet) bridgeError(bridge string) error {
	other, n := s.otherBridge(bridge)
	if other == "" {
		return nil
	}
	return invalidf("subnet %s is on bridge %s (%d interface(s)): one subnet is routed to one bridge, so an interface on %s cannot use it; use bridge %s or another subnet",
		s.prefix, other, n, bridge, other)
}

func lo64(a netip.Addr) uint64 {
	b := a.As16()
	return binary.BigEndian.Uint64(b[8:])
}

func hi64(a netip.Addr) uint64 {
	b := a.As16()
	return binary.BigEndian.Uint64(b[:8])
}

func (s *subnet) offset(a netip.Addr) uint64 { return lo64(a) - s.base }

func (s *subnet) addr(off uint64) netip.Addr {
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], s.hi)
	binary.BigEndian.PutUint64(b[8:], s.base+off)
	return netip.AddrFrom16(b)
}

// subnetKey is the allocation domain of address a inside pool prefix p.
func subnetKey(p netip.Prefix, a netip.Addr) netip.Prefix {
	if p.Bits() >= 64 {
		return p
	}
	return netip.PrefixFrom(a, 64).Masked()
}

// Open loads the Manager's state from st, applies the configured pools
// (creating missing ones, updating fields and adding prefixes of existing
// ones) and, when no pool exists at all, creates pool "default" on a random
// RFC 4193 ULA /48.
func Open(ctx context.Context, st Store, pools []PoolConfig, opts Options) (*Manager, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Rand == nil {
		opts.Rand = rand.Reader
	}
	if opts.OrphanMinAge == 0 {
		opts.OrphanMinAge = time.Minute
	}
	m := &Manager{
		st: st, opts: opts, log: opts.Logger,
		pools:   map[string]*poolState{},
		byAddr:  map[netip.Addr]*entry{},
		byVM:    map[string]map[string]*entry{},
		subnets: map[netip.Prefix]*subnet{},
		names:   map[netip.Prefix]map[string]SubnetName{},
		values:  map[netip.Prefix]map[uint16]string{},
		rate:    map[rateKey][]time.Time{},

		tentative: map[nameKey]*NameTx{},
	}
	m.orphans = &NameTx{m: m, ctx: context.Background(), done: true}
	now := opts.Now()
	snap, err := st.Load(ctx, now.Add(-time.Hour))
	if err != nil {
		return nil, fmt.Errorf("load ipam state: %w", err)
	}
	for _, p := range snap.Pools {
		m.pools[p.ID] = newPoolState(p.clone())
	}
	for _, n := range snap.SubnetNames {
		m.addName(n)
		if n.Tentative {
			m.tentative[nameKey{n.Parent, n.Name}] = m.orphans
		}
	}
	allocs := slices.Clone(snap.Allocations)
	slices.SortStableFunc(allocs, func(a, b Allocation) int { return a.CreatedAt.Compare(b.CreatedAt) })
	for _, a := range allocs {
		p := m.pools[a.PoolID]
		if p == nil {
			return nil, fmt.Errorf("load ipam state: allocation %s names unknown pool %q", a.Address, a.PoolID)
		}
		pfx, ok := p.prefixOf(a.Address)
		if !ok {
			return nil, fmt.Errorf("load ipam state: allocation %s lies outside pool %q", a.Address, a.PoolID)
		}
		if _, dup := m.byAddr[a.Address]; dup {
			return nil, fmt.Errorf("load ipam state: address %s allocated twice", a.Address)
		}
		m.index(a, m.subnet(subnetKey(pfx, a.Address), p))
		if now.Sub(a.CreatedAt) < time.Hour {
			m.hour = append(m.hour, a.CreatedAt)
		}
	}
	slices.SortFunc(m.hour, func(a, b time.Time) int { return a.Compare(b) })
	for _, s := range snap.RateStamps {
		k := rateKey{s.TenantID, s.PoolID}
		m.rate[k] = append(m.rate[k], s.At)
	}
	for k := range m.rate {
		slices.SortFunc(m.rate[k], func(a, b time.Time) int { return a.Compare(b) })
	}
	m.settleUnfinishedNames(ctx)
	for _, pc := range pools {
		if err := m.applyConfig(ctx, pc); err != nil {
			return nil, fmt.Errorf("configure pool %q: %w", pc.ID, err)
		}
	}
	if len(m.pools) == 0 {
		pfx, err := randomULA(opts.Rand)
		if err != nil {
			return nil, fmt.Errorf("create default pool: %w", err)
		}
		if _, err := m.CreatePool(ctx, Pool{ID: DefaultPoolID, Prefixes: []netip.Prefix{pfx}, Description: "default pool on a random RFC 4193 ULA /48"}); err != nil {
			return nil, fmt.Errorf("create default pool: %w", err)
		}
		m.log.Info("created default IPv6 pool", logKeyPool, DefaultPoolID, logKeyPrefix, pfx)
	}
	return m, nil
}

// settleUnfinishedNames handles, at Open, the names still tentative in the
// store: the requests that assigned them never finished (the daemon
// stopped first), which makes them failed requests. A name whose subnet
// holds no allocation is removed; one whose subnet does (in practice the
// interrupted request's own addresses, which crash recovery releases next)
// stays tentative, and goes with the last of them unless something pins
// it first.
func (m *Manager) settleUnfinishedNames(ctx context.Context) {
	if len(m.tentative) == 0 {
		return
	}
	m.dropOrphansLocked(ctx, "the request that assigned it never finished")
	for k := range m.tentative {
		n := m.names[k.parent][k.name]
		m.log.Warn("kept tentative IPv6 subnet name of an unfinished request while its subnet holds allocations",
			"parent", n.Parent, "name", n.Name, "subnet", n.Prefix())
	}
}

// randomULA returns fdXX:XXXX:XXXX::/48 with 40 random bits (RFC 4193).
func randomULA(r io.Reader) (netip.Prefix, error) {
	var b [16]byte
	b[0] = 0xfd
	if _, err := io.ReadFull(r, b[1:6]); err != nil {
		return netip.Prefix{}, err
	}
	return netip.PrefixFrom(netip.AddrFrom16(b), 48), nil
}

func newPoolState(p Pool) *poolState {
	ps := &poolState{Pool: p, bridges: map[string]*subnet{}}
	ps.recount()
	return ps
}

func (p *poolState) recount() {
	total := new(big.Int)
	for _, pfx := range p.Prefixes {
		total.Add(total, assignable(pfx))
	}
	p.assignable = total
}

func (p *poolState) prefixOf(a netip.Addr) (netip.Prefix, bool) {
	for _, pfx := range p.Prefixes {
		if pfx.Contains(a) {
			return pfx, true
		}
	}
	return netip.Prefix{}, false
}

// assignable counts the addresses of p, less the subnet-router anycast
// address of each /64 it holds (or overlaps, for prefixes longer than /64
// starting on a /64 boundary).
func assignable(p netip.Prefix) *big.Int {
	n := new(big.Int).Lsh(big.NewInt(1), uint(128-p.Bits()))
	switch {
	case p.Bits() < 64:
		n.Sub(n, new(big.Int).Lsh(big.NewInt(1), uint(64-p.Bits())))
	case lo64(p.Addr()) == 0:
		n.Sub(n, big.NewInt(1))
	}
	return n
}

func (p *poolState) status() PoolStatus {
	capacity := new(big.Int).Set(p.assignable)
	if p.MaxAllocations > 0 {
		if q := big.NewInt(p.MaxAllocations); q.Cmp(capacity) < 0 {
			capacity = q
		}
	}
	avail := new(big.Int).Sub(capacity, big.NewInt(p.allocated))
	if avail.Sign() < 0 {
		avail.SetInt64(0)
	}
	var util float64
	if capacity.Sign() > 0 {
		util, _ = new(big.Float).Quo(new(big.Float).SetInt64(p.allocated), new(big.Float).SetInt(capacity)).Float64()
	}
	if util > 1 {
		util = 1
	}
	return PoolStatus{Pool: p.Pool.clone(), Allocated: p.allocated, Assignable: new(big.Int).Set(p.assignable), Available: avail, Utilization: util}
}

// subnet returns (creating) the allocation domain key of pool p.
func (m *Manager) subnet(key netip.Prefix, p *poolState) *subnet {
	if s := m.subnets[key]; s != nil {
		return s
	}
	s := &subnet{prefix: key, pool: p, hi: hi64(key.Addr()), base: lo64(key.Addr()), gateways: map[uint64]int{}, onBridge: map[string]int{}}
	s.max = ^uint64(0) >> (key.Bits() - 64)
	s.free = newFreeSet(s.max)
	if s.base == 0 {
		s.free.take(0) // subnet-router anycast of the /64
	}
	m.subnets[key] = s
	return s
}

// index adds an allocation to the in-memory state.
func (m *Manager) index(a Allocation, s *subnet) *entry {
	e := &entry{Allocation: a, sub: s}
	s.free.take(s.offset(a.Address))
	s.allocated++
	if a.Gateway.IsValid() && s.prefix.Contains(a.Gateway) {
		s.gateways[s.offset(a.Gateway)]++
	}
	m.byAddr[a.Address] = e
	nics := m.byVM[a.VMID]
	if nics == nil {
		nics = map[string]*entry{}
		m.byVM[a.VMID] = nics
	}
	nics[a.NICID] = e
	s.pool.allocated++
	if a.Bridge != "" {
		s.pool.bridges[a.Bridge] = s
		s.onBridge[a.Bridge]++
	}
	return e
}

// unindex removes an allocation from the in-memory state.
func (m *Manager) unindex(e *entry) {
	if m.byAddr[e.Address] != e {
		return
	}
	s := e.sub
	s.free.release(s.offset(e.Address))
	s.allocated--
	if e.Bridge != "" {
		if s.onBridge[e.Bridge]--; s.onBridge[e.Bridge] <= 0 {
			delete(s.onBridge, e.Bridge)
		}
	}
	if e.Gateway.IsValid() && s.prefix.Contains(e.Gateway) {
		off := s.offset(e.Gateway)
		if s.gateways[off]--; s.gateways[off] <= 0 {
			delete(s.gateways, off)
		}
	}
	delete(m.byAddr, e.Address)
	if nics := m.byVM[e.VMID]; nics != nil {
		delete(nics, e.NICID)
		if len(nics) == 0 {
			delete(m.byVM, e.VMID)
		}
	}
	s.pool.allocated--
}

// poolFor returns the pool and pool prefix holding a.
func (m *Manager) poolFor(a netip.Addr) (*poolState, netip.Prefix) {
	for _, p := range m.pools {
		if pfx, ok := p.prefixOf(a); ok {
			return p, pfx
		}
	}
	return nil, netip.Prefix{}
}

func (m *Manager) allowedPools(tenant string) []string {
	var ids []string
	for id, p := range m.pools {
		if p.Allows(tenant) {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids
}

// CheckUnicast returns why a cannot be a VM's global address, or nil.
func CheckUnicast(a netip.Addr) error {
	switch {
	case !a.IsValid():
		return invalidf("missing address")
	case a.Is4In6():
		return invalidf("%s is an IPv4-mapped address", a)
	case !a.Is6():
		return invalidf("%s is not an IPv6 address", a)
	case a.Zone() != "":
		return invalidf("%s has a zone", a)
	case a.IsUnspecified():
		return invalidf("%s is the unspecified address", a)
	case a.IsLoopback():
		return invalidf("%s is the loopback address", a)
	case a.IsMulticast():
		return invalidf("%s is a multicast address", a)
	case a.IsLinkLocalUnicast():
		return invalidf("%s is a link-local address", a)
	}
	return nil
}

// planned is one reservation applied to memory but not yet to the store.
type planned struct {
	e     *entry
	stamp *RateStamp
	fresh bool // false when the NIC already held the address
}

// Reserve reserves req's exact address, or allocates the next free one,
// and commits it in one transaction. A NIC that already holds an address
// gets it back (idempotent retries).
func (m *Manager) Reserve(ctx context.Context, req Request) (Allocation, error) {
	out, err := m.ReserveBatch(ctx, []Request{req})
	if err != nil {
		return Allocation{}, err
	}
	return out[0], nil
}

// ReserveBatch reserves several NICs' addresses all-or-nothing in one
// transaction (a VM's NICs, or a bulk load).
func (m *Manager) ReserveBatch(ctx context.Context, reqs []Request) ([]Allocation, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.opts.Now().UTC()
	var plans []planned
	undo := func() {
		for i := len(plans) - 1; i >= 0; i-- {
			m.unplan(plans[i])
		}
	}
	for _, req := range reqs {
		pl, err := m.plan(req, now)
		if err != nil {
			undo()
			m.failed(err)
			return nil, err
		}
		plans = append(plans, pl)
	}
	var allocs []Allocation
	var stamps []RateStamp
	for _, pl := range plans {
		if pl.fresh {
			allocs = append(allocs, pl.e.Allocation)
		}
		if pl.stamp != nil {
			stamps = append(stamps, *pl.stamp)
		}
	}
	if len(allocs) > 0 {
		if err := m.st.InsertAllocations(ctx, allocs, stamps); err != nil {
			undo()
			m.failed(err)
			return nil, fmt.Errorf("store allocation: %w", err)
		}
	}
	if len(m.tentative) > 0 {
		tx := m.txFrom(ctx)
		for _, a := range allocs {
			m.pinSubnetLocked(ctx, a.Address, tx)
		}
	}
	out := make([]Allocation, len(plans))
	perPool := map[string]int{}
	for i, pl := range plans {
		out[i] = pl.e.Allocation
		if pl.fresh {
			perPool[pl.e.PoolID]++
			m.hour = append(m.hour, now)
		}
	}
	if o := m.opts.Observer; o != nil {
		for id, n := range perPool {
			o.Allocated(id, n)
		}
	}
	return out, nil
}

func (m *Manager) failed(err error) {
	if o := m.opts.Observer; o != nil {
		o.AllocationFailed(FailureReason(err))
	}
}

func (m *Manager) unplan(pl planned) {
	if !pl.fresh {
		return
	}
	m.unindex(pl.e)
	if pl.stamp != nil {
		k := rateKey{pl.stamp.TenantID, pl.stamp.PoolID}
		q := m.rate[k]
		if i := slices.Index(q, pl.stamp.At); i >= 0 {
			m.rate[k] = slices.Delete(q, i, i+1)
		}
	}
}

// plan validates req and applies it to memory.
func (m *Manager) plan(req Request, now time.Time) (planned, error) {
	if req.VMID == "" || req.NICID == "" {
		return planned{}, invalidf("vm id and interface id are required")
	}
	if req.Gateway.IsValid() {
		if err := CheckUnicast(req.Gateway); err != nil && !req.Gateway.IsLinkLocalUnicast() {
			return planned{}, gatewayErr(fmt.Errorf("gateway: %w", err))
		}
	}
	if e := m.byVM[req.VMID][req.NICID]; e != nil {
		if req.Address.IsValid() && req.Address.Addr() != e.Address {
			return planned{}, invalidf("vm %q interface %q already holds %s", req.VMID, req.NICID, e.Address)
		}
		return planned{e: e}, nil
	}
	if req.Address.IsValid() {
		return m.planExact(req, now)
	}
	return m.planAuto(req, now)
}

func (m *Manager) planExact(req Request, now time.Time) (planned, error) {
	a := req.Address.Addr()
	if err := CheckUnicast(a); err != nil {
		return planned{}, err
	}
	if req.Address.Bits() < 127 && a == req.Address.Masked().Addr() {
		return planned{}, invalidf("%s is the subnet-router anycast address of %s", a, req.Address.Masked())
	}
	if req.Gateway.IsValid() {
		if a == req.Gateway {
			return planned{}, invalidf("address %s is the gateway", a)
		}
		if !req.Gateway.IsLinkLocalUnicast() && !req.Address.Contains(req.Gateway) {
			return planned{}, gatewayErr(invalidf("gateway %s is outside the address's prefix %s", req.Gateway, req.Address.Masked()))
		}
	}
	p, pfx := m.poolFor(a)
	if p == nil {
		return planned{}, fmt.Errorf("address %s: %w", a, ErrNotInPool)
	}
	if !p.Allows(req.TenantID) {
		return planned{}, &PermissionError{Tenant: req.TenantID, PoolID: p.ID, Address: a, Allowed: m.allowedPools(req.TenantID)}
	}
	// The prefix becomes an on-link route on the VM's bridge: one wider
	// than the address's subnet would take other subnets, other pools or
	// the outside world onto that bridge.
	if key := subnetKey(pfx, a); req.Address.Bits() < key.Bits() {
		return planned{}, invalidf("prefix length /%d is wider than the address's subnet %s (pool '%s'): use /%d or longer",
			req.Address.Bits(), key, p.ID, key.Bits())
	}
	if e := m.byAddr[a]; e != nil {
		return planned{}, &ConflictError{Address: a, VMID: e.VMID, NICID: e.NICID}
	}
	s := m.subnet(subnetKey(pfx, a), p)
	if err := s.bridgeError(req.Bridge); err != nil {
		return planned{}, err
	}
	off := s.offset(a)
	if s.gateways[off] > 0 {
		return planned{}, invalidf("address %s is the gateway of other interfaces in %s", a, s.prefix)
	}
	if !s.free.isFree(off) {
		return planned{}, invalidf("%s is the subnet-router anycast address of %s", a, netip.PrefixFrom(a, 64).Masked())
	}
	if err := m.checkLimits(p, req.TenantID, now); err != nil {
		return planned{}, err
	}
	return m.commitPlan(req, p, s, a, req.Address.Bits(), now), nil
}

func (m *Manager) planAuto(req Request, now time.Time) (planned, error) {
	p, err := m.choosePool(req)
	if err != nil {
		return planned{}, err
	}
	// A full pool or a tenant over its rate is that, whichever subnet the
	// NIC could have had.
	if err := m.checkLimits(p, req.TenantID, now); err != nil {
		return planned{}, err
	}
	var cands []*subnet
	switch {
	case req.Gateway.IsValid() && !req.Gateway.IsLinkLocalUnicast():
		pfx, ok := p.prefixOf(req.Gateway)
		if !ok {
			return planned{}, gatewayErr(invalidf("gateway %s is outside pool '%s'", req.Gateway, p.ID))
		}
		s := m.subnet(subnetKey(pfx, req.Gateway), p)
		if err := s.bridgeError(req.Bridge); err != nil {
			return planned{}, gatewayErr(err)
		}
		cands = []*subnet{s}
	case req.Bridge != "" && p.bridges[req.Bridge] != nil && p.bridges[req.Bridge].onBridge[req.Bridge] > 0:
		cands = []*subnet{p.bridges[req.Bridge]}
	default:
		// Each prefix's first subnet that no other bridge uses.
		for _, pfx := range p.Prefixes {
			if s := m.freeSubnet(pfx, p, req.Bridge); s != nil {
				cands = append(cands, s)
			}
		}
		if len(cands) == 0 {
			return planned{}, invalidf("every subnet of pool '%s' is on another bridge than %s (one subnet is routed to one bridge): name a gateway or address on %s's subnet, or use another pool",
				p.ID, req.Bridge, req.Bridge)
		}
	}
	for _, s := range cands {
		if off, ok := s.pick(req.Gateway); ok {
			return m.commitPlan(req, p, s, s.addr(off), s.prefix.Bits(), now), nil
		}
	}
	ex := &ExhaustedError{PoolID: p.ID}
	if len(cands) == 1 {
		ex.Subnet = cands[0].prefix
	}
	return planned{}, ex
}

// maxSubnetScan bounds the /64s of one pool prefix freeSubnet looks at.
const maxSubnetScan = 4096

// freeSubnet returns pfx's first subnet (its /64s in order, or pfx itself
// when it is /64 or longer) that no bridge other than bridge uses; nil
// when the first maxSubnetScan are all taken.
func (m *Manager) freeSubnet(pfx netip.Prefix, p *poolState, bridge string) *subnet {
	if pfx.Bits() >= 64 {
		if s := m.subnet(subnetKey(pfx, pfx.Addr()), p); s.bridgeError(bridge) == nil {
			return s
		}
		return nil
	}
	n := uint64(1) << min(64-pfx.Bits(), 62)
	hi := hi64(pfx.Addr())
	for i := uint64(0); i < n && i < maxSubnetScan; i++ {
		var b [16]byte
		binary.BigEndian.PutUint64(b[:8], hi+i)
		key := netip.PrefixFrom(netip.AddrFrom16(b), 64)
		if s := m.subnets[key]; s != nil && s.bridgeError(bridge) != nil {
			continue
		}
		return m.subnet(key, p)
	}
	return nil
}

// pick returns the lowest free offset that is not a gateway.
func (s *subnet) pick(gw netip.Addr) (uint64, bool) {
	gwOff, hasGW := uint64(0), false
	if gw.IsValid() && s.prefix.Contains(gw) {
		gwOff, hasGW = s.offset(gw), true
	}
	var from uint64
	for {
		off, ok := s.free.firstFrom(from)
		if !ok {
			return 0, false
		}
		if (hasGW && off == gwOff) || s.gateways[off] > 0 {
			if off == s.max {
				return 0, false
			}
			from = off + 1
			continue
		}
		return off, true
	}
}

func (m *Manager) choosePool(req Request) (*poolState, error) {
	deny := func(p *poolState) error {
		return &PermissionError{Tenant: req.TenantID, PoolID: p.ID, Allowed: m.allowedPools(req.TenantID)}
	}
	if req.PoolHint != "" {
		p := m.pools[req.PoolHint]
		if p == nil {
			return nil, invalidf("pool %q does not exist", req.PoolHint)
		}
		if !p.Allows(req.TenantID) {
			return nil, deny(p)
		}
		return p, nil
	}
	if req.Gateway.IsValid() && !req.Gateway.IsLinkLocalUnicast() {
		p, _ := m.poolFor(req.Gateway)
		if p == nil {
			return nil, gatewayErr(fmt.Errorf("gateway %s: %w", req.Gateway, ErrNotInPool))
		}
		if !p.Allows(req.TenantID) {
			return nil, deny(p)
		}
		return p, nil
	}
	if req.Bridge != "" {
		var ids []string
		for id, p := range m.pools {
			if p.bridges[req.Bridge] != nil && p.Allows(req.TenantID) {
				ids = append(ids, id)
			}
		}
		if len(ids) > 0 {
			slices.Sort(ids)
			return m.pools[ids[0]], nil
		}
	}
	var own []string
	for id, p := range m.pools {
		if slices.Contains(p.TenantIDs, req.TenantID) {
			own = append(own, id)
		}
	}
	if len(own) > 0 {
		slices.Sort(own)
		return m.pools[own[0]], nil
	}
	p := m.pools[DefaultPoolID]
	if p == nil {
		return nil, fmt.Errorf("no pool for tenant %q and no pool '%s': %w", req.TenantID, DefaultPoolID, ErrNotInPool)
	}
	if !p.Allows(req.TenantID) {
		return nil, deny(p)
	}
	return p, nil
}

// checkLimits enforces the pool quota and the tenant's rate limit.
func (m *Manager) checkLimits(p *poolState, tenant string, now time.Time) error {
	if p.MaxAllocations > 0 && p.allocated >= p.MaxAllocations {
		return &ExhaustedError{PoolID: p.ID, Quota: true}
	}
	if p.RateLimit <= 0 {
		return nil
	}
	k := rateKey{tenant, p.ID}
	q := m.rate[k]
	cut := now.Add(-time.Hour)
	i := 0
	for i < len(q) && !q[i].After(cut) {
		i++
	}
	q = q[i:]
	m.rate[k] = q
	if len(q) >= p.RateLimit {
		return &RateLimitError{Tenant: tenant, PoolID: p.ID, Current: len(q), Limit: p.RateLimit,
			RetryAfter: q[len(q)-p.RateLimit].Add(time.Hour).Sub(now)}
	}
	return nil
}

func (m *Manager) commitPlan(req Request, p *poolState, s *subnet, a netip.Addr, bits int, now time.Time) planned {
	alloc := Allocation{Address: a, PrefixLen: bits, PoolID: p.ID, VMID: req.VMID, NICID: req.NICID,
		TenantID: req.TenantID, Gateway: req.Gateway, Bridge: req.Bridge, CreatedAt: now}
	pl := planned{e: m.index(alloc, s), fresh: true}
	if p.RateLimit > 0 {
		k := rateKey{req.TenantID, p.ID}
		m.rate[k] = append(m.rate[k], now)
		pl.stamp = &RateStamp{TenantID: req.TenantID, PoolID: p.ID, At: now}
	}
	return pl
}

// Release releases every allocation of vmID (DeleteVm, and a failed
// CreateVm) and returns them; none is not an error.
func (m *Manager) Release(ctx context.Context, vmID string) ([]Allocation, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var es []*entry
	for _, e := range m.byVM[vmID] {
		es = append(es, e)
	}
	return m.release(ctx, es)
}

func (m *Manager) release(ctx context.Context, es []*entry) ([]Allocation, error) {
	if len(es) == 0 {
		return nil, nil
	}
	slices.SortFunc(es, func(a, b *entry) int { return a.Address.Compare(b.Address) })
	addrs := make([]netip.Addr, len(es))
	out := make([]Allocation, len(es))
	for i, e := range es {
		addrs[i], out[i] = e.Address, e.Allocation
	}
	if err := m.st.DeleteAllocations(ctx, addrs); err != nil {
		return nil, fmt.Errorf("release addresses: %w", err)
	}
	for _, e := range es {
		m.unindex(e)
	}
	if len(m.tentative) > 0 {
		m.dropOrphansLocked(ctx, "its request failed or never finished, and the last allocation in its subnet is released")
	}
	return out, nil
}

// Allocations returns every allocation ordered by address.
func (m *Manager) Allocations() []Allocation {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Allocation, 0, len(m.byAddr))
	for _, e := range m.byAddr {
		out = append(out, e.Allocation)
	}
	slices.SortFunc(out, func(a, b Allocation) int { return a.Address.Compare(b.Address) })
	return out
}

// AllocationsOf returns vmID's allocations ordered by interface id.
func (m *Manager) AllocationsOf(vmID string) []Allocation {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Allocation
	for _, e := range m.byVM[vmID] {
		out = append(out, e.Allocation)
	}
	slices.SortFunc(out, func(a, b Allocation) int { return strings.Compare(a.NICID, b.NICID) })
	return out
}

// Orphans returns the allocations Cleanup would release: those whose VM
// does not exist (and that are older than Options.OrphanMinAge) and those
// whose VM has been TERMINATED for longer than grace.
func (m *Manager) Orphans(live LiveFunc, grace time.Duration) []Allocation {
	now := m.opts.Now()
	var out []Allocation
	for _, a := range m.Allocations() {
		exists, since := live(a.VMID)
		switch {
		case !exists && now.Sub(a.CreatedAt) >= m.opts.OrphanMinAge:
			out = append(out, a)
		case exists && !since.IsZero() && now.Sub(since) > grace:
			out = append(out, a)
		}
	}
	return out
}

// Cleanup releases what Orphans reports, in one transaction, and returns it.
func (m *Manager) Cleanup(ctx context.Context, live LiveFunc, grace time.Duration) ([]Allocation, error) {
	victims := m.Orphans(live, grace)
	m.mu.Lock()
	defer m.mu.Unlock()
	var es []*entry
	for _, a := range victims {
		if e := m.byAddr[a.Address]; e != nil && e.VMID == a.VMID && e.NICID == a.NICID {
			es = append(es, e)
		}
	}
	out, err := m.release(ctx, es)
	if err != nil {
		return nil, err
	}
	if err := m.st.PruneRateStamps(ctx, m.opts.Now().Add(-time.Hour)); err != nil {
		m.log.Warn("prune ipam rate stamps", logKeyErr, err)
	}
	if len(out) > 0 {
		m.log.Info("released leaked IPv6 allocations", logKeyCount, len(out))
		if o := m.opts.Observer; o != nil {
			o.Reclaimed(len(out))
		}
	}
	return out, nil
}

// CollectLeaks runs Cleanup every interval until ctx is done.
func (m *Manager) CollectLeaks(ctx context.Context, interval, grace time.Duration, live LiveFunc) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if _, err := m.Cleanup(ctx, live, grace); err != nil && ctx.Err() == nil {
				m.log.Warn("collect leaked IPv6 allocations", logKeyErr, err)
			}
		}
	}
}

// Stats returns pool usage and the trailing hour's allocation count.
func (m *Manager) Stats() Stats {
	pools := m.Pools()
	m.mu.Lock()
	defer m.mu.Unlock()
	cut := m.opts.Now().Add(-time.Hour)
	i, _ := slices.BinarySearchFunc(m.hour, cut, func(a, b time.Time) int {
		if a.After(b) {
			return 1
		}
		return -1
	})
	m.hour = m.hour[i:]
	return Stats{Pools: pools, AllocationsLastHour: len(m.hour)}
}

var poolIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// CheckPoolPrefix returns why p cannot be a pool prefix, or nil.
func CheckPoolPrefix(p netip.Prefix) error {
	a := p.Addr()
	switch {
	case !p.IsValid():
		return invalidf("invalid prefix")
	case !a.Is6() || a.Is4In6():
		return invalidf("%s is not an IPv6 prefix", p)
	case a.Zone() != "":
		return invalidf("%s has a zone", p)
	case p != p.Masked():
		return invalidf("prefix %s has host bits set; did you mean %s?", p, p.Masked())
	case p.Bits() < 16:
		return invalidf("prefix %s is shorter than /16", p)
	case a.IsMulticast(), a.IsLinkLocalUnicast(), a.IsLoopback(), a.IsUnspecified():
		return invalidf("prefix %s is not global or unique-local unicast space", p)
	}
	return nil
}

// checkPrefixes validates new prefixes of pool id against each other and
// every other pool (and id's own existing ones).
func (m *Manager) checkPrefixes(id string, add []netip.Prefix) error {
	if len(add) == 0 {
		return invalidf("pool %q needs at least one prefix", id)
	}
	for i, p := range add {
		if err := CheckPoolPrefix(p); err != nil {
			return err
		}
		for _, q := range add[:i] {
			if p.Overlaps(q) {
				return &OverlapError{Prefix: p, Other: q, OtherPoolID: id}
			}
		}
		for _, o := range m.pools {
			for _, q := range o.Prefixes {
				if p.Overlaps(q) {
					return &OverlapError{Prefix: p, Other: q, OtherPoolID: o.ID}
				}
			}
		}
	}
	return nil
}

func checkPoolFields(p Pool) error {
	if !poolIDRE.MatchString(p.ID) {
		return invalidf("pool id %q must match %s", p.ID, poolIDRE)
	}
	if p.RateLimit < 0 {
		return invalidf("rate_limit must not be negative")
	}
	if p.MaxAllocations < 0 {
		return invalidf("max_allocations must not be negative")
	}
	for _, t := range p.TenantIDs {
		if !TenantIDPattern.MatchString(t) {
			return invalidf("tenant_ids: %q is not a tenant id (1..63 characters of [a-z0-9._-] starting and ending with [a-z0-9]): no VM could use the pool under it", t)
		}
	}
	return nil
}

// TenantIDPattern is the form of a tenant id (a VM config's tenant_id,
// a pool's tenant_ids) and of a security group name: a DNS label that may
// also hold '.' and '_'.
var TenantIDPattern = regexp.MustCompile(`^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$`)

// CreatePool creates and persists a pool; ErrPoolExists when the id is
// taken, *OverlapError when a prefix overlaps another pool's.
func (m *Manager) CreatePool(ctx context.Context, p Pool) (PoolStatus, error) {
	if err := checkPoolFields(p); err != nil {
		return PoolStatus{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.pools[p.ID] != nil {
		return PoolStatus{}, fmt.Errorf("pool '%s': %w", p.ID, ErrPoolExists)
	}
	if err := m.checkPrefixes(p.ID, p.Prefixes); err != nil {
		return PoolStatus{}, err
	}
	p = p.clone()
	if p.CreatedAt.IsZero() {
		p.CreatedAt = m.opts.Now().UTC()
	}
	if err := m.st.CreatePool(ctx, p); err != nil {
		if errors.Is(err, ErrPoolExists) {
			return PoolStatus{}, fmt.Errorf("pool '%s': %w", p.ID, ErrPoolExists)
		}
		return PoolStatus{}, fmt.Errorf("store pool: %w", err)
	}
	ps := newPoolState(p)
	m.pools[p.ID] = ps
	return ps.status(), nil
}

// ExpandPool adds prefixes to pool id and, when description is not nil,
// replaces its description. Existing prefixes and allocations stay.
func (m *Manager) ExpandPool(ctx context.Context, id string, add []netip.Prefix, description *string) (PoolStatus, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	ps := m.pools[id]
	if ps == nil {
		return PoolStatus{}, fmt.Errorf("pool '%s': %w", id, ErrNotFound)
	}
	var fresh []netip.Prefix
	for _, p := range add {
		if !slices.Contains(ps.Prefixes, p) && !slices.Contains(fresh, p) {
			fresh = append(fresh, p)
		}
	}
	if len(fresh) > 0 {
		if err := m.checkPrefixes(id, fresh); err != nil {
			return PoolStatus{}, err
		}
	}
	np := ps.Pool.clone()
	np.Prefixes = append(np.Prefixes, fresh...)
	if description != nil {
		np.Description = *description
	}
	if err := m.st.UpdatePool(ctx, np); err != nil {
		return PoolStatus{}, fmt.Errorf("store pool: %w", err)
	}
	ps.Pool = np
	ps.recount()
	return ps.status(), nil
}

// UpdatePoolSettings replaces a pool's description, tenants and limits
// (not its prefixes).
func (m *Manager) UpdatePoolSettings(ctx context.Context, p Pool) (PoolStatus, error) {
	if err := checkPoolFields(p); err != nil {
		return PoolStatus{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	ps := m.pools[p.ID]
	if ps == nil {
		return PoolStatus{}, fmt.Errorf("pool '%s': %w", p.ID, ErrNotFound)
	}
	np := ps.Pool.clone()
	np.Description, np.TenantIDs, np.RateLimit, np.MaxAllocations = p.Description, slices.Clone(p.TenantIDs), p.RateLimit, p.MaxAllocations
	if err := m.st.UpdatePool(ctx, np); err != nil {
		return PoolStatus{}, fmt.Errorf("store pool: %w", err)
	}
	ps.Pool = np
	return ps.status(), nil
}

// DeletePool deletes an empty pool; ErrPoolNotEmpty while it holds
// allocations.
func (m *Manager) DeletePool(ctx context.Context, id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	ps := m.pools[id]
	if ps == nil {
		return fmt.Errorf("pool '%s': %w", id, ErrNotFound)
	}
	if ps.allocated > 0 {
		return fmt.Errorf("pool '%s' holds %d allocations: %w", id, ps.allocated, ErrPoolNotEmpty)
	}
	if err := m.st.DeletePool(ctx, id); err != nil {
		return fmt.Errorf("delete pool: %w", err)
	}
	delete(m.pools, id)
	for k, s := range m.subnets {
		if s.pool == ps {
			delete(m.subnets, k)
		}
	}
	return nil
}

// Pools returns every pool with its usage, ordered by id.
func (m *Manager) Pools() []PoolStatus {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]PoolStatus, 0, len(m.pools))
	for _, p := range m.pools {
		out = append(out, p.status())
	}
	slices.SortFunc(out, func(a, b PoolStatus) int { return strings.Compare(a.ID, b.ID) })
	return out
}

// Pool returns one pool with its usage.
func (m *Manager) Pool(id string) (PoolStatus, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	p := m.pools[id]
	if p == nil {
		return PoolStatus{}, false
	}
	return p.status(), true
}

// applyConfig creates or updates a configured pool.
func (m *Manager) applyConfig(ctx context.Context, pc PoolConfig) error {
	var prefixes []netip.Prefix
	for _, s := range pc.Prefixes {
		p, err := m.ResolvePrefix(ctx, s)
		if err != nil {
			return err
		}
		prefixes = append(prefixes, p)
	}
	p := Pool{ID: pc.ID, Prefixes: prefixes, Description: pc.Description, TenantIDs: pc.TenantIDs, RateLimit: pc.RateLimit, MaxAllocations: pc.MaxAllocations}
	if _, ok := m.Pool(pc.ID); !ok {
		_, err := m.CreatePool(ctx, p)
		return err
	}
	if _, err := m.UpdatePoolSettings(ctx, p); err != nil {
		return err
	}
	st, err := m.ExpandPool(ctx, pc.ID, prefixes, nil)
	if err != nil {
		return err
	}
	for _, q := range st.Prefixes {
		if !slices.Contains(prefixes, q) {
			m.log.Warn("pool prefix kept though no longer configured", logKeyPool, pc.ID, logKeyPrefix, q)
		}
	}
	return nil
}
