package nft

import (
	"encoding/binary"
	"fmt"
	"net"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/metald/metald/internal/netnstest"
	"github.com/metald/metald/internal/network"
	"github.com/metald/metald/internal/network/ns"
)

const (
	brMAC  = "02:00:00:00:00:01"
	vm1MAC = "02:00:00:00:01:01"
	vm2MAC = "02:00:00:00:01:02"
	vm1IP  = "2001:db8:1::10"
	vm2IP  = "2001:db8:1::11"
	vm1LL  = "fe80::ff:fe00:101"
	vm2LL  = "fe80::ff:fe00:102"
)

// topo is a host namespace with bridge br0 and two VM namespaces whose
// eth0 is a veth peered with tap-vm1 / tap-vm2 on br0.
type topo struct {
	host, vm1, vm2 *netnstest.NS
	fw             *Firewall
	plans          [2]network.NICPlan
}

func noDAD(t testing.TB, n *netnstest.NS) {
	t.Helper()
	for _, k := range []string{"net/ipv6/conf/all/accept_dad", "net/ipv6/conf/default/accept_dad"} {
		if err := ns.WriteSysctl(n.Fd(), k, "0"); err != nil {
			t.Fatal(err)
		}
	}
}

func newTopo(t testing.TB, c network.Controls) *topo {
	t.Helper()
	tp := &topo{host: netnstest.New(t), vm1: netnstest.New(t), vm2: netnstest.New(t)}
	for _, n := range []*netnstest.NS{tp.host, tp.vm1, tp.vm2} {
		noDAD(t, n)
	}
	fw, err := New(tp.host.Fd())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fw.Close() })
	tp.fw = fw
	tp.plans = [2]network.NICPlan{vmPlan(1, c), vmPlan(2, c)}
	// The NIC's chains go in before its port exists.
	for _, p := range tp.plans {
		if err := fw.AddNIC(p); err != nil {
			t.Fatalf("add nic: %v", err)
		}
	}
	hh := tp.host.Handle(t)
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0", HardwareAddr: mustMAC(brMAC)}}
	if err := hh.LinkAdd(br); err != nil {
		t.Fatal(err)
	}
	tp.host.MustRun(t, "ip", "link", "set", "br0", "up")
	tp.host.MustRun(t, "ip", "-6", "addr", "add", "fe80::1/64", "dev", "br0", "nodad")
	tp.host.MustRun(t, "ip", "-6", "addr", "add", "2001:db8:1::1/64", "dev", "br0", "nodad")
	for i, vm := range []*netnstest.NS{tp.vm1, tp.vm2} {
		mac := []string{vm1MAC, vm2MAC}[i]
		ip := []string{vm1IP, vm2IP}[i]
		tap := fmt.Sprintf("tap-vm%d", i+1)
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: "eth0", HardwareAddr: mustMAC(mac)},
			PeerName:      tap,
			PeerNamespace: netlink.NsFd(tp.host.Fd()),
		}
		if err := vm.Handle(t).LinkAdd(veth); err != nil {
			t.Fatalf("veth: %v", err)
		}
		tp.host.MustRun(t, "ip", "link", "set", tap, "master", "br0", "up")
		vm.MustRun(t, "ip", "link", "set", "eth0", "up")
		vm.MustRun(t, "ip", "-6", "addr", "add", ip+"/64", "dev", "eth0", "nodad")
	}
	return tp
}

// scapy runs a python/scapy snippet inside n. Names in scope: the scapy
// layers plus M1, M2, BR (MACs), IP1, IP2, LL1, LL2.
func scapy(t *testing.T, n *netnstest.NS, script string) string {
	t.Helper()
	prelude := fmt.Sprintf(`
import logging
logging.getLogger("scapy").setLevel(logging.ERROR)
from scapy.layers.l2 import Ether, Dot1Q, Dot1AD, ARP
from scapy.layers.inet6 import *
from scapy.layers.inet import UDP
from scapy.packet import Raw
from scapy.sendrecv import sendp
M1, M2, BR = %q, %q, %q
IP1, IP2, LL1, LL2 = %q, %q, %q, %q
def send(pkts, iface="eth0"):
    sendp(pkts, iface=iface, verbose=False)
`, vm1MAC, vm2MAC, brMAC, vm1IP, vm2IP, vm1LL, vm2LL)
	out, err := ns.Command(n.Fd(), exec.Command("/usr/bin/python3", "-c", prelude+script))
	if err != nil {
		t.Fatalf("scapy: %v\n%s\n%s", err, out, script)
	}
	return string(out)
}

// capture records the IPv6 flow labels of frames received on an interface.
type capture struct {
	mu     sync.Mutex
	labels map[uint32]int
	fd     int
	done   chan struct{}
}

func startCapture(t *testing.T, n *netnstest.NS, ifname string) *capture {
	t.Helper()
	c := &capture{labels: map[uint32]int{}, done: make(chan struct{})}
	proto := int(htons(unix.ETH_P_ALL))
	err := ns.Do(n.Fd(), func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, proto)
		if err != nil {
			return err
		}
		c.fd = fd
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index})
	})
	if err != nil {
		t.Fatalf("capture: %v", err)
	}
	tv := unix.NsecToTimeval(int64(50 * time.Millisecond))
	unix.SetsockoptTimeval(c.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	go c.loop()
	t.Cleanup(func() { close(c.done); unix.Close(c.fd) })
	return c
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (c *capture) loop() {
	buf := make([]byte, 65536)
	for {
		select {
		case <-c.done:
			return
		default:
		}
		n, from, err := unix.Recvfrom(c.fd, buf, 0)
		if err != nil || n < 18 {
			continue
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		off := 12
		for off+2 <= n && (binary.BigEndian.Uint16(buf[off:]) == 0x8100 || binary.BigEndian.Uint16(buf[off:]) == 0x88a8) {
			off += 4
		}
		if off+6 > n || binary.BigEndian.Uint16(buf[off:]) != 0x86dd {
			continue
		}
		ip := buf[off+2:]
		fl := uint32(ip[1]&0x0f)<<16 | uint32(ip[2])<<8 | uint32(ip[3])
		c.mu.Lock()
		c.labels[fl]++
		c.mu.Unlock()
	}
}

func (c *capture) count(fl uint32) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.labels[fl]
}

// waitFor waits until a frame with flow label fl arrived.
func (c *capture) waitFor(t *testing.T, fl uint32) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for c.count(fl) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("marker flow label %#x never arrived", fl)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (tp *topo) counters(t testing.TB, dev string) map[network.Control]uint64 {
	t.Helper()
	c, err := tp.fw.Counters(dev)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func deltas(before, after map[network.Control]uint64) map[network.Control]uint64 {
	d := map[network.Control]uint64{}
	for k, v := range after {
		if v != before[k] {
			d[k] = v - before[k]
		}
	}
	return d
}

func fmtDeltas(d map[network.Control]uint64) string {
	var s []string
	for _, c := range network.AllControls {
		if d[c] != 0 {
			s = append(s, fmt.Sprintf("%s+%d", c, d[c]))
		}
	}
	return strings.Join(s, " ")
}
