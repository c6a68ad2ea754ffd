package netns_test

import (
	"os"
	"strconv"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/metald/metald/internal/backend/netns"
	"github.com/metald/metald/internal/netnstest"
	"github.com/metald/metald/internal/network/ns"
)

// The IPv6 settings read over rtnetlink are the ones /proc/sys shows, at
// the indexes metald compares, and only differing ones are written.
func TestInet6ConfMatchesProcSys(t *testing.T) {
	n := netnstest.New(t)
	err := ns.Do(n.Fd(), func() error {
		h, err := netlink.NewHandle()
		if err != nil {
			return err
		}
		defer h.Close()
		la := netlink.NewLinkAttrs()
		la.Name = "d0"
		if err := h.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "d1"}); err != nil {
			return err
		}
		l, err := h.LinkByName("d0")
		if err != nil {
			return err
		}
		for _, set := range []map[string]string{
			{"use_tempaddr": "2", "temp_valid_lft": "3600", "disable_ipv6": "1"},
			{"use_tempaddr": "0", "temp_valid_lft": "86400", "disable_ipv6": "0"},
		} {
			for k, v := range set {
				if err := os.WriteFile("/proc/sys/net/ipv6/conf/d0/"+k, []byte(v), 0o644); err != nil {
					return err
				}
			}
			conf, err := netns.Inet6Conf(l.Attrs().Index)
			if err != nil {
				return err
			}
			for k, v := range set {
				if got := strconv.Itoa(int(conf[netns.DevconfIndex[k]])); got != v {
					t.Errorf("%s: rtnetlink says %s, /proc/sys was set to %s", k, got, v)
				}
			}
			kv := [][2]string{{"use_tempaddr", set["use_tempaddr"]}, {"disable_ipv6", "1"}, {"stable_secret", "::1"}}
			got := netns.ChangedSysctls(conf, kv)
			want := 2 // stable_secret always; disable_ipv6 only when it is 0
			if set["disable_ipv6"] == "1" {
				want = 1
			}
			if len(got) != want || got[len(got)-1][0] != "stable_secret" {
				t.Errorf("changed settings %v, want %d ending in stable_secret", got, want)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
