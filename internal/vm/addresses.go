package vm

import (
	"context"
	"fmt"
	"net/netip"
)

// StaticAddresses is the Addresses implementation for hosts without address
// pools: it accepts the literal addresses a config names (plain IPv6 only),
// reserves nothing, and assigns nothing to NICs that name no address.
type StaticAddresses struct{}

// Reserve implements Addresses.
func (StaticAddresses) Reserve(_ context.Context, req AddressRequest) (ResolvedNIC, error) {
	var r ResolvedNIC
	v6 := req.IPv6
	if v6 == nil {
		return r, nil
	}
	if s := v6.GetAddress(); s != "" {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return r, &ValidationError{Violations: []FieldViolation{{Field: req.Field + ".address", Reason: fmt.Sprintf("invalid IPv6 prefix %q", s)}}}
		}
		r.Address = netip.PrefixFrom(p.Addr().Unmap(), p.Bits())
	}
	if s := v6.GetGateway(); s != "" {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return r, &ValidationError{Violations: []FieldViolation{{Field: req.Field + ".gateway", Reason: fmt.Sprintf("invalid IPv6 address %q", s)}}}
		}
		r.Gateway = a
	}
	for i, s := range v6.GetDnsServers() {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return r, &ValidationError{Violations: []FieldViolation{{Field: fmt.Sprintf("%s.dns_servers[%d]", req.Field, i), Reason: fmt.Sprintf("invalid IPv6 address %q", s)}}}
		}
		r.DNS = append(r.DNS, a)
	}
	return r, nil
}

// Release implements Addresses.
func (StaticAddresses) Release(context.Context, string) error { return nil }
