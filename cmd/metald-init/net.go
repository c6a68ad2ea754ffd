package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/metald/metald/cmd/metald-init/guestcfg"
)

// nicWait is how long configure waits for a NIC's driver to show it.
const nicWait = 15 * time.Second

// configure applies cfg: every NIC, then /etc/resolv.conf.
func configure(cfg guestcfg.Config) error {
	if lo, err := netlink.LinkByName("lo"); err == nil {
		netlink.LinkSetUp(lo)
	}
	var errs []error
	for _, n := range cfg.NICs {
		if err := configureNIC(n); err != nil {
			errs = append(errs, fmt.Errorf("nic %s: %w", n.MAC, err))
		}
	}
	if err := writeResolvConf("/etc/resolv.conf", cfg); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// linkByMAC waits until a link with mac exists.
func linkByMAC(mac net.HardwareAddr) (netlink.Link, error) {
	deadline := time.Now().Add(nicWait)
	for {
		links, err := netlink.LinkList()
		if err == nil {
			for _, l := range links {
				if l.Attrs().HardwareAddr.String() == mac.String() && l.Type() != "bridge" {
					return l, nil
				}
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no interface with mac %s after %v", mac, nicWait)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// sysctl is one /proc/sys key and value.
type sysctl struct{ key, value string }

// sysctls returns the per-interface IPv6 sysctls for n, in the order they
// must be written, before the link comes up (the kernel derives addresses
// at link up). Writing stable_secret also switches the interface to
// stable-privacy address generation (RFC 7217).
func sysctls(ifname string, n guestcfg.NIC) []sysctl {
	base := "net/ipv6/conf/" + ifname + "/"
	tmp := "0"
	if n.Privacy {
		tmp = "2"
	}
	out := []sysctl{{base + "use_tempaddr", tmp}}
	if n.StableSecret != "" {
		out = append(out, sysctl{base + "stable_secret", n.StableSecret})
	}
	if n.TempValidLft > 0 {
		out = append(out, sysctl{base + "temp_valid_lft", strconv.FormatUint(uint64(n.TempValidLft), 10)})
	}
	return out
}

func configureNIC(n guestcfg.NIC) error {
	mac, err := n.HardwareAddr()
	if err != nil {
		return err
	}
	l, err := linkByMAC(mac)
	if err != nil {
		return err
	}
	name := l.Attrs().Name
	for _, sc := range sysctls(name, n) {
		if err := os.WriteFile("/proc/sys/"+sc.key, []byte(sc.value), 0o644); err != nil {
			return fmt.Errorf("sysctl %s=%s: %w", sc.key, sc.value, err)
		}
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fmt.Errorf("set %s up: %w", name, err)
	}
	if n.Address.IsValid() {
		a := &netlink.Addr{IPNet: &net.IPNet{IP: n.Address.Addr().AsSlice(), Mask: net.CIDRMask(n.Address.Bits(), 128)}}
		if err := netlink.AddrReplace(l, a); err != nil {
			return fmt.Errorf("add %s to %s: %w", n.Address, name, err)
		}
	}
	if n.Gateway.IsValid() {
		r := &netlink.Route{LinkIndex: l.Attrs().Index, Gw: n.Gateway.AsSlice(),
			Dst: &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}}
		if err := netlink.RouteReplace(r); err != nil {
			return fmt.Errorf("default route via %s on %s: %w", n.Gateway, name, err)
		}
	}
	logf("%s (%s): address %s gateway %s privacy %v", name, mac, n.Address, n.Gateway, n.Privacy)
	return nil
}

// resolvConf renders the resolvers of all NICs, in order, without
// duplicates.
func resolvConf(cfg guestcfg.Config) string {
	var sb strings.Builder
	sb.WriteString("# written by metald-init\n")
	seen := map[netip.Addr]bool{}
	for _, n := range cfg.NICs {
		for _, d := range n.DNS {
			if !seen[d] {
				seen[d] = true
				fmt.Fprintf(&sb, "nameserver %s\n", d)
			}
		}
	}
	return sb.String()
}

func writeResolvConf(path string, cfg guestcfg.Config) error {
	os.MkdirAll("/etc", 0o755)
	if err := os.WriteFile(path, []byte(resolvConf(cfg)), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// rogueRA (test mode) sends unsolicited Router Advertisements for
// 2001:db8:bad::/64 to ff02::1 from every configured NIC, five times a
// second apart, once its link-local address is usable.
func rogueRA(cfg guestcfg.Config) {
	for i := range 5 {
		for _, n := range cfg.NICs {
			mac, err := n.HardwareAddr()
			if err != nil {
				continue
			}
			l, err := linkByMAC(mac)
			if err != nil {
				logf("rogue-ra: %v", err)
				continue
			}
			// An RA sent before DAD of the link-local ends leaves from ::,
			// which the source guard (not RA Guard) stops: a slow guest
			// would test the wrong control.
			if !waitLinkLocal(l, time.Minute) {
				logf("rogue-ra: no usable link-local address on %s", l.Attrs().Name)
				continue
			}
			if err := sendRA(l.Attrs().Index, mac); err != nil {
				logf("rogue-ra: %v", err)
			} else {
				logf("rogue-ra: sent RA %d on %s", i+1, l.Attrs().Name)
			}
		}
		time.Sleep(time.Second)
	}
}

// waitLinkLocal waits until l has a non-tentative link-local address and
// reports whether it got one within d.
func waitLinkLocal(l netlink.Link, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		as, _ := netlink.AddrList(l, netlink.FAMILY_V6)
		for _, a := range as {
			if a.IP.IsLinkLocalUnicast() && a.Flags&(unix.IFA_F_TENTATIVE|unix.IFA_F_DADFAILED) == 0 {
				return true
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return false
}

// RAMessage builds an ICMPv6 Router Advertisement (checksum left zero: the
// kernel fills it in on raw ICMPv6 sockets) with a source link-layer
// address option and a prefix information option for prefix.
func RAMessage(mac net.HardwareAddr, prefix netip.Prefix) []byte {
	b := make([]byte, 16, 16+8+32)
	b[0] = 134                              // type: router advertisement
	b[4] = 64                               // cur hop limit
	binary.BigEndian.PutUint16(b[6:], 1800) // router lifetime
	b = append(b, 1, 1)                     // source link-layer address, 1x8 bytes
	b = append(b, mac...)
	pi := make([]byte, 32)
	pi[0], pi[1], pi[2] = 3, 4, byte(prefix.Bits()) // prefix information, 4x8 bytes
	pi[3] = 0xc0                                    // on-link, autonomous
	binary.BigEndian.PutUint32(pi[4:], 86400)       // valid lifetime
	binary.BigEndian.PutUint32(pi[8:], 14400)       // preferred lifetime
	a := prefix.Addr().As16()
	copy(pi[16:], a[:])
	return append(b, pi...)
}

func sendRA(ifindex int, mac net.HardwareAddr) error {
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMPV6)
	if err != nil {
		return fmt.Errorf("raw icmpv6 socket: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_MULTICAST_HOPS, 255); err != nil {
		return err
	}
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_MULTICAST_IF, ifindex); err != nil {
		return err
	}
	// Do not loop the RA back into this guest's own stack: it would
	// autoconfigure addresses from the rogue prefix and use them as sources.
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_MULTICAST_LOOP, 0); err != nil {
		return err
	}
	msg := RAMessage(mac, netip.MustParsePrefix("2001:db8:bad::/64"))
	dst := &unix.SockaddrInet6{Addr: netip.MustParseAddr("ff02::1").As16(), ZoneId: uint32(ifindex)}
	if err := unix.Sendto(fd, msg, 0, dst); err != nil {
		return fmt.Errorf("send ra: %w", err)
	}
	return nil
}

// ping6 (test mode) pings addr with busybox until it answers (up to about a
// minute) and reports the result on the console.
func ping6(addr netip.Addr) {
	for i := 0; i < 30; i++ {
		out, err := exec.Command("/bin/busybox", "ping", "-6", "-c", "1", "-W", "2", addr.String()).CombinedOutput()
		if err == nil {
			logf("ping6 %s ok", addr)
			return
		}
		if i == 29 {
			logf("ping6 %s failed: %v: %s", addr, err, out)
		}
		time.Sleep(time.Second)
	}
}
