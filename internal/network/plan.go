// Package network owns the desired network state of every VM NIC on a host:
// a pure, validated plan (addresses, MAC, first-hop security controls) from
// which the nft and link reconcilers derive kernel state, and the
// deterministic names (chains, sets, counters) that state is kept under.
package network

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// ErrInvalidPlan reports a NIC plan that cannot be programmed.
var ErrInvalidPlan = errors.New("invalid nic plan")

// Controls are the IPv6 first-hop security controls of one NIC (the seed's
// ipv6.security block, after profile defaults have been applied).
type Controls struct {
	// RAGuard drops RAs, redirects and DHCPv6 server messages sent by the
	// VM, fragmented ND, and, toward the VM, RAs/redirects from anyone not
	// in AllowedRASources (and AllowedRAMACs when set).
	RAGuard bool
	// AllowedRASources are the router addresses whose RAs may reach the VM.
	// RAs are sent from link-local addresses (RFC 4861 6.1.2), so the
	// caller adds the router's link-local address next to its global one.
	AllowedRASources []netip.Addr
	// AllowedRAMACs, when not empty, further restricts RAs toward the VM
	// to these source MACs (a router metald owns, e.g. the bridge).
	AllowedRAMACs []net.HardwareAddr
	// SourceGuard: the VM may send only from its bound addresses
	// (Addresses, LinkLocal, :: for DAD and MLD) and NA targets must be its own.
	SourceGuard bool
	// StrictSourceValidation: the link-layer address options of NS, NA and
	// RS must carry the VM's MAC; ND with extension headers is refused.
	StrictSourceValidation bool
	BlockHopByHop          bool
	BlockRouting           bool
	BlockFragment          bool
	BlockDestOpts          bool
	// Rate limits in packets per second; 0 disables the limit.
	NDRateLimit        uint32 // NS/NA from the VM
	ICMPv6RateLimit    uint32 // all ICMPv6 from the VM
	RARateLimit        uint32 // RAs toward the VM
	MulticastRateLimit uint32 // multicast frames (33:33:*) from the VM
	// MLDSnooping exempts MLD reports/done (link-local or :: source, hop
	// limit 1) from BlockHopByHop: they carry a Router Alert option.
	MLDSnooping bool
	// PrivacyExtensions: temporary addresses (RFC 8981) inside the /64 of
	// one of Addresses are bound to the port, first come first served
	// (RFC 6620), when the VM performs DAD for them (NS from :: with the
	// address as target): for TempValidLifetime, in kernel sets filled
	// from the packet path. An address another port holds is not bound
	// (the DAD NS still passes, so the holder defends it) and traffic
	// from it is refused by SourceGuard.
	PrivacyExtensions bool
	// TempValidLifetime is how long a learned address stays bound
	// (default DefaultTempValidLifetime).
	TempValidLifetime time.Duration
}

// DefaultTempValidLifetime is RFC 8981's default TEMP_VALID_LIFETIME.
const DefaultTempValidLifetime = 48 * time.Hour

// PrivacyPrefixes returns the distinct /64 prefixes of the NIC's global
// addresses: the prefixes inside which temporary addresses are learned.
func (n NICPlan) PrivacyPrefixes() []netip.Prefix {
	var out []netip.Prefix
	for _, a := range n.Addresses {
		if a.IsLinkLocalUnicast() {
			continue
		}
		p, err := a.Prefix(64)
		if err == nil && !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return out
}

// NICPlan is the desired state of one VM NIC on this host.
type NICPlan struct {
	VMID       string
	TenantID   string
	NICID      string
	HostDevice string // tap or veth on the host side, the bridge port
	MAC        net.HardwareAddr
	// Addresses are the global addresses bound to the NIC.
	Addresses []netip.Addr
	// Gateway is the NIC's default router when it is a global address (the
	// address metald puts on the bridge, or another router's): privacy
	// learning never binds it to the port (zero: none).
	Gateway netip.Addr
	// LinkLocal is the VM's link-local address; zero means the EUI-64
	// address derived from MAC.
	LinkLocal netip.Addr
	Controls  Controls
	VLAN      uint16
	// Monitor: the NIC's tenant is under enhanced monitoring; counted
	// drops log up to 1000 packets/s per rule instead of 10 (see
	// nft.LogPrefix).
	Monitor bool
	// Pending: the NIC's VM is being created. A reconcile neither repairs
	// nor removes its objects: the create programs them and a failed
	// create's rollback removes them (a repair racing the rollback would
	// leave rules of a VM that does not exist).
	Pending bool
}

// Plan is the desired state of every VM NIC on a host.
type Plan struct {
	NICs []NICPlan
}

// Validate checks every NIC and that host devices are unique.
func (p Plan) Validate() error {
	seen := map[string]bool{}
	for _, n := range p.NICs {
		if err := n.Validate(); err != nil {
			return err
		}
		if seen[n.HostDevice] {
			return fmt.Errorf("%w: host device %q used twice", ErrInvalidPlan, n.HostDevice)
		}
		seen[n.HostDevice] = true
	}
	return nil
}

// Sorted returns the NICs ordered by host device.
func (p Plan) Sorted() []NICPlan {
	out := slices.Clone(p.NICs)
	slices.SortFunc(out, func(a, b NICPlan) int { return strings.Compare(a.HostDevice, b.HostDevice) })
	return out
}

// ValidHostDevice reports whether name can be a host device that metald
// programs: a Linux interface name (1-15 bytes) restricted to characters
// that are safe in nftables identifiers.
func ValidHostDevice(name string) bool {
	if len(name) == 0 || len(name) > 15 {
		return false
	}
	for _, c := range name {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_', c == '.':
		default:
			return false
		}
	}
	return name[0] != '-' && name[0] != '.'
}

// Validate reports whether the NIC plan can be programmed.
func (n NICPlan) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: nic %q: %s", ErrInvalidPlan, n.HostDevice, fmt.Sprintf(format, a...))
	}
	if !ValidHostDevice(n.HostDevice) {
		return bad("host device name not valid")
	}
	if len(n.MAC) != 6 {
		return bad("mac %q is not 48 bits", n.MAC)
	}
	if n.MAC[0]&1 != 0 {
		return bad("mac %s is multicast", n.MAC)
	}
	if n.LinkLocal.IsValid() && (!n.LinkLocal.Is6() || !n.LinkLocal.IsLinkLocalUnicast() || n.LinkLocal.Zone() != "") {
		return bad("link-local %s is not an IPv6 link-local address", n.LinkLocal)
	}
	for _, a := range n.Addresses {
		if !a.Is6() || a.Is4In6() || a.IsUnspecified() || a.IsMulticast() || a.Zone() != "" {
			return bad("address %s cannot be bound to a nic", a)
		}
	}
	for _, a := range n.Controls.AllowedRASources {
		if !a.Is6() || a.IsUnspecified() || a.IsMulticast() || a.Zone() != "" {
			return bad("allowed ra source %s is not an IPv6 unicast address", a)
		}
	}
	for _, m := range n.Controls.AllowedRAMACs {
		if len(m) != 6 {
			return bad("allowed ra mac %q is not 48 bits", m)
		}
	}
	if n.Controls.TempValidLifetime < 0 {
		return bad("temp valid lifetime %v is negative", n.Controls.TempValidLifetime)
	}
	if n.VLAN > 4094 {
		return bad("vlan %d out of range", n.VLAN)
	}
	return nil
}

// EffectiveLinkLocal returns LinkLocal or, when unset, the EUI-64
// link-local address of the MAC (RFC 4291 appendix A).
func (n NICPlan) EffectiveLinkLocal() netip.Addr {
	if n.LinkLocal.IsValid() {
		return n.LinkLocal
	}
	return EUI64LinkLocal(n.MAC)
}

// BoundAddresses returns the addresses the VM may use as IPv6 source and
// NA target: its global addresses and its link-local, sorted, unique.
func (n NICPlan) BoundAddresses() []netip.Addr {
	out := append(slices.Clone(n.Addresses), n.EffectiveLinkLocal())
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out)
}

// EUI64LinkLocal derives the fe80::/64 modified EUI-64 address of mac.
func EUI64LinkLocal(mac net.HardwareAddr) netip.Addr {
	if len(mac) != 6 {
		return netip.Addr{}
	}
	var b [16]byte
	b[0], b[1] = 0xfe, 0x80
	b[8] = mac[0] ^ 0x02
	b[9], b[10] = mac[1], mac[2]
	b[11], b[12] = 0xff, 0xfe
	b[13], b[14], b[15] = mac[3], mac[4], mac[5]
	return netip.AddrFrom16(b)
}
