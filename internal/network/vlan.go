package network

// VLANMode says how VLAN separation (NICPlan.VLAN) between ports of one
// bridge is enforced on a host, for GetVm.
type VLANMode string

const (
	// VLANModeKernel: the bridge's own VLAN filtering (vlan_filtering=1,
	// each port's VLAN as untagged PVID). The nftables separation below is
	// kept as well, as a second layer.
	VLANModeKernel VLANMode = "kernel"
	// VLANModeNFTables: the kernel has no bridge VLAN filtering; metald's
	// bridge table separates the ports: a frame entering from a VM port is
	// marked with that port's VLAN, and the to-VM chain of every port drops
	// marked frames of another VLAN (unicast, multicast and broadcast
	// alike, since the bridge's forward hook runs once per egress port).
	VLANModeNFTables VLANMode = "nftables"
)

// VLANModeFor returns the mode in force given whether the kernel supports
// bridge VLAN filtering (link.VLANFilteringSupported).
func VLANModeFor(kernelFiltering bool) VLANMode {
	if kernelFiltering {
		return VLANModeKernel
	}
	return VLANModeNFTables
}
