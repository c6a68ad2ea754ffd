package netns

import (
	"encoding/binary"
	"fmt"
	"strconv"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// IPv6 per-interface settings by their index in IFLA_INET6_CONF (the
// kernel's DEVCONF_* enumeration, include/uapi/linux/ipv6.h).
var devconfIndex = map[string]int{
	"use_tempaddr":   10, // DEVCONF_USE_TEMPADDR
	"temp_valid_lft": 11, // DEVCONF_TEMP_VALID_LFT
	"disable_ipv6":   26, // DEVCONF_DISABLE_IPV6
}

// inet6Conf reads the IPv6 settings of the link with index ifindex in the
// calling thread's namespace over rtnetlink: the values /proc/sys/net/ipv6
// /conf/<dev> shows, without the /proc/sys/net/ipv6 lookup whose cost grows
// with the number of namespaces on the host.
func inet6Conf(ifindex int) ([]int32, error) {
	req := nl.NewNetlinkRequest(unix.RTM_GETLINK, unix.NLM_F_ACK)
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Index = int32(ifindex)
	req.AddData(msg)
	msgs, err := req.Execute(unix.NETLINK_ROUTE, unix.RTM_NEWLINK)
	if err != nil {
		return nil, fmt.Errorf("read link %d: %w", ifindex, err)
	}
	for _, m := range msgs {
		if len(m) < unix.SizeofIfInfomsg {
			continue
		}
		attrs, err := nl.ParseRouteAttr(m[unix.SizeofIfInfomsg:])
		if err != nil {
			return nil, err
		}
		for _, a := range attrs {
			if a.Attr.Type&^unix.NLA_F_NESTED != unix.IFLA_AF_SPEC {
				continue
			}
			afs, err := nl.ParseRouteAttr(a.Value)
			if err != nil {
				return nil, err
			}
			for _, af := range afs {
				if af.Attr.Type&^unix.NLA_F_NESTED != unix.AF_INET6 {
					continue
				}
				in6, err := nl.ParseRouteAttr(af.Value)
				if err != nil {
					return nil, err
				}
				for _, c := range in6 {
					if c.Attr.Type&^unix.NLA_F_NESTED != unix.IFLA_INET6_CONF {
						continue
					}
					conf := make([]int32, len(c.Value)/4)
					for i := range conf {
						conf[i] = int32(binary.NativeEndian.Uint32(c.Value[4*i:]))
					}
					return conf, nil
				}
			}
		}
	}
	return nil, fmt.Errorf("link %d: no IPv6 settings in its description", ifindex)
}

// changedSysctls drops from kv the settings conf (inet6Conf) already has.
// Settings conf does not carry (stable_secret) are kept.
func changedSysctls(conf []int32, kv [][2]string) [][2]string {
	var out [][2]string
	for _, p := range kv {
		if i, ok := devconfIndex[p[0]]; ok && i < len(conf) && strconv.Itoa(int(conf[i])) == p[1] {
			continue
		}
		out = append(out, p)
	}
	return out
}
