package daemon

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// CutFlows deletes the host namespace's conntrack entries whose original
// source or destination is one of addrs (vm.FlowCutter): IsolateVm uses it
// so that connections opened before the quarantine are judged by it too.
func (p ports) CutFlows(addrs []netip.Addr) error {
	if len(addrs) == 0 {
		return nil
	}
	h, err := netlink.NewHandleAt(netns.NsHandle(p.hostFd), unix.NETLINK_NETFILTER)
	if err != nil {
		return fmt.Errorf("open conntrack handle: %w", err)
	}
	defer h.Close()
	var filters []netlink.CustomConntrackFilter
	for _, a := range addrs {
		for _, tp := range []netlink.ConntrackFilterType{netlink.ConntrackOrigSrcIP, netlink.ConntrackOrigDstIP} {
			f := &netlink.ConntrackFilter{}
			if err := f.AddIP(tp, a.AsSlice()); err != nil {
				return err
			}
			filters = append(filters, f)
		}
	}
	if _, err := h.ConntrackDeleteFilters(netlink.ConntrackTable, unix.AF_INET6, filters...); err != nil {
		return fmt.Errorf("delete conntrack entries: %w", err)
	}
	return nil
}
