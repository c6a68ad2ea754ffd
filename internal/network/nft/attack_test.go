package nft

import (
	"fmt"
	"maps"
	"net/netip"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/metald/metald/internal/network"
)

type attack struct {
	name string
	// script sends the attack; FL is the flow label to put on every packet.
	script string
	want   map[network.Control]uint64 // exact counter deltas on tap-vm1
	arrive int                        // frames with FL expected at VM2
}

const (
	raMC   = `Ether(src=M1, dst="33:33:00:00:00:01")/IPv6(src=LL1, dst="ff02::1", hlim=255, fl=FL)`
	toVM2  = `Ether(src=M1, dst=M2)/IPv6(src=IP1, dst=IP2, fl=FL)`
	ra     = `ICMPv6ND_RA()/ICMPv6NDOptPrefixInfo(prefix="2001:db8:bad::", prefixlen=64)/ICMPv6NDOptSrcLLAddr(lladdr=M1)`
	snNode = `Ether(src=M1, dst="33:33:ff:00:00:11")/IPv6(src=IP1, dst="ff02::1:ff00:11", hlim=255, fl=FL)`
)

func ctl(kv ...any) map[network.Control]uint64 {
	m := map[network.Control]uint64{}
	for i := 0; i < len(kv); i += 2 {
		m[kv[i].(network.Control)] = uint64(kv[i+1].(int))
	}
	return m
}

// Attacks with every control on.
var attacksAllOn = []attack{
	{name: "rogue RA", script: `send([` + raMC + `/` + ra + `]*3)`, want: ctl(network.CtlRAGuard, 3)},
	// A frame two controls drop counts under the first that sees it: the
	// source check comes first (a foreign source never gets the srcOK
	// mark), the RA guard rules after it.
	{name: "RA from a spoofed source", script: `send(Ether(src=M1, dst="33:33:00:00:00:01")/IPv6(src="fe80::bad", dst="ff02::1", hlim=255, fl=FL)/` + ra + `)`, want: ctl(network.CtlSourceGuard, 1)},
	{name: "RA behind hop-by-hop", script: `send([` + raMC + `/IPv6ExtHdrHopByHop()/` + ra + `]*2)`, want: ctl(network.CtlRAGuard, 2)},
	{name: "RA behind destination options", script: `send([` + raMC + `/IPv6ExtHdrDestOpt()/` + ra + `]*2)`, want: ctl(network.CtlRAGuard, 2)},
	{name: "RA behind dstopt+hbh+routing", script: `send(` + raMC + `/IPv6ExtHdrHopByHop()/IPv6ExtHdrDestOpt()/IPv6ExtHdrRouting(addresses=[])/` + ra + `)`, want: ctl(network.CtlRAGuard, 1)},
	// RA split over fragments: the first fragment carries the ICMPv6 type
	// (RA guard); the other fragments are fragments (block_fragment_header).
	{name: "RA in fragments", script: `send(fragment6(` + raMC + `/IPv6ExtHdrFragment(id=7)/` + ra + `/ICMPv6NDOptMTU()/Raw(b"x"*1200), 600))`,
		want: ctl(network.CtlRAGuard, 1, network.CtlExtFragment, 2)},
	// RFC 7112: the first fragment stops inside the header chain, the RA
	// is in the second fragment.
	{name: "RA with incomplete header chain", script: `
import struct
body = bytes(IPv6ExtHdrDestOpt(nh=58, options=[PadN(optdata=b"\x00"*12)])/` + ra + `)
first = ` + raMC + `/IPv6ExtHdrFragment(nh=60, offset=0, m=1, id=9)/Raw(body[:8])
second = ` + raMC + `/IPv6ExtHdrFragment(nh=60, offset=1, m=0, id=9)/Raw(body[8:])
send([first, second])`, want: ctl(network.CtlHeaderChain, 1, network.CtlExtFragment, 1)},
	{name: "first fragment without ICMPv6 header", script: `send(` + raMC + `/IPv6ExtHdrFragment(nh=58, offset=0, m=1, id=11))`, want: ctl(network.CtlHeaderChain, 1)},
	{name: "redirect", script: `send(` + toVM2 + `/ICMPv6ND_Redirect(tgt=IP1, dst="2001:db8:2::1"))`, want: ctl(network.CtlRAGuard, 1)},
	{name: "DHCPv6 server reply", script: `send(Ether(src=M1, dst="33:33:00:01:00:02")/IPv6(src=LL1, dst="ff02::1:2", fl=FL)/UDP(sport=547, dport=546)/Raw(b"\x07"+b"\x00"*40))`, want: ctl(network.CtlRAGuard, 1)},
	{name: "DHCPv6 server reply behind dstopt", script: `send(Ether(src=M1, dst=M2)/IPv6(src=IP1, dst=IP2, fl=FL)/IPv6ExtHdrDestOpt()/UDP(sport=547, dport=546)/Raw(b"\x07"+b"\x00"*40))`, want: ctl(network.CtlRAGuard, 1)},
	{name: "spoofed source", script: `send([Ether(src=M1, dst=M2)/IPv6(src="2001:db8:1::99", dst=IP2, fl=FL)/ICMPv6EchoRequest()]*4)`, want: ctl(network.CtlSourceGuard, 4)},
	{name: "spoofed link-local source", script: `send(Ether(src=M1, dst=M2)/IPv6(src="fe80::dead:beef", dst=LL2, fl=FL)/ICMPv6EchoRequest())`, want: ctl(network.CtlSourceGuard, 1)},
	{name: "unspecified source, not DAD", script: `send(Ether(src=M1, dst=M2)/IPv6(src="::", dst=IP2, fl=FL)/ICMPv6EchoRequest())`, want: ctl(network.CtlSourceGuard, 1)},
	{name: "spoofed MAC", script: `send([Ether(src="02:00:00:00:09:09", dst=M2)/IPv6(src=IP1, dst=IP2, fl=FL)/ICMPv6EchoRequest()]*2)`, want: ctl(network.CtlMACSpoof, 2)},
	{name: "VLAN tagged", script: `send(Ether(src=M1, dst=M2)/Dot1Q(vlan=100)/IPv6(src=IP1, dst=IP2, fl=FL)/ICMPv6EchoRequest())`, want: ctl(network.CtlL2Violation, 1)},
	{name: "QinQ tagged", script: `send(Ether(src=M1, dst=M2)/Dot1AD(vlan=10)/Dot1Q(vlan=100)/IPv6(src=IP1, dst=IP2, fl=FL)/ICMPv6EchoRequest())`, want: ctl(network.CtlL2Violation, 1)},
	{name: "ARP (non-IPv6 ethertype)", script: `send(Ether(src=M1, dst="ff:ff:ff:ff:ff:ff")/ARP(hwsrc=M1, psrc="10.0.0.1", pdst="10.0.0.2"))`, want: ctl(network.CtlL2Violation, 1)},
	{name: "NA with foreign target", script: `send(Ether(src=M1, dst="33:33:00:00:00:01")/IPv6(src=IP1, dst="ff02::1", hlim=255, fl=FL)/ICMPv6ND_NA(tgt=IP2, R=0, S=0, O=1)/ICMPv6NDOptDstLLAddr(lladdr=M1))`, want: ctl(network.CtlSourceGuard, 1)},
	{name: "NS with spoofed source link-layer option", script: `send(` + snNode + `/ICMPv6ND_NS(tgt=IP2)/ICMPv6NDOptSrcLLAddr(lladdr="02:00:00:00:09:09"))`, want: ctl(network.CtlNDStrict, 1)},
	{name: "NA with spoofed target link-layer option", script: `send(Ether(src=M1, dst=M2)/IPv6(src=IP1, dst=IP2, hlim=255, fl=FL)/ICMPv6ND_NA(tgt=IP1, S=1, O=1)/ICMPv6NDOptDstLLAddr(lladdr="02:00:00:00:09:09"))`, want: ctl(network.CtlNDStrict, 1)},
	{name: "NS with two link-layer options", script: `send(` + snNode + `/ICMPv6ND_NS(tgt=IP2)/ICMPv6NDOptSrcLLAddr(lladdr=M1)/ICMPv6NDOptSrcLLAddr(lladdr="02:00:00:00:09:09"))`, want: ctl(network.CtlNDStrict, 1)},
	{name: "RS with spoofed source link-layer option", script: `send(Ether(src=M1, dst="33:33:00:00:00:02")/IPv6(src=LL1, dst="ff02::2", hlim=255, fl=FL)/ICMPv6ND_RS()/ICMPv6NDOptSrcLLAddr(lladdr="02:00:00:00:09:09"))`, want: ctl(network.CtlNDStrict, 1)},
	{name: "hop-by-hop header", script: `send(` + toVM2 + `/IPv6ExtHdrHopByHop()/ICMPv6EchoRequest())`, want: ctl(network.CtlExtHopByHop, 1)},
	{name: "MLD report with hop limit 64", script: `send(Ether(src=M1, dst="33:33:00:00:00:16")/IPv6(src=LL1, dst="ff02::16", hlim=64, fl=FL)/IPv6ExtHdrHopByHop(options=[RouterAlert()])/ICMPv6MLReport2(records=[ICMPv6MLDMultAddrRec(dst="ff05::99")]))`, want: ctl(network.CtlExtHopByHop, 1)},
	{name: "routing header", script: `send(` + toVM2 + `/IPv6ExtHdrRouting(addresses=["2001:db8:1::1"])/ICMPv6EchoRequest())`, want: ctl(network.CtlExtRouting, 1)},
	{name: "fragment header", script: `send(fragment6(` + toVM2 + `/IPv6ExtHdrFragment(id=12)/ICMPv6EchoRequest(data=b"y"*1400), 800))`, want: ctl(network.CtlExtFragment, 2)},
	{name: "atomic fragment", script: `send(` + toVM2 + `/IPv6ExtHdrFragment(id=13, m=0, offset=0)/ICMPv6EchoRequest())`, want: ctl(network.CtlExtFragment, 1)},
	{name: "destination options header", script: `send(` + toVM2 + `/IPv6ExtHdrDestOpt()/ICMPv6EchoRequest())`, want: ctl(network.CtlExtDestOpts, 1)},
	// TCP meets the fast path first (packet type, one 8-byte link-layer
	// match, the next header, the bound source in four 4-byte pieces);
	// what it does not take must meet every other rule. The spoofed
	// sources differ from IP1 in one 4-byte piece each.
	{name: "TCP from a spoofed source", script: `send([Ether(src=M1, dst=M2)/IPv6(src="2001:db8:1::99", dst=IP2, fl=FL)/TCP(dport=80, flags="S")]*2)`, want: ctl(network.CtlSourceGuard, 2)},
	{name: "TCP from sources one 4-byte piece off", script: `send([Ether(src=M1, dst=M2)/IPv6(src=s, dst=IP2, fl=FL)/TCP(dport=80, flags="S") for s in ("2001:db9:1::10", "2001:db8:2::10", "2001:db8:1:0:1::10")])`, want: ctl(network.CtlSourceGuard, 3)},
	{name: "TCP from a spoofed MAC", script: `send(Ether(src="02:00:00:00:09:09", dst=M2)/IPv6(src=IP1, dst=IP2, fl=FL)/TCP(dport=80, flags="S"))`, want: ctl(network.CtlMACSpoof, 1)},
	{name: "TCP VLAN tagged", script: `send(Ether(src=M1, dst=M2)/Dot1Q(vlan=100)/IPv6(src=IP1, dst=IP2, fl=FL)/TCP(dport=80, flags="S"))`, want: ctl(network.CtlL2Violation, 1)},
	{name: "TCP behind hop-by-hop", script: `send(` + toVM2 + `/IPv6ExtHdrHopByHop()/TCP(dport=80, flags="S"))`, want: ctl(network.CtlExtHopByHop, 1)},
	{name: "TCP behind a routing header", script: `send(` + toVM2 + `/IPv6ExtHdrRouting(addresses=["2001:db8:1::1"])/TCP(dport=80, flags="S"))`, want: ctl(network.CtlExtRouting, 1)},
	{name: "TCP header cut short", script: `send(Ether(src=M1, dst=M2)/IPv6(src=IP1, dst=IP2, fl=FL, nh=6)/Raw(b"\x00\x50"))`, want: ctl(network.CtlHeaderChain, 1)},
}

// Attacks that only RA guard (plus source guard) must stop: the extension
// header blocks are off, so evasions through fragments rely on RA guard.
var attacksRAGuardOnly = []attack{
	{name: "RA in fragments", script: `send(fragment6(` + raMC + `/IPv6ExtHdrFragment(id=21)/` + ra + `/ICMPv6NDOptMTU()/Raw(b"x"*1200), 600))`,
		want: ctl(network.CtlRAGuard, 1), arrive: 2}, // tail fragments are harmless without the first
	{name: "RA with incomplete header chain", script: `
body = bytes(IPv6ExtHdrDestOpt(nh=58, options=[PadN(optdata=b"\x00"*12)])/` + ra + `)
send([` + raMC + `/IPv6ExtHdrFragment(nh=60, offset=0, m=1, id=22)/Raw(body[:8]),
      ` + raMC + `/IPv6ExtHdrFragment(nh=60, offset=1, m=0, id=22)/Raw(body[8:])])`,
		want: ctl(network.CtlHeaderChain, 1), arrive: 1},
	{name: "fragmented NS (RFC 6980)", script: `send(fragment6(` + snNode + `/IPv6ExtHdrFragment(id=23)/ICMPv6ND_NS(tgt=IP2)/ICMPv6NDOptSrcLLAddr(lladdr=M1)/Raw(b"z"*1000), 600))`,
		want: ctl(network.CtlRAGuard, 1), arrive: 1},
	{name: "RA behind hop-by-hop", script: `send(` + raMC + `/IPv6ExtHdrHopByHop()/` + ra + `)`, want: ctl(network.CtlRAGuard, 1)},
	// The seed's Scenario 3 validation opens a raw IPPROTO_HOPOPTS socket;
	// Linux refuses that socket (EPROTONOSUPPORT) before any firewall is
	// involved, so the snippet "passes" vacuously. This is the packet it
	// meant: 64 zero bytes after a next header of 0 (a chain of empty
	// hop-by-hop headers that runs off the end of the packet).
	{name: "seed scenario 3: hop-by-hop chain of zeros", script: `send(Ether(src=M1, dst=M2)/IPv6(src=IP1, dst=IP2, fl=FL, nh=0)/Raw(b"\x00"*64))`, want: ctl(network.CtlHeaderChain, 1)},
}

func runAttacks(t *testing.T, tp *topo, cap *capture, attacks []attack, base uint32) {
	for i, a := range attacks {
		t.Run(a.name, func(t *testing.T) {
			fl := base + uint32(i)
			marker := fl | 0x80000
			before := tp.counters(t, "tap-vm1")
			before2 := tp.counters(t, "tap-vm2")
			scapy(t, tp.vm1, fmt.Sprintf("FL = %d\n%s\nsend(Ether(src=M1, dst=M2)/IPv6(src=IP1, dst=IP2, fl=%d)/ICMPv6EchoRequest())\n", fl, a.script, marker))
			cap.waitFor(t, marker)
			time.Sleep(20 * time.Millisecond)
			got := deltas(before, tp.counters(t, "tap-vm1"))
			if !maps.Equal(got, a.want) {
				t.Errorf("counter deltas on tap-vm1: got %q, want %q", fmtDeltas(got), fmtDeltas(a.want))
			}
			if d := deltas(before2, tp.counters(t, "tap-vm2")); len(d) != 0 {
				t.Errorf("counters of tap-vm2 moved: %s", fmtDeltas(d))
			}
			if n := cap.count(fl); n != a.arrive {
				t.Errorf("%d frames with the attack's flow label reached VM2, want %d", n, a.arrive)
			}
			t.Logf("blocked: %s", fmtDeltas(got))
		})
	}
}

func TestAttacksAllControls(t *testing.T) {
	t.Parallel()
	tp := newTopo(t, allOn())
	cap := startCapture(t, tp.vm2, "eth0")
	runAttacks(t, tp, cap, attacksAllOn, 0x1000)
}

func TestAttacksRAGuardOnly(t *testing.T) {
	t.Parallel()
	c := network.Controls{RAGuard: true, SourceGuard: true}
	tp := newTopo(t, c)
	cap := startCapture(t, tp.vm2, "eth0")
	runAttacks(t, tp, cap, attacksRAGuardOnly, 0x2000)
}

// A port deleted and created again under the same name (a tap recreated
// behind metald's back) is filtered again at once: the NIC's chains are
// hooked on the device by name and the kernel attaches them when it
// appears, with no reconcile in between.
func TestRecreatedPortFilteredAgain(t *testing.T) {
	t.Parallel()
	tp := newTopo(t, allOn())
	tp.host.MustRun(t, "ip", "link", "del", "tap-vm1")
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: "eth0", HardwareAddr: mustMAC(vm1MAC)},
		PeerName:      "tap-vm1",
		PeerNamespace: netlink.NsFd(tp.host.Fd()),
	}
	if err := tp.vm1.Handle(t).LinkAdd(veth); err != nil {
		t.Fatalf("veth: %v", err)
	}
	tp.host.MustRun(t, "ip", "link", "set", "tap-vm1", "master", "br0", "up")
	tp.vm1.MustRun(t, "ip", "link", "set", "eth0", "up")
	tp.vm1.MustRun(t, "ip", "-6", "addr", "add", vm1IP+"/64", "dev", "eth0", "nodad")
	cap := startCapture(t, tp.vm2, "eth0")
	runAttacks(t, tp, cap, []attack{
		{name: "rogue RA", script: `send([` + raMC + `/` + ra + `]*3)`, want: ctl(network.CtlRAGuard, 3)},
		{name: "spoofed source", script: `send([Ether(src=M1, dst=M2)/IPv6(src="2001:db8:1::99", dst=IP2, fl=FL)/ICMPv6EchoRequest()]*2)`, want: ctl(network.CtlSourceGuard, 2)},
	}, 0x3000)
}

// TestFastPathFollowsAddressChange: the TCP fast path compares the source
// with each bound address inline, so an address change must rewrite it:
// after VM1's address moves, TCP from the old address is dropped and
// counted, and TCP from the new one arrives.
func TestFastPathFollowsAddressChange(t *testing.T) {
	t.Parallel()
	tp := newTopo(t, allOn())
	cap := startCapture(t, tp.vm2, "eth0")
	p := tp.plans[0]
	p.Addresses = []netip.Addr{netip.MustParseAddr("2001:db8:1::20")}
	if err := tp.fw.UpdateNIC(p); err != nil {
		t.Fatal(err)
	}
	before := tp.counters(t, "tap-vm1")
	scapy(t, tp.vm1, `
send(Ether(src=M1, dst=M2)/IPv6(src=IP1, dst=IP2, fl=0x7201)/TCP(dport=80, flags="S"))
send(Ether(src=M1, dst=M2)/IPv6(src="2001:db8:1::20", dst=IP2, fl=0x7202)/TCP(dport=80, flags="S"))
`)
	cap.waitFor(t, 0x7202)
	time.Sleep(20 * time.Millisecond)
	if n := cap.count(0x7201); n != 0 {
		t.Errorf("TCP from the old address reached VM2 %d times", n)
	}
	if d := deltas(before, tp.counters(t, "tap-vm1")); !maps.Equal(d, ctl(network.CtlSourceGuard, 1)) {
		t.Errorf("counter deltas on tap-vm1: got %q, want source_guard+1", fmtDeltas(d))
	}
}

// TestFastPathTaken: the TCP fast path is taken by what it is for and by
// nothing it must leave to the full checks. A second base chain on
// tap-vm2's egress, after metald's (an accept ends only the chain it is
// in), counts frames carrying the fast path's mark.
func TestFastPathTaken(t *testing.T) {
	t.Parallel()
	tp := newTopo(t, allOn())
	cap := startCapture(t, tp.vm2, "eth0")
	tp.host.MustRun(t, "nft", "add table netdev probe { chain c { type filter hook egress device tap-vm2 priority 0; meta mark "+fmt.Sprintf("%#x", vlanTag|srcOK|fastTCP)+" counter; }; }")
	fastCount := func() int {
		out := tp.host.MustRun(t, "nft", "list", "chain", "netdev", "probe", "c")
		m := regexp.MustCompile(`counter packets (\d+)`).FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("no counter in %q", out)
		}
		n, _ := strconv.Atoi(m[1])
		return n
	}
	for i, c := range []struct {
		name, frame string
		fast        bool
	}{
		{"unicast TCP from the bound address", `Ether(src=M1, dst=M2)/IPv6(src=IP1, dst=IP2, fl=FL)/TCP(dport=80, flags="S")`, true},
		{"unicast TCP from the link-local address", `Ether(src=M1, dst=M2)/IPv6(src=LL1, dst=LL2, fl=FL)/TCP(dport=80, flags="S")`, true},
		{"TCP to a group MAC", `Ether(src=M1, dst="33:33:00:00:12:34")/IPv6(src=IP1, dst=IP2, fl=FL)/TCP(dport=80, flags="S")`, false},
		{"TCP to the broadcast MAC", `Ether(src=M1, dst="ff:ff:ff:ff:ff:ff")/IPv6(src=IP1, dst=IP2, fl=FL)/TCP(dport=80, flags="S")`, false},
		{"TCP with ports 0 and 0", `Ether(src=M1, dst=M2)/IPv6(src=IP1, dst=IP2, fl=FL)/TCP(sport=0, dport=0, flags="S")`, false},
		{"TCP behind a destination options header", `Ether(src=M1, dst=M2)/IPv6(src=IP1, dst=IP2, fl=FL)/IPv6ExtHdrDestOpt()/TCP(dport=80, flags="S")`, false},
		{"UDP", `Ether(src=M1, dst=M2)/IPv6(src=IP1, dst=IP2, fl=FL)/UDP(dport=53)`, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			fl := uint32(0x7300 + i)
			before := fastCount()
			// The marker echo that sendAndMark waits for is not TCP.
			sendAndMark(t, tp, cap, false, fl, "send(["+c.frame+"]*3)")
			got := fastCount() - before
			want := map[bool]int{true: 3, false: 0}[c.fast]
			if got != want {
				t.Errorf("%d of 3 frames took the fast path, want %d", got, want)
			}
		})
	}
}
