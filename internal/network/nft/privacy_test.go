package nft

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/metald/metald/internal/network"
)

// TestPrivacyAddressFCFS (RFC 6620): a temporary address is bound to the
// first port that performs DAD for it, for the lifetime; another port's DAD
// for it binds nothing and its traffic from it is dropped and counted;
// after the lifetime the address is free again.
func TestPrivacyAddressFCFS(t *testing.T) {
	t.Parallel()
	c := allOn()
	c.PrivacyExtensions = true
	c.TempValidLifetime = 3 * time.Second
	tp := newTopo(t, c)
	for i := range tp.plans {
		tp.plans[i].Gateway = netip.MustParseAddr("2001:db8:1::1") // on br0
		if err := tp.fw.UpdateNIC(tp.plans[i]); err != nil {
			t.Fatal(err)
		}
	}
	cap2 := startCapture(t, tp.vm2, "eth0")
	capH := startCapture(t, tp.host, "br0")
	const temp = "2001:db8:1:0:1c2d:3e4f:5a6b:7c8d"

	// A DAD for the gateway's address is a claim on the router: never
	// bound, dropped and counted, and the override NA that would follow
	// (poisoning the neighbours' caches) is dropped too.
	t.Run("the gateway's address is never bound", func(t *testing.T) {
		b := tp.counters(t, "tap-vm1")
		sendAndMark(t, tp, cap2, false, 0x7010,
			`send(Ether(src=M1, dst="33:33:ff:00:00:01")/IPv6(src="::", dst="ff02::1:ff00:1", hlim=255)/ICMPv6ND_NS(tgt="2001:db8:1::1"))`+"\n"+
				`send(Ether(src=M1, dst=M2)/IPv6(src="2001:db8:1::1", dst=IP2, hlim=255, fl=0x7010)/ICMPv6ND_NA(tgt="2001:db8:1::1", R=1, O=1)/ICMPv6NDOptDstLLAddr(lladdr=M1))`)
		if cap2.count(0x7010) != 0 {
			t.Error("VM1's NA for the gateway's address reached VM2")
		}
		if out := tp.host.MustRun(t, "nft", "list", "set", "netdev", TableFor(tp.plans[0]), "tap-vm1-temp"); strings.Contains(out, "2001:db8:1::1 ") || strings.Contains(out, "2001:db8:1::1,") {
			t.Errorf("tap-vm1-temp bound the gateway's address:\n%s", out)
		}
		if d := deltas(b, tp.counters(t, "tap-vm1")); d[network.CtlSourceGuard] < 2 {
			t.Errorf("deltas %s, want source_guard +2 (the DAD and the NA)", fmtDeltas(d))
		}
	})
	dad := func(mac string) string {
		return fmt.Sprintf(`send(Ether(src=%s, dst="33:33:ff:6b:7c:8d")/IPv6(src="::", dst="ff02::1:ff6b:7c8d", hlim=255)/ICMPv6ND_NS(tgt=%q))`, mac, temp)
	}
	fromTemp := func(mac, dstMAC, dst string, fl uint32) string {
		return fmt.Sprintf(`send(Ether(src=%s, dst=%s)/IPv6(src=%q, dst=%s, fl=%d)/ICMPv6EchoRequest())`, mac, dstMAC, temp, dst, fl)
	}

	t.Run("without DAD the temporary address is refused", func(t *testing.T) {
		b := tp.counters(t, "tap-vm1")
		sendAndMark(t, tp, cap2, false, 0x7001, fromTemp("M1", "M2", "IP2", 0x7001))
		if cap2.count(0x7001) != 0 {
			t.Error("traffic from an unlearned temporary address reached VM2")
		}
		if d := deltas(b, tp.counters(t, "tap-vm1")); d[network.CtlSourceGuard] != 1 || len(d) != 1 {
			t.Errorf("deltas %s, want source_guard+1", fmtDeltas(d))
		}
	})
	t.Run("VM1 DADs the address and may use it", func(t *testing.T) {
		sendAndMark(t, tp, cap2, false, 0x7002, dad("M1")+"\n"+fromTemp("M1", "M2", "IP2", 0x7002))
		if cap2.count(0x7002) != 1 {
			t.Error("VM1's traffic from its learned temporary address did not reach VM2")
		}
		if out := tp.host.MustRun(t, "nft", "list", "set", "netdev", TableFor(tp.plans[0]), "tap-vm1-temp"); !strings.Contains(out, temp) {
			t.Errorf("tap-vm1-temp lacks %s:\n%s", temp, out)
		}
	})
	t.Run("VM2 DADs the same address: not bound, traffic dropped", func(t *testing.T) {
		b := tp.counters(t, "tap-vm2")
		scapy(t, tp.vm2, dad("M2")+"\n"+fromTemp("M2", "BR", `"2001:db8:1::1"`, 0x7003)+"\n"+
			`send(Ether(src=M2, dst=BR)/IPv6(src=IP2, dst="2001:db8:1::1", fl=0x87003)/ICMPv6EchoRequest())`)
		capH.waitFor(t, 0x87003)
		time.Sleep(20 * time.Millisecond)
		if capH.count(0x7003) != 0 {
			t.Error("VM2's traffic from VM1's temporary address reached the host")
		}
		if d := deltas(b, tp.counters(t, "tap-vm2")); d[network.CtlSourceGuard] != 1 || len(d) != 1 {
			t.Errorf("tap-vm2 deltas %s, want source_guard+1", fmtDeltas(d))
		}
		if out := tp.host.MustRun(t, "nft", "list", "set", "netdev", TableFor(tp.plans[1]), "tap-vm2-temp"); strings.Contains(out, temp) {
			t.Errorf("tap-vm2-temp learned an address VM1 holds:\n%s", out)
		}
	})
	t.Run("after the lifetime the address is free again", func(t *testing.T) {
		time.Sleep(3200 * time.Millisecond)
		scapy(t, tp.vm2, dad("M2")+"\n"+fromTemp("M2", "BR", `"2001:db8:1::1"`, 0x7004)+"\n"+
			`send(Ether(src=M2, dst=BR)/IPv6(src=IP2, dst="2001:db8:1::1", fl=0x87004)/ICMPv6EchoRequest())`)
		capH.waitFor(t, 0x87004)
		time.Sleep(20 * time.Millisecond)
		if capH.count(0x7004) != 1 {
			t.Error("VM2 could not take over the expired temporary address")
		}
		// and VM1 lost it
		b := tp.counters(t, "tap-vm1")
		sendAndMark(t, tp, cap2, false, 0x7005, fromTemp("M1", "M2", "IP2", 0x7005))
		if cap2.count(0x7005) != 0 || deltas(b, tp.counters(t, "tap-vm1"))[network.CtlSourceGuard] != 1 {
			t.Error("VM1 still uses an address now bound to VM2")
		}
	})
}

// TestPrivacyBindingsBounded: a guest that DADs for more temporary
// addresses than MaxTempAddrs (a flood of targets) binds MaxTempAddrs of
// them; traffic from one bound first passes, from one beyond the bound is
// dropped and counted, and a NIC programmed before the bound existed (its
// set unbounded) is reported as drift and repaired without losing its
// bindings.
func TestPrivacyBindingsBounded(t *testing.T) {
	t.Parallel()
	c := allOn()
	c.PrivacyExtensions = true
	tp := newTopo(t, c)
	for _, p := range tp.plans {
		if err := tp.fw.UpdateNIC(p); err != nil {
			t.Fatal(err)
		}
	}
	cap2 := startCapture(t, tp.vm2, "eth0")
	target := func(i int) string { return fmt.Sprintf("2001:db8:1:0:aaaa:bbbb:cccc:%x", i+1) }
	var prog strings.Builder
	for i := range MaxTempAddrs + 4 {
		// The solicited-node group is not checked by the rules; one will do.
		fmt.Fprintf(&prog, "send(Ether(src=M1, dst=\"33:33:ff:cc:00:01\")/IPv6(src=\"::\", dst=\"ff02::1:ffcc:1\", hlim=255)/ICMPv6ND_NS(tgt=%q))\n", target(i))
	}
	scapy(t, tp.vm1, prog.String())
	set := TableFor(tp.plans[0])
	out := tp.host.MustRun(t, "nft", "list", "set", "netdev", set, "tap-vm1-temp")
	if n := strings.Count(out, "2001:db8:1:0:aaaa:bbbb:cccc:"); n != MaxTempAddrs {
		t.Fatalf("tap-vm1-temp holds %d of the %d addresses DADed, want %d:\n%s", n, MaxTempAddrs+4, MaxTempAddrs, out)
	}
	from := func(src string, fl uint32) string {
		return fmt.Sprintf(`send(Ether(src=M1, dst=M2)/IPv6(src=%q, dst=IP2, fl=%d)/ICMPv6EchoRequest())`, src, fl)
	}
	sendAndMark(t, tp, cap2, false, 0x7101, from(target(0), 0x7101))
	if cap2.count(0x7101) != 1 {
		t.Error("traffic from the first bound temporary address did not reach VM2")
	}
	b := tp.counters(t, "tap-vm1")
	sendAndMark(t, tp, cap2, false, 0x7102, from(target(MaxTempAddrs+3), 0x7102))
	if cap2.count(0x7102) != 0 {
		t.Error("traffic from a temporary address beyond the bound reached VM2")
	}
	if d := deltas(b, tp.counters(t, "tap-vm1")); d[network.CtlSourceGuard] != 1 || len(d) != 1 {
		t.Errorf("deltas %s, want source_guard+1", fmtDeltas(d))
	}

	// A set of the layout before the bound: drift, repaired in place.
	tp.host.MustRun(t, "nft", "add", "set", "netdev", set, "tap-vm2-temp", "{ type ipv6_addr; flags dynamic,timeout; size 65535; }")
	r, err := tp.fw.Reconcile(t.Context(), tp.plans[:])
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(r.NICs["tap-vm2"], "set tap-vm2-temp size differs") {
		t.Fatalf("repairs %s lack the temporary set's size", r)
	}
	if out := tp.host.MustRun(t, "nft", "list", "set", "netdev", TableFor(tp.plans[1]), "tap-vm2-temp"); !strings.Contains(out, fmt.Sprintf("size %d", MaxTempAddrs)) {
		t.Errorf("tap-vm2-temp not bounded after the update:\n%s", out)
	}
	if out := tp.host.MustRun(t, "nft", "list", "set", "netdev", set, "tap-vm1-temp"); strings.Count(out, "2001:db8:1:0:aaaa:bbbb:cccc:") != MaxTempAddrs {
		t.Errorf("tap-vm1-temp lost bindings:\n%s", out)
	}
}
