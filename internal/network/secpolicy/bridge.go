package secpolicy

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/metald/metald/internal/network/ns"
)

// SysctlBridgeCallIP6 is the per-namespace br_netfilter switch.
const SysctlBridgeCallIP6 = "net/bridge/bridge-nf-call-ip6tables"

// ErrNoBridgeNetfilter reports a kernel without br_netfilter: bridged IPv6
// never reaches the ip6 hooks, so the table cannot see traffic between VMs
// on one bridge.
var ErrNoBridgeNetfilter = errors.New("br_netfilter not available")

// EnsureBridgeNetfilter makes bridged IPv6 on bridge visible to the ip6
// hooks of the namespace open at hostNS: it sets
// net.bridge.bridge-nf-call-ip6tables=1 in that namespace and the bridge's
// own nf_call_ip6tables=1.
//
// The per-bridge flag is set over rtnetlink (IFLA_BR_NF_CALL_IP6TABLES)
// rather than /sys/class/net/<br>/bridge/nf_call_ip6tables: sysfs shows the
// devices of the namespace it was mounted in, not of the thread's network
// namespace, so the sysfs path would miss (or hit the wrong) bridge from
// inside ns.Do.
func EnsureBridgeNetfilter(hostNS int, bridge string) error {
	if err := ns.WriteSysctl(hostNS, SysctlBridgeCallIP6, "1"); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return ErrNoBridgeNetfilter
		}
		return fmt.Errorf("enable %s: %w", SysctlBridgeCallIP6, err)
	}
	return ns.Do(hostNS, func() error {
		l, err := netlink.LinkByName(bridge)
		if err != nil {
			return fmt.Errorf("find bridge %s: %w", bridge, err)
		}
		if l.Type() != "bridge" {
			return fmt.Errorf("%s is a %s, not a bridge", bridge, l.Type())
		}
		req := nl.NewNetlinkRequest(unix.RTM_NEWLINK, unix.NLM_F_ACK)
		msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
		msg.Index = int32(l.Attrs().Index)
		req.AddData(msg)
		info := nl.NewRtAttr(unix.IFLA_LINKINFO, nil)
		info.AddRtAttr(nl.IFLA_INFO_KIND, nl.NonZeroTerminated("bridge"))
		data := info.AddRtAttr(nl.IFLA_INFO_DATA, nil)
		data.AddRtAttr(unix.IFLA_BR_NF_CALL_IP6TABLES, []byte{1})
		req.AddData(info)
		if _, err := req.Execute(unix.NETLINK_ROUTE, 0); err != nil {
			return fmt.Errorf("set nf_call_ip6tables on %s: %w", bridge, err)
		}
		return nil
	})
}

// BridgeStatus says whether bridged IPv6 on a bridge reaches the ip6 hooks.
type BridgeStatus struct {
	// Visible is true when the table sees bridged traffic at L3.
	Visible bool
	// Reason explains Visible == false.
	Reason string
}

// BridgeNetfilterStatus reports whether bridged IPv6 on bridge is visible
// to the ip6 hooks in the namespace open at hostNS.
func BridgeNetfilterStatus(hostNS int, bridge string) (BridgeStatus, error) {
	v, err := ns.ReadSysctl(hostNS, SysctlBridgeCallIP6)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return BridgeStatus{Reason: "kernel has no br_netfilter"}, nil
		}
		return BridgeStatus{}, err
	}
	if strings.TrimSpace(v) != "1" {
		return BridgeStatus{Reason: SysctlBridgeCallIP6 + " is " + v}, nil
	}
	var on bool
	err = ns.Do(hostNS, func() error {
		l, err := netlink.LinkByName(bridge)
		if err != nil {
			return fmt.Errorf("find bridge %s: %w", bridge, err)
		}
		req := nl.NewNetlinkRequest(unix.RTM_GETLINK, unix.NLM_F_ACK)
		msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
		msg.Index = int32(l.Attrs().Index)
		req.AddData(msg)
		msgs, err := req.Execute(unix.NETLINK_ROUTE, unix.RTM_NEWLINK)
		if err != nil {
			return err
		}
		for _, m := range msgs {
			attrs, err := nl.ParseRouteAttr(m[unix.SizeofIfInfomsg:])
			if err != nil {
				return err
			}
			for _, a := range attrs {
				if a.Attr.Type != unix.IFLA_LINKINFO {
					continue
				}
				infos, err := nl.ParseRouteAttr(a.Value)
				if err != nil {
					return err
				}
				for _, i := range infos {
					if i.Attr.Type != nl.IFLA_INFO_DATA {
						continue
					}
					data, err := nl.ParseRouteAttr(i.Value)
					if err != nil {
						return err
					}
					for _, d := range data {
						if d.Attr.Type == unix.IFLA_BR_NF_CALL_IP6TABLES && len(d.Value) > 0 {
							on = d.Value[0] == 1
						}
					}
				}
			}
		}
		return nil
	})
	if err != nil {
		return BridgeStatus{}, err
	}
	if !on {
		return BridgeStatus{Reason: "bridge " + bridge + " has nf_call_ip6tables off"}, nil
	}
	return BridgeStatus{Visible: true}, nil
}
