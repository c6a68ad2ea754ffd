package link

import (
	"fmt"
	"os"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Host is a VM backend's own handles in the host network namespace: a
// duplicate of the namespace file (the caller may close its own), a route
// netlink handle in it, and a link manager (the caller's, or one Host
// built and owns).
type Host struct {
	NS       *os.File
	H        *netlink.Handle
	Links    *Manager
	ownLinks bool
}

// OpenHost opens the handles for the namespace open at ns, using links
// when it is not nil.
func OpenHost(ns *os.File, links *Manager) (*Host, error) {
	fd, err := unix.FcntlInt(ns.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("duplicate host namespace: %w", err)
	}
	h := &Host{NS: os.NewFile(uintptr(fd), ns.Name()), Links: links}
	if h.H, err = HandleAt(fd); err != nil {
		h.NS.Close()
		return nil, err
	}
	if h.Links == nil {
		if h.Links, err = New(h.NS); err != nil {
			h.H.Close()
			h.NS.Close()
			return nil, err
		}
		h.ownLinks = true
	}
	return h, nil
}

// Close releases the handles (and the link manager OpenHost built).
func (h *Host) Close() {
	if h.ownLinks {
		h.Links.Close()
	}
	h.H.Close()
	h.NS.Close()
}
