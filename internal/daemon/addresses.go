package daemon

import (
	"context"
	"errors"
	"fmt"

	"github.com/metald/metald/internal/ipam"
	"github.com/metald/metald/internal/vm"
)

// addresses adapts the IPAM manager to the VM manager's Addresses
// contract: it resolves symbolic subnet names and reserves each NIC's
// address (the configured one, or the next free one).
type addresses struct{ m *ipam.Manager }

// fieldError turns an IPAM error about one field into a validation error
// naming it, unless it is about the pool rather than the field (exhaustion
// and rate limits keep their own messages and codes).
func fieldError(field string, err error) error {
	if errors.Is(err, ipam.ErrExhausted) || errors.Is(err, ipam.ErrRateLimited) {
		return err
	}
	if errors.Is(err, ipam.ErrPermission) || errors.Is(err, ipam.ErrConflict) {
		return fmt.Errorf("%s: %w", field, err)
	}
	return &vm.ValidationError{Violations: []vm.FieldViolation{{Field: field, Reason: err.Error()}}}
}

func (a addresses) Reserve(ctx context.Context, req vm.AddressRequest) (vm.ResolvedNIC, error) {
	var r vm.ResolvedNIC
	v6 := req.IPv6
	ireq := ipam.Request{VMID: req.VMID, NICID: req.NICID, TenantID: req.TenantID, Bridge: req.Bridge}
	if s := v6.GetAddress(); s != "" {
		p, err := a.m.ResolvePrefix(ctx, s)
		if err != nil {
			return r, fieldError(req.Field+".address", err)
		}
		ireq.Address = p
	}
	if s := v6.GetGateway(); s != "" {
		gw, err := a.m.ResolveAddr(ctx, s)
		if err != nil {
			return r, fieldError(req.Field+".gateway", err)
		}
		ireq.Gateway = gw
	}
	for i, s := range v6.GetDnsServers() {
		d, err := a.m.ResolveAddr(ctx, s)
		if err != nil {
			return r, fieldError(fmt.Sprintf("%s.dns_servers[%d]", req.Field, i), err)
		}
		r.DNS = append(r.DNS, d)
	}
	alloc, err := a.m.Reserve(ctx, ireq)
	if err != nil {
		var gwErr *ipam.GatewayError
		switch {
		case errors.As(err, &gwErr):
			return r, fieldError(req.Field+".gateway", err)
		case ireq.Address.IsValid():
			return r, fieldError(req.Field+".address", err)
		case errors.Is(err, ipam.ErrNotInPool):
			return r, &vm.ValidationError{Violations: []vm.FieldViolation{{Field: req.Field + ".address", Reason: fmt.Sprintf(
				"not given, and no pool allocates for tenant %q (no pool lists it, and there is no pool %q): give an address or add a pool", req.TenantID, ipam.DefaultPoolID)}}}
		case errors.Is(err, ipam.ErrInvalid):
			// No subnet of the pool is left for the bridge.
			return r, fieldError(req.Field+".address", err)
		}
		return r, err
	}
	r.Address = alloc.Prefix()
	r.Gateway = ireq.Gateway
	return r, nil
}

func (a addresses) Release(ctx context.Context, vmID string) error {
	_, err := a.m.Release(ctx, vmID)
	return err
}
