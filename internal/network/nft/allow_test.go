package nft

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/metald/metald/internal/network"
)

// sendAndMark runs script in n with FL set, then a marker echo toward VM2
// from the same namespace, and waits for the marker at VM2.
func sendAndMark(t *testing.T, tp *topo, cap *capture, fromHost bool, fl uint32, script string) {
	t.Helper()
	marker := fl | 0x80000
	if fromHost {
		scapy(t, tp.host, fmt.Sprintf("FL = %d\n%s\nsend(Ether(src=BR, dst=M2)/IPv6(src=\"2001:db8:1::1\", dst=IP2, fl=%d)/ICMPv6EchoRequest(), iface=\"br0\")\n", fl, script, marker))
	} else {
		scapy(t, tp.vm1, fmt.Sprintf("FL = %d\n%s\nsend(Ether(src=M1, dst=M2)/IPv6(src=IP1, dst=IP2, fl=%d)/ICMPv6EchoRequest())\n", fl, script, marker))
	}
	cap.waitFor(t, marker)
	time.Sleep(20 * time.Millisecond)
}

// TestNoOverblocking: with every control on, the traffic a VM needs works.
func TestNoOverblocking(t *testing.T) {
	t.Parallel()
	tp := newTopo(t, allOn())
	cap := startCapture(t, tp.vm2, "eth0")
	before1, before2 := tp.counters(t, "tap-vm1"), tp.counters(t, "tap-vm2")

	t.Run("ping and neighbour discovery", func(t *testing.T) {
		tp.vm1.MustRun(t, "ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", vm2IP)
		tp.vm2.MustRun(t, "ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", vm1LL+"%eth0")
		out := tp.vm1.MustRun(t, "ip", "-6", "neigh", "show", vm2IP, "dev", "eth0")
		if !strings.Contains(out, "REACHABLE") {
			t.Errorf("neighbour entry for %s not REACHABLE: %q", vm2IP, out)
		}
	})
	t.Run("TCP with ports 0 and 0 (misses the fast path, passes the full checks)", func(t *testing.T) {
		sendAndMark(t, tp, cap, false, 0x3009, `send(Ether(src=M1, dst=M2)/IPv6(src=IP1, dst=IP2, fl=FL)/TCP(sport=0, dport=0, flags="S"))`)
		if n := cap.count(0x3009); n != 1 {
			t.Errorf("TCP with ports 0 reached VM2 %d times, want 1", n)
		}
	})
	t.Run("large ping (fragment-free PMTU path)", func(t *testing.T) {
		tp.vm1.MustRun(t, "ping", "-6", "-c", "2", "-i", "0.2", "-s", "1400", "-M", "do", "-W", "2", vm2IP)
	})
	t.Run("MLD report with router alert from link-local", func(t *testing.T) {
		sendAndMark(t, tp, cap, false, 0x3001, `send(Ether(src=M1, dst="33:33:00:00:00:16")/IPv6(src=LL1, dst="ff02::16", hlim=1, fl=FL)/IPv6ExtHdrHopByHop(options=[RouterAlert()])/ICMPv6MLReport2(records=[ICMPv6MLDMultAddrRec(dst="ff05::1234")]))`)
		if n := cap.count(0x3001); n != 1 {
			t.Errorf("MLD report reached VM2 %d times, want 1", n)
		}
		if out := tp.host.MustRun(t, "bridge", "mdb", "show"); !strings.Contains(out, "ff05::1234") {
			t.Errorf("bridge mdb has no ff05::1234 entry:\n%s", out)
		}
	})
	t.Run("DAD neighbour solicitation from ::", func(t *testing.T) {
		sendAndMark(t, tp, cap, false, 0x3002, `send(Ether(src=M1, dst="33:33:ff:00:00:77")/IPv6(src="::", dst="ff02::1:ff00:77", hlim=255, fl=FL)/ICMPv6ND_NS(tgt="2001:db8:1::77")/Raw(bytes([14, 1, 1, 2, 3, 4, 5, 6])))`)
		if n := cap.count(0x3002); n != 1 {
			t.Errorf("DAD NS reached VM2 %d times, want 1", n)
		}
	})
	t.Run("allowed router RA reaches the VM", func(t *testing.T) {
		sendAndMark(t, tp, cap, true, 0x3003, `send(Ether(src=BR, dst="33:33:00:00:00:01")/IPv6(src="fe80::1", dst="ff02::1", hlim=255, fl=FL)/ICMPv6ND_RA()/ICMPv6NDOptPrefixInfo(prefix="2001:db8:1::", prefixlen=64), iface="br0")`)
		if n := cap.count(0x3003); n != 1 {
			t.Errorf("allowed RA reached VM2 %d times, want 1", n)
		}
	})
	if t.Failed() {
		return
	}
	if d := deltas(before1, tp.counters(t, "tap-vm1")); len(d) != 0 {
		t.Errorf("legitimate traffic moved tap-vm1 counters: %s", fmtDeltas(d))
	}
	if d := deltas(before2, tp.counters(t, "tap-vm2")); len(d) != 0 {
		t.Errorf("legitimate traffic moved tap-vm2 counters: %s", fmtDeltas(d))
	}

	t.Run("rogue RA from the host side", func(t *testing.T) {
		b := tp.counters(t, "tap-vm2")
		sendAndMark(t, tp, cap, true, 0x3004, `send(Ether(src=BR, dst="33:33:00:00:00:01")/IPv6(src="fe80::bad", dst="ff02::1", hlim=255, fl=FL)/ICMPv6ND_RA(), iface="br0")`)
		if n := cap.count(0x3004); n != 0 {
			t.Errorf("rogue RA reached VM2")
		}
		if d := deltas(b, tp.counters(t, "tap-vm2")); d[network.CtlRAGuard] != 1 || len(d) != 1 {
			t.Errorf("tap-vm2 deltas %s, want ra_guard+1", fmtDeltas(d))
		}
	})
	t.Run("RA from allowed address but foreign MAC", func(t *testing.T) {
		b := tp.counters(t, "tap-vm2")
		sendAndMark(t, tp, cap, true, 0x3005, `send(Ether(src="02:00:00:00:07:07", dst="33:33:00:00:00:01")/IPv6(src="fe80::1", dst="ff02::1", hlim=255, fl=FL)/ICMPv6ND_RA(), iface="br0")`)
		if n := cap.count(0x3005); n != 0 {
			t.Errorf("RA with foreign MAC reached VM2")
		}
		if d := deltas(b, tp.counters(t, "tap-vm2")); d[network.CtlRAGuard] != 1 || len(d) != 1 {
			t.Errorf("tap-vm2 deltas %s, want ra_guard+1", fmtDeltas(d))
		}
	})
}

// TestRateLimits: excess is dropped and counted exactly (sent = arrived +
// counted), and a burst admits about the bucket size (limitBurst).
func TestRateLimits(t *testing.T) {
	t.Parallel()
	c := allOn()
	c.NDRateLimit, c.ICMPv6RateLimit, c.MulticastRateLimit, c.RARateLimit = 20, 1000, 1000, 10
	tp := newTopo(t, c)
	cap := startCapture(t, tp.vm2, "eth0")
	check := func(t *testing.T, dev string, ctl network.Control, sent int, fl uint32, rate int, b map[network.Control]uint64) {
		t.Helper()
		d := deltas(b, tp.counters(t, dev))
		arrived := cap.count(fl)
		if int(d[ctl])+arrived != sent || len(d) > 1 {
			t.Errorf("%s: sent %d, arrived %d, deltas %s", ctl, sent, arrived, fmtDeltas(d))
		}
		// The bucket holds limitBurst packets and refills at rate/s; the
		// send takes well under a second.
		if arrived < 1 || arrived > limitBurst+rate {
			t.Errorf("%s: %d of %d arrived, want between 1 and %d", ctl, arrived, sent, limitBurst+rate)
		}
		t.Logf("%s: sent %d, arrived %d, counter +%d", ctl, sent, arrived, d[ctl])
	}
	t.Run("nd_rate_limit", func(t *testing.T) {
		b := tp.counters(t, "tap-vm1")
		sendAndMark(t, tp, cap, false, 0x4001, `
import time
time.sleep(1.1)
send([`+snNode+`/ICMPv6ND_NS(tgt=IP2)/ICMPv6NDOptSrcLLAddr(lladdr=M1)]*100)
time.sleep(1.1)`)
		check(t, "tap-vm1", network.CtlNDRate, 100, 0x4001, 20, b)
	})
	t.Run("multicast_rate_limit", func(t *testing.T) {
		if err := tp.fw.UpdateNIC(func() network.NICPlan {
			p := tp.plans[0]
			p.Controls.MulticastRateLimit = 30
			return p
		}()); err != nil {
			t.Fatal(err)
		}
		b := tp.counters(t, "tap-vm1")
		sendAndMark(t, tp, cap, false, 0x4002, `
import time
send([Ether(src=M1, dst="33:33:00:00:12:34")/IPv6(src=IP1, dst="ff05::1234", fl=FL)/UDP(sport=5000, dport=5000)/Raw(b"m")]*150)
time.sleep(1.1)`)
		check(t, "tap-vm1", network.CtlMulticastRate, 150, 0x4002, 30, b)
	})
	// TCP to a group MAC, with a unicast IPv6 destination, is multicast
	// too: the TCP fast path (unicast only) must leave it to the limit.
	t.Run("multicast_rate_limit on TCP to a group MAC", func(t *testing.T) {
		b := tp.counters(t, "tap-vm1")
		sendAndMark(t, tp, cap, false, 0x4004, `
import time
time.sleep(1.1)
send([Ether(src=M1, dst="33:33:00:00:12:34")/IPv6(src=IP1, dst=IP2, fl=FL)/TCP(dport=80, flags="A")]*150)
time.sleep(1.1)`)
		check(t, "tap-vm1", network.CtlMulticastRate, 150, 0x4004, 30, b)
	})
	t.Run("ra_rate_limit toward the VM", func(t *testing.T) {
		b := tp.counters(t, "tap-vm2")
		sendAndMark(t, tp, cap, true, 0x4003, `
import time
send([Ether(src=BR, dst=M2)/IPv6(src="fe80::1", dst=LL2, hlim=255, fl=FL)/ICMPv6ND_RA()]*60, iface="br0")
time.sleep(1.1)`)
		check(t, "tap-vm2", network.CtlRARate, 60, 0x4003, 10, b)
	})
}
