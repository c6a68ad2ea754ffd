package vm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"

	vmv1 "github.com/metald/metald/internal/gen/vmprovisioner/v1"
	"github.com/metald/metald/internal/network"
	"github.com/metald/metald/internal/network/secpolicy"
	"github.com/metald/metald/internal/policy"
	"github.com/metald/metald/internal/store"
)

// PolicyEnforcer programs each NIC's security policy (the stateful per-VM
// firewall, tenant isolation, security groups) into the kernel.
type PolicyEnforcer interface {
	Upsert(ctx context.Context, p secpolicy.NICPolicy) error
	Remove(ctx context.Context, vmID, nic string) error
	Apply(ctx context.Context, all []secpolicy.NICPolicy) error
	SetGroupMembers(ctx context.Context, group string, addrs []netip.Addr) error
}

// JointInstaller programs the first-hop rules and the security policies of
// a new VM's NICs in one kernel transaction instead of one per kind: every
// nf_tables commit walks every chain of the namespace, so each commit saved
// is time that grows with the number of VMs. An error means nothing was
// committed; the caller then programs each kind on its own, which reports
// what failed.
type JointInstaller interface {
	InstallJoint(ctx context.Context, rules []network.NICPlan, policies []secpolicy.NICPolicy) error
}

// installRulesAndPolicy programs a new VM's first-hop rules and policies:
// in one transaction when a JointInstaller is configured, else (or when
// that fails) the rules first, then the policies. (Other paths that program
// both leave to the managers' own commits: their wrappers may skip an
// unchanged plan.)
func (m *Manager) installRulesAndPolicy(ctx context.Context, row *store.VM, cfg *vmv1.VmConfig) error {
	if m.opt.Joint == nil || m.opt.Firewall == nil || m.opt.Policy == nil {
		if err := m.installFirewall(row, cfg); err != nil {
			return err
		}
		return m.installPolicy(ctx, row, cfg)
	}
	groups, err := m.groupsFor(ctx, cfg)
	if err != nil {
		return err
	}
	plans, err := m.Plans(row, cfg)
	if err != nil {
		return err
	}
	pols, err := m.Policies(ctx, row, cfg, groups)
	if err != nil {
		return err
	}
	if jerr := m.opt.Joint.InstallJoint(ctx, plans, pols); jerr != nil {
		m.log.Debug("one-transaction install failed; programming rules and policy apart", "vm_id", row.ID, "err", jerr)
		if err := m.programRules(plans); err != nil {
			return err
		}
		if err := m.programPolicies(ctx, pols); err != nil {
			return err
		}
	}
	return m.refreshGroups(ctx, cfg.GetSecurityProfile().GetSecurityGroups(), groups)
}

// linkLocal is the guest link-local address the host binds to a NIC: as
// read from the guest, else (guests metald cannot look into) computed from
// the stable secret, else derived from the MAC.
func (m *Manager) linkLocal(n store.NIC) netip.Addr {
	if ll, err := netip.ParseAddr(n.LinkLocal); err == nil {
		return ll
	}
	mac, err := normalMAC(n.MAC)
	if err != nil {
		return netip.Addr{}
	}
	if _, reads := m.opt.Backend.(LinkLocalReader); !reads && n.StableSecret != "" {
		if ll, ok := StableLinkLocal(n.StableSecret, mac); ok {
			return ll
		}
	}
	return network.EUI64LinkLocal(mac)
}

// groupMembers maps each security group to the addresses of the VMs in it.
func (m *Manager) groupMembers(ctx context.Context) (map[string][]netip.Addr, error) {
	all, err := m.opt.Store.ListVMs(ctx)
	if err != nil {
		return nil, err
	}
	out := map[string][]netip.Addr{}
	for _, row := range all {
		if row.State == store.StateDeleting {
			continue
		}
		cfg, err := decodeConfig(row)
		if err != nil {
			continue
		}
		for _, g := range cfg.GetSecurityProfile().GetSecurityGroups() {
			for _, n := range row.NICs {
				if p, err := netip.ParsePrefix(n.Address); err == nil {
					out[g] = append(out[g], p.Addr())
				}
				if ll := m.linkLocal(n); ll.IsValid() {
					out[g] = append(out[g], ll)
				}
				out[g] = append(out[g], m.tempAddrs(n.HostDevice)...)
			}
		}
	}
	return out, nil
}

// Policies builds the security-policy plans of a VM's NICs.
func (m *Manager) Policies(ctx context.Context, row *store.VM, cfg *vmv1.VmConfig, groups map[string][]netip.Addr) ([]secpolicy.NICPolicy, error) {
	if cfg == nil {
		var err error
		if cfg, err = decodeConfig(row); err != nil {
			return nil, err
		}
	}
	parsePrefix := m.opt.Validate.ParsePrefix
	if parsePrefix == nil {
		parsePrefix = netip.ParsePrefix
	}
	parseAddr := m.opt.Validate.ParseAddr
	if parseAddr == nil {
		parseAddr = netip.ParseAddr
	}
	res := policy.Resolver{Prefix: parsePrefix, Group: func(name string) ([]netip.Prefix, error) {
		var out []netip.Prefix
		for _, a := range groups[name] {
			out = append(out, netip.PrefixFrom(a, 128))
		}
		return out, nil
	}}
	var out []secpolicy.NICPolicy
	for i, n := range row.NICs {
		if i >= len(cfg.GetNetwork()) {
			break
		}
		nc := cfg.GetNetwork()[i]
		sp := nc.GetSecurityPolicy()
		field := fmt.Sprintf("config.network[%d].security_policy", i)
		p := secpolicy.NICPolicy{VMID: row.ID, NIC: n.ID, Tenant: row.TenantID, HostDevice: n.HostDevice, Bridge: n.Bridge,
			Isolated:          !row.IsolatedAt.IsZero(),
			Microsegmentation: cfg.GetSecurityProfile().GetEnableNetworkMicrosegmentation(),
			SecurityGroups:    cfg.GetSecurityProfile().GetSecurityGroups(), LogSecurityEvents: sp.GetLogSecurityEvents()}
		if p.Isolated {
			p.ManagementIngress, p.ManagementEgress = m.opt.ManagementAccess, m.opt.ManagementAccess
		}
		if mac, err := net.ParseMAC(n.MAC); err == nil {
			p.MAC = mac
		}
		if a, err := netip.ParsePrefix(n.Address); err == nil {
			p.Addrs = append(p.Addrs, a.Addr())
		}
		if ll := m.linkLocal(n); ll.IsValid() {
			p.Addrs = append(p.Addrs, ll)
		}
		p.Addrs = append(p.Addrs, m.tempAddrs(n.HostDevice)...)
		if gw, err := netip.ParseAddr(n.Gateway); err == nil {
			p.Gateways = append(p.Gateways, gw)
			if n.GatewayOnBridge && m.opt.Router != nil {
				if _, brLL, err := m.opt.Router.BridgeRouter(n.Bridge); err == nil {
					p.Gateways = append(p.Gateways, brLL)
				}
			}
		}
		switch sp.GetTenantIsolationLevel() {
		case "strict":
			p.TenantIsolation = secpolicy.IsolationStrict
		case "moderate":
			p.TenantIsolation = secpolicy.IsolationModerate
		default:
			p.TenantIsolation = secpolicy.IsolationNone
		}
		for j, d := range sp.GetAllowedDestinations() {
			pr, err := parsePrefix(d)
			if err != nil {
				return nil, fmt.Errorf("%s.allowed_destinations[%d]: %w", field, j, err)
			}
			p.AllowedDestinations = append(p.AllowedDestinations, pr.Masked())
		}
		for _, dir := range []struct {
			name  string
			rules []string
			into  *[]policy.Rule
		}{{"ingress_rules", sp.GetIngressRules(), &p.Ingress}, {"egress_rules", sp.GetEgressRules(), &p.Egress}} {
			rules, err := policy.ParseList(field+"."+dir.name, dir.rules, policy.ParseOptions{ParsePrefix: parsePrefix})
			if err != nil {
				return nil, err
			}
			if *dir.into, err = policy.Resolve(rules, res); err != nil {
				return nil, fmt.Errorf("%s.%s: %w", field, dir.name, err)
			}
		}
		out = append(out, p)
	}
	return out, nil
}

// TempAddrs returns the temporary addresses the guest behind hostDev has
// bound (Options.TempAddrs), as the security policy has them.
func (m *Manager) TempAddrs(hostDev string) []netip.Addr { return m.tempAddrs(hostDev) }

// tempAddrs returns hostDev's learned temporary addresses (Options.TempAddrs).
func (m *Manager) tempAddrs(hostDev string) []netip.Addr {
	if m.opt.TempAddrs == nil || hostDev == "" {
		return nil
	}
	return m.opt.TempAddrs(hostDev)
}

// ReprogramPolicy programs the security policies of one VM's NICs again
// (its addresses changed: a temporary address learned or expired) and the
// members of its security groups, under the VM's lock. It reports false
// for a VM that is gone or being created or deleted (nothing to do).
func (m *Manager) ReprogramPolicy(ctx context.Context, id string) (bool, error) {
	unlock := m.lock(id)
	defer unlock()
	row, err := m.opt.Store.GetVM(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if row.State == store.StateCreating || row.State == store.StateDeleting {
		return false, nil
	}
	cfg, err := decodeConfig(row)
	if err != nil {
		return false, err
	}
	return true, m.installPolicy(ctx, row, cfg)
}

// installPolicy programs a VM's policies and refreshes the members of its
// security groups everywhere.
func (m *Manager) installPolicy(ctx context.Context, row *store.VM, cfg *vmv1.VmConfig) error {
	if m.opt.Policy == nil {
		return nil
	}
	groups, err := m.groupsFor(ctx, cfg)
	if err != nil {
		return err
	}
	plans, err := m.Policies(ctx, row, cfg, groups)
	if err != nil {
		return err
	}
	if err := m.programPolicies(ctx, plans); err != nil {
		return err
	}
	return m.refreshGroups(ctx, cfg.GetSecurityProfile().GetSecurityGroups(), groups)
}

// groupsFor returns every security group's members when cfg names a group
// (sg: rules) or belongs to one, else nil: membership needs every VM's
// config, so it is not read on every CreateVm.
func (m *Manager) groupsFor(ctx context.Context, cfg *vmv1.VmConfig) (map[string][]netip.Addr, error) {
	if !usesGroups(cfg) {
		return nil, nil
	}
	return m.groupMembers(ctx)
}

// programPolicies upserts each policy.
func (m *Manager) programPolicies(ctx context.Context, plans []secpolicy.NICPolicy) error {
	for _, p := range plans {
		if err := m.opt.Policy.Upsert(ctx, p); err != nil {
			return fmt.Errorf("program security policy of %s/%s: %w", p.VMID, p.NIC, err)
		}
	}
	return nil
}

func (m *Manager) refreshGroups(ctx context.Context, names []string, groups map[string][]netip.Addr) error {
	if m.opt.Policy == nil || len(names) == 0 {
		return nil
	}
	if groups == nil {
		var err error
		if groups, err = m.groupMembers(ctx); err != nil {
			return err
		}
	}
	for _, g := range names {
		addrs := slices.Clone(groups[g])
		if err := m.opt.Policy.SetGroupMembers(ctx, g, addrs); err != nil {
			return fmt.Errorf("update security group %s: %w", g, err)
		}
	}
	return nil
}

// removePolicy removes a VM's policies; absent ones are fine.
func (m *Manager) removePolicy(ctx context.Context, vmID string, nics []store.NIC) error {
	if m.opt.Policy == nil {
		return nil
	}
	var errs []error
	for _, n := range nics {
		if err := m.opt.Policy.Remove(ctx, vmID, n.ID); err != nil && !errors.Is(err, secpolicy.ErrNotFound) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// PolicyResyncer is implemented by enforcers that can program every
// policy again whatever the kernel holds (secpolicy.Manager.Resync).
type PolicyResyncer interface {
	Resync(ctx context.Context, all []secpolicy.NICPolicy) error
}

// ResyncPolicies programs every VM's policies again from scratch (after a
// foreign change to the policy tables: an operator's nft command that
// flushed a chain or deleted a table), and logs that it did.
func (m *Manager) ResyncPolicies(ctx context.Context) error {
	r, ok := m.opt.Policy.(PolicyResyncer)
	if !ok {
		return m.ReconcilePolicies(ctx)
	}
	if err := m.reconcilePolicies(ctx, r.Resync); err != nil {
		return err
	}
	m.log.Warn("repaired security policy drift: every policy programmed again")
	return nil
}

// ReconcilePolicies makes the kernel hold exactly the policies of the VMs
// that exist.
func (m *Manager) ReconcilePolicies(ctx context.Context) error {
	if m.opt.Policy == nil {
		return nil
	}
	return m.reconcilePolicies(ctx, m.opt.Policy.Apply)
}

func (m *Manager) reconcilePolicies(ctx context.Context, apply func(context.Context, []secpolicy.NICPolicy) error) error {
	all, err := m.opt.Store.ListVMs(ctx)
	if err != nil {
		return err
	}
	groups, err := m.groupMembers(ctx)
	if err != nil {
		return err
	}
	var desired []secpolicy.NICPolicy
	for _, row := range all {
		if row.State == store.StateDeleting || row.State == store.StateCreating {
			continue
		}
		plans, err := m.Policies(ctx, row, nil, groups)
		if err != nil {
			m.log.Error("build security policy", "vm_id", row.ID, "err", err)
			continue
		}
		desired = append(desired, plans...)
	}
	if err := apply(ctx, desired); err != nil {
		return err
	}
	for g, addrs := range groups {
		if err := m.opt.Policy.SetGroupMembers(ctx, g, addrs); err != nil {
			return err
		}
	}
	return nil
}

// Shaper applies a port's bandwidth (Mbit/s) and packet-rate (packets/s)
// limits in both directions; zero removes a limit.
type Shaper interface {
	ApplyLimits(hostDev string, mbps, pps uint32) error
	RemoveLimits(hostDev string) error
}

// applyLimits sets every NIC's limits from its security policy.
func (m *Manager) applyLimits(row *store.VM, cfg *vmv1.VmConfig) error {
	if m.opt.Shaper == nil {
		return nil
	}
	for i, n := range row.NICs {
		if i >= len(cfg.GetNetwork()) {
			break
		}
		sp := cfg.GetNetwork()[i].GetSecurityPolicy()
		if err := m.opt.Shaper.ApplyLimits(n.HostDevice, sp.GetBandwidthLimitMbps(), sp.GetPacketRateLimit()); err != nil {
			return fmt.Errorf("apply limits to %s: %w", n.HostDevice, err)
		}
	}
	return nil
}

// removeLimits removes every NIC's limits.
func (m *Manager) removeLimits(nics []store.NIC) error {
	if m.opt.Shaper == nil {
		return nil
	}
	var errs []error
	for _, n := range nics {
		if err := m.opt.Shaper.RemoveLimits(n.HostDevice); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// usesGroups reports whether a config names security groups, in its
// profile or in sg: rule endpoints.
func usesGroups(cfg *vmv1.VmConfig) bool {
	if len(cfg.GetSecurityProfile().GetSecurityGroups()) > 0 {
		return true
	}
	for _, n := range cfg.GetNetwork() {
		for _, r := range append(slices.Clone(n.GetSecurityPolicy().GetIngressRules()), n.GetSecurityPolicy().GetEgressRules()...) {
			if strings.Contains(r, "sg:") {
				return true
			}
		}
	}
	return false
}

// PrivacyDevices returns the host devices of the NICs whose guests use
// privacy extensions (temporary addresses), of VMs that are neither being
// created nor deleted.
func (m *Manager) PrivacyDevices(ctx context.Context) ([]string, error) {
	all, err := m.opt.Store.ListVMs(ctx)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, row := range all {
		if row.State == store.StateCreating || row.State == store.StateDeleting {
			continue
		}
		cfg, err := decodeConfig(row)
		if err != nil {
			continue
		}
		for i, n := range row.NICs {
			if i < len(cfg.GetNetwork()) && cfg.GetNetwork()[i].GetIpv6().GetEnablePrivacyExtensions() && n.HostDevice != "" {
				out = append(out, n.HostDevice)
			}
		}
	}
	return out, nil
}
