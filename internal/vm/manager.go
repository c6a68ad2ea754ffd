package vm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"sync"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/metald/metald/internal/backend"
	vmv1 "github.com/metald/metald/internal/gen/vmprovisioner/v1"
	"github.com/metald/metald/internal/network/link"
	"github.com/metald/metald/internal/policy"
	"github.com/metald/metald/internal/store"
)

// Ports is the host-side link management the manager drives: bridges, the
// gateway address a bridge holds, and VM ports.
type Ports interface {
	// EnsureBridge creates the bridge if absent and brings it up.
	EnsureBridge(name string) error
	// EnsureGateway puts gw on the bridge (and turns on IPv6 forwarding).
	// It returns false, without error, when another link holds the address.
	EnsureGateway(bridge string, gw netip.Prefix) (onBridge bool, err error)
	// RemoveGateway removes gw from the bridge; absent is not an error.
	RemoveGateway(bridge string, gw netip.Prefix) error
	// AttachPort enslaves a VM port to its bridge and brings it up.
	AttachPort(dev, bridge string) error
	// PortAttached reports whether dev exists and is a port of bridge.
	PortAttached(dev, bridge string) (exists, attached bool, err error)
	// DeletePort deletes a VM port; absent is not an error.
	DeletePort(dev string) error
	// OwnedPorts lists host links metald created, keyed by device name,
	// with the VM id they belong to.
	OwnedPorts() (map[string]string, error)
	// RemoveBridgeIfUnused deletes a bridge metald created once it has no
	// ports; other bridges are left alone.
	RemoveBridgeIfUnused(name string) error
}

// Addresses resolves the address text of a config (which may use symbolic
// subnet names) and keeps track of which VM holds which address.
type Addresses interface {
	// Reserve resolves and reserves the addresses of one NIC. The result's
	// Address is invalid when the NIC has no IPv6 address.
	Reserve(ctx context.Context, req AddressRequest) (ResolvedNIC, error)
	// Release releases every address the VM holds; nothing held is fine.
	Release(ctx context.Context, vmID string) error
}

// AddressRequest asks for one NIC's addresses.
type AddressRequest struct {
	VMID     string
	TenantID string
	NICID    string
	Bridge   string
	// Field is the config path of the NIC's ipv6 block, for errors.
	Field string
	IPv6  *vmv1.Ipv6Config
}

// ResolvedNIC is a NIC's addresses in canonical form.
type ResolvedNIC struct {
	Address netip.Prefix
	Gateway netip.Addr
	DNS     []netip.Addr
}

// Options configure a Manager.
type Options struct {
	Store     store.Store
	Backend   backend.Backend
	Ports     Ports
	Addresses Addresses
	// Firewall programs first-hop rules; nil runs without them.
	Firewall Firewall
	// Router describes bridges acting as the VMs' router; may be nil.
	Router Router
	// Caps says which enforcement mechanisms the host has (for GetVm).
	Caps Capabilities
	// Snooper enables MLD snooping on bridges; may be nil.
	Snooper Snooper
	// Policy programs per-VM security policies; nil runs without them.
	Policy PolicyEnforcer
	// Shaper applies bandwidth and packet-rate limits; nil runs without.
	Shaper Shaper
	// Region is the host's region, which compliance.data_residency must
	// match.
	Region string
	// TempAddrs returns the temporary addresses the guest behind a host
	// device has bound (privacy extensions, learned by the first-hop
	// rules): the security policy counts them as the NIC's own. Nil: none.
	TempAddrs func(hostDev string) []netip.Addr
	// PolicyDrift reports whether the policy tables may have been changed
	// by someone else since it last answered true (a foreign nftables
	// commit); Watch then programs every policy again (ResyncPolicies).
	// Nil: never.
	PolicyDrift func() bool
	// TenantGone is called after DeleteVm removed a tenant's last VM
	// (per-tenant metric series end). Nil: not called.
	TenantGone func(tenant string)
	// ManagementAccess are the flows that still pass while a VM is
	// isolated (operator configuration; applied to both directions of
	// every isolated NIC).
	ManagementAccess []policy.Rule
	// Emit records a security event metald itself raises (vm_isolated,
	// vm_released); nil drops them.
	Emit   func(eventType, severity string, vm *store.VM, reason string)
	Logger *slog.Logger
	// ShutdownTimeout bounds a graceful guest stop (default 10 s).
	ShutdownTimeout time.Duration
	// OpTimeout bounds the kernel work of one operation once it has begun,
	// independent of the caller's context (default 60 s).
	OpTimeout time.Duration
	// Validate configures request validation, and its parsers also serve
	// building the rule plans of stored configs.
	Validate ValidateOptions
	// Names, when set, opens a NameTx for each request that validates
	// content (CreateVm, UpdateSecurityPolicy, UpdateVmNetwork): its
	// parsers replace Validate's for that request, and it is committed
	// when the request succeeds and rolled back on every failure. Nil
	// validates with Validate alone.
	Names func(ctx context.Context) NameTx
	// Joint, when set with Firewall and Policy, programs a new VM's
	// first-hop rules and policies in one kernel transaction.
	Joint JointInstaller
	// Now returns the current time (default time.Now).
	Now func() time.Time
	// Step, when set, is called after each durable step of CreateVm
	// ("create:row", "create:addresses", "create:bridges",
	// "create:firewall", "create:sandbox", "create:attached",
	// "create:done") and DeleteVm ("delete:marked", "delete:sandbox",
	// "delete:ports", "delete:firewall", "delete:bridges",
	// "delete:addresses"). Crash tests use it to kill the daemon at every
	// point; production leaves it nil.
	Step func(step string)
}

// NameTx is one request's view of the symbolic subnet names its addresses
// use (an ipam name transaction): names the request is the first to use
// are assigned while it runs and removed again when it fails.
type NameTx interface {
	// Validate returns the validation options whose parsers resolve
	// through the transaction; nil fields fall back to Options.Validate.
	Validate() ValidateOptions
	// Bind returns ctx carrying the transaction, so that the address
	// reservation under it resolves as part of the same request.
	Bind(ctx context.Context) context.Context
	// Finish commits the transaction when ok and rolls it back otherwise.
	Finish(ok bool)
}

// plainNames is the NameTx without Options.Names: Options.Validate's
// parsers, nothing to finish.
type plainNames struct{ opt ValidateOptions }

func (p plainNames) Validate() ValidateOptions              { return p.opt }
func (plainNames) Bind(ctx context.Context) context.Context { return ctx }
func (plainNames) Finish(bool)                              {}

// beginNames opens a request's name transaction and returns it with the
// validation options to use under it.
func (m *Manager) beginNames(ctx context.Context) (NameTx, ValidateOptions) {
	var tx NameTx = plainNames{m.opt.Validate}
	if m.opt.Names != nil {
		tx = m.opt.Names(ctx)
	}
	o, base := tx.Validate(), m.opt.Validate
	if o.ParsePrefix == nil {
		o.ParsePrefix = base.ParsePrefix
	}
	if o.ParseAddr == nil {
		o.ParseAddr = base.ParseAddr
	}
	if o.ParseRule == nil {
		o.ParseRule = base.ParseRule
	}
	return tx, o
}

// Manager sequences VM lifecycles. It is safe for concurrent use; operations
// on one VM are serialised.
type Manager struct {
	opt Options
	log *slog.Logger

	locksMu sync.Mutex
	locks   map[string]*vmLock

	// netMu serialises decisions about shared bridge state (gateway
	// addresses, bridge removal) across VMs.
	netMu sync.Mutex
	// gwClaims (under netMu) are the gateways creates in flight count on
	// (bridge|gateway -> VM ids) before their rows record it: a delete
	// racing such a create must not take the gateway away.
	gwClaims map[string]map[string]bool
}

func gwKey(bridge, gw string) string { return bridge + "|" + gw }

// dropClaims forgets vmID's gateway claims (its row records them now, or
// its create failed).
func (m *Manager) dropClaims(vmID string) {
	m.netMu.Lock()
	defer m.netMu.Unlock()
	for k, ids := range m.gwClaims {
		delete(ids, vmID)
		if len(ids) == 0 {
			delete(m.gwClaims, k)
		}
	}
}

// claimedByOther reports whether a create in flight other than vmID counts
// on the gateway (under netMu).
func (m *Manager) claimedByOther(bridge, gw, vmID string) bool {
	for id := range m.gwClaims[gwKey(bridge, gw)] {
		if id != vmID {
			return true
		}
	}
	return false
}

type vmLock struct {
	mu   sync.Mutex
	refs int
}

// NewManager returns a Manager.
func NewManager(opt Options) *Manager {
	if opt.Logger == nil {
		opt.Logger = slog.New(slog.DiscardHandler)
	}
	if opt.ShutdownTimeout <= 0 {
		opt.ShutdownTimeout = 10 * time.Second
	}
	if opt.OpTimeout <= 0 {
		opt.OpTimeout = 60 * time.Second
	}
	if opt.Now == nil {
		opt.Now = time.Now
	}
	if opt.Step == nil {
		opt.Step = func(string) {}
	}
	if opt.Emit == nil {
		opt.Emit = func(string, string, *store.VM, string) {}
	}
	return &Manager{opt: opt, log: opt.Logger, locks: map[string]*vmLock{}}
}

// lock serialises operations on one VM id.
func (m *Manager) lock(id string) func() {
	m.locksMu.Lock()
	l := m.locks[id]
	if l == nil {
		l = &vmLock{}
		m.locks[id] = l
	}
	l.refs++
	m.locksMu.Unlock()
	l.mu.Lock()
	return func() {
		l.mu.Unlock()
		m.locksMu.Lock()
		l.refs--
		if l.refs == 0 {
			delete(m.locks, id)
		}
		m.locksMu.Unlock()
	}
}

// detached returns a context for kernel work that must finish (or be
// undone) even when the caller goes away.
func (m *Manager) detached(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), m.opt.OpTimeout)
}

var configJSON = protojson.MarshalOptions{UseProtoNames: true}

// Create validates req and builds the VM: its row, addresses, bridges, ports
// and sandbox. On any error every step already taken is undone, and the
// subnet names the request was the first to use are removed again.
func (m *Manager) Create(ctx context.Context, req *vmv1.CreateVmRequest) (*store.VM, error) {
	names, vopt := m.beginNames(ctx)
	created := false
	// Deferred first, so it runs last: after the undo steps (the address
	// release among them) on a failure.
	defer func() { names.Finish(created) }()
	ctx = names.Bind(ctx)
	if err := validateWithProfile(req, vopt); err != nil {
		return nil, err
	}
	cfg := req.GetConfig()
	if err := checkCompliance(cfg, m.opt.Region); err != nil {
		return nil, err
	}
	id := req.GetVmId()
	if id == "" {
		id = NewID()
	}
	unlock := m.lock(id)
	defer unlock()

	raw, err := configJSON.Marshal(cfg)
	if err != nil {
		return nil, fmt.Errorf("encode config: %w", err)
	}
	tenant := cfg.GetTenantId()
	if tenant == "" {
		tenant = "default"
	}
	now := m.opt.Now().UTC()
	row := &store.VM{ID: id, TenantID: tenant, State: store.StateCreating, Config: raw,
		Backend: m.opt.Backend.Name(), CreatedAt: now, UpdatedAt: now}
	for i, n := range cfg.GetNetwork() {
		mac := DefaultMAC(id, n.GetId())
		if n.GetMacAddress() != "" {
			if mac, err = normalMAC(n.GetMacAddress()); err != nil {
				return nil, err // validated already; defensive
			}
		}
		nic := store.NIC{ID: n.GetId(), Index: i, HostDevice: HostDevice(id, n.GetId(), i), GuestDevice: n.GetId(),
			MAC: mac.String(), Bridge: BridgeDevice(n.GetBridgeName()), VLAN: n.GetVlanId()}
		if n.GetIpv6().GetEnableStablePrivacy() {
			nic.StableSecret = NewStableSecret()
		}
		row.NICs = append(row.NICs, nic)
	}

	// A MAC is unique on the host: the policy finds a VM's egress rules by
	// its frames' source MAC.
	for i, n := range row.NICs {
		other, err := m.opt.Store.VMWithMAC(ctx, n.MAC, id)
		if err != nil {
			return nil, err
		}
		if other != "" {
			return nil, &ValidationError{Violations: []FieldViolation{{Field: fmt.Sprintf("config.network[%d].mac_address", i),
				Reason: fmt.Sprintf("MAC %s is in use by VM %s on this host (a VM's packets are told apart by their MAC)", n.MAC, other)}}}
		}
	}

	// Backend-specific checks (a real VMM needs its kernel and disks to
	// exist) before anything is built.
	if v, ok := m.opt.Backend.(SpecValidator); ok {
		spec, err := m.spec(row, cfg)
		if err != nil {
			return nil, err
		}
		if err := v.Validate(spec); err != nil {
			return nil, specError(err)
		}
	}

	// From here on, the work is finished or undone whatever the caller does.
	ctx, cancel := m.detached(ctx)
	defer cancel()
	var undo []func(context.Context) error
	fail := func(err error) (*store.VM, error) {
		for i := len(undo) - 1; i >= 0; i-- {
			if uerr := undo[i](ctx); uerr != nil {
				m.log.Error("undo failed create", "vm_id", id, "err", uerr)
			}
		}
		return nil, err
	}

	// Undone last, once the row is gone: the security groups this VM joined
	// (members are read from the rows) drop its addresses again.
	undo = append(undo, func(ctx context.Context) error {
		return m.refreshGroups(ctx, cfg.GetSecurityProfile().GetSecurityGroups(), nil)
	})
	// 1. The row first: an intent record that a restart after a crash uses
	// to roll the creation back.
	if err := m.opt.Store.CreateVM(ctx, row); err != nil {
		if errors.Is(err, store.ErrConflict) {
			return nil, fmt.Errorf("vm_id: %q: %w", id, ErrExists)
		}
		return nil, fmt.Errorf("create vm %s: %w", id, err)
	}
	undo = append(undo, func(ctx context.Context) error { return m.opt.Store.DeleteVM(ctx, id) })
	m.opt.Step("create:row")

	// 2. Addresses.
	undo = append(undo, func(ctx context.Context) error { return m.opt.Addresses.Release(ctx, id) })
	for i, n := range cfg.GetNetwork() {
		res, err := m.opt.Addresses.Reserve(ctx, AddressRequest{VMID: id, TenantID: tenant, NICID: n.GetId(),
			Bridge: BridgeDevice(n.GetBridgeName()), Field: fmt.Sprintf("config.network[%d].ipv6", i), IPv6: n.GetIpv6()})
		if err != nil {
			return fail(err)
		}
		nic := &row.NICs[i]
		if res.Address.IsValid() {
			nic.Address = res.Address.String()
		}
		if res.Gateway.IsValid() {
			nic.Gateway = res.Gateway.String()
		}
	}
	m.opt.Step("create:addresses")

	// 3. Bridges and gateways.
	undo = append(undo, func(ctx context.Context) error { return m.releaseBridges(ctx, id, row.NICs) })
	defer m.dropClaims(id) // after the row records them, or after the rollback
	if err := m.ensureBridges(ctx, id, row.NICs, false); err != nil {
		return fail(err)
	}
	m.opt.Step("create:bridges")

	// 4. First-hop rules, keyed on the ports' names: in place before the
	// ports exist.
	undo = append(undo, func(ctx context.Context) error { return m.removeFirewall(row.NICs) })
	undo = append(undo, func(ctx context.Context) error { return m.removePolicy(ctx, id, row.NICs) })
	if err := m.installRulesAndPolicy(ctx, row, cfg); err != nil {
		return fail(err)
	}
	m.opt.Step("create:firewall")

	// 5. Sandbox and ports (down, detached).
	spec, err := m.spec(row, cfg)
	if err != nil {
		return fail(err)
	}
	inst, err := m.opt.Backend.Create(ctx, spec)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			// A namespace of that name that no VM of this metald owns.
			return fail(fmt.Errorf("create sandbox: %w: %w", ErrHostConflict, err))
		}
		return fail(fmt.Errorf("create sandbox: %w", err))
	}
	undo = append(undo, func(ctx context.Context) error { return m.opt.Backend.Destroy(ctx, id, inst) })
	m.opt.Step("create:sandbox")

	// 6. Join the bridges.
	for _, n := range row.NICs {
		if err := m.opt.Ports.AttachPort(n.HostDevice, n.Bridge); err != nil {
			return fail(fmt.Errorf("attach %s to bridge %s: %w", n.HostDevice, n.Bridge, err))
		}
	}
	if err := m.enableSnooping(row, cfg); err != nil {
		return fail(err)
	}
	undo = append(undo, func(context.Context) error { return m.removeLimits(row.NICs) })
	if err := m.applyLimits(row, cfg); err != nil {
		return fail(err)
	}
	m.opt.Step("create:attached")

	// 7. Done: CREATED. The request's subnet names are made permanent
	// before the row that makes the VM durable: a crash in between leaves a
	// name the rolled-back VM no longer uses (harmless), never a stored
	// config naming a subnet that start-up removed as unfinished.
	row.Instance, _ = json.Marshal(inst)
	row.State = store.StateCreated
	row.UpdatedAt = m.opt.Now().UTC()
	names.Finish(true)
	if err := m.opt.Store.UpdateVM(ctx, row); err != nil {
		return fail(fmt.Errorf("persist vm: %w", err))
	}
	m.opt.Step("create:done")
	created = true
	m.audit(ctx, row, "CreateVm", string(raw))
	m.log.Info("vm created", "vm_id", id, "tenant_id", tenant, "nics", len(row.NICs))
	return row, nil
}

// ensureBridges creates the NICs' bridges and puts each gateway on its
// bridge when it lies in the NIC's prefix and no VM holds it. It records in
// the NICs whether the bridge holds the gateway.
//
// Unless force is set, a gateway that another VM's NIC on the same bridge
// already records as on the bridge is taken as present without asking the
// kernel (CreateVm's hot path); recovery passes force to re-check it.
func (m *Manager) ensureBridges(ctx context.Context, vmID string, nics []store.NIC, force bool) error {
	m.netMu.Lock()
	defer m.netMu.Unlock()
	for i := range nics {
		n := &nics[i]
		if err := m.opt.Ports.EnsureBridge(n.Bridge); err != nil {
			if errors.Is(err, link.ErrNotBridge) {
				return &ValidationError{Violations: []FieldViolation{{Field: fmt.Sprintf("config.network[%d].bridge_name", n.Index),
					Reason: fmt.Sprintf("the host's interface %s is not a bridge: name another bridge", n.Bridge)}}}
			}
			return fmt.Errorf("ensure bridge %s: %w", n.Bridge, err)
		}
		gwp, ok := gatewayPrefix(*n)
		if !ok {
			continue
		}
		holders, err := m.opt.Store.NICsWithAddress(ctx, gwp.Addr().String())
		if err != nil {
			return err
		}
		if slices.ContainsFunc(holders, func(r store.NICRef) bool { return r.VMID != vmID }) {
			continue // a VM holds the gateway address: it is the router
		}
		if !force {
			held, err := m.opt.Store.GatewayOnBridgeBy(ctx, n.Bridge, n.Gateway, vmID)
			if err != nil {
				return err
			}
			if held {
				// Another VM's creation put it there; Recover re-checks
				// the kernel on every start.
				n.GatewayOnBridge = true
				m.claim(n.Bridge, n.Gateway, vmID)
				continue
			}
		}
		on, err := m.opt.Ports.EnsureGateway(n.Bridge, gwp)
		if err != nil {
			return fmt.Errorf("put gateway %s on bridge %s: %w", gwp, n.Bridge, err)
		}
		n.GatewayOnBridge = on
		if on && !force {
			m.claim(n.Bridge, n.Gateway, vmID)
		}
	}
	return nil
}

// claim records (under netMu) that vmID's create counts on the gateway.
func (m *Manager) claim(bridge, gw, vmID string) {
	if m.gwClaims == nil {
		m.gwClaims = map[string]map[string]bool{}
	}
	k := gwKey(bridge, gw)
	if m.gwClaims[k] == nil {
		m.gwClaims[k] = map[string]bool{}
	}
	m.gwClaims[k][vmID] = true
}

// releaseBridges undoes ensureBridges for a VM that is going away: gateways
// and bridges that no other VM uses are removed.
func (m *Manager) releaseBridges(ctx context.Context, vmID string, nics []store.NIC) error {
	m.netMu.Lock()
	defer m.netMu.Unlock()
	var errs []error
	done := map[string]bool{}
	for _, n := range nics {
		if done[n.Bridge] {
			continue
		}
		done[n.Bridge] = true
		for _, mine := range nics {
			gwp, ok := gatewayPrefix(mine)
			if mine.Bridge != n.Bridge || !ok || !mine.GatewayOnBridge {
				continue
			}
			// Another VM's NIC that put the same gateway there keeps it.
			held, err := m.opt.Store.GatewayOnBridgeBy(ctx, n.Bridge, mine.Gateway, vmID)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if held || m.claimedByOther(n.Bridge, mine.Gateway, vmID) {
				continue
			}
			if err := m.opt.Ports.RemoveGateway(n.Bridge, gwp); err != nil {
				errs = append(errs, err)
			}
		}
		used, err := m.opt.Store.BridgeUsedBy(ctx, n.Bridge, vmID)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if !used {
			if err := m.opt.Ports.RemoveBridgeIfUnused(n.Bridge); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

func gatewayPrefix(n store.NIC) (netip.Prefix, bool) {
	if n.Address == "" || n.Gateway == "" {
		return netip.Prefix{}, false
	}
	p, err1 := netip.ParsePrefix(n.Address)
	gw, err2 := netip.ParseAddr(n.Gateway)
	if err1 != nil || err2 != nil || gw.IsLinkLocalUnicast() || !p.Masked().Contains(gw) || gw == p.Addr() {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(gw, p.Bits()), true
}

func joinErrs(errs []error) error { return errors.Join(errs...) }

// spec turns a VM row and its config into what the backend builds.
func (m *Manager) spec(row *store.VM, cfg *vmv1.VmConfig) (*backend.Spec, error) {
	if cfg == nil {
		cfg = &vmv1.VmConfig{}
		if err := protojson.Unmarshal(row.Config, cfg); err != nil {
			return nil, fmt.Errorf("decode stored config of %s: %w", row.ID, err)
		}
	}
	s := &backend.Spec{VMID: row.ID, VCPUs: cfg.GetCpu().GetVcpuCount(), MemoryBytes: cfg.GetMemory().GetSizeBytes(),
		KernelPath: cfg.GetBoot().GetKernelPath(), InitrdPath: cfg.GetBoot().GetInitrdPath(), KernelArgs: cfg.GetBoot().GetKernelArgs()}
	for _, d := range cfg.GetStorage() {
		s.Disks = append(s.Disks, backend.Disk{ID: d.GetId(), Path: d.GetPath(), ReadOnly: d.GetReadonly(), Root: d.GetIsRootDevice()})
	}
	for i, n := range row.NICs {
		mac, err := normalMAC(n.MAC)
		if err != nil {
			return nil, err
		}
		b := backend.NIC{ID: n.GuestDevice, HostDevice: n.HostDevice, MAC: mac, StableSecret: n.StableSecret}
		if n.Address != "" {
			b.Address, _ = netip.ParsePrefix(n.Address)
		}
		if n.Gateway != "" {
			b.Gateway, _ = netip.ParseAddr(n.Gateway)
		}
		if i < len(cfg.GetNetwork()) {
			v6 := cfg.GetNetwork()[i].GetIpv6()
			for _, d := range v6.GetDnsServers() {
				if a, err := netip.ParseAddr(d); err == nil {
					b.DNS = append(b.DNS, a)
				}
			}
			b.PrivacyExtensions = v6.GetEnablePrivacyExtensions()
			b.TempValidLifetime = time.Duration(v6.GetTempValidLifetime()) * time.Second
		}
		s.NICs = append(s.NICs, b)
	}
	return s, nil
}

// Caps returns the host's enforcement capabilities.
func (m *Manager) Caps() Capabilities { return m.opt.Caps }

// Get returns a VM's record.
func (m *Manager) Get(ctx context.Context, id string) (*store.VM, error) {
	vm, err := m.opt.Store.GetVM(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("vm %q: %w", id, ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	if vm.State == store.StateCreating || vm.State == store.StateDeleting {
		// Being built or torn down: not visible as a VM yet / any more.
		return nil, fmt.Errorf("vm %q: %w", id, ErrNotFound)
	}
	return vm, nil
}

// List returns every VM.
func (m *Manager) List(ctx context.Context) ([]*store.VM, error) {
	all, err := m.opt.Store.ListVMs(ctx)
	if err != nil {
		return nil, err
	}
	return slices.DeleteFunc(all, func(v *store.VM) bool {
		return v.State == store.StateCreating || v.State == store.StateDeleting
	}), nil
}

// Instance decodes a VM's backend handle.
func Instance(vm *store.VM) backend.Instance {
	var inst backend.Instance
	if len(vm.Instance) > 0 {
		_ = json.Unmarshal(vm.Instance, &inst)
	}
	if inst.Backend == "" {
		inst.Backend = vm.Backend
	}
	return inst
}

// transition runs op on a VM in one of the allowed states and persists the
// resulting state and instance.
func (m *Manager) transition(ctx context.Context, id, opName string, allowed []string,
	op func(ctx context.Context, vm *store.VM, inst backend.Instance) (backend.Instance, string, error)) (*store.VM, error) {
	unlock := m.lock(id)
	defer unlock()
	vm, err := m.Get(ctx, id)
	if err != nil {
		return nil, err
	}
	if !slices.Contains(allowed, vm.State) {
		return nil, &StateError{VMID: id, State: vm.State, Op: opName, Want: allowed}
	}
	ctx, cancel := m.detached(ctx)
	defer cancel()
	inst, state, err := op(ctx, vm, Instance(vm))
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", opName, id, err)
	}
	vm.Instance, _ = json.Marshal(inst)
	now := m.opt.Now().UTC()
	if state == store.StateRunning && vm.State != store.StateRunning && vm.State != store.StatePaused {
		vm.StartedAt = now
	}
	if state == store.StateRunning && opName == "RebootVm" {
		vm.StartedAt = now
	}
	vm.State, vm.StateReason, vm.UpdatedAt = state, "", now
	if err := m.opt.Store.UpdateVM(ctx, vm); err != nil {
		return nil, fmt.Errorf("persist vm state: %w", err)
	}
	m.audit(ctx, vm, opName, state)
	m.log.Info("vm state changed", "vm_id", id, "op", opName, "state", state)
	return vm, nil
}

// Boot starts a created or shut-down VM.
func (m *Manager) Boot(ctx context.Context, id string) (*store.VM, error) {
	return m.transition(ctx, id, "BootVm", []string{store.StateCreated, store.StateShutdown},
		func(ctx context.Context, vm *store.VM, inst backend.Instance) (backend.Instance, string, error) {
			spec, err := m.spec(vm, nil)
			if err != nil {
				return inst, "", err
			}
			inst, err = m.opt.Backend.Boot(ctx, spec, inst)
			if err == nil {
				m.afterBoot(vm)
			}
			return inst, store.StateRunning, err
		})
}

// afterBoot binds the guest's link-local addresses (known only once its
// interfaces are up) to its ports.
func (m *Manager) afterBoot(vm *store.VM) {
	if !m.learnLinkLocal(vm) {
		return
	}
	if err := m.installFirewall(vm, nil); err != nil {
		m.log.Error("update first-hop rules with the guest's link-local address", "vm_id", vm.ID, "err", err)
	}
	cfg, err := decodeConfig(vm)
	if err == nil {
		err = m.installPolicy(context.Background(), vm, cfg)
	}
	if err != nil {
		m.log.Error("update security policy with the guest's link-local address", "vm_id", vm.ID, "err", err)
	}
}

// Shutdown stops a running or paused VM, keeping its resources.
func (m *Manager) Shutdown(ctx context.Context, id string, timeout time.Duration) (*store.VM, error) {
	if timeout <= 0 {
		timeout = m.opt.ShutdownTimeout
	}
	return m.transition(ctx, id, "ShutdownVm", []string{store.StateRunning, store.StatePaused},
		func(ctx context.Context, vm *store.VM, inst backend.Instance) (backend.Instance, string, error) {
			if vm.State == store.StatePaused {
				// A stopped process would hold a graceful signal pending.
				if err := m.opt.Backend.Resume(ctx, inst); err != nil && !errors.Is(err, backend.ErrNotRunning) {
					return inst, "", err
				}
			}
			inst, err := m.opt.Backend.Shutdown(ctx, inst, timeout)
			return inst, store.StateShutdown, err
		})
}

// Pause freezes a running VM.
func (m *Manager) Pause(ctx context.Context, id string) (*store.VM, error) {
	return m.transition(ctx, id, "PauseVm", []string{store.StateRunning},
		func(ctx context.Context, vm *store.VM, inst backend.Instance) (backend.Instance, string, error) {
			return inst, store.StatePaused, m.opt.Backend.Pause(ctx, inst)
		})
}

// Resume continues a paused VM.
func (m *Manager) Resume(ctx context.Context, id string) (*store.VM, error) {
	return m.transition(ctx, id, "ResumeVm", []string{store.StatePaused},
		func(ctx context.Context, vm *store.VM, inst backend.Instance) (backend.Instance, string, error) {
			return inst, store.StateRunning, m.opt.Backend.Resume(ctx, inst)
		})
}

// Reboot restarts a running VM's guest.
func (m *Manager) Reboot(ctx context.Context, id string) (*store.VM, error) {
	return m.transition(ctx, id, "RebootVm", []string{store.StateRunning},
		func(ctx context.Context, vm *store.VM, inst backend.Instance) (backend.Instance, string, error) {
			spec, err := m.spec(vm, nil)
			if err != nil {
				return inst, "", err
			}
			// Recorded first: a metald killed while the guest is down
			// between its stop and its start finds it so on restart, and
			// leaves it SHUTDOWN (bootable) rather than TERMINATED.
			vm.StateReason, vm.UpdatedAt = reasonRebooting, m.opt.Now().UTC()
			if err := m.opt.Store.UpdateVM(ctx, vm); err != nil {
				return inst, "", fmt.Errorf("persist vm state: %w", err)
			}
			inst, err = m.opt.Backend.Reboot(ctx, spec, inst)
			if err != nil {
				// Failed, not interrupted: the mark goes (the liveness
				// watch judges the guest as it is).
				vm.StateReason = ""
				if perr := m.opt.Store.UpdateVM(ctx, vm); perr != nil {
					m.log.Error("clear reboot mark", "vm_id", vm.ID, "err", perr)
				}
				return inst, "", err
			}
			m.afterBoot(vm)
			return inst, store.StateRunning, nil
		})
}

// reasonRebooting is the state reason of a RUNNING VM while RebootVm has
// its guest down.
const reasonRebooting = "rebooting"

// Delete stops the VM if needed and releases everything it holds.
func (m *Manager) Delete(ctx context.Context, id string) error {
	unlock := m.lock(id)
	defer unlock()
	vm, err := m.Get(ctx, id)
	if err != nil {
		return err
	}
	ctx, cancel := m.detached(ctx)
	defer cancel()
	m.audit(ctx, vm, "DeleteVm", "")
	// Intent first: a crash from here on is finished by the next start.
	vm.State, vm.UpdatedAt = store.StateDeleting, m.opt.Now().UTC()
	if err := m.opt.Store.UpdateVM(ctx, vm); err != nil {
		return fmt.Errorf("mark vm %s deleting: %w", id, err)
	}
	m.opt.Step("delete:marked")
	if err := m.teardown(ctx, vm); err != nil {
		return fmt.Errorf("delete vm %s: %w", id, err)
	}
	if cfg, err := decodeConfig(vm); err == nil {
		if err := m.refreshGroups(ctx, cfg.GetSecurityProfile().GetSecurityGroups(), nil); err != nil {
			m.log.Error("update security groups", "vm_id", id, "err", err)
		}
	}
	if m.opt.TenantGone != nil {
		if has, err := m.opt.Store.TenantHasVMs(ctx, vm.TenantID); err == nil && !has {
			m.opt.TenantGone(vm.TenantID)
		}
	}
	m.log.Info("vm deleted", "vm_id", id)
	return nil
}

// teardown removes everything a VM holds, then its row. It is idempotent, so
// it also finishes deletions and rolls back creations a crash interrupted.
func (m *Manager) teardown(ctx context.Context, vm *store.VM) error {
	var errs []error
	if err := m.opt.Backend.Destroy(ctx, vm.ID, Instance(vm)); err != nil {
		errs = append(errs, fmt.Errorf("destroy sandbox: %w", err))
	}
	m.opt.Step("delete:sandbox")
	for _, n := range vm.NICs {
		if err := m.opt.Ports.DeletePort(n.HostDevice); err != nil {
			errs = append(errs, fmt.Errorf("delete port %s: %w", n.HostDevice, err))
		}
	}
	m.opt.Step("delete:ports")
	if err := m.removeFirewall(vm.NICs); err != nil {
		errs = append(errs, fmt.Errorf("remove first-hop rules: %w", err))
	}
	if err := m.removePolicy(ctx, vm.ID, vm.NICs); err != nil {
		errs = append(errs, fmt.Errorf("remove security policy: %w", err))
	}
	if err := m.removeLimits(vm.NICs); err != nil {
		errs = append(errs, fmt.Errorf("remove limits: %w", err))
	}
	m.opt.Step("delete:firewall")
	if err := m.releaseBridges(ctx, vm.ID, vm.NICs); err != nil {
		errs = append(errs, fmt.Errorf("release bridges: %w", err))
	}
	m.opt.Step("delete:bridges")
	if err := m.opt.Addresses.Release(ctx, vm.ID); err != nil {
		errs = append(errs, fmt.Errorf("release addresses: %w", err))
	}
	m.opt.Step("delete:addresses")
	if len(errs) > 0 {
		// Keep the row (in DELETING) so the next start retries.
		return errors.Join(errs...)
	}
	if err := m.opt.Store.DeleteVM(ctx, vm.ID); err != nil && !errors.Is(err, store.ErrNotFound) {
		return err
	}
	return nil
}

// ManagementAccess returns the flows the daemon's configuration lets
// through a quarantine (isolation.management_access).
func (m *Manager) ManagementAccess() []policy.Rule { return m.opt.ManagementAccess }
