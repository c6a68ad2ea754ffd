package ipam

import (
	"context"
	"errors"
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
// plain resolution does, but stays tentative until the transaction
// finishes: Commit keeps it, Rollback removes it again (store row first,
// then memory), so a request that fails leaves no name behind.
//
// A tentative name that anyone else uses is pinned and survives the
// rollback: another transaction resolving it, plain resolution
// (ResolveAddr, ResolvePrefix, SubnetValue, the parsers), an explicit
// DeclareSubnetName, or an allocation in its subnet made outside the
// transaction (Reserve under a context that does not carry it). A name
// whose subnet still holds allocations when the rollback runs is kept too.
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
			out = append(out, m.names[k.parent][k.name])
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

// Commit makes the transaction's names permanent. Finishing twice is a
// no-op.
func (tx *NameTx) Commit() {
	m := tx.m
	m.mu.Lock()
	defer m.mu.Unlock()
	if tx.done {
		return
	}
	tx.done = true
	for _, k := range tx.declared {
		if m.tentative[k] == tx {
			delete(m.tentative, k)
		}
	}
}

// Rollback removes the names the transaction assigned that are still
// tentative, most recent first, freeing their values for the next new
// name. A store error is logged and leaves that name in place (it is then
// an ordinary name). Finishing twice is a no-op.
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
		delete(m.tentative, k)
		n, ok := m.names[k.parent][k.name]
		if !ok {
			continue
		}
		if m.subnetInUseLocked(n.Prefix()) {
			m.log.Warn("kept IPv6 subnet name of a failed request: its subnet holds allocations",
				"parent", n.Parent, "name", n.Name, "subnet", n.Prefix())
			continue
		}
		if err := m.st.DeleteSubnetName(ctx, n.Parent, n.Name); err != nil && !errors.Is(err, ErrNotFound) {
			m.log.Error("remove IPv6 subnet name of a failed request", "parent", n.Parent, "name", n.Name, logKeyErr, err)
			continue
		}
		m.removeName(n)
		m.log.Info("removed IPv6 subnet name of a failed request", "parent", n.Parent, "name", n.Name, "subnet", n.Prefix())
	}
}

// pinLocked makes a tentative name permanent whatever its transaction does.
func (m *Manager) pinLocked(k nameKey) {
	delete(m.tentative, k)
	m.log.Debug("pinned tentative IPv6 subnet name", "parent", k.parent, "name", k.name)
}

// pinSubnetLocked pins the tentative names of transactions other than tx
// whose subnet holds a.
func (m *Manager) pinSubnetLocked(a netip.Addr, tx *NameTx) {
	for k, owner := range m.tentative {
		if owner == tx {
			continue
		}
		if n, ok := m.names[k.parent][k.name]; ok && n.Prefix().Contains(a) {
			m.pinLocked(k)
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
	return func(s string) (netip.Addr, error) {
		a, err := ParseAddr(s)
		if err != nil {
			return netip.Addr{}, err
		}
		if ip, ok := a.Plain(); ok {
			return ip, nil
		}
		v, err := m.planValue(a.Parent(), a.Name())
		if err != nil {
			return netip.Addr{}, err
		}
		return a.With(v), nil
	}
}

// PlanPrefixParser is PlanAddrParser for prefixes.
func (m *Manager) PlanPrefixParser() func(string) (netip.Prefix, error) {
	return func(s string) (netip.Prefix, error) {
		p, err := ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, err
		}
		if pp, ok := p.Plain(); ok {
			return pp, nil
		}
		v, err := m.planValue(p.Parent(), p.Name())
		if err != nil {
			return netip.Prefix{}, err
		}
		return p.With(v), nil
	}
}

func (m *Manager) planValue(parent netip.Prefix, name string) (uint16, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.subnetValueLocked(context.Background(), parent, strings.ToLower(name), nil, false)
}
