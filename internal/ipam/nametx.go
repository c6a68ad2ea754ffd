package ipam

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"
)

// rollbackTimeout bounds the store deletes of one NameTx rollback.
const rollbackTimeout = 30 * time.Second

type nameKey struct {
	parent netip.Prefix
	name   string
}

type txKey struct{}

// NameTx is one request's view of the subnet-name registry. A name the
// request is the first to resolve is assigned (and persisted) at once, as
// plain resolution does, but stays tentative, in memory and in the store,
// until the transaction finishes: Commit confirms it, Rollback removes it
// again (store row first, then memory), so a request that fails leaves no
// name behind. A transaction that never finishes because the daemon died
// is rolled back by the next Open, which finds its names still tentative
// in the store.
//
// A tentative name that anyone else uses is pinned and survives the
// rollback: another transaction resolving it, plain resolution
// (ResolveAddr, ResolvePrefix, SubnetValue, the parsers), an explicit
// DeclareSubnetName, or an allocation in its subnet made outside the
// transaction (Reserve under a context that does not carry it). A name
// whose subnet still holds allocations when the rollback runs is kept,
// tentative, until the last of them is released. Pinning and committing
// write the store before memory.
//
// A NameTx is meant for one request; its methods may be called from any
// goroutine. Resolving through a finished transaction is plain resolution.
type NameTx struct {
	m   *Manager
	ctx context.Context

	// Guarded by m.mu.
	declared []nameKey
	done     bool
}

// BeginNames starts a name transaction for one request. ctx is used for
// the store writes of the names it assigns; the rollback's deletes run
// detached from its cancellation.
func (m *Manager) BeginNames(ctx context.Context) *NameTx {
	return &NameTx{m: m, ctx: ctx}
}

// txFrom returns the transaction of m that ctx carries, or nil.
func (m *Manager) txFrom(ctx context.Context) *NameTx {
	if ctx == nil {
		return nil
	}
	if tx, ok := ctx.Value(txKey{}).(*NameTx); ok && tx.m == m {
		return tx
	}
	return nil
}

// Bind returns ctx carrying tx: the Manager's resolution under it
// (ResolveAddr, ResolvePrefix, SubnetValue, and so Reserve's callers that
// resolve first) goes through tx, and an allocation made under it does not
// pin tx's own names.
func (tx *NameTx) Bind(ctx context.Context) context.Context {
	return context.WithValue(ctx, txKey{}, tx)
}

// ResolveAddr is Manager.ResolveAddr through the transaction.
func (tx *NameTx) ResolveAddr(s string) (netip.Addr, error) {
	return tx.m.ResolveAddr(tx.Bind(tx.ctx), s)
}

// ResolvePrefix is Manager.ResolvePrefix through the transaction.
func (tx *NameTx) ResolvePrefix(s string) (netip.Prefix, error) {
	return tx.m.ResolvePrefix(tx.Bind(tx.ctx), s)
}

// AddrParser returns tx.ResolveAddr, for vm.ValidateOptions.ParseAddr.
func (tx *NameTx) AddrParser() func(string) (netip.Addr, error) { return tx.ResolveAddr }

// PrefixParser returns tx.ResolvePrefix, for vm.ValidateOptions.ParsePrefix.
func (tx *NameTx) PrefixParser() func(string) (netip.Prefix, error) { return tx.ResolvePrefix }

// Declared returns the names the transaction assigned that are still
// tentative (neither pinned nor finished), ordered as assigned.
func (tx *NameTx) Declared() []SubnetName {
	m := tx.m
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []SubnetName
	for _, k := range tx.declared {
		if m.tentative[k] == tx {
			n := m.names[k.parent][k.name]
			n.Tentative = true
			out = append(out, n)
		}
	}
	return out
}

// Finish commits the transaction when ok and rolls it back otherwise.
func (tx *NameTx) Finish(ok bool) {
	if ok {
		tx.Commit()
	} else {
		tx.Rollback()
	}
}

// Commit makes the transaction's names permanent: each still tentative is
// confirmed in the store, then in memory. A store error is logged and
// leaves that name tentative, unowned (Manager.orphans): the next use
// confirms it, and a start before that removes it unless its subnet holds
// allocations. Finishing twice is a no-op.
func (tx *NameTx) Commit() {
	m := tx.m
	m.mu.Lock()
	defer m.mu.Unlock()
	if tx.done {
		return
	}
	tx.done = true
	ctx, cancel := context.WithTimeout(context.WithoutCancel(tx.ctx), rollbackTimeout)
	defer cancel()
	for _, k := range tx.declared {
		if m.tentative[k] != tx {
			continue // pinned
		}
		if err := m.st.ConfirmSubnetName(ctx, k.parent, k.name); err != nil {
			m.log.Error("confirm IPv6 subnet name of a succeeded request; it stays tentative until used again",
				"parent", k.parent, "name", k.name, logKeyErr, err)
			m.tentative[k] = m.orphans
			continue
		}
		delete(m.tentative, k)
	}
}

// Rollback removes the names the transaction assigned that are still
// tentative, most recent first (store row first, then memory), freeing
// their values for the next new name. A name whose subnet holds
// allocations, or whose store delete fails (logged), stays tentative
// without an owner (Manager.orphans): it goes with the last allocation
// in its subnet, or at the next start, unless something uses it before.
// Finishing twice is a no-op.
func (tx *NameTx) Rollback() {
	m := tx.m
	m.mu.Lock()
	defer m.mu.Unlock()
	if tx.done {
		return
	}
	tx.done = true
	ctx, cancel := context.WithTimeout(context.WithoutCancel(tx.ctx), rollbackTimeout)
	defer cancel()
	for i := len(tx.declared) - 1; i >= 0; i-- {
		k := tx.declared[i]
		if m.tentative[k] != tx {
			continue // pinned
		}
		n, ok := m.names[k.parent][k.name]
		if !ok {
			delete(m.tentative, k)
			continue
		}
		if m.subnetInUseLocked(n.Prefix()) {
			m.log.Warn("kept IPv6 subnet name of a failed request while its subnet holds allocations",
				"parent", n.Parent, "name", n.Name, "subnet", n.Prefix())
			m.tentative[k] = m.orphans
			continue
		}
		if err := m.st.DeleteSubnetName(ctx, n.Parent, n.Name); err != nil && !errors.Is(err, ErrNotFound) {
			m.log.Error("remove IPv6 subnet name of a failed request; it stays tentative until the next start or use",
				"parent", n.Parent, "name", n.Name, logKeyErr, err)
			m.tentative[k] = m.orphans
			continue
		}
		delete(m.tentative, k)
		m.removeName(n)
		m.log.Info("removed IPv6 subnet name of a failed request", "parent", n.Parent, "name", n.Name, "subnet", n.Prefix())
	}
}

// dropOrphansLocked removes the tentative names no transaction owns
// (requests that failed, or never finished because the daemon stopped)
// whose subnet holds no allocation, store row first. why is logged. A
// store error is logged and leaves the name for a later attempt.
func (m *Manager) dropOrphansLocked(ctx context.Context, why string) {
	for k, owner := range m.tentative {
		if owner != m.orphans {
			continue
		}
		n, ok := m.names[k.parent][k.name]
		if !ok {
			delete(m.tentative, k)
			continue
		}
		if m.subnetInUseLocked(n.Prefix()) {
			continue
		}
		if err := m.st.DeleteSubnetName(ctx, n.Parent, n.Name); err != nil && !errors.Is(err, ErrNotFound) {
			m.log.Error("remove tentative IPv6 subnet name", "parent", n.Parent, "name", n.Name, "reason", why, logKeyErr, err)
			continue
		}
		delete(m.tentative, k)
		m.removeName(n)
		m.log.Info("removed tentative IPv6 subnet name", "parent", n.Parent, "name", n.Name, "subnet", n.Prefix(), "reason", why)
	}
}

// pinLocked makes a tentative name permanent whatever its transaction
// does: confirmed in the store first, then in memory. On a store error
// the name stays tentative.
func (m *Manager) pinLocked(ctx context.Context, k nameKey) error {
	if err := m.st.ConfirmSubnetName(ctx, k.parent, k.name); err != nil {
		return fmt.Errorf("confirm subnet name %q under %s: %w", k.name, k.parent, err)
	}
	delete(m.tentative, k)
	m.log.Debug("pinned tentative IPv6 subnet name", "parent", k.parent, "name", k.name)
	return nil
}

// pinSubnetLocked pins the tentative names of transactions other than tx
// (and those no transaction owns) whose subnet holds a. A store error is
// logged and leaves the name tentative: the allocation still keeps it,
// also across a restart, for as long as it lasts.
func (m *Manager) pinSubnetLocked(ctx context.Context, a netip.Addr, tx *NameTx) {
	for k, owner := range m.tentative {
		if owner == tx {
			continue
		}
		if n, ok := m.names[k.parent][k.name]; ok && n.Prefix().Contains(a) {
			if err := m.pinLocked(ctx, k); err != nil {
				m.log.Warn("pin tentative IPv6 subnet name for an allocation in its subnet", "parent", k.parent, "name", k.name, logKeyAddress, a, logKeyErr, err)
			}
		}
	}
}

// subnetInUseLocked reports whether any allocation lies in p.
func (m *Manager) subnetInUseLocked(p netip.Prefix) bool {
	scan := false
	for k, s := range m.subnets {
		if s.allocated == 0 || !k.Overlaps(p) {
			continue
		}
		if k.Bits() >= p.Bits() {
			return true // the allocation domain lies inside p
		}
		scan = true
	}
	if scan {
		for a := range m.byAddr {
			if p.Contains(a) {
				return true
			}
		}
	}
	return false
}

// PlanAddrParser returns a parser for building the rule plans of VMs whose
// configs their own requests already resolved (vm.Options.Validate in the
// daemon): it resolves like ResolveAddr, but a tentative name it meets is
// left tentative, since the only config that can name it is that of the
// request that declared it (any other request's resolution pinned it).
func (m *Manager) PlanAddrParser() func(string) (netip.Addr, error) {
	return func(s string) (netip.Addr, error) { return resolve[Addr](s, ParseAddr, m.planValue) }
}

// PlanPrefixParser is PlanAddrParser for prefixes.
func (m *Manager) PlanPrefixParser() func(string) (netip.Prefix, error) {
	return func(s string) (netip.Prefix, error) { return resolve[Prefix](s, ParsePrefix, m.planValue) }
}

func (m *Manager) planValue(parent netip.Prefix, name string) (uint16, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.subnetValueLocked(context.Background(), parent, strings.ToLower(name), nil, false)
}
