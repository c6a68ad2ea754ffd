package ipam

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"
)

// Pool is an address pool as persisted.
type Pool struct {
	ID string
	// Prefixes are masked IPv6 prefixes, in the order they were added; they
	// overlap no other pool's.
	Prefixes    []netip.Prefix
	Description string
	// TenantIDs are the tenants allowed to use the pool; empty means every
	// tenant (a shared pool).
	TenantIDs []string
	// RateLimit is the allocations per hour allowed per tenant; 0 is none.
	RateLimit int
	// MaxAllocations caps the pool's allocations; 0 is none.
	MaxAllocations int64
	CreatedAt      time.Time
}

func (p Pool) clone() Pool {
	p.Prefixes = slices.Clone(p.Prefixes)
	p.TenantIDs = slices.Clone(p.TenantIDs)
	return p
}

// Allows reports whether tenant may use the pool.
func (p Pool) Allows(tenant string) bool {
	return len(p.TenantIDs) == 0 || slices.Contains(p.TenantIDs, tenant)
}

// Allocation is one address held by one VM NIC.
type Allocation struct {
	Address netip.Addr
	// PrefixLen is the on-link prefix length the NIC gets.
	PrefixLen int
	PoolID    string
	VMID      string
	NICID     string
	TenantID  string
	// Gateway is the NIC's gateway, when it has one.
	Gateway   netip.Addr
	Bridge    string
	CreatedAt time.Time
}

// Prefix is the address with its prefix length (2600:beef:1000:1::10/64).
func (a Allocation) Prefix() netip.Prefix { return netip.PrefixFrom(a.Address, a.PrefixLen) }

// SubnetName maps a name under a parent prefix to a 16-bit subnet value.
type SubnetName struct {
	Parent    netip.Prefix
	Name      string
	Value     uint16
	CreatedAt time.Time
	// Tentative marks a name a request assigned and has not finished with
	// (see NameTx). The Store records it so that a name whose request never
	// finished (the daemon died) is not taken for a permanent one: Open
	// removes it, or keeps it only while its subnet holds allocations.
	// Manager.SubnetNames reports the current state.
	Tentative bool
}

// Prefix is the subnet the name stands for (parent + value, 16 bits longer).
func (n SubnetName) Prefix() netip.Prefix {
	b := n.Parent.Addr().As16()
	i := n.Parent.Bits() / 8
	b[i] = byte(n.Value >> 8)
	b[i+1] = byte(n.Value)
	return netip.PrefixFrom(netip.AddrFrom16(b), n.Parent.Bits()+16)
}

// RateStamp records one allocation by a tenant in a rate-limited pool.
type RateStamp struct {
	TenantID string
	PoolID   string
	At       time.Time
}

// Snapshot is everything a Store holds, loaded at start.
type Snapshot struct {
	Pools       []Pool
	Allocations []Allocation
	SubnetNames []SubnetName
	// RateStamps are those at or after the time passed to Load.
	RateStamps []RateStamp
}

// Store persists IPAM state. Each method is one transaction. The Manager
// serialises writes that must not interleave; implementations must still be
// safe for concurrent use.
type Store interface {
	// Load returns all pools, allocations and subnet names, and the rate
	// stamps at or after since.
	Load(ctx context.Context, since time.Time) (*Snapshot, error)
	// CreatePool inserts a pool; ErrPoolExists when the id is taken.
	CreatePool(ctx context.Context, p Pool) error
	// UpdatePool replaces a pool's fields and prefixes; ErrNotFound when
	// absent.
	UpdatePool(ctx context.Context, p Pool) error
	// DeletePool removes a pool; ErrNotFound when absent.
	DeletePool(ctx context.Context, id string) error
	// InsertAllocations inserts allocations and rate stamps in one
	// committed transaction; ErrConflict (nothing inserted) when an address
	// is taken.
	InsertAllocations(ctx context.Context, allocs []Allocation, stamps []RateStamp) error
	// DeleteAllocations removes allocations by address in one transaction;
	// absent addresses are ignored.
	DeleteAllocations(ctx context.Context, addrs []netip.Addr) error
	// PutSubnetName inserts a name, tentative or not (n.Tentative);
	// ErrSubnetNameTaken when the name or the value is already used under
	// the parent.
	PutSubnetName(ctx context.Context, n SubnetName) error
	// ConfirmSubnetName clears the name's tentative mark (its request
	// succeeded, or something else uses it); confirming a confirmed name
	// is not an error. ErrNotFound when absent.
	ConfirmSubnetName(ctx context.Context, parent netip.Prefix, name string) error
	// DeleteSubnetName removes the name under parent, freeing its value;
	// ErrNotFound when absent. (A failed request's names are removed
	// again: see NameTx.)
	DeleteSubnetName(ctx context.Context, parent netip.Prefix, name string) error
	// PruneRateStamps deletes rate stamps older than before.
	PruneRateStamps(ctx context.Context, before time.Time) error
}

// MemStore is an in-memory Store for tests and for running without a
// database.
type MemStore struct {
	mu     sync.Mutex
	pools  map[string]Pool
	allocs map[netip.Addr]Allocation
	names  []SubnetName
	stamps []RateStamp
	// Fail, when set, is returned by every write (to test rollback).
	Fail error
}

var _ Store = (*MemStore)(nil)

// NewMemStore returns an empty MemStore.
func NewMemStore() *MemStore {
	return &MemStore{pools: map[string]Pool{}, allocs: map[netip.Addr]Allocation{}}
}

// Load implements Store.
func (s *MemStore) Load(ctx context.Context, since time.Time) (*Snapshot, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	snap := &Snapshot{SubnetNames: slices.Clone(s.names)}
	for _, p := range s.pools {
		snap.Pools = append(snap.Pools, p.clone())
	}
	slices.SortFunc(snap.Pools, func(a, b Pool) int { return strings.Compare(a.ID, b.ID) })
	for _, a := range s.allocs {
		snap.Allocations = append(snap.Allocations, a)
	}
	slices.SortFunc(snap.Allocations, func(a, b Allocation) int { return a.Address.Compare(b.Address) })
	for _, st := range s.stamps {
		if !st.At.Before(since) {
			snap.RateStamps = append(snap.RateStamps, st)
		}
	}
	return snap, nil
}

// CreatePool implements Store.
func (s *MemStore) CreatePool(ctx context.Context, p Pool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.Fail != nil {
		return s.Fail
	}
	if _, ok := s.pools[p.ID]; ok {
		return ErrPoolExists
	}
	s.pools[p.ID] = p.clone()
	return nil
}

// UpdatePool implements Store.
func (s *MemStore) UpdatePool(ctx context.Context, p Pool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.Fail != nil {
		return s.Fail
	}
	if _, ok := s.pools[p.ID]; !ok {
		return ErrNotFound
	}
	s.pools[p.ID] = p.clone()
	return nil
}

// DeletePool implements Store.
func (s *MemStore) DeletePool(ctx context.Context, id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.Fail != nil {
		return s.Fail
	}
	if _, ok := s.pools[id]; !ok {
		return ErrNotFound
	}
	delete(s.pools, id)
	return nil
}

// InsertAllocations implements Store.
func (s *MemStore) InsertAllocations(ctx context.Context, allocs []Allocation, stamps []RateStamp) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.Fail != nil {
		return s.Fail
	}
	seen := map[netip.Addr]bool{}
	for _, a := range allocs {
		if _, ok := s.allocs[a.Address]; ok || seen[a.Address] {
			return ErrConflict
		}
		seen[a.Address] = true
	}
	for _, a := range allocs {
		s.allocs[a.Address] = a
	}
	s.stamps = append(s.stamps, stamps...)
	return nil
}

// DeleteAllocations implements Store.
func (s *MemStore) DeleteAllocations(ctx context.Context, addrs []netip.Addr) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.Fail != nil {
		return s.Fail
	}
	for _, a := range addrs {
		delete(s.allocs, a)
	}
	return nil
}

// PutSubnetName implements Store.
func (s *MemStore) PutSubnetName(ctx context.Context, n SubnetName) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.Fail != nil {
		return s.Fail
	}
	for _, o := range s.names {
		if o.Parent == n.Parent && (o.Name == n.Name || o.Value == n.Value) {
			return ErrSubnetNameTaken
		}
	}
	s.names = append(s.names, n)
	return nil
}

// ConfirmSubnetName implements Store.
func (s *MemStore) ConfirmSubnetName(ctx context.Context, parent netip.Prefix, name string) error {
	return s.withName(parent, name, func(i int) { s.names[i].Tentative = false })
}

// DeleteSubnetName implements Store.
func (s *MemStore) DeleteSubnetName(ctx context.Context, parent netip.Prefix, name string) error {
	return s.withName(parent, name, func(i int) { s.names = slices.Delete(s.names, i, i+1) })
}

// withName runs f on the index of the subnet name (parent, name) under
// the lock; ErrNotFound when there is none.
func (s *MemStore) withName(parent netip.Prefix, name string, f func(i int)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.Fail != nil {
		return s.Fail
	}
	i := slices.IndexFunc(s.names, func(o SubnetName) bool { return o.Parent == parent && o.Name == name })
	if i < 0 {
		return ErrNotFound
	}
	f(i)
	return nil
}

// PruneRateStamps implements Store.
func (s *MemStore) PruneRateStamps(ctx context.Context, before time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stamps = slices.DeleteFunc(s.stamps, func(st RateStamp) bool { return st.At.Before(before) })
	return nil
}
