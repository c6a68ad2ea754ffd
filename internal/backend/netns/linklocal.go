package netns

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
)

// GuestLinkLocal returns the link-local address of the guest's NIC nicID.
// With stable privacy (RFC 7217) the guest derives it from its secret, not
// from the MAC, so the first-hop source guard learns it here after boot.
func (b *Backend) GuestLinkLocal(vmID, nicID string) (netip.Addr, error) {
	f, err := b.openVM(vmID)
	if err != nil {
		return netip.Addr{}, err
	}
	defer f.Close()
	var ll netip.Addr
	err = inNetns(int(f.Fd()), func(h *netlink.Handle) error {
		l, err := h.LinkByName(nicID)
		if err != nil {
			return fmt.Errorf("guest link %s: %w", nicID, err)
		}
		addrs, err := h.AddrList(l, netlink.FAMILY_V6)
		if err != nil {
			return fmt.Errorf("guest addresses of %s: %w", nicID, err)
		}
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.IsLinkLocalUnicast() {
				ll = ip
				return nil
			}
		}
		return nil
	})
	return ll, err
}
