package vm

import (
	"fmt"

	vmv1 "github.com/metald/metald/internal/gen/vmprovisioner/v1"
	"github.com/metald/metald/internal/store"
)

// Capabilities says which enforcement mechanisms this host has, so GetVm
// never claims a protection that is not in force.
type Capabilities struct {
	// Firewall is true when first-hop rules are programmed (nftables).
	Firewall bool
	// VLANMode is "kernel" (bridge VLAN filtering) or "nftables" (port
	// groups) when VLAN separation is enforced, "" when it is not.
	VLANMode string
	// VLANReason explains why VLAN separation is not enforced.
	VLANReason string
	// BridgeSnooping is true when metald turns on MLD snooping and a
	// querier on bridges whose NICs ask for it.
	BridgeSnooping bool
	// Policy is true when security policies are programmed (table ip6
	// metald_security).
	Policy bool
	// Limits is true when bandwidth and packet-rate limits are applied.
	Limits bool
}

const (
	statusEnforced    = "enforced"
	statusNotEnforced = "not_enforced"
	statusOff         = "off"
)

// ControlStatuses reports, per first-hop control of one NIC, whether it is
// enforced on this host.
func ControlStatuses(sec *vmv1.Ipv6Security, nic store.NIC, caps Capabilities) []*vmv1.ControlStatus {
	var out []*vmv1.ControlStatus
	add := func(control string, on bool, scope string, notReason string) {
		st := &vmv1.ControlStatus{Control: control, Scope: scope, Status: statusOff}
		switch {
		case !on:
		case !caps.Firewall:
			st.Status, st.Reason = statusNotEnforced, "this host programs no first-hop rules (nftables unavailable)"
		case notReason != "":
			st.Status, st.Reason = statusNotEnforced, notReason
		default:
			st.Status = statusEnforced
		}
		out = append(out, st)
	}
	rate := func(control string, v uint32) {
		st := &vmv1.ControlStatus{Control: control, Scope: "port", Status: statusOff}
		if v > 0 {
			st.Status = statusEnforced
			st.Reason = fmt.Sprintf("%d packets per second", v)
			if !caps.Firewall {
				st.Status, st.Reason = statusNotEnforced, "this host programs no first-hop rules (nftables unavailable)"
			}
		}
		out = append(out, st)
	}
	add("enable_ra_guard", sec.GetEnableRaGuard(), "port", "")
	add("enable_source_guard", sec.GetEnableSourceGuard(), "port", "")
	add("strict_source_validation", sec.GetStrictSourceValidation(), "port", "")
	add("block_hop_by_hop", sec.GetBlockHopByHop(), "port", "")
	add("block_routing_header", sec.GetBlockRoutingHeader(), "port", "")
	add("block_fragment_header", sec.GetBlockFragmentHeader(), "port", "")
	add("block_destination_options", sec.GetBlockDestinationOptions(), "port", "")
	rate("nd_rate_limit", sec.GetNdRateLimit())
	rate("icmpv6_rate_limit", sec.GetIcmpv6RateLimit())
	rate("ra_rate_limit", sec.GetRaRateLimit())
	rate("multicast_rate_limit", sec.GetMulticastRateLimit())
	snoop := ""
	if !caps.BridgeSnooping {
		snoop = "MLD messages pass the hop-by-hop block, but metald does not yet turn on multicast snooping and a querier on the bridge"
	}
	add("enable_mld_snooping", sec.GetEnableMldSnooping(), "bridge", snoop)
	vlan := ""
	if caps.VLANMode == "" {
		vlan = caps.VLANReason
		if vlan == "" {
			vlan = "VLAN separation is not enforced on this host"
		}
	}
	add("vlan_id", nic.VLAN != "", "port", vlan)
	return out
}

// VLANMode is how a NIC's VLAN is enforced: "none" when untagged.
func VLANMode(nic store.NIC, caps Capabilities) string {
	switch {
	case nic.VLAN == "":
		return "none"
	case caps.VLANMode == "":
		return "not_enforced"
	}
	return caps.VLANMode
}
