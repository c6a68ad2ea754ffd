package ipam

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"
)

// Sentinel errors for expected cases. Typed errors below wrap or match them
// with errors.Is so callers can map them to API codes:
//
//	ErrExhausted, ErrRateLimited       → resource_exhausted
//	ErrPermission                      → permission_denied
//	ErrConflict, ErrPoolExists         → already_exists
//	ErrPoolNotEmpty                    → failed_precondition
//	ErrNotFound                        → not_found
//	everything else (ErrNotInPool, ErrInvalid, ErrUnknownSubnetName,
//	ErrOverlap)                        → invalid_argument
var (
	ErrExhausted         = errors.New("no available IPv6 addresses")
	ErrRateLimited       = errors.New("allocation rate limit exceeded")
	ErrPermission        = errors.New("permission denied")
	ErrConflict          = errors.New("address already allocated")
	ErrNotInPool         = errors.New("not inside any pool")
	ErrInvalid           = errors.New("invalid argument")
	ErrUnknownSubnetName = errors.New("unknown subnet name")
	ErrOverlap           = errors.New("prefix overlaps another pool")
	ErrPoolExists        = errors.New("pool already exists")
	ErrPoolNotEmpty      = errors.New("pool has allocations")
	ErrNotFound          = errors.New("not found")
	// ErrSubnetNameTaken reports a subnet name or value already declared
	// differently under the same parent.
	ErrSubnetNameTaken = errors.New("subnet name already declared")
)

// ExhaustedError reports a pool (or its implied subnet, or its
// max_allocations quota) with no address left. Its message is exactly
// "no available IPv6 addresses in pool '<id>'".
type ExhaustedError struct {
	PoolID string
	// Subnet is the subnet that was searched, when the pool has others.
	Subnet netip.Prefix
	// Quota is true when max_allocations, not the address space, ran out.
	Quota bool
}

func (e *ExhaustedError) Error() string {
	return fmt.Sprintf("no available IPv6 addresses in pool '%s'", e.PoolID)
}

// Is makes errors.Is(err, ErrExhausted) true.
func (e *ExhaustedError) Is(target error) bool { return target == ErrExhausted }

// RateLimitError reports a tenant over its pool's allocations-per-hour limit.
type RateLimitError struct {
	Tenant     string
	PoolID     string
	Current    int // allocations in the trailing hour
	Limit      int // allowed per hour
	RetryAfter time.Duration
}

func (e *RateLimitError) Error() string {
	return fmt.Sprintf("tenant %q exceeded the IPv6 allocation rate of pool '%s': %d allocations in the last hour, limit %d per hour; retry after %s",
		e.Tenant, e.PoolID, e.Current, e.Limit, e.RetryAfter.Round(time.Second))
}

// Is makes errors.Is(err, ErrRateLimited) true.
func (e *RateLimitError) Is(target error) bool { return target == ErrRateLimited }

// PermissionError reports a tenant using a pool reserved for others.
type PermissionError struct {
	Tenant  string
	PoolID  string
	Address netip.Addr // the requested address, if any
	// Allowed lists the pools the tenant may use.
	Allowed []string
}

func (e *PermissionError) Error() string {
	what := fmt.Sprintf("pool '%s'", e.PoolID)
	if e.Address.IsValid() {
		what = fmt.Sprintf("address %s in pool '%s'", e.Address, e.PoolID)
	}
	allowed := "none"
	if len(e.Allowed) > 0 {
		allowed = strings.Join(e.Allowed, ", ")
	}
	return fmt.Sprintf("tenant %q may not use %s (pools allowed for the tenant: %s)", e.Tenant, what, allowed)
}

// Is makes errors.Is(err, ErrPermission) true.
func (e *PermissionError) Is(target error) bool { return target == ErrPermission }

// ConflictError reports an address held by another NIC.
type ConflictError struct {
	Address netip.Addr
	VMID    string
	NICID   string
}

func (e *ConflictError) Error() string {
	return fmt.Sprintf("address %s is already allocated to vm %q interface %q", e.Address, e.VMID, e.NICID)
}

// Is makes errors.Is(err, ErrConflict) true.
func (e *ConflictError) Is(target error) bool { return target == ErrConflict }

// OverlapError reports a prefix that overlaps one of another (or the same)
// pool.
type OverlapError struct {
	Prefix      netip.Prefix
	Other       netip.Prefix
	OtherPoolID string
}

func (e *OverlapError) Error() string {
	return fmt.Sprintf("prefix %s overlaps %s of pool '%s'", e.Prefix, e.Other, e.OtherPoolID)
}

// Is makes errors.Is(err, ErrOverlap) true.
func (e *OverlapError) Is(target error) bool { return target == ErrOverlap }

// UnknownSubnetNameError reports a subnet name that is not declared while
// automatic assignment is off.
type UnknownSubnetNameError struct {
	Name   string
	Parent netip.Prefix
}

func (e *UnknownSubnetNameError) Error() string {
	return fmt.Sprintf("unknown subnet name %q under %s (automatic subnet names are off; declare it with POST /debug/ipv6/subnets)", e.Name, e.Parent)
}

// Is makes errors.Is(err, ErrUnknownSubnetName) true.
func (e *UnknownSubnetNameError) Is(target error) bool { return target == ErrUnknownSubnetName }

// GatewayError marks an error of Reserve that the request's gateway
// caused (outside every pool or the address's prefix, not unicast, on a
// subnet another bridge uses), so that a caller names the gateway field,
// not the address.
type GatewayError struct{ Err error }

func (e *GatewayError) Error() string { return e.Err.Error() }
func (e *GatewayError) Unwrap() error { return e.Err }

func gatewayErr(err error) error { return &GatewayError{Err: err} }

func invalidf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// FailureReason classifies an error from Reserve for metrics labels:
// exhausted, quota, rate_limited, permission_denied, conflict, not_in_pool,
// invalid or internal.
func FailureReason(err error) string {
	var ex *ExhaustedError
	switch {
	case errors.As(err, &ex) && ex.Quota:
		return "quota"
	case errors.Is(err, ErrExhausted):
		return "exhausted"
	case errors.Is(err, ErrRateLimited):
		return "rate_limited"
	case errors.Is(err, ErrPermission):
		return "permission_denied"
	case errors.Is(err, ErrConflict):
		return "conflict"
	case errors.Is(err, ErrNotInPool):
		return "not_in_pool"
	case errors.Is(err, ErrInvalid), errors.Is(err, ErrUnknownSubnetName):
		return "invalid"
	}
	return "internal"
}
