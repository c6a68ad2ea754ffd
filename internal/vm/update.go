package vm

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	vmv1 "github.com/metald/metald/internal/gen/vmprovisioner/v1"
	"github.com/metald/metald/internal/store"
)

// Patches: a field present in the request replaces the configured one, an
// absent field stays. Lists replace when the request gives a non-empty
// list (proto3 cannot tell an absent list from an empty one); the
// request's clear_fields empties a list or unsets a field (clearFields).

func patchPolicy(cur, p *vmv1.SecurityPolicy) *vmv1.SecurityPolicy {
	out := proto.Clone(cur).(*vmv1.SecurityPolicy)
	if out == nil {
		out = &vmv1.SecurityPolicy{}
	}
	if len(p.GetIngressRules()) > 0 {
		out.IngressRules = p.GetIngressRules()
	}
	if len(p.GetEgressRules()) > 0 {
		out.EgressRules = p.GetEgressRules()
	}
	if len(p.GetAllowedDestinations()) > 0 {
		out.AllowedDestinations = p.GetAllowedDestinations()
	}
	if p.GetTenantIsolationLevel() != "" {
		out.TenantIsolationLevel = p.GetTenantIsolationLevel()
	}
	if p.EnableDeepPacketInspection != nil {
		out.EnableDeepPacketInspection = p.EnableDeepPacketInspection
	}
	if p.LogSecurityEvents != nil {
		out.LogSecurityEvents = p.LogSecurityEvents
	}
	if p.BandwidthLimitMbps != nil {
		out.BandwidthLimitMbps = p.BandwidthLimitMbps
	}
	if p.PacketRateLimit != nil {
		out.PacketRateLimit = p.PacketRateLimit
	}
	return out
}

func patchSecurity(cur, p *vmv1.Ipv6Security) *vmv1.Ipv6Security {
	out := proto.Clone(cur).(*vmv1.Ipv6Security)
	if out == nil {
		out = &vmv1.Ipv6Security{}
	}
	lists := out.AllowedRaSources
	proto.Merge(out, p) // present optional fields replace; lists append
	out.AllowedRaSources = lists
	if len(p.GetAllowedRaSources()) > 0 {
		out.AllowedRaSources = p.GetAllowedRaSources()
	}
	return out
}

// clearFields resets the fields of msg named by paths (the request's
// clear_fields: dotted field names under the patched message, as the
// config spells them or as GetVm prints them) to unset; a list becomes
// empty. given is the request's patch of msg: a field it sets may not be
// cleared as well. fixed maps the fields that cannot change at all (by
// their config spelling) to the reason. Errors name clear_fields[i]. On an
// error msg may be partly cleared: callers discard it.
func clearFields(msg, given protoreflect.Message, paths []string, fixed map[string]string) error {
	var ve ValidationError
	seen := map[string]int{}
	for i, path := range paths {
		canon, reason := clearPath(msg, given, path, fixed)
		if j, dup := seen[canon]; dup && reason == "" {
			reason = fmt.Sprintf("%q is named twice (also clear_fields[%d])", path, j)
		}
		if reason != "" {
			ve.Violations = append(ve.Violations, FieldViolation{Field: fmt.Sprintf("clear_fields[%d]", i), Reason: reason})
			continue
		}
		seen[canon] = i
	}
	if len(ve.Violations) > 0 {
		return &ve
	}
	return nil
}

// clearPath clears one dotted path of msg; it returns the path in the
// config's spelling, or why it cannot.
func clearPath(msg, given protoreflect.Message, path string, fixed map[string]string) (string, string) {
	segs := strings.Split(path, ".")
	var canon []string
	for j, seg := range segs {
		fields := msg.Descriptor().Fields()
		fd := fields.ByName(protoreflect.Name(seg))
		if fd == nil {
			fd = fields.ByJSONName(seg) // as GetVm prints it
		}
		if fd == nil {
			return "", fmt.Sprintf("%q: %s has no field %q", path, msg.Descriptor().Name(), seg)
		}
		canon = append(canon, string(fd.Name()))
		if j == len(segs)-1 {
			name := strings.Join(canon, ".")
			if reason, ok := fixed[name]; ok {
				return "", reason
			}
			if given.Has(fd) {
				return "", fmt.Sprintf("%q is given in the request as well: clear it or set it, not both", path)
			}
			msg.Clear(fd)
			return name, ""
		}
		if fd.Message() == nil || fd.IsList() || fd.IsMap() {
			return "", fmt.Sprintf("%q: %s is not a message", path, seg)
		}
		msg, given = msg.Mutable(fd).Message(), given.Get(fd).Message()
	}
	return "", ""
}

// emptyPatch reports whether a patch sets nothing: no field, or only
// empty messages. An empty list is absent in proto3, so a request meant to
// empty one by sending [] arrives as an empty patch.
func emptyPatch(m protoreflect.Message) bool {
	empty := true
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if fd.Message() != nil && !fd.IsList() && !fd.IsMap() && emptyPatch(v.Message()) {
			return true
		}
		empty = false
		return false
	})
	return empty
}

// emptyPatchReason explains an empty patch.
const emptyPatchReason = "sets no field, so nothing would change (an empty list [] reads as absent: to empty a list, name it in clear_fields)"

// nicIndexes resolves interface_id to NIC indexes (all when empty and all
// is allowed, else the only NIC).
func nicIndexes(cfg *vmv1.VmConfig, id string, all bool) ([]int, error) {
	nics := cfg.GetNetwork()
	if id == "" {
		switch {
		case all:
			idx := make([]int, len(nics))
			for i := range idx {
				idx[i] = i
			}
			return idx, nil
		case len(nics) == 1:
			return []int{0}, nil
		}
		return nil, &ValidationError{Violations: []FieldViolation{{Field: "interface_id", Reason: fmt.Sprintf("required: the vm has %d interfaces", len(nics))}}}
	}
	for i, n := range nics {
		if n.GetId() == id {
			return []int{i}, nil
		}
	}
	return nil, &ValidationError{Violations: []FieldViolation{{Field: "interface_id", Reason: fmt.Sprintf("no interface %q", id)}}}
}

// renameFields maps validation paths of the whole config to the request's
// own field names (config.network[0].security_policy.x → security_policy.x).
func renameFields(err error, from, to string) error {
	var ce *ComplianceError
	if errors.As(err, &ce) {
		out := *ce
		if rest, ok := strings.CutPrefix(out.Field, from); ok {
			out.Field = to + rest
		}
		return &out
	}
	var ve *ValidationError
	if !errors.As(err, &ve) {
		return err
	}
	out := &ValidationError{}
	for _, v := range ve.Violations {
		if rest, ok := strings.CutPrefix(v.Field, from); ok {
			v.Field = to + rest
		}
		out.Violations = append(out.Violations, v)
	}
	return out
}

// applyConfig validates a changed config, programs it (first-hop rules and
// policies, each NIC one kernel transaction) and persists it. On a
// validation or kernel error nothing is persisted and the kernel is put
// back to the stored config; subnet names the change was the first to use
// are removed again.
func (m *Manager) applyConfig(ctx context.Context, row *store.VM, cfg *vmv1.VmConfig, from, to string) (*store.VM, error) {
	names, vopt := m.beginNames(ctx)
	applied := false
	defer func() { names.Finish(applied) }()
	ctx = names.Bind(ctx)
	if err := validateWithProfile(&vmv1.CreateVmRequest{VmId: row.ID, Config: cfg}, vopt); err != nil {
		return nil, renameFields(err, from, to)
	}
	if err := checkCompliance(cfg, m.opt.Region); err != nil {
		return nil, renameFields(err, from, to)
	}
	raw, err := configJSON.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	next := *row
	next.Config = raw
	if _, err := m.Policies(ctx, &next, cfg, nil); err != nil {
		return nil, renameFields(err, from, to)
	}
	old, err := decodeConfig(row)
	if err != nil {
		return nil, err
	}
	// New DNS servers reach a live guest where the backend can give them
	// (netns: resolv.conf); other backends pass them at the next boot.
	dns := m.dnsChange(ctx, row, old, cfg)
	if err := dns(cfg); err != nil {
		return nil, err
	}
	restore := func() {
		m.installFirewall(row, nil)
		m.installPolicy(ctx, row, old)
		if err := dns(old); err != nil {
			m.log.Error("restore dns after a failed update", "vm_id", row.ID, "err", err)
		}
	}
	if err := m.installFirewall(&next, cfg); err != nil {
		restore()
		return nil, err
	}
	if err := m.installPolicy(ctx, &next, cfg); err != nil {
		restore()
		return nil, err
	}
	if err := m.applyLimits(&next, cfg); err != nil {
		restore()
		m.applyLimits(row, old)
		return nil, err
	}
	next.UpdatedAt = m.opt.Now().UTC()
	// Names become permanent before the config that uses them is stored
	// (see Create).
	names.Finish(true)
	if err := m.opt.Store.UpdateVM(ctx, &next); err != nil {
		restore()
		return nil, fmt.Errorf("persist vm: %w", err)
	}
	applied = true
	m.log.Info("vm configuration updated", "vm_id", row.ID, "field", to)
	m.audit(ctx, &next, "Update "+to, string(raw))
	return &next, nil
}

// UpdateSecurityPolicy patches the security policy of one NIC, or of every
// NIC when nicID is empty.
func (m *Manager) UpdateSecurityPolicy(ctx context.Context, id, nicID string, patch *vmv1.SecurityPolicy, clear []string) (*store.VM, error) {
	unlock := m.lock(id)
	defer unlock()
	row, err := m.Get(ctx, id)
	if err != nil {
		return nil, err
	}
	cfg, err := decodeConfig(row)
	if err != nil {
		return nil, err
	}
	idx, err := nicIndexes(cfg, nicID, true)
	if err != nil {
		return nil, err
	}
	if patch == nil {
		patch = &vmv1.SecurityPolicy{}
	}
	if emptyPatch(patch.ProtoReflect()) && len(clear) == 0 {
		return nil, &ValidationError{Violations: []FieldViolation{{Field: "security_policy", Reason: emptyPatchReason}}}
	}
	for _, i := range idx {
		n := cfg.GetNetwork()[i]
		n.SecurityPolicy = patchPolicy(n.GetSecurityPolicy(), patch)
		if err := clearFields(n.SecurityPolicy.ProtoReflect(), patch.ProtoReflect(), clear, nil); err != nil {
			return nil, err
		}
	}
	from := "config.network[" + fmt.Sprint(idx[0]) + "].security_policy"
	if len(idx) > 1 {
		from = "config.network" // several NICs: keep the full path
	}
	ctx, cancel := m.detached(ctx)
	defer cancel()
	return m.applyConfig(ctx, row, cfg, from, map[bool]string{true: "security_policy", false: "config.network"}[len(idx) == 1])
}

// UpdateVmNetwork patches one NIC's ipv6 settings: its security block and
// DNS servers. Addresses and privacy settings belong to the guest's boot
// and cannot be changed on a live VM.
func (m *Manager) UpdateVmNetwork(ctx context.Context, id, nicID string, patch *vmv1.Ipv6Config, clear []string) (*store.VM, int, error) {
	unlock := m.lock(id)
	defer unlock()
	row, err := m.Get(ctx, id)
	if err != nil {
		return nil, 0, err
	}
	cfg, err := decodeConfig(row)
	if err != nil {
		return nil, 0, err
	}
	idx, err := nicIndexes(cfg, nicID, false)
	if err != nil {
		return nil, 0, err
	}
	if patch == nil {
		patch = &vmv1.Ipv6Config{}
	}
	if emptyPatch(patch.ProtoReflect()) && len(clear) == 0 {
		return nil, 0, &ValidationError{Violations: []FieldViolation{{Field: "ipv6", Reason: emptyPatchReason}}}
	}
	// Fields the guest configures at boot: neither set nor cleared here.
	const bootOnly = "cannot change on an existing vm (the guest configures it at boot); create a new vm"
	var ve ValidationError
	fixed := map[string]string{}
	pr := patch.ProtoReflect()
	for _, f := range []protoreflect.Name{"address", "gateway", "enable_privacy_extensions", "enable_stable_privacy", "temp_valid_lifetime"} {
		if pr.Has(pr.Descriptor().Fields().ByName(f)) {
			ve.Violations = append(ve.Violations, FieldViolation{Field: "ipv6." + string(f), Reason: bootOnly})
		}
		fixed[string(f)] = fmt.Sprintf("%q %s", f, bootOnly)
	}
	if len(ve.Violations) > 0 {
		return nil, 0, &ve
	}
	i := idx[0]
	n := cfg.GetNetwork()[i]
	if n.Ipv6 == nil {
		n.Ipv6 = &vmv1.Ipv6Config{}
	}
	if patch.GetSecurity() != nil {
		n.Ipv6.Security = patchSecurity(n.Ipv6.GetSecurity(), patch.GetSecurity())
	}
	if len(patch.GetDnsServers()) > 0 {
		n.Ipv6.DnsServers = patch.GetDnsServers()
	}
	if err := clearFields(n.Ipv6.ProtoReflect(), patch.ProtoReflect(), clear, fixed); err != nil {
		return nil, 0, err
	}
	ctx, cancel := m.detached(ctx)
	defer cancel()
	next, err := m.applyConfig(ctx, row, cfg, fmt.Sprintf("config.network[%d].ipv6", i), "ipv6")
	return next, i, err
}

// dnsChange returns what gives the guest a config's DNS servers: the
// backend's DNSUpdater when the update changes them (from old to cfg) and
// the backend has one, else nothing.
func (m *Manager) dnsChange(ctx context.Context, row *store.VM, old, cfg *vmv1.VmConfig) func(*vmv1.VmConfig) error {
	u, ok := m.opt.Backend.(DNSUpdater)
	same := slices.EqualFunc(old.GetNetwork(), cfg.GetNetwork(), func(a, b *vmv1.NetworkInterface) bool {
		return slices.Equal(a.GetIpv6().GetDnsServers(), b.GetIpv6().GetDnsServers())
	})
	if !ok || same {
		return func(*vmv1.VmConfig) error { return nil }
	}
	return func(c *vmv1.VmConfig) error {
		spec, err := m.spec(row, c)
		if err != nil {
			return err
		}
		return u.UpdateDNS(ctx, spec, Instance(row))
	}
}

// MaxIsolationReason bounds IsolateVm's reason, in bytes.
const MaxIsolationReason = 1024

// Isolate quarantines a VM: its policies drop everything to and from it
// (ND/MLD excepted) but the operator's management access
// (Options.ManagementAccess, from isolation.management_access; no request
// can add to it) until Release; policy updates meanwhile are stored and
// take effect on release. Isolating an isolated VM updates the reason.
func (m *Manager) Isolate(ctx context.Context, id, reason string) (*store.VM, error) {
	return m.setIsolation(ctx, id, reason, true)
}

// Release lifts a quarantine.
func (m *Manager) Release(ctx context.Context, id string) (*store.VM, error) {
	return m.setIsolation(ctx, id, "", false)
}

func (m *Manager) setIsolation(ctx context.Context, id, reason string, on bool) (*store.VM, error) {
	if on {
		// The reason is stored, shown by GetVm and written to both logs:
		// bounded, and text.
		switch {
		case len(reason) > MaxIsolationReason:
			return nil, &ValidationError{Violations: []FieldViolation{{Field: "reason", Reason: fmt.Sprintf("must be at most %d bytes, got %d", MaxIsolationReason, len(reason))}}}
		case !utf8.ValidString(reason):
			return nil, &ValidationError{Violations: []FieldViolation{{Field: "reason", Reason: "must be UTF-8 text"}}}
		}
	}
	unlock := m.lock(id)
	defer unlock()
	row, err := m.Get(ctx, id)
	if err != nil {
		return nil, err
	}
	if !on && row.IsolatedAt.IsZero() {
		return nil, &StateError{VMID: id, State: "not isolated", Op: "ReleaseVm", Want: []string{"isolated"}}
	}
	ctx, cancel := m.detached(ctx)
	defer cancel()
	next := *row
	now := m.opt.Now().UTC()
	if on {
		if next.IsolatedAt.IsZero() {
			next.IsolatedAt = now
		}
		next.IsolatedReason = reason
	} else {
		next.IsolatedAt, next.IsolatedReason = time.Time{}, ""
	}
	cfg, err := decodeConfig(&next)
	if err != nil {
		return nil, err
	}
	if err := m.installPolicy(ctx, &next, cfg); err != nil {
		m.installPolicy(ctx, row, cfg) // put the kernel back
		return nil, err
	}
	if on {
		if err := m.cutFlows(row); err != nil {
			m.installPolicy(ctx, row, cfg)
			return nil, err
		}
	}
	next.UpdatedAt = now
	if err := m.opt.Store.UpdateVM(ctx, &next); err != nil {
		m.installPolicy(ctx, row, cfg)
		return nil, fmt.Errorf("persist vm: %w", err)
	}
	if on {
		m.audit(ctx, &next, "IsolateVm", reason)
	} else {
		m.audit(ctx, &next, "ReleaseVm", "")
	}
	if on {
		m.log.Warn("vm isolated", "vm_id", id, "reason", reason)
		m.opt.Emit("vm_isolated", "high", &next, reason)
	} else {
		m.log.Info("vm released", "vm_id", id)
		m.opt.Emit("vm_released", "medium", &next, "")
	}
	return &next, nil
}

// FlowCutter forgets the host's connection tracking of flows to and from
// addresses, so that their next packets are judged by the rules in force
// (an established flow otherwise passes on its conntrack state). The
// manager's Ports implement it where they can.
type FlowCutter interface {
	CutFlows(addrs []netip.Addr) error
}

// cutFlows makes the quarantine apply to connections the VM already had:
// their next packets are new to conntrack, so the isolated NIC's chains
// judge them (management access passes again, everything else is dropped).
func (m *Manager) cutFlows(row *store.VM) error {
	fc, ok := m.opt.Ports.(FlowCutter)
	if !ok {
		return nil
	}
	var addrs []netip.Addr
	for _, n := range row.NICs {
		if p, err := netip.ParsePrefix(n.Address); err == nil {
			addrs = append(addrs, p.Addr())
		}
		if ll := m.linkLocal(n); ll.IsValid() {
			addrs = append(addrs, ll)
		}
	}
	if err := fc.CutFlows(addrs); err != nil {
		return fmt.Errorf("cut the established flows of %s: %w", row.ID, err)
	}
	return nil
}
