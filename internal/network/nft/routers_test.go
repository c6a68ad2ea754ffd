package nft

import (
	"fmt"
	"strings"
	"testing"

	"github.com/metald/metald/internal/network"
)

// TestRAFromSeveralRouters: with two allowed router MACs the RA checks
// toward the VM go to the helper chain vm-<dev>-in_ra. RAs from either
// router pass, an RA from the allowed address with another MAC is dropped
// by RA guard, and the two routers share ONE rate limit: a burst
// alternating them admits about one bucket (limitBurst), not one each.
func TestRAFromSeveralRouters(t *testing.T) {
	t.Parallel()
	const router2 = "02:00:00:00:00:02"
	c := allOn()
	c.AllowedRAMACs = append(c.AllowedRAMACs[:1:1], mustMAC(router2)) // brMAC, the router of the other tests
	c.RARateLimit = 5
	tp := newTopo(t, c)
	cap := startCapture(t, tp.vm2, "eth0")
	// An RA from the allowed source fe80::1 toward VM2, from source MAC mac
	// with flow label fl (Python expressions).
	raFrom := func(mac, fl string) string {
		return `Ether(src=` + mac + `, dst=M2)/IPv6(src="fe80::1", dst=LL2, hlim=255, fl=` + fl + `)/ICMPv6ND_RA()/ICMPv6NDOptPrefixInfo(prefix="2001:db8:1::", prefixlen=64)`
	}
	r2 := fmt.Sprintf("%q", router2)

	t.Run("helper chain in the kernel", func(t *testing.T) {
		chain := network.NamesFor("tap-vm2").ToSub("ra")
		found := false
		for _, line := range strings.Split(tp.host.MustRun(t, "nft", "list", "chains", "netdev"), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "chain" && f[1] == chain {
				found = true
			}
		}
		if !found {
			t.Fatalf("no chain %s in the host namespace", chain)
		}
		out := tp.host.MustRun(t, "nft", "list", "chain", "netdev", TableFor(tp.plans[1]), chain)
		// nft lists no burst when it is its default of 5 (limitBurst).
		if n := strings.Count(out, "limit rate over 5/second"); n != 1 {
			t.Errorf("%s holds %d RA rate limits, want 1:\n%s", chain, n, out)
		}
	})
	if t.Failed() {
		return
	}

	t.Run("RA from each allowed router reaches the VM", func(t *testing.T) {
		b := tp.counters(t, "tap-vm2")
		sendAndMark(t, tp, cap, true, 0x5001, `send([`+raFrom("BR", "FL")+`, `+raFrom(r2, "FL+1")+`], iface="br0")`)
		if n := cap.count(0x5001); n != 1 {
			t.Errorf("RA from the first router (%s) reached VM2 %d times, want 1", brMAC, n)
		}
		if n := cap.count(0x5002); n != 1 {
			t.Errorf("RA from the second router (%s) reached VM2 %d times, want 1", router2, n)
		}
		if d := deltas(b, tp.counters(t, "tap-vm2")); len(d) != 0 {
			t.Errorf("allowed RAs moved tap-vm2 counters: %s", fmtDeltas(d))
		}
	})

	t.Run("RA from allowed address but a MAC not allowed", func(t *testing.T) {
		b := tp.counters(t, "tap-vm2")
		sendAndMark(t, tp, cap, true, 0x5003, `send(`+raFrom(`"02:00:00:00:07:07"`, "FL")+`, iface="br0")`)
		if n := cap.count(0x5003); n != 0 {
			t.Errorf("RA with a MAC not allowed reached VM2 %d times", n)
		}
		if d := deltas(b, tp.counters(t, "tap-vm2")); d[network.CtlRAGuard] != 1 || len(d) != 1 {
			t.Errorf("tap-vm2 deltas %s, want ra_guard+1", fmtDeltas(d))
		}
	})

	t.Run("the two routers share one rate limit", func(t *testing.T) {
		const sent = 20
		b := tp.counters(t, "tap-vm2")
		// After the sleep the bucket is full (limitBurst); the burst
		// alternates the routers, flow label FL from the first, FL+1
		// from the second.
		sendAndMark(t, tp, cap, true, 0x5004, fmt.Sprintf(`
import time
time.sleep(1.1)
send([%s, %s]*%d, iface="br0")
time.sleep(1.1)`, raFrom("BR", "FL"), raFrom(r2, "FL+1"), sent/2))
		d := deltas(b, tp.counters(t, "tap-vm2"))
		first, second := cap.count(0x5004), cap.count(0x5005)
		arrived := first + second
		if int(d[network.CtlRARate])+arrived != sent || len(d) > 1 {
			t.Errorf("sent %d, arrived %d, deltas %s, want arrived + ra_rate = %d and no other counter", sent, arrived, fmtDeltas(d), sent)
		}
		// One bucket of limitBurst, refilling at 5/s during a send of well
		// under a second; one bucket per router would admit 2*limitBurst.
		if arrived < limitBurst || arrived > limitBurst+3 {
			t.Errorf("%d of %d RAs arrived (%d from %s, %d from %s), want between %d and %d (one shared bucket)",
				arrived, sent, first, brMAC, second, router2, limitBurst, limitBurst+3)
		}
		if first == 0 || second == 0 {
			t.Errorf("arrived %d from %s and %d from %s, want both routers served", first, brMAC, second, router2)
		}
		t.Logf("sent %d alternating, arrived %d (%d from %s, %d from %s), ra_rate +%d", sent, arrived, first, brMAC, second, router2, d[network.CtlRARate])
	})
}
