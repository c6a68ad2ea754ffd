package ipam

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

func groupValue(a netip.Addr, pos int) uint16 {
	b := a.As16()
	return uint16(b[2*pos])<<8 | uint16(b[2*pos+1])
}

func (m *Manager) removeName(n SubnetName) {
	delete(m.names[n.Parent], n.Name)
	delete(m.values[n.Parent], n.Value)
	if len(m.names[n.Parent]) == 0 {
		delete(m.names, n.Parent)
		delete(m.values, n.Parent)
	}
}

// addName adds n to memory; whether it is tentative is m.tentative's
// business.
func (m *Manager) addName(n SubnetName) {
	n.Tentative = false
	if m.names[n.Parent] == nil {
		m.names[n.Parent] = map[string]SubnetName{}
		m.values[n.Parent] = map[uint16]string{}
	}
	m.names[n.Parent][n.Name] = n
	m.values[n.Parent][n.Value] = n.Name
}

// ResolveAddr parses s (plain or symbolic) and resolves its subnet name,
// assigning an unknown one when automatic names are on.
func (m *Manager) ResolveAddr(ctx context.Context, s string) (netip.Addr, error) {
	return resolve[Addr](s, ParseAddr, func(parent netip.Prefix, name string) (uint16, error) {
		return m.SubnetValue(ctx, parent, name)
	})
}

// ResolvePrefix is ResolveAddr for prefixes (and addresses with a prefix
// length); host bits are kept.
func (m *Manager) ResolvePrefix(ctx context.Context, s string) (netip.Prefix, error) {
	return resolve[Prefix](s, ParsePrefix, func(parent netip.Prefix, name string) (uint16, error) {
		return m.SubnetValue(ctx, parent, name)
	})
}

// symbolic is Addr or Prefix: a plain value (T), or one inside a named
// subnet of a parent prefix.
type symbolic[T any] interface {
	Plain() (T, bool)
	Parent() netip.Prefix
	Name() string
	With(value uint16) T
}

// resolve parses s and, when it names a subnet, gives the name its value.
func resolve[S symbolic[T], T any](s string, parse func(string) (S, error), value func(parent netip.Prefix, name string) (uint16, error)) (T, error) {
	var zero T
	x, err := parse(s)
	if err != nil {
		return zero, err
	}
	if v, ok := x.Plain(); ok {
		return v, nil
	}
	n, err := value(x.Parent(), x.Name())
	if err != nil {
		return zero, err
	}
	return x.With(n), nil
}

// AddrParser returns ResolveAddr bound to ctx, for hooks such as
// vm.ValidateOptions.ParseAddr.
func (m *Manager) AddrParser(ctx context.Context) func(string) (netip.Addr, error) {
	return func(s string) (netip.Addr, error) { return m.ResolveAddr(ctx, s) }
}

// PrefixParser returns ResolvePrefix bound to ctx, for hooks such as
// vm.ValidateOptions.ParsePrefix.
func (m *Manager) PrefixParser(ctx context.Context) func(string) (netip.Prefix, error) {
	return func(s string) (netip.Prefix, error) { return m.ResolvePrefix(ctx, s) }
}

func checkParent(parent netip.Prefix) error {
	switch {
	case !parent.IsValid() || !parent.Addr().Is6() || parent.Addr().Is4In6():
		return invalidf("parent %s is not an IPv6 prefix", parent)
	case parent != parent.Masked():
		return invalidf("parent %s has host bits set; did you mean %s?", parent, parent.Masked())
	case parent.Bits()%16 != 0 || parent.Bits() < 16 || parent.Bits() > 112:
		return invalidf("parent %s must end on a group boundary (/16, /32 ... /112)", parent)
	}
	return nil
}

// SubnetValue returns the value of name under parent, assigning the lowest
// free one (from 1) on first use when automatic names are on. When ctx
// carries a NameTx of m (NameTx.Bind), the name is resolved through it;
// otherwise this is plain resolution, which pins a tentative name.
func (m *Manager) SubnetValue(ctx context.Context, parent netip.Prefix, name string) (uint16, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.subnetValueLocked(ctx, parent, strings.ToLower(name), m.txFrom(ctx), true)
}

// subnetValueLocked resolves name under parent for tx (nil: plain
// resolution). A name tx declares is tentative until tx finishes; pin
// pins a tentative name of another transaction.
func (m *Manager) subnetValueLocked(ctx context.Context, parent netip.Prefix, name string, tx *NameTx, pin bool) (uint16, error) {
	if tx != nil && tx.done {
		tx = nil // a finished transaction resolves plainly
	}
	k := nameKey{parent, name}
	if n, ok := m.names[parent][name]; ok {
		if owner := m.tentative[k]; owner != nil && owner != tx && pin {
			if err := m.pinLocked(ctx, k); err != nil {
				return 0, err
			}
		}
		return n.Value, nil
	}
	if !m.opts.AutoSubnetNames {
		return 0, &UnknownSubnetNameError{Name: name, Parent: parent}
	}
	n, err := m.declareLocked(ctx, parent, name, nil, tx != nil)
	if err != nil {
		return 0, err
	}
	if tx != nil {
		m.tentative[k] = tx
		tx.declared = append(tx.declared, k)
	}
	return n.Value, nil
}

// DeclareSubnetName declares name under parent with value, or the lowest
// free value when value is nil. Declaring an existing name with its value
// (or no value) returns it; a different value, or a value another name
// holds, is ErrSubnetNameTaken.
func (m *Manager) DeclareSubnetName(ctx context.Context, parent netip.Prefix, name string, value *uint16) (SubnetName, error) {
	if !IsLabel(name) {
		return SubnetName{}, invalidf("subnet name %q must match [a-z][a-z0-9-]{0,31} and not be hex", name)
	}
	if err := checkParent(parent); err != nil {
		return SubnetName{}, err
	}
	name = strings.ToLower(name)
	m.mu.Lock()
	defer m.mu.Unlock()
	if n, ok := m.names[parent][name]; ok {
		if value != nil && *value != n.Value {
			return SubnetName{}, fmt.Errorf("subnet name %q under %s is %#04x: %w", name, parent, n.Value, ErrSubnetNameTaken)
		}
		// An explicit declaration keeps a name a request only tried.
		if m.tentative[nameKey{parent, name}] != nil {
			if err := m.pinLocked(ctx, nameKey{parent, name}); err != nil {
				return SubnetName{}, err
			}
		}
		return n, nil
	}
	return m.declareLocked(ctx, parent, name, value, false)
}

// declareLocked assigns name under parent and stores it, tentative (for a
// NameTx, which records it) or not.
func (m *Manager) declareLocked(ctx context.Context, parent netip.Prefix, name string, value *uint16, tentative bool) (SubnetName, error) {
	if err := checkParent(parent); err != nil {
		return SubnetName{}, err
	}
	var v uint16
	if value != nil {
		v = *value
		if other, ok := m.values[parent][v]; ok {
			return SubnetName{}, fmt.Errorf("value %#04x under %s is subnet %q: %w", v, parent, other, ErrSubnetNameTaken)
		}
	} else {
		used := m.usedValues(parent)
		found := false
		for i := 1; i <= 0xffff; i++ {
			if used[i/64]&(1<<(i%64)) == 0 {
				v, found = uint16(i), true
				break
			}
		}
		if !found {
			return SubnetName{}, fmt.Errorf("no free subnet value under %s for %q: %w", parent, name, ErrExhausted)
		}
	}
	n := SubnetName{Parent: parent, Name: name, Value: v, CreatedAt: m.opts.Now().UTC(), Tentative: tentative}
	if err := m.st.PutSubnetName(ctx, n); err != nil {
		if errors.Is(err, ErrSubnetNameTaken) {
			return SubnetName{}, fmt.Errorf("subnet name %q under %s: %w", name, parent, err)
		}
		return SubnetName{}, fmt.Errorf("store subnet name: %w", err)
	}
	m.addName(n)
	m.log.Info("assigned IPv6 subnet name", "parent", parent, "name", name, "subnet", n.Prefix(), "tentative", tentative)
	return n, nil
}

// usedValues marks the 16-bit values under parent that pool subnets,
// allocations and names already use.
func (m *Manager) usedValues(parent netip.Prefix) *[1024]uint64 {
	var used [1024]uint64
	mark := func(v uint16) { used[v/64] |= 1 << (v % 64) }
	pos := parent.Bits() / 16
	child := parent.Bits() + 16
	for v := range m.values[parent] {
		mark(v)
	}
	for _, p := range m.pools {
		for _, q := range p.Prefixes {
			if q.Bits() <= parent.Bits() || !parent.Contains(q.Addr()) {
				continue
			}
			v0 := int(groupValue(q.Addr(), pos))
			n := 1
			if q.Bits() < child {
				n = 1 << (child - q.Bits())
			}
			for v := v0; v < v0+n && v <= 0xffff; v++ {
				mark(uint16(v))
			}
		}
	}
	scan := false
	for k, s := range m.subnets {
		if s.allocated == 0 || !parent.Overlaps(k) {
			continue
		}
		if k.Bits() >= child && parent.Contains(k.Addr()) {
			mark(groupValue(k.Addr(), pos))
		} else {
			scan = true
		}
	}
	if scan { // parent at /64 or longer: look at the addresses themselves
		for a := range m.byAddr {
			if parent.Contains(a) {
				mark(groupValue(a, pos))
			}
		}
	}
	return &used
}

// SubnetNames returns every declared name, ordered by parent then name;
// Tentative marks those a request assigned and has not finished with (or
// that a failed or interrupted request left while their subnet holds
// allocations).
func (m *Manager) SubnetNames() []SubnetName {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []SubnetName
	for _, ns := range m.names {
		for _, n := range ns {
			n.Tentative = m.tentative[nameKey{n.Parent, n.Name}] != nil
			out = append(out, n)
		}
	}
	slices.SortFunc(out, func(a, b SubnetName) int {
		if c := a.Parent.Addr().Compare(b.Parent.Addr()); c != 0 {
			return c
		}
		if c := a.Parent.Bits() - b.Parent.Bits(); c != 0 {
			return c
		}
		return strings.Compare(a.Name, b.Name)
	})
	return out
}
