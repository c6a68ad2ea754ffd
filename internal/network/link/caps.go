package link

import (
	"sync"

	"github.com/vishvananda/netlink"

	"github.com/metald/metald/internal/network/ns"
)

var vlanProbe struct {
	once sync.Once
	ok   bool
}

// VLANFilteringSupported reports whether the kernel can do bridge VLAN
// filtering. It creates a probe bridge with vlan_filtering=1 in a
// throwaway network namespace (never touching the host's links); kernels
// built without CONFIG_BRIDGE_VLAN_FILTERING refuse the attribute. The
// answer is computed once per process. Use network.VLANModeFor to turn it
// into the mode reported in GetVm.
func VLANFilteringSupported() bool {
	vlanProbe.once.Do(func() { vlanProbe.ok = probeVLANFiltering() })
	return vlanProbe.ok
}

func probeVLANFiltering() bool {
	f, err := ns.New()
	if err != nil {
		return false
	}
	defer f.Close()
	h, err := HandleAt(int(f.Fd()))
	if err != nil {
		return false
	}
	defer h.Close()
	on := true
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "vlanprobe0"}, VlanFiltering: &on}
	if err := h.LinkAdd(br); err != nil {
		return false
	}
	l, err := h.LinkByName("vlanprobe0")
	if err != nil {
		return false
	}
	b, ok := l.(*netlink.Bridge)
	return ok && b.VlanFiltering != nil && *b.VlanFiltering
}
