package vm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	vmv1 "github.com/metald/metald/internal/gen/vmprovisioner/v1"
	"github.com/metald/metald/internal/network"
	"github.com/metald/metald/internal/store"
)

// Firewall programs each VM port's first-hop security rules. Rules are
// keyed on the host device name, so they are in place before the port
// exists: a port never passes a frame unfiltered.
type Firewall interface {
	// AddNIC installs or replaces one NIC's rules in one kernel
	// transaction.
	AddNIC(plan network.NICPlan) error
	// RemoveNIC removes one NIC's rules; absent is not an error.
	RemoveNIC(hostDev string) error
	// Reconcile makes the kernel match the desired NICs (from list, called
	// only when a comparison is needed), removing rules of NICs not listed,
	// and reports what it had to repair. It must not remove or rewrite a
	// NIC programmed after list was called.
	Reconcile(ctx context.Context, list func(context.Context) ([]network.NICPlan, error)) (repaired []string, err error)
}

// Router tells which link-local address and MAC a bridge uses when it acts
// as the VMs' router (metald put the gateway address on it).
type Router interface {
	BridgeRouter(bridge string) (mac net.HardwareAddr, linkLocal netip.Addr, err error)
}

// Snooper turns on MLD snooping (with a querier) on a bridge and bounds the
// multicast groups one port may hold, so a VM's report flood cannot fill
// the bridge's table and switch snooping off for everyone.
type Snooper interface {
	EnableSnooping(bridge, port string) error
}

// LinkLocalReader is implemented by backends that can read a running
// guest's link-local address (for guests that derive it from a stable
// secret, RFC 7217, rather than from the MAC).
type LinkLocalReader interface {
	GuestLinkLocal(vmID, nicID string) (netip.Addr, error)
}

func decodeConfig(row *store.VM) (*vmv1.VmConfig, error) {
	cfg := &vmv1.VmConfig{}
	if err := protojson.Unmarshal(row.Config, cfg); err != nil {
		return nil, fmt.Errorf("decode stored config of %s: %w", row.ID, err)
	}
	return cfg, nil
}

// Plans returns the first-hop plans of a VM's NICs from its record.
func (m *Manager) Plans(row *store.VM, cfg *vmv1.VmConfig) ([]network.NICPlan, error) {
	if cfg == nil {
		var err error
		if cfg, err = decodeConfig(row); err != nil {
			return nil, err
		}
	}
	parseAddr := m.opt.Validate.ParseAddr
	if parseAddr == nil {
		parseAddr = netip.ParseAddr
	}
	out := make([]network.NICPlan, 0, len(row.NICs))
	for i, n := range row.NICs {
		if i >= len(cfg.GetNetwork()) {
			break
		}
		sec := EffectiveSecurity(cfg, cfg.GetNetwork()[i])
		mac, err := normalMAC(n.MAC)
		if err != nil {
			return nil, err
		}
		p := network.NICPlan{VMID: row.ID, TenantID: row.TenantID, NICID: n.ID, HostDevice: n.HostDevice, MAC: mac}
		if v, err := strconv.Atoi(n.VLAN); err == nil {
			p.VLAN = uint16(v)
		}
		if a, err := netip.ParsePrefix(n.Address); err == nil {
			p.Addresses = []netip.Addr{a.Addr()}
		}
		if gw, err := netip.ParseAddr(n.Gateway); err == nil && !gw.IsLinkLocalUnicast() {
			p.Gateway = gw
		}
		if ll, err := netip.ParseAddr(n.LinkLocal); err == nil {
			p.LinkLocal = ll
		} else if _, reads := m.opt.Backend.(LinkLocalReader); !reads && n.StableSecret != "" {
			// A guest metald cannot look into (a real VM): with stable
			// privacy its link-local address follows from the secret and
			// the virtio NIC's permanent address, its MAC.
			if ll, ok := StableLinkLocal(n.StableSecret, mac); ok {
				p.LinkLocal = ll
			}
		}
		c := network.Controls{
			RAGuard: sec.GetEnableRaGuard(), SourceGuard: sec.GetEnableSourceGuard(), StrictSourceValidation: sec.GetStrictSourceValidation(),
			BlockHopByHop: sec.GetBlockHopByHop(), BlockRouting: sec.GetBlockRoutingHeader(), BlockFragment: sec.GetBlockFragmentHeader(),
			BlockDestOpts: sec.GetBlockDestinationOptions(), NDRateLimit: sec.GetNdRateLimit(), ICMPv6RateLimit: sec.GetIcmpv6RateLimit(),
			RARateLimit: sec.GetRaRateLimit(), MulticastRateLimit: sec.GetMulticastRateLimit(), MLDSnooping: sec.GetEnableMldSnooping(),
		}
		for _, s := range sec.GetAllowedRaSources() {
			a, err := parseAddr(s)
			if err != nil {
				return nil, fmt.Errorf("config.network[%d].ipv6.security.allowed_ra_sources: %w", i, err)
			}
			c.AllowedRASources = append(c.AllowedRASources, a)
		}
		// RAs come from link-local addresses (RFC 4861 6.1.2). When the
		// allowed router is the gateway metald put on the bridge, admit the
		// bridge's own link-local address, and only its MAC.
		if gw, err := netip.ParseAddr(n.Gateway); err == nil && n.GatewayOnBridge && slices.Contains(c.AllowedRASources, gw) && m.opt.Router != nil {
			if brMAC, brLL, err := m.opt.Router.BridgeRouter(n.Bridge); err == nil {
				c.AllowedRASources = append(c.AllowedRASources, brLL)
				if len(c.AllowedRASources) == 2 {
					c.AllowedRAMACs = []net.HardwareAddr{brMAC}
				}
			}
		}
		v6 := cfg.GetNetwork()[i].GetIpv6()
		c.PrivacyExtensions = v6.GetEnablePrivacyExtensions()
		if l := v6.GetTempValidLifetime(); l > 0 {
			c.TempValidLifetime = time.Duration(l) * time.Second
		}
		p.Controls = c
		out = append(out, p)
	}
	return out, nil
}

// installFirewall programs every NIC of a VM.
func (m *Manager) installFirewall(row *store.VM, cfg *vmv1.VmConfig) error {
	if m.opt.Firewall == nil {
		return nil
	}
	plans, err := m.Plans(row, cfg)
	if err != nil {
		return err
	}
	return m.programRules(plans)
}

// programRules programs each NIC's first-hop rules.
func (m *Manager) programRules(plans []network.NICPlan) error {
	for _, p := range plans {
		if err := m.opt.Firewall.AddNIC(p); err != nil {
			return fmt.Errorf("program first-hop rules of %s: %w", p.HostDevice, err)
		}
	}
	return nil
}

// removeFirewall removes every NIC's rules of a VM.
func (m *Manager) removeFirewall(nics []store.NIC) error {
	if m.opt.Firewall == nil {
		return nil
	}
	var errs []error
	for _, n := range nics {
		if err := m.opt.Firewall.RemoveNIC(n.HostDevice); err != nil {
			errs = append(errs, err)
		}
	}
	return joinErrs(errs)
}

// learnLinkLocal reads the booted guest's link-local addresses into the
// NIC records; it reports whether any changed.
func (m *Manager) learnLinkLocal(row *store.VM) bool {
	r, ok := m.opt.Backend.(LinkLocalReader)
	if !ok {
		return false
	}
	changed := false
	for i := range row.NICs {
		n := &row.NICs[i]
		ll, err := r.GuestLinkLocal(row.ID, n.GuestDevice)
		if err != nil || !ll.IsValid() {
			continue
		}
		// Rules need reprogramming only when the address differs from the
		// one already bound (derived from the MAC when none was learned).
		bound := m.linkLocal(*n)
		n.LinkLocal = ll.String()
		if ll != bound {
			changed = true
		}
	}
	return changed
}

// ReconcileFirewall makes the kernel's first-hop rules match every VM's
// desired state, repairing drift (a flushed table, a deleted chain), and
// logs what it repaired.
func (m *Manager) ReconcileFirewall(ctx context.Context) error {
	if m.opt.Firewall == nil {
		return nil
	}
	list := func(ctx context.Context) ([]network.NICPlan, error) {
		all, err := m.opt.Store.ListVMs(ctx)
		if err != nil {
			return nil, err
		}
		var desired []network.NICPlan
		for _, row := range all {
			if row.State == store.StateDeleting {
				continue // its rules go with it
			}
			plans, err := m.Plans(row, nil)
			if err != nil {
				m.log.Error("build first-hop plan", "vm_id", row.ID, "err", err)
				continue
			}
			if row.State == store.StateCreating {
				// The create programs its NICs (or its rollback removes
				// them): left as they are.
				for i := range plans {
					plans[i].Pending = true
				}
			}
			desired = append(desired, plans...)
		}
		return desired, nil
	}
	repaired, err := m.opt.Firewall.Reconcile(ctx, list)
	if len(repaired) > 0 {
		m.log.Warn("repaired first-hop firewall drift", "repairs", repaired)
	}
	return err
}

// enableSnooping turns on snooping for the NICs that ask for it.
func (m *Manager) enableSnooping(row *store.VM, cfg *vmv1.VmConfig) error {
	if m.opt.Snooper == nil {
		return nil
	}
	for i, n := range row.NICs {
		if i < len(cfg.GetNetwork()) && EffectiveSecurity(cfg, cfg.GetNetwork()[i]).GetEnableMldSnooping() {
			if err := m.opt.Snooper.EnableSnooping(n.Bridge, n.HostDevice); err != nil {
				return fmt.Errorf("enable mld snooping on %s: %w", n.Bridge, err)
			}
		}
	}
	return nil
}

// Reprogram programs a VM's first-hop rules and security policy again from
// its stored row, holding the VM's lock, so it never races an update or a
// delete of the same VM. A VM being created or deleted (or already gone)
// is left to that operation. Enhanced monitoring uses it when a session
// starts or ends (the rule owners mark a monitored tenant's plans).
func (m *Manager) Reprogram(ctx context.Context, id string) error {
	unlock := m.lock(id)
	defer unlock()
	row, err := m.opt.Store.GetVM(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if row.State == store.StateCreating || row.State == store.StateDeleting {
		return nil
	}
	cfg, err := decodeConfig(row)
	if err != nil {
		return err
	}
	if err := m.installFirewall(row, cfg); err != nil {
		return err
	}
	return m.installPolicy(ctx, row, cfg)
}
