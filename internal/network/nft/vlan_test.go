package nft

import (
	"fmt"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/metald/metald/internal/netnstest"
	"github.com/metald/metald/internal/network"
)

// addVM plugs a VM namespace for plan p (index i: MAC 02:00:00:00:01:0i,
// address 2001:db8:1::1<i-1>) into br0 of tp.host.
func addVM(t testing.TB, tp *topo, p network.NICPlan, addr string) *netnstest.NS {
	t.Helper()
	vm := netnstest.New(t)
	noDAD(t, vm)
	if err := tp.fw.AddNIC(p); err != nil {
		t.Fatal(err)
	}
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0", HardwareAddr: p.MAC},
		PeerName: p.HostDevice, PeerNamespace: netlink.NsFd(tp.host.Fd())}
	if err := vm.Handle(t).LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	tp.host.MustRun(t, "ip", "link", "set", p.HostDevice, "master", "br0", "up")
	vm.MustRun(t, "ip", "link", "set", "eth0", "up")
	vm.MustRun(t, "ip", "-6", "addr", "add", addr+"/64", "dev", "eth0", "nodad")
	return vm
}

// TestVLANSeparation: VM1 and VM2 in VLAN 100, VM3 in VLAN 200, all on one
// bridge without kernel VLAN filtering. Same-VLAN traffic flows; nothing
// crosses VLANs in either direction (unicast, all-nodes multicast,
// broadcast); the host (gateway) still reaches every VLAN.
func TestVLANSeparation(t *testing.T) {
	t.Parallel()
	c := allOn()
	tp := newTopo(t, c)
	for i := range tp.plans {
		tp.plans[i].VLAN = 100
		if err := tp.fw.UpdateNIC(tp.plans[i]); err != nil {
			t.Fatal(err)
		}
	}
	p3 := vmPlan(3, c)
	p3.VLAN = 200
	vm3 := addVM(t, tp, p3, "2001:db8:1::12")
	cap1 := startCapture(t, tp.vm1, "eth0")
	cap3 := startCapture(t, vm3, "eth0")

	t.Run("same VLAN: ping VM1 <-> VM2", func(t *testing.T) {
		tp.vm1.MustRun(t, "ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", vm2IP)
		tp.vm2.MustRun(t, "ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", vm1IP)
	})
	t.Run("host reaches both VLANs", func(t *testing.T) {
		tp.host.MustRun(t, "ping", "-6", "-c", "1", "-W", "2", vm1IP)
		tp.host.MustRun(t, "ping", "-6", "-c", "1", "-W", "2", "2001:db8:1::12")
	})
	t.Run("other VLAN: ping VM1 -> VM3 and VM3 -> VM1 fail", func(t *testing.T) {
		if out, err := tp.vm1.Run("ping", "-6", "-c", "2", "-i", "0.2", "-W", "1", "2001:db8:1::12"); err == nil {
			t.Errorf("VM1 reached VM3 across VLANs:\n%s", out)
		}
		if out, err := vm3.Run("ping", "-6", "-c", "2", "-i", "0.2", "-W", "1", vm1IP); err == nil {
			t.Errorf("VM3 reached VM1 across VLANs:\n%s", out)
		}
	})
	t.Run("unicast, multicast and broadcast frames do not cross", func(t *testing.T) {
		before3 := tp.counters(t, "tap-vm3")
		// From VM1 (VLAN 100): unicast to VM3's MAC, all-nodes multicast,
		// broadcast; a same-VLAN marker to VM2 proves the send completed.
		cap2 := startCapture(t, tp.vm2, "eth0")
		scapy(t, tp.vm1, `
send(Ether(src=M1, dst="02:00:00:00:01:03")/IPv6(src=IP1, dst="2001:db8:1::12", fl=0x6001)/ICMPv6EchoRequest())
send(Ether(src=M1, dst="33:33:00:00:00:01")/IPv6(src=IP1, dst="ff02::1", fl=0x6002)/ICMPv6EchoRequest())
send(Ether(src=M1, dst="ff:ff:ff:ff:ff:ff")/IPv6(src=IP1, dst="ff02::1", fl=0x6003)/ICMPv6EchoRequest())
send(Ether(src=M1, dst="02:00:00:00:01:03")/IPv6(src=IP1, dst="2001:db8:1::12", fl=0x6005)/TCP(dport=80, flags="S"))
send(Ether(src=M1, dst=M2)/IPv6(src=IP1, dst=IP2, fl=0x6006)/TCP(dport=80, flags="S"))
send(Ether(src=M1, dst="33:33:00:00:00:01")/IPv6(src=IP1, dst="ff02::1", fl=0x6004)/ICMPv6EchoRequest())
`)
		cap2.waitFor(t, 0x6004)
		if cap2.count(0x6002) != 1 || cap2.count(0x6003) != 1 {
			t.Errorf("same-VLAN multicast/broadcast at VM2: %d, %d; want 1, 1", cap2.count(0x6002), cap2.count(0x6003))
		}
		// TCP takes the fast paths (the to-VM one trusts the mark the
		// from-VM one set): same VLAN it arrives, across VLANs it does not.
		if n := cap2.count(0x6006); n != 1 {
			t.Errorf("same-VLAN TCP at VM2: %d, want 1", n)
		}
		// The other direction: VM3 multicasts and broadcasts.
		scapy(t, vm3, `
M3 = "02:00:00:00:01:03"
send(Ether(src=M3, dst=M1)/IPv6(src="2001:db8:1::12", dst=IP1, fl=0x6011)/ICMPv6EchoRequest())
send(Ether(src=M3, dst=M1)/IPv6(src="2001:db8:1::12", dst=IP1, fl=0x6014)/TCP(dport=80, flags="S"))
send(Ether(src=M3, dst="33:33:00:00:00:01")/IPv6(src="2001:db8:1::12", dst="ff02::1", fl=0x6012)/ICMPv6EchoRequest())
send(Ether(src=M3, dst="ff:ff:ff:ff:ff:ff")/IPv6(src="2001:db8:1::12", dst="ff02::1", fl=0x6013)/ICMPv6EchoRequest())
`)
		time.Sleep(200 * time.Millisecond)
		for _, fl := range []uint32{0x6001, 0x6002, 0x6003, 0x6004, 0x6005} {
			if n := cap3.count(fl); n != 0 {
				t.Errorf("frame %#x from VLAN 100 seen %d times in VLAN 200", fl, n)
			}
		}
		for _, fl := range []uint32{0x6011, 0x6012, 0x6013, 0x6014} {
			if n := cap1.count(fl) + cap2.count(fl); n != 0 {
				t.Errorf("frame %#x from VLAN 200 seen %d times in VLAN 100", fl, n)
			}
		}
		// VM1's 5 frames, plus whatever the VLAN 100 guests' kernels
		// multicast meanwhile (MLD reports, RS)
		if d := deltas(before3, tp.counters(t, "tap-vm3")); d[network.CtlVLAN] < 5 {
			t.Errorf("tap-vm3 vlan counter +%d, want at least 5 (VM1's 5 frames)", d[network.CtlVLAN])
		}
	})
	t.Run("moving VM3 into VLAN 100 joins it", func(t *testing.T) {
		p3.VLAN = 100
		if err := tp.fw.UpdateNIC(p3); err != nil {
			t.Fatal(err)
		}
		tp.vm1.MustRun(t, "ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", "2001:db8:1::12")
	})
	_ = fmt.Sprint
}
