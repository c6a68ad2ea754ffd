// Package ipamhttp owns the operator HTTP endpoints for IPv6 address
// management under /debug/ipv6/ (pools, allocations, leak cleanup, subnet
// names): plain net/http handlers with snake_case JSON over an ipam.Manager.
//
// Request bodies are JSON whatever the Content-Type says (curl -d sends
// application/x-www-form-urlencoded); unknown fields are rejected with 400.
// Errors are {"code": "...", "message": "..."} with Connect-style codes.
package ipamhttp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/metald/metald/internal/httpjson"
	"github.com/metald/metald/internal/ipam"
)

// Options wires the handler to the rest of the daemon.
type Options struct {
	// VMState returns a VM's state (CREATED, RUNNING, TERMINATED, ...) and
	// whether it exists. Nil: every VM counts as missing.
	VMState func(ctx context.Context, vmID string) (state string, exists bool)
	// Live tells cleanup-allocations which VMs exist and since when they
	// are TERMINATED. Nil: derived from VMState (TERMINATED VMs are then
	// never considered leaked, only missing ones).
	Live ipam.LiveFunc
	// Grace is how long a TERMINATED VM keeps its addresses before
	// cleanup-allocations releases them. Default 10 minutes.
	Grace time.Duration
}

// Handler serves /debug/ipv6/.
type Handler struct {
	m    *ipam.Manager
	opts Options
	mux  *http.ServeMux
}

// New returns the handler; mount it with Register or as a whole under
// "/debug/ipv6/".
func New(m *ipam.Manager, opts Options) *Handler {
	if opts.Grace == 0 {
		opts.Grace = 10 * time.Minute
	}
	h := &Handler{m: m, opts: opts, mux: http.NewServeMux()}
	h.Register(h.mux)
	return h
}

// QueryParams are the query parameters each route reads (by mux
// pattern; the others read none): the daemon's guard of the API port
// refuses any other.
var QueryParams = map[string][]string{
	"POST /debug/ipv6/cleanup-allocations": {"dry_run"},
}

// Register adds the routes to mux.
func (h *Handler) Register(mux *http.ServeMux) {
	mux.HandleFunc("GET /debug/ipv6/pools", h.listPools)
	mux.HandleFunc("POST /debug/ipv6/pools", h.createPool)
	mux.HandleFunc("GET /debug/ipv6/pools/{id}", h.getPool)
	mux.HandleFunc("PUT /debug/ipv6/pools/{id}", h.updatePool)
	mux.HandleFunc("DELETE /debug/ipv6/pools/{id}", h.deletePool)
	mux.HandleFunc("GET /debug/ipv6/allocations", h.listAllocations)
	mux.HandleFunc("POST /debug/ipv6/cleanup-allocations", h.cleanup)
	mux.HandleFunc("GET /debug/ipv6/subnets", h.listSubnets)
	mux.HandleFunc("POST /debug/ipv6/subnets", h.declareSubnet)
}

// ServeHTTP implements http.Handler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) { h.mux.ServeHTTP(w, r) }

// Pool is the JSON form of a pool.
type Pool struct {
	ID                 string   `json:"id"`
	Prefixes           []string `json:"prefixes"`
	Description        string   `json:"description"`
	TenantIDs          []string `json:"tenant_ids"`
	RateLimit          int      `json:"rate_limit"`
	MaxAllocations     int64    `json:"max_allocations"`
	Allocated          int64    `json:"allocated"`
	AvailableAddresses *big.Int `json:"available_addresses"`
	Utilization        float64  `json:"utilization"`
}

func poolJSON(p ipam.PoolStatus) Pool {
	out := Pool{ID: p.ID, Prefixes: []string{}, Description: p.Description, TenantIDs: []string{}, RateLimit: p.RateLimit,
		MaxAllocations: p.MaxAllocations, Allocated: p.Allocated, AvailableAddresses: p.Available, Utilization: p.Utilization}
	for _, q := range p.Prefixes {
		out.Prefixes = append(out.Prefixes, q.String())
	}
	out.TenantIDs = append(out.TenantIDs, p.TenantIDs...)
	return out
}

// Allocation is the JSON form of an allocation.
type Allocation struct {
	Address      string  `json:"address"`
	PrefixLength int     `json:"prefix_length"`
	PoolID       string  `json:"pool_id"`
	VMID         *string `json:"vm_id"` // null when the VM does not exist
	InterfaceID  string  `json:"interface_id"`
	TenantID     string  `json:"tenant_id"`
	VMState      *string `json:"vm_state"` // null when the VM does not exist
	Gateway      string  `json:"gateway,omitempty"`
	Bridge       string  `json:"bridge,omitempty"`
	CreatedAt    string  `json:"created_at"`
	// OwnerVMID is the VM id recorded with the allocation, kept when
	// vm_id is null so the operator can see whose it was.
	OwnerVMID string `json:"owner_vm_id"`
}

func (h *Handler) allocJSON(ctx context.Context, a ipam.Allocation) Allocation {
	out := Allocation{Address: a.Address.String(), PrefixLength: a.PrefixLen, PoolID: a.PoolID, InterfaceID: a.NICID,
		TenantID: a.TenantID, Bridge: a.Bridge, CreatedAt: a.CreatedAt.UTC().Format(time.RFC3339Nano), OwnerVMID: a.VMID}
	if a.Gateway.IsValid() {
		out.Gateway = a.Gateway.String()
	}
	if h.opts.VMState != nil && a.VMID != "" {
		if st, ok := h.opts.VMState(ctx, a.VMID); ok {
			id := a.VMID
			out.VMID, out.VMState = &id, &st
		}
	}
	return out
}

// SubnetName is the JSON form of a subnet name.
type SubnetName struct {
	Parent    string `json:"parent"`
	Name      string `json:"name"`
	Value     int    `json:"value"`
	ValueHex  string `json:"value_hex"`
	Prefix    string `json:"prefix"`
	CreatedAt string `json:"created_at,omitempty"`
	// Tentative is set while the request that assigned the name has not
	// finished (see ipam.NameTx).
	Tentative bool `json:"tentative,omitempty"`
}

func subnetJSON(n ipam.SubnetName) SubnetName {
	out := SubnetName{Parent: n.Parent.String(), Name: n.Name, Value: int(n.Value), ValueHex: fmt.Sprintf("%04x", n.Value), Prefix: n.Prefix().String(), Tentative: n.Tentative}
	if !n.CreatedAt.IsZero() {
		out.CreatedAt = n.CreatedAt.UTC().Format(time.RFC3339Nano)
	}
	return out
}

func writeJSON(w http.ResponseWriter, status int, v any) { httpjson.Write(w, status, v) }

func writeError(w http.ResponseWriter, err error) {
	status, code := http.StatusInternalServerError, "internal"
	switch {
	case errors.Is(err, ipam.ErrPoolExists), errors.Is(err, ipam.ErrSubnetNameTaken), errors.Is(err, ipam.ErrConflict):
		status, code = http.StatusConflict, "already_exists"
	case errors.Is(err, ipam.ErrPoolNotEmpty):
		status, code = http.StatusConflict, "failed_precondition"
	case errors.Is(err, ipam.ErrNotFound):
		status, code = http.StatusNotFound, "not_found"
	case errors.Is(err, ipam.ErrPermission):
		status, code = http.StatusForbidden, "permission_denied"
	case errors.Is(err, ipam.ErrExhausted), errors.Is(err, ipam.ErrRateLimited):
		status, code = http.StatusTooManyRequests, "resource_exhausted"
	case errors.Is(err, errBadRequest), errors.Is(err, ipam.ErrInvalid), errors.Is(err, ipam.ErrOverlap),
		errors.Is(err, ipam.ErrUnknownSubnetName), errors.Is(err, ipam.ErrNotInPool):
		status, code = http.StatusBadRequest, "invalid_argument"
	}
	httpjson.WriteError(w, status, code, err.Error())
}

var errBadRequest = errors.New("bad request")

func badRequest(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errBadRequest, fmt.Sprintf(format, args...))
}

// decode reads a JSON object whatever the Content-Type; an empty body is
// an empty object when allowEmpty.
func decode(r *http.Request, v any, allowEmpty bool) error {
	if err := httpjson.Decode(r, v, allowEmpty); err != nil {
		return badRequest("%v", err)
	}
	return nil
}

func (h *Handler) listPools(w http.ResponseWriter, r *http.Request) {
	out := []Pool{}
	for _, p := range h.m.Pools() {
		out = append(out, poolJSON(p))
	}
	writeJSON(w, http.StatusOK, out)
}

func (h *Handler) getPool(w http.ResponseWriter, r *http.Request) {
	p, ok := h.m.Pool(r.PathValue("id"))
	if !ok {
		writeError(w, fmt.Errorf("pool '%s': %w", r.PathValue("id"), ipam.ErrNotFound))
		return
	}
	writeJSON(w, http.StatusOK, poolJSON(p))
}

type createPoolReq struct {
	ID             string   `json:"id"`
	Prefix         string   `json:"prefix"`
	Prefixes       []string `json:"prefixes"`
	Description    string   `json:"description"`
	TenantIDs      []string `json:"tenant_ids"`
	RateLimit      int      `json:"rate_limit"`
	MaxAllocations int64    `json:"max_allocations"`
}

func (h *Handler) prefixes(ctx context.Context, one string, many []string) ([]netip.Prefix, error) {
	texts := many
	if one != "" {
		texts = append([]string{one}, many...)
	}
	var out []netip.Prefix
	for _, s := range texts {
		p, err := h.m.ResolvePrefix(ctx, s)
		if err != nil {
			return nil, badRequest("prefix %q: %v", s, err)
		}
		out = append(out, p)
	}
	return out, nil
}

func (h *Handler) createPool(w http.ResponseWriter, r *http.Request) {
	var req createPoolReq
	if err := decode(r, &req, false); err != nil {
		writeError(w, err)
		return
	}
	if req.ID == "" {
		writeError(w, badRequest("id is required"))
		return
	}
	if req.Prefix == "" && len(req.Prefixes) == 0 {
		writeError(w, badRequest("prefix (or prefixes) is required"))
		return
	}
	if _, exists := h.m.Pool(req.ID); exists {
		writeError(w, fmt.Errorf("pool '%s': %w", req.ID, ipam.ErrPoolExists))
		return
	}
	pfx, err := h.prefixes(r.Context(), req.Prefix, req.Prefixes)
	if err != nil {
		writeError(w, err)
		return
	}
	st, err := h.m.CreatePool(r.Context(), ipam.Pool{ID: req.ID, Prefixes: pfx, Description: req.Description,
		TenantIDs: req.TenantIDs, RateLimit: req.RateLimit, MaxAllocations: req.MaxAllocations})
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusCreated, poolJSON(st))
}

type updatePoolReq struct {
	Prefix         string    `json:"prefix"`
	Prefixes       []string  `json:"prefixes"`
	Description    *string   `json:"description"`
	TenantIDs      *[]string `json:"tenant_ids"`
	RateLimit      *int      `json:"rate_limit"`
	MaxAllocations *int64    `json:"max_allocations"`
}

func (h *Handler) updatePool(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	var req updatePoolReq
	if err := decode(r, &req, false); err != nil {
		writeError(w, err)
		return
	}
	cur, ok := h.m.Pool(id)
	if !ok {
		writeError(w, fmt.Errorf("pool '%s': %w", id, ipam.ErrNotFound))
		return
	}
	pfx, err := h.prefixes(r.Context(), req.Prefix, req.Prefixes)
	if err != nil {
		writeError(w, err)
		return
	}
	if req.TenantIDs != nil || req.RateLimit != nil || req.MaxAllocations != nil {
		p := cur.Pool
		if req.TenantIDs != nil {
			p.TenantIDs = *req.TenantIDs
		}
		if req.RateLimit != nil {
			p.RateLimit = *req.RateLimit
		}
		if req.MaxAllocations != nil {
			p.MaxAllocations = *req.MaxAllocations
		}
		if req.Description != nil {
			p.Description = *req.Description
		}
		if _, err := h.m.UpdatePoolSettings(r.Context(), p); err != nil {
			writeError(w, err)
			return
		}
	}
	st, err := h.m.ExpandPool(r.Context(), id, pfx, req.Description)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, poolJSON(st))
}

func (h *Handler) deletePool(w http.ResponseWriter, r *http.Request) {
	if err := h.m.DeletePool(r.Context(), r.PathValue("id")); err != nil {
		writeError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (h *Handler) listAllocations(w http.ResponseWriter, r *http.Request) {
	out := []Allocation{}
	for _, a := range h.m.Allocations() {
		out = append(out, h.allocJSON(r.Context(), a))
	}
	writeJSON(w, http.StatusOK, out)
}

// CleanupResult is the answer of POST /debug/ipv6/cleanup-allocations.
type CleanupResult struct {
	DryRun        bool         `json:"dry_run"`
	ReleasedCount int          `json:"released_count"`
	Released      []Allocation `json:"released"`
}

func (h *Handler) live(ctx context.Context) ipam.LiveFunc {
	if h.opts.Live != nil {
		return h.opts.Live
	}
	return func(vmID string) (bool, time.Time) {
		if h.opts.VMState == nil {
			return false, time.Time{}
		}
		_, ok := h.opts.VMState(ctx, vmID)
		return ok, time.Time{}
	}
}

func (h *Handler) cleanup(w http.ResponseWriter, r *http.Request) {
	var req struct {
		DryRun       bool   `json:"dry_run"`
		GraceSeconds *int64 `json:"grace_seconds"`
	}
	if err := decode(r, &req, true); err != nil {
		writeError(w, err)
		return
	}
	if v := r.URL.Query().Get("dry_run"); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			writeError(w, badRequest("dry_run=%q is not a boolean", v))
			return
		}
		req.DryRun = b
	}
	grace := h.opts.Grace
	if req.GraceSeconds != nil {
		if *req.GraceSeconds < 0 {
			writeError(w, badRequest("grace_seconds must not be negative"))
			return
		}
		grace = time.Duration(*req.GraceSeconds) * time.Second
	}
	var rel []ipam.Allocation
	if req.DryRun {
		rel = h.m.Orphans(h.live(r.Context()), grace)
	} else {
		var err error
		if rel, err = h.m.Cleanup(r.Context(), h.live(r.Context()), grace); err != nil {
			writeError(w, err)
			return
		}
	}
	out := CleanupResult{DryRun: req.DryRun, ReleasedCount: len(rel), Released: []Allocation{}}
	for _, a := range rel {
		out.Released = append(out.Released, h.allocJSON(r.Context(), a))
	}
	writeJSON(w, http.StatusOK, out)
}

func (h *Handler) listSubnets(w http.ResponseWriter, r *http.Request) {
	out := []SubnetName{}
	for _, n := range h.m.SubnetNames() {
		out = append(out, subnetJSON(n))
	}
	writeJSON(w, http.StatusOK, out)
}

func (h *Handler) declareSubnet(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Parent string          `json:"parent"`
		Name   string          `json:"name"`
		Value  json.RawMessage `json:"value"`
	}
	if err := decode(r, &req, false); err != nil {
		writeError(w, err)
		return
	}
	if req.Parent == "" || req.Name == "" {
		writeError(w, badRequest("parent and name are required"))
		return
	}
	parent, err := h.m.ResolvePrefix(r.Context(), req.Parent)
	if err != nil {
		writeError(w, badRequest("parent %q: %v", req.Parent, err))
		return
	}
	var value *uint16
	if v := strings.TrimSpace(string(req.Value)); v != "" && v != "null" {
		var n uint64
		var perr error
		if s, err := strconv.Unquote(v); err == nil { // "0x00db" or "db": hex
			n, perr = strconv.ParseUint(strings.TrimPrefix(strings.ToLower(s), "0x"), 16, 16)
		} else {
			n, perr = strconv.ParseUint(v, 10, 16)
		}
		if perr != nil {
			writeError(w, badRequest("value %s must be 0..65535 or a hex string like \"0x00db\"", v))
			return
		}
		u := uint16(n)
		value = &u
	}
	existed := false
	for _, n := range h.m.SubnetNames() {
		if n.Parent == parent && n.Name == strings.ToLower(req.Name) {
			existed = true
		}
	}
	n, err := h.m.DeclareSubnetName(r.Context(), parent, req.Name, value)
	if err != nil {
		writeError(w, err)
		return
	}
	status := http.StatusCreated
	if existed {
		status = http.StatusOK
	}
	writeJSON(w, status, subnetJSON(n))
}
