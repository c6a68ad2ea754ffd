package shape

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/metald/metald/internal/netnstest"
	"github.com/metald/metald/internal/network/ns"
)

func TestMain(m *testing.M) { os.Exit(netnstest.Main(m)) }

type topo struct {
	host, a, b *netnstest.NS
	s          *Shaper
}

// shaper returns the topology's Shaper, opened on first use.
func (tp *topo) shaper(t *testing.T) *Shaper {
	t.Helper()
	if tp.s == nil {
		s, err := New(tp.host.Fd())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		tp.s = s
	}
	return tp.s
}

// newTopo: host ns with br0; VM namespaces a (2001:db8:1::10, port v-a)
// and b (2001:db8:1::11, port v-b).
func newTopo(t *testing.T) *topo {
	tp := &topo{host: netnstest.New(t), a: netnstest.New(t), b: netnstest.New(t)}
	for _, n := range []*netnstest.NS{tp.host, tp.a, tp.b} {
		for _, k := range []string{"net/ipv6/conf/all/accept_dad", "net/ipv6/conf/default/accept_dad"} {
			if err := ns.WriteSysctl(n.Fd(), k, "0"); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tp.host.Handle(t).LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}); err != nil {
		t.Fatal(err)
	}
	tp.host.MustRun(t, "ip", "link", "set", "br0", "up")
	for i, v := range []*netnstest.NS{tp.a, tp.b} {
		port := []string{"v-a", "v-b"}[i]
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: port, PeerNamespace: netlink.NsFd(tp.host.Fd())}
		if err := v.Handle(t).LinkAdd(veth); err != nil {
			t.Fatal(err)
		}
		tp.host.MustRun(t, "ip", "link", "set", port, "master", "br0", "up")
		v.MustRun(t, "ip", "link", "set", "eth0", "up")
		v.MustRun(t, "ip", "-6", "addr", "add", fmt.Sprintf("2001:db8:1::%d/64", 10+i), "dev", "eth0", "nodad")
	}
	return tp
}

func start(t *testing.T, n *netnstest.NS, name string, args ...string) {
	cmd := exec.Command(name, args...)
	if err := ns.Start(n.Fd(), cmd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Signal(syscall.SIGKILL); cmd.Wait() })
}

// iperf returns the received rate in Mbit/s of a 3 s TCP test from a to b
// (reverse: b to a).
func iperf(t *testing.T, tp *topo, reverse bool) float64 {
	args := []string{"-6", "-c", "2001:db8:1::11", "-t", "3", "-O", "1", "-J"}
	if reverse {
		args = append(args, "-R")
	}
	var out string
	for range 20 { // wait for the server; iperf3 may report errors in its JSON with exit status 0
		var err error
		out, err = tp.a.Run("iperf3", args...)
		var r struct {
			Error string `json:"error"`
			End   struct {
				SumReceived struct {
					BitsPerSecond float64 `json:"bits_per_second"`
				} `json:"sum_received"`
			} `json:"end"`
		}
		if err == nil && json.Unmarshal([]byte(out), &r) == nil && r.Error == "" && r.End.SumReceived.BitsPerSecond > 0 {
			return r.End.SumReceived.BitsPerSecond / 1e6
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("iperf3 never measured a transfer:\n%s", out)
	return 0
}

// TestBandwidth: iperf3 through a 100 Mbit/s limit on a's port measures
// within ±10% both ways; removing the limit lifts it.
func TestBandwidth(t *testing.T) {
	tp := newTopo(t)
	start(t, tp.b, "iperf3", "-s")
	if err := tp.shaper(t).Apply("v-a", Limits{Mbps: 100}); err != nil {
		t.Fatal(err)
	}
	if err := tp.shaper(t).Apply("v-a", Limits{Mbps: 100}); err != nil { // idempotent
		t.Fatal(err)
	}
	// A netdev ingress chain before the policer (as metald's first-hop
	// chains are) sees every frame from the VM: nothing redirects them
	// around the port's ingress hook.
	tp.host.MustRun(t, "nft", "add table netdev fh; add chain netdev fh in { type filter hook ingress device v-a priority -500; policy accept; }; add rule netdev fh in counter")
	from, to := iperf(t, tp, false), iperf(t, tp, true)
	t.Logf("limit 100 Mbit/s: from VM %.1f, toward VM %.1f", from, to)
	if out := tp.host.MustRun(t, "nft", "list", "chain", "netdev", "fh", "in"); !regexp.MustCompile(`packets [1-9]\d{3,}`).MatchString(out) {
		t.Errorf("the port's ingress hook missed the transfer:\n%s", out)
	}
	if out := tp.host.MustRun(t, "nft", "list", "chain", "netdev", BandwidthTable, "v-a-from-vm"); !regexp.MustCompile(`packets [1-9]`).MatchString(out) {
		t.Errorf("the policer dropped nothing at 100 Mbit/s:\n%s", out)
	}
	for _, v := range []float64{from, to} {
		if v < 90 || v > 110 {
			t.Errorf("rate %.1f Mbit/s outside 100 ±10%%", v)
		}
	}
	if err := tp.shaper(t).Remove("v-a"); err != nil {
		t.Fatal(err)
	}
	if free := iperf(t, tp, false); free < 300 {
		t.Errorf("after Remove only %.1f Mbit/s", free)
	} else {
		t.Logf("unlimited: %.0f Mbit/s", free)
	}
	if out, err := tp.host.Run("nft", "list", "tables", "netdev"); err != nil || strings.Contains(out, BandwidthTable) {
		t.Errorf("policer table left behind (%v):\n%s", err, out)
	}
	if out := tp.host.MustRun(t, "tc", "qdisc", "show", "dev", "v-a"); strings.Contains(out, "htb") || strings.Contains(out, "ingress") {
		t.Errorf("qdiscs left on v-a:\n%s", out)
	}
	// Removing again (nothing left) is not an error.
	if err := tp.shaper(t).Remove("v-a"); err != nil {
		t.Error(err)
	}
}

const floodScript = `
import socket, sys, time
dst, secs = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
end = time.time() + secs; n = 0
# 5000 packets/s, paced: 2.5 times the limit without overflowing the
# per-CPU backlog that veth shares between the flood and what passes.
t0 = time.time()
while time.time() < end:
    for _ in range(25):
        s.sendto(b"x", (dst, 9999)); n += 1
    time.sleep(max(0, t0 + n / 5000 - time.time()))
print(n)
`

const countScript = `
import socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE: a loaded host must not drop here
s.bind(("::", 9999)); s.settimeout(1.0)
n = 0; first = None; last = None
try:
    while True:
        s.recv(64); n += 1
        last = time.time()
        if first is None: first = last
except socket.timeout: pass
print(n, (last or 0) - (first or 0))
`

// flood sends UDP from src to dst for secs and returns (sent, received
// per second).
func flood(t *testing.T, src, dst *netnstest.NS, dstAddr string, secs float64) (int, float64) {
	f, _ := os.CreateTemp(t.TempDir(), "cnt")
	cmd := exec.Command("/usr/bin/python3", "-c", countScript)
	cmd.Stdout = f
	if err := ns.Start(dst.Fd(), cmd); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	out, err := src.Run("/usr/bin/python3", "-c", floodScript, dstAddr, strconv.FormatFloat(secs, 'f', 1, 64))
	if err != nil {
		t.Fatalf("flood: %v %s", err, out)
	}
	sent, _ := strconv.Atoi(strings.TrimSpace(out))
	cmd.Wait()
	b, _ := os.ReadFile(f.Name())
	var n int
	var dur float64
	fmt.Sscan(string(b), &n, &dur)
	if dur < secs/2 {
		t.Fatalf("receiver saw %d packets over %.2fs", n, dur)
	}
	return sent, float64(n) / dur
}

// TestPacketRate: a UDP flood through a 2000 packets/s limit arrives at
// 2000/s ±10%, both ways.
func TestPacketRate(t *testing.T) {
	tp := newTopo(t)
	if err := tp.shaper(t).Apply("v-a", Limits{PPS: 2000}); err != nil {
		t.Fatal(err)
	}
	sent, rate := flood(t, tp.a, tp.b, "2001:db8:1::11", 2)
	t.Logf("from VM: sent %d (%.0f/s), received %.0f/s", sent, float64(sent)/2, rate)
	if float64(sent)/2 < 4000*0.9 || rate < 1800 || rate > 2200 {
		t.Errorf("from VM: received %.0f/s, want 2000 ±10%% (sent %.0f/s)", rate, float64(sent)/2)
	}
	sent, rate = flood(t, tp.b, tp.a, "2001:db8:1::10", 2)
	t.Logf("toward VM: sent %d (%.0f/s), received %.0f/s", sent, float64(sent)/2, rate)
	if float64(sent)/2 < 4000*0.9 || rate < 1800 || rate > 2200 {
		t.Errorf("toward VM: received %.0f/s, want 2000 ±10%% (sent %.0f/s)", rate, float64(sent)/2)
	}
	// Both limits together, then removal.
	if err := tp.shaper(t).Apply("v-a", Limits{Mbps: 50, PPS: 2000}); err != nil {
		t.Fatal(err)
	}
	_, rate = flood(t, tp.a, tp.b, "2001:db8:1::11", 1)
	if rate < 1800 || rate > 2200 {
		t.Errorf("with a bandwidth limit too: from VM %.0f/s, want 2000 ±10%%", rate)
	}
	if err := tp.shaper(t).Remove("v-a"); err != nil {
		t.Fatal(err)
	}
	_, rate = flood(t, tp.a, tp.b, "2001:db8:1::11", 1)
	if rate < 4000*0.9 {
		t.Errorf("after Remove: %.0f/s", rate)
	}
	if out := tp.host.MustRun(t, "nft", "list", "table", "bridge", Table); strings.Contains(out, "v-a") {
		t.Errorf("v-a left in table:\n%s", out)
	}
}

// The Shaper remembers what its tables hold; an operator deleting them
// behind its back costs one retry, not an error.
func TestTablesDeletedBehindItsBack(t *testing.T) {
	tp := newTopo(t)
	s := tp.shaper(t)
	if err := s.Apply("v-a", Limits{Mbps: 100, PPS: 2000}); err != nil {
		t.Fatal(err)
	}
	tp.host.MustRun(t, "nft", "delete", "table", "netdev", BandwidthTable)
	tp.host.MustRun(t, "nft", "delete", "table", "bridge", Table)
	if err := s.Apply("v-b", Limits{Mbps: 50, PPS: 1000}); err != nil {
		t.Fatal(err)
	}
	for _, c := range [][]string{{"netdev", BandwidthTable, "v-b-from-vm"}, {"bridge", Table, "v-b-from-vm"}} {
		if _, err := tp.host.Run("nft", "list", "chain", c[0], c[1], c[2]); err != nil {
			t.Errorf("%v missing: %v", c, err)
		}
	}
	if err := s.Remove("v-b"); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove("v-a"); err != nil {
		t.Fatal(err)
	}
}
