package network

// Control names a security control as it appears in counter names, rule
// comments and metric labels.
type Control string

// Controls counted per NIC. Every NIC has a named counter for each of them,
// whether or not the control is enabled, so the set of counters is stable.
const (
	CtlMACSpoof      Control = "mac_spoof"      // frame from another source MAC
	CtlL2Violation   Control = "l2_violation"   // VLAN/QinQ tag or non-IPv6 ethertype
	CtlHeaderChain   Control = "header_chain"   // first fragment without the upper-layer header (RFC 7112)
	CtlSourceGuard   Control = "source_guard"   // unbound IPv6 source or foreign NA target
	CtlNDStrict      Control = "nd_strict"      // ND link-layer option not carrying the VM MAC
	CtlRAGuard       Control = "ra_guard"       // RA/redirect/DHCPv6 server/fragmented ND
	CtlExtHopByHop   Control = "ext_hbh"        // hop-by-hop options header
	CtlExtRouting    Control = "ext_routing"    // routing header
	CtlExtFragment   Control = "ext_fragment"   // fragment header
	CtlExtDestOpts   Control = "ext_dstopts"    // destination options header
	CtlNDRate        Control = "nd_rate"        // NS/NA over nd_rate_limit
	CtlICMPv6Rate    Control = "icmpv6_rate"    // ICMPv6 over icmpv6_rate_limit
	CtlMulticastRate Control = "multicast_rate" // multicast over multicast_rate_limit
	CtlRARate        Control = "ra_rate"        // RAs toward the VM over ra_rate_limit
	CtlVLAN          Control = "vlan"           // frame from a VM port of another VLAN (counted on the receiving port)
)

// AllControls lists every counted control in a fixed order.
var AllControls = []Control{
	CtlMACSpoof, CtlL2Violation, CtlHeaderChain, CtlSourceGuard, CtlNDStrict,
	CtlRAGuard, CtlExtHopByHop, CtlExtRouting, CtlExtFragment, CtlExtDestOpts,
	CtlNDRate, CtlICMPv6Rate, CtlMulticastRate, CtlRARate, CtlVLAN,
}

// Names are the kernel object names derived from a host device. They are a
// pure function of the device name so a NIC's objects can be found (and
// installed) before the device exists.
type Names struct {
	HostDevice string
}

// NamesFor returns the names of hostDev's objects.
func NamesFor(hostDev string) Names { return Names{HostDevice: hostDev} }

// Every name ends in "-<suffix>" where the suffix contains no '-', and host
// devices are restricted by ValidHostDevice, so names of different NICs
// never collide (the suffix and the prefix each identify one side).

// FromChain is the per-NIC chain for frames from the VM ("vm-<dev>-out"),
// reached through the from-VM verdict map.
func (n Names) FromChain() string { return "vm-" + n.HostDevice + "-out" }

// ToChain is the per-NIC chain for frames toward the VM ("vm-<dev>-in").
func (n Names) ToChain() string { return "vm-" + n.HostDevice + "-in" }

// FromSub names a helper chain of the from-VM chain; part has no '-'.
func (n Names) FromSub(part string) string { return n.FromChain() + "_" + part }

// ToSub names a helper chain of the to-VM chain; part has no '-'.
func (n Names) ToSub(part string) string { return n.ToChain() + "_" + part }

// AddrSet names the set of the NIC's bound addresses.
func (n Names) AddrSet() string { return n.HostDevice + "-addrs" }

// RASourceSet names the set of allowed RA sources toward the NIC.
func (n Names) RASourceSet() string { return n.HostDevice + "-ra_src" }

// TempSet names the dynamic set of temporary (privacy) addresses learned
// for the NIC.
func (n Names) TempSet() string { return n.HostDevice + "-temp" }

// RAMACSet names the set of allowed RA source MACs toward the NIC.
func (n Names) RAMACSet() string { return n.HostDevice + "-ra_mac" }

// Counter names the NIC's counter for control c.
func (n Names) Counter(c Control) string { return n.HostDevice + "-" + string(c) }
