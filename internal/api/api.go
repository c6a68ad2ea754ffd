// Package api owns metald's network edge: the Connect handlers of
// vmprovisioner.v1.VmService (thin: decode, call the VM manager, map typed
// errors to Connect codes), the curl-compatibility layer, and the HTTP mux
// that the debug endpoints mount on.
package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"regexp"
	"strconv"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	vmv1 "github.com/metald/metald/internal/gen/vmprovisioner/v1"
	"github.com/metald/metald/internal/gen/vmprovisioner/v1/vmprovisionerv1connect"
	"github.com/metald/metald/internal/ipam"
	"github.com/metald/metald/internal/store"
	"github.com/metald/metald/internal/vm"
)

var errBodyTooLarge = errors.New("request body larger than 4 MiB")

// NICStatuser is implemented by backends that can report a NIC's live
// state inside the guest.
type NICStatuser interface {
	NICStatus(vmID, nicID string, addr netip.Prefix) (dad, link string, err error)
}

// Server implements VmService over the VM manager.
type Server struct {
	vms      *vm.Manager
	status   NICStatuser // may be nil
	bridgeL3 func(bridge string) (bool, string)
	ruleHits func(vmID, nic string) ([]RuleHit, error) // may be nil
}

var _ vmprovisionerv1connect.VmServiceHandler = (*Server)(nil)

// NewServer returns the VmService implementation. status may be nil.
func NewServer(m *vm.Manager, status NICStatuser) *Server {
	return &Server{vms: m, status: status}
}

// Handler returns the VmService routes, wrapped for curl compatibility, as
// a path and handler to mount.
func (s *Server) Handler(opts ...connect.HandlerOption) (string, http.Handler) {
	opts = append([]connect.HandlerOption{connect.WithCodec(jsonCodec{"json"}), connect.WithCodec(protoCodec{}), connect.WithCodec(jsonCodec{"json; charset=utf-8"}),
		connect.WithInterceptors(callerInterceptor())}, opts...)
	path, h := vmprovisionerv1connect.NewVmServiceHandler(s, opts...)
	sd := vmv1.File_vmprovisioner_v1_vm_proto.Services().ByName("VmService")
	return path, newCompat(h, sd)
}

// fieldError is an invalid_argument error naming one field, with a
// google.rpc.BadRequest detail.
func fieldError(field, reason string) *connect.Error {
	return violationsError([]*errdetails.BadRequest_FieldViolation{{Field: field, Description: reason}})
}

func violationsError(vs []*errdetails.BadRequest_FieldViolation) *connect.Error {
	msg := vs[0].Field + ": " + vs[0].Description
	if len(vs) > 1 {
		msg += fmt.Sprintf(" (and %d more)", len(vs)-1)
	}
	ce := connect.NewError(connect.CodeInvalidArgument, errors.New(msg))
	if d, err := connect.NewErrorDetail(&errdetails.BadRequest{FieldViolations: vs}); err == nil {
		ce.AddDetail(d)
	}
	return ce
}

// toConnect maps domain errors to Connect codes; this is the only place
// that knows about them. An error of the caller's (not internal) whose
// message starts with a field path ("config.network[0].ipv6.address:
// ...") carries a google.rpc.BadRequest detail naming it, whatever its
// code (already_exists, permission_denied, failed_precondition...).
func toConnect(err error) error {
	out := toConnectCode(err)
	var ce *connect.Error
	if out == nil || !errors.As(out, &ce) || ce.Code() == connect.CodeInternal || ce.Code() == connect.CodeUnknown {
		return out
	}
	for _, d := range ce.Details() {
		if v, derr := d.Value(); derr == nil {
			if _, ok := v.(*errdetails.BadRequest); ok {
				return out
			}
		}
	}
	if m := fieldPrefix.FindStringSubmatch(ce.Message()); m != nil {
		if d, derr := connect.NewErrorDetail(&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{Field: m[1], Description: m[2]}}}); derr == nil {
			ce.AddDetail(d)
		}
	}
	return out
}

// fieldPrefix matches a message that starts with a request field's path.
var fieldPrefix = regexp.MustCompile(`^([a-z_][a-z0-9_]*(?:\[[0-9]+\])?(?:\.[a-z_][a-z0-9_]*(?:\[[0-9]+\])?)*): (.+)$`)

func toConnectCode(err error) error {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		return ce
	}
	var ve *vm.ValidationError
	if errors.As(err, &ve) {
		vs := make([]*errdetails.BadRequest_FieldViolation, 0, len(ve.Violations))
		for _, v := range ve.Violations {
			vs = append(vs, &errdetails.BadRequest_FieldViolation{Field: v.Field, Description: v.Reason})
		}
		if len(vs) > 0 {
			return violationsError(vs)
		}
	}
	var ce2 *vm.ComplianceError
	if errors.As(err, &ce2) {
		out := connect.NewError(connect.CodeFailedPrecondition, err)
		if d, derr := connect.NewErrorDetail(&errdetails.PreconditionFailure{Violations: []*errdetails.PreconditionFailure_Violation{
			{Type: ce2.Framework, Subject: ce2.Field, Description: ce2.Reason}}}); derr == nil {
			out.AddDetail(d)
		}
		return out
	}
	var se *vm.StateError
	switch {
	case errors.As(err, &se):
		return connect.NewError(connect.CodeFailedPrecondition, err)
	case errors.Is(err, vm.ErrNotFound):
		return connect.NewError(connect.CodeNotFound, err)
	case errors.Is(err, vm.ErrExists):
		return connect.NewError(connect.CodeAlreadyExists, err)
	case errors.Is(err, vm.ErrHostConflict):
		return connect.NewError(connect.CodeFailedPrecondition, err)
	case errors.Is(err, context.Canceled):
		return connect.NewError(connect.CodeCanceled, err)
	case errors.Is(err, context.DeadlineExceeded):
		return connect.NewError(connect.CodeDeadlineExceeded, err)
	}
	if ce := addressError(err); ce != nil {
		return ce
	}
	if c, ok := codeOf(err); ok {
		return connect.NewError(c, err)
	}
	return connect.NewError(connect.CodeInternal, err)
}

// addressError maps address-management errors; nil when err is not one.
func addressError(err error) *connect.Error {
	var code connect.Code
	switch {
	case errors.Is(err, ipam.ErrExhausted), errors.Is(err, ipam.ErrRateLimited):
		code = connect.CodeResourceExhausted
	case errors.Is(err, ipam.ErrPermission):
		code = connect.CodePermissionDenied
	case errors.Is(err, ipam.ErrConflict):
		code = connect.CodeAlreadyExists
	case errors.Is(err, ipam.ErrNotInPool), errors.Is(err, ipam.ErrInvalid), errors.Is(err, ipam.ErrUnknownSubnetName), errors.Is(err, ipam.ErrOverlap):
		code = connect.CodeInvalidArgument
	default:
		return nil
	}
	ce := connect.NewError(code, err)
	var rl *ipam.RateLimitError
	var ex *ipam.ExhaustedError
	switch {
	case errors.As(err, &rl):
		if d, derr := connect.NewErrorDetail(&errdetails.RetryInfo{RetryDelay: durationpb.New(rl.RetryAfter)}); derr == nil {
			ce.AddDetail(d)
		}
		if d, derr := connect.NewErrorDetail(&errdetails.ErrorInfo{Reason: "IPV6_ALLOCATION_RATE_LIMITED", Domain: "metald", Metadata: map[string]string{
			"tenant_id": rl.Tenant, "pool_id": rl.PoolID, "current_per_hour": strconv.Itoa(rl.Current),
			"limit_per_hour": strconv.Itoa(rl.Limit), "retry_after_seconds": strconv.Itoa(int(rl.RetryAfter.Seconds() + 0.999)),
		}}); derr == nil {
			ce.AddDetail(d)
		}
	case errors.As(err, &ex):
		reason := "IPV6_POOL_EXHAUSTED"
		if ex.Quota {
			reason = "IPV6_POOL_QUOTA_EXHAUSTED"
		}
		if d, derr := connect.NewErrorDetail(&errdetails.ErrorInfo{Reason: reason, Domain: "metald", Metadata: map[string]string{"pool_id": ex.PoolID}}); derr == nil {
			ce.AddDetail(d)
		}
	}
	return ce
}

// coded is implemented by domain errors that know their Connect code
// (address management errors, for example).
type coded interface{ ConnectCode() connect.Code }

func codeOf(err error) (connect.Code, bool) {
	var c coded
	if errors.As(err, &c) {
		return c.ConnectCode(), true
	}
	return 0, false
}

func requireID(id string) error {
	if id == "" {
		return fieldError("vm_id", "required")
	}
	if !vm.ValidID(id) {
		return fieldError("vm_id", fmt.Sprintf("must be a lower-case DNS label of at most 63 characters ([a-z0-9], '-' inside), got %q", id))
	}
	return nil
}

var stateNames = map[string]vmv1.VmState{
	store.StateCreated:    vmv1.VmState_VM_STATE_CREATED,
	store.StateRunning:    vmv1.VmState_VM_STATE_RUNNING,
	store.StatePaused:     vmv1.VmState_VM_STATE_PAUSED,
	store.StateShutdown:   vmv1.VmState_VM_STATE_SHUTDOWN,
	store.StateTerminated: vmv1.VmState_VM_STATE_TERMINATED,
}

func pbState(s string) vmv1.VmState { return stateNames[s] }

func pbTime(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

// CreateVm implements VmService.
func (s *Server) CreateVm(ctx context.Context, req *connect.Request[vmv1.CreateVmRequest]) (*connect.Response[vmv1.CreateVmResponse], error) {
	row, err := s.vms.Create(ctx, req.Msg)
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&vmv1.CreateVmResponse{VmId: row.ID, State: pbState(row.State)}), nil
}

// GetVm implements VmService.
func (s *Server) GetVm(ctx context.Context, req *connect.Request[vmv1.GetVmRequest]) (*connect.Response[vmv1.GetVmResponse], error) {
	if err := requireID(req.Msg.GetVmId()); err != nil {
		return nil, err
	}
	row, err := s.vms.Get(ctx, req.Msg.GetVmId())
	if err != nil {
		return nil, toConnect(err)
	}
	resp, err := s.describe(row)
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(resp), nil
}

func (s *Server) describe(row *store.VM) (*vmv1.GetVmResponse, error) {
	cfg := &vmv1.VmConfig{}
	if err := protojson.Unmarshal(row.Config, cfg); err != nil {
		return nil, fmt.Errorf("decode stored config: %w", err)
	}
	inst := vm.Instance(row)
	resp := &vmv1.GetVmResponse{
		VmId: row.ID, Config: cfg, State: pbState(row.State), TenantId: row.TenantID, Network: cfg.GetNetwork(),
		CreatedAt: pbTime(row.CreatedAt), UpdatedAt: pbTime(row.UpdatedAt), StartedAt: pbTime(row.StartedAt),
		StateReason: row.StateReason, Isolation: isolation(row),
		BackendInfo: &vmv1.BackendInfo{Type: inst.Backend, Netns: inst.Netns, Pid: int32(inst.PID), Details: inst.Details},
	}
	for i, n := range row.NICs {
		st := &vmv1.NetworkInterfaceStatus{Id: n.ID, HostDevice: n.HostDevice, GuestDevice: n.GuestDevice, MacAddress: n.MAC,
			BridgeName: n.Bridge, BridgeDevice: n.Bridge, VlanId: n.VLAN, Ipv6Address: n.Address, Ipv6Gateway: n.Gateway, GatewayOnBridge: n.GatewayOnBridge,
			DadState: "unknown", LinkState: "unknown"}
		st.GuestLinkLocal = n.LinkLocal
		for _, a := range s.vms.TempAddrs(n.HostDevice) {
			st.TemporaryAddresses = append(st.TemporaryAddresses, a.String())
		}
		st.VlanMode = vm.VLANMode(n, s.vms.Caps())
		if i < len(cfg.GetNetwork()) {
			st.EffectiveSecurity = vm.EffectiveSecurity(cfg, cfg.GetNetwork()[i])
			st.Controls = vm.ControlStatuses(st.EffectiveSecurity, n, s.vms.Caps())
			st.PolicyControls = append(policyStatus(cfg.GetNetwork()[i], cfg, s.vms.Caps()), s.bridgeStatus(n.Bridge))
			st.BridgeName = cfg.GetNetwork()[i].GetBridgeName()
			st.DnsServers = canonicalAddrs(cfg.GetNetwork()[i].GetIpv6().GetDnsServers())
		}
		if s.status != nil && row.State != store.StateTerminated {
			addr, _ := netip.ParsePrefix(n.Address)
			if dad, ls, err := s.status.NICStatus(row.ID, n.GuestDevice, addr); err == nil {
				st.DadState, st.LinkState = dad, ls
			}
		}
		resp.NetworkStatus = append(resp.NetworkStatus, st)
	}
	return resp, nil
}

func canonicalAddrs(in []string) []string {
	out := make([]string, 0, len(in))
	for _, a := range in {
		if p, err := netip.ParseAddr(a); err == nil {
			out = append(out, p.String())
		} else {
			out = append(out, a)
		}
	}
	return out
}

// ListVms implements VmService.
func (s *Server) ListVms(ctx context.Context, _ *connect.Request[vmv1.ListVmsRequest]) (*connect.Response[vmv1.ListVmsResponse], error) {
	rows, err := s.vms.List(ctx)
	if err != nil {
		return nil, toConnect(err)
	}
	resp := &vmv1.ListVmsResponse{Vms: make([]*vmv1.VmInfo, 0, len(rows))}
	for _, r := range rows {
		resp.Vms = append(resp.Vms, &vmv1.VmInfo{VmId: r.ID, State: pbState(r.State), TenantId: r.TenantID,
			CreatedAt: pbTime(r.CreatedAt), UpdatedAt: pbTime(r.UpdatedAt)})
	}
	return connect.NewResponse(resp), nil
}

// BootVm implements VmService.
func (s *Server) BootVm(ctx context.Context, req *connect.Request[vmv1.BootVmRequest]) (*connect.Response[vmv1.BootVmResponse], error) {
	row, err := s.op(ctx, req.Msg.GetVmId(), s.vms.Boot)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&vmv1.BootVmResponse{State: pbState(row.State)}), nil
}

// ShutdownVm implements VmService.
func (s *Server) ShutdownVm(ctx context.Context, req *connect.Request[vmv1.ShutdownVmRequest]) (*connect.Response[vmv1.ShutdownVmResponse], error) {
	timeout := time.Duration(req.Msg.GetTimeoutSeconds()) * time.Second
	row, err := s.op(ctx, req.Msg.GetVmId(), func(ctx context.Context, id string) (*store.VM, error) {
		return s.vms.Shutdown(ctx, id, timeout)
	})
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&vmv1.ShutdownVmResponse{State: pbState(row.State)}), nil
}

// PauseVm implements VmService.
func (s *Server) PauseVm(ctx context.Context, req *connect.Request[vmv1.PauseVmRequest]) (*connect.Response[vmv1.PauseVmResponse], error) {
	row, err := s.op(ctx, req.Msg.GetVmId(), s.vms.Pause)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&vmv1.PauseVmResponse{State: pbState(row.State)}), nil
}

// ResumeVm implements VmService.
func (s *Server) ResumeVm(ctx context.Context, req *connect.Request[vmv1.ResumeVmRequest]) (*connect.Response[vmv1.ResumeVmResponse], error) {
	row, err := s.op(ctx, req.Msg.GetVmId(), s.vms.Resume)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&vmv1.ResumeVmResponse{State: pbState(row.State)}), nil
}

// RebootVm implements VmService.
func (s *Server) RebootVm(ctx context.Context, req *connect.Request[vmv1.RebootVmRequest]) (*connect.Response[vmv1.RebootVmResponse], error) {
	row, err := s.op(ctx, req.Msg.GetVmId(), s.vms.Reboot)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&vmv1.RebootVmResponse{State: pbState(row.State)}), nil
}

// DeleteVm implements VmService.
func (s *Server) DeleteVm(ctx context.Context, req *connect.Request[vmv1.DeleteVmRequest]) (*connect.Response[vmv1.DeleteVmResponse], error) {
	if err := requireID(req.Msg.GetVmId()); err != nil {
		return nil, err
	}
	if err := s.vms.Delete(ctx, req.Msg.GetVmId()); err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&vmv1.DeleteVmResponse{}), nil
}

func (s *Server) op(ctx context.Context, id string, f func(context.Context, string) (*store.VM, error)) (*store.VM, error) {
	if err := requireID(id); err != nil {
		return nil, err
	}
	row, err := f(ctx, id)
	if err != nil {
		return nil, toConnect(err)
	}
	return row, nil
}

// UpdateSecurityPolicy implements VmService.
func (s *Server) UpdateSecurityPolicy(ctx context.Context, req *connect.Request[vmv1.UpdateSecurityPolicyRequest]) (*connect.Response[vmv1.UpdateSecurityPolicyResponse], error) {
	if err := requireID(req.Msg.GetVmId()); err != nil {
		return nil, err
	}
	if req.Msg.GetSecurityPolicy() == nil && len(req.Msg.GetClearFields()) == 0 {
		return nil, fieldError("security_policy", "required (or clear_fields)")
	}
	row, err := s.vms.UpdateSecurityPolicy(ctx, req.Msg.GetVmId(), req.Msg.GetInterfaceId(), req.Msg.GetSecurityPolicy(), req.Msg.GetClearFields())
	if err != nil {
		return nil, toConnect(err)
	}
	resp, err := s.describe(row)
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&vmv1.UpdateSecurityPolicyResponse{Network: resp.GetNetwork()}), nil
}

// UpdateVmNetwork implements VmService.
func (s *Server) UpdateVmNetwork(ctx context.Context, req *connect.Request[vmv1.UpdateVmNetworkRequest]) (*connect.Response[vmv1.UpdateVmNetworkResponse], error) {
	if err := requireID(req.Msg.GetVmId()); err != nil {
		return nil, err
	}
	if req.Msg.GetIpv6() == nil && len(req.Msg.GetClearFields()) == 0 {
		return nil, fieldError("ipv6", "required (or clear_fields)")
	}
	row, i, err := s.vms.UpdateVmNetwork(ctx, req.Msg.GetVmId(), req.Msg.GetInterfaceId(), req.Msg.GetIpv6(), req.Msg.GetClearFields())
	if err != nil {
		return nil, toConnect(err)
	}
	resp, err := s.describe(row)
	if err != nil {
		return nil, toConnect(err)
	}
	return connect.NewResponse(&vmv1.UpdateVmNetworkResponse{Network: resp.GetNetwork()[i]}), nil
}

func isolation(row *store.VM) *vmv1.Isolation {
	if row.IsolatedAt.IsZero() {
		return nil
	}
	return &vmv1.Isolation{Isolated: true, Reason: row.IsolatedReason, Since: pbTime(row.IsolatedAt)}
}

// IsolateVm implements VmService.
func (s *Server) IsolateVm(ctx context.Context, req *connect.Request[vmv1.IsolateVmRequest]) (*connect.Response[vmv1.IsolateVmResponse], error) {
	row, err := s.op(ctx, req.Msg.GetVmId(), func(ctx context.Context, id string) (*store.VM, error) {
		return s.vms.Isolate(ctx, id, req.Msg.GetReason())
	})
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&vmv1.IsolateVmResponse{Isolation: isolation(row)}), nil
}

// ReleaseVm implements VmService.
func (s *Server) ReleaseVm(ctx context.Context, req *connect.Request[vmv1.ReleaseVmRequest]) (*connect.Response[vmv1.ReleaseVmResponse], error) {
	if _, err := s.op(ctx, req.Msg.GetVmId(), s.vms.Release); err != nil {
		return nil, err
	}
	return connect.NewResponse(&vmv1.ReleaseVmResponse{}), nil
}

// callerInterceptor records who calls (peer address and user agent) in the
// request context, for the audit log.
func callerInterceptor() connect.UnaryInterceptorFunc {
	return func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			caller := req.Peer().Addr
			if ua := req.Header().Get("User-Agent"); ua != "" {
				caller += " " + ua
			}
			return next(vm.WithCaller(ctx, caller), req)
		}
	}
}
