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
		// IFLA_AF_SPEC > AF_INET6 > IFLA_INET6_CONF: an s32 per setting.
		b, ok := m[unix.SizeofIfInfomsg:], true
		for _, typ := range []uint16{unix.IFLA_AF_SPEC, unix.AF_INET6, unix.IFLA_INET6_CONF} {
			if b, ok, err = attr(b, typ); err != nil {
				return nil, err
			} else if !ok {
				break
			}
		}
		if !ok {
			continue
		}
		conf := make([]int32, len(b)/4)
		for i := range conf {
			conf[i] = int32(binary.NativeEndian.Uint32(b[4*i:]))
		}
		return conf, nil
	}
	return nil, fmt.Errorf("link %d: no IPv6 settings in its description", ifindex)
}

// attr returns the value of the first attribute of type typ in b (the
// nested flag ignored).
func attr(b []byte, typ uint16) ([]byte, bool, error) {
	attrs, err := nl.ParseRouteAttr(b)
	if err != nil {
		return nil, false, err
	}
	for _, a := range attrs {
		if a.Attr.Type&^unix.NLA_F_NESTED == typ {
			return a.Value, true, nil
		}
	}
	return nil, false, nil
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
