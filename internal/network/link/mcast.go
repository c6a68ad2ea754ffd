package link

import (
	"fmt"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Multicast snooping limits.
const (
	// DefaultPortMaxGroups bounds the multicast groups one VM port may hold
	// in the bridge's MDB (IFLA_BRPORT_MCAST_MAX_GROUPS, Linux 6.3+). A
	// report beyond it is not learned for that port; nothing else changes.
	DefaultPortMaxGroups = 256
	// SnoopingHashMax is the bridge's MDB size (IFLA_BR_MCAST_HASH_MAX).
	// When the MDB reaches hash_max the kernel turns snooping off for the
	// whole bridge ("Multicast hash table maximum ... reached, disabling
	// snooping"), so it must stay above ports x DefaultPortMaxGroups plus
	// the host's own groups: 65536 covers 255 fully-subscribed ports, and
	// the per-port limit keeps one VM from using more than its share.
	SnoopingHashMax = 65536
)

// EnsureMulticastSnooping turns MLD snooping, and the bridge's MLD querier,
// on or off for bridge (a bridge-wide setting: it applies to every port).
// Turning it on also raises hash_max to SnoopingHashMax. Idempotent.
func (m *Manager) EnsureMulticastSnooping(bridge string, on bool) error {
	l, err := m.byName(bridge)
	if err != nil {
		return fmt.Errorf("set multicast snooping of %s: %w", bridge, err)
	}
	if _, ok := l.(*netlink.Bridge); !ok {
		return fmt.Errorf("set multicast snooping of %s: %w", bridge, ErrNotBridge)
	}
	v := uint8(0)
	if on {
		v = 1
	}
	attrs := []*nl.RtAttr{
		nl.NewRtAttr(unix.IFLA_BR_MCAST_SNOOPING, nl.Uint8Attr(v)),
		nl.NewRtAttr(unix.IFLA_BR_MCAST_QUERIER, nl.Uint8Attr(v)),
	}
	if on {
		attrs = append(attrs, nl.NewRtAttr(unix.IFLA_BR_MCAST_HASH_MAX, nl.Uint32Attr(SnoopingHashMax)))
	}
	if err := m.setBridgeAttrs(l.Attrs().Index, attrs); err != nil {
		return fmt.Errorf("set multicast snooping of %s: %w", bridge, err)
	}
	return nil
}

// MulticastSnooping reports whether snooping is on for bridge (the kernel
// switches it off by itself when the MDB overflows).
func (m *Manager) MulticastSnooping(bridge string) (bool, error) {
	l, err := m.byName(bridge)
	if err != nil {
		return false, err
	}
	br, ok := l.(*netlink.Bridge)
	if !ok {
		return false, fmt.Errorf("read multicast snooping of %s: %w", bridge, ErrNotBridge)
	}
	return br.MulticastSnooping != nil && *br.MulticastSnooping, nil
}

// SetPortMulticastMaxGroups limits the MDB entries bridge port dev may
// hold (0 = unlimited). Returns an error on kernels before 6.3, which do
// not know the attribute.
func (m *Manager) SetPortMulticastMaxGroups(dev string, max uint32) error {
	l, err := m.byName(dev)
	if err != nil {
		return fmt.Errorf("set multicast max groups of %s: %w", dev, err)
	}
	err = m.th.Run(func() error {
		req := nl.NewNetlinkRequest(unix.RTM_SETLINK, unix.NLM_F_ACK)
		msg := nl.NewIfInfomsg(unix.AF_BRIDGE)
		msg.Index = int32(l.Attrs().Index)
		req.AddData(msg)
		pi := nl.NewRtAttr(unix.IFLA_PROTINFO|unix.NLA_F_NESTED, nil)
		pi.AddRtAttr(unix.IFLA_BRPORT_MCAST_MAX_GROUPS, nl.Uint32Attr(max))
		req.AddData(pi)
		_, err := req.Execute(unix.NETLINK_ROUTE, 0)
		return err
	})
	if err != nil {
		return fmt.Errorf("set multicast max groups of %s: %w", dev, err)
	}
	return nil
}

// setBridgeAttrs changes IFLA_BR_* attributes of the bridge at index.
func (m *Manager) setBridgeAttrs(index int, attrs []*nl.RtAttr) error {
	return m.th.Run(func() error {
		req := nl.NewNetlinkRequest(unix.RTM_NEWLINK, unix.NLM_F_ACK)
		msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
		msg.Index = int32(index)
		req.AddData(msg)
		li := nl.NewRtAttr(unix.IFLA_LINKINFO, nil)
		li.AddRtAttr(nl.IFLA_INFO_KIND, nl.NonZeroTerminated("bridge"))
		data := li.AddRtAttr(nl.IFLA_INFO_DATA, nil)
		for _, a := range attrs {
			data.AddChild(a)
		}
		req.AddData(li)
		_, err := req.Execute(unix.NETLINK_ROUTE, 0)
		return err
	})
}
