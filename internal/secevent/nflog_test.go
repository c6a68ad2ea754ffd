package secevent_test

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/metald/metald/internal/netnstest"
	"github.com/metald/metald/internal/network/ns"
	"github.com/metald/metald/internal/secevent"
	"github.com/metald/metald/internal/secevent/eventhttp"
)

// raceEnabled is set under -race, where the latency bound does not hold.
var raceEnabled bool

func TestMain(m *testing.M) { os.Exit(netnstest.Main(m)) }

const (
	testGroup = 6421
	vm1MAC    = "02:00:00:00:01:01"
)

// nflogTopo is a host namespace with bridge br0 and a VM namespace whose
// eth0 is a veth peered with tap-vm1 on br0, plus a bridge-family table
// whose rules log drops to testGroup with metald prefixes.
type nflogTopo struct {
	host, vm *netnstest.NS
}

func newNflogTopo(t *testing.T, rules string) *nflogTopo {
	t.Helper()
	tp := &nflogTopo{host: netnstest.New(t), vm: netnstest.New(t)}
	hh := tp.host.Handle(t)
	if err := hh.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}); err != nil {
		t.Fatal(err)
	}
	mac, _ := net.ParseMAC(vm1MAC)
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0", HardwareAddr: mac}, PeerName: "tap-vm1",
		PeerNamespace: netlink.NsFd(tp.host.Fd())}
	if err := tp.vm.Handle(t).LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	tp.host.MustRun(t, "ip", "link", "set", "br0", "up")
	tp.host.MustRun(t, "ip", "link", "set", "tap-vm1", "master", "br0", "up")
	tp.vm.MustRun(t, "ip", "link", "set", "eth0", "up")
	f := filepath.Join(t.TempDir(), "rules.nft")
	if err := os.WriteFile(f, []byte(rules), 0o644); err != nil {
		t.Fatal(err)
	}
	tp.host.MustRun(t, "nft", "-f", f)
	return tp
}

func scapy(t *testing.T, n *netnstest.NS, script string) {
	t.Helper()
	prelude := `
import logging
logging.getLogger("scapy").setLevel(logging.ERROR)
from scapy.layers.l2 import Ether
from scapy.layers.inet6 import *
from scapy.sendrecv import sendp
`
	out, err := ns.Command(n.Fd(), exec.Command("/usr/bin/python3", "-c", prelude+script))
	if err != nil {
		t.Fatalf("scapy: %v\n%s", err, out)
	}
}

var raRules = fmt.Sprintf(`table bridge metald_test {
	chain prerouting {
		type filter hook prerouting priority -300; policy accept;
		iifname "tap-vm1" icmpv6 type nd-router-advert log group %d prefix "%s" drop
		iifname "tap-vm1" ip6 saddr 2001:db8:bad::/48 log group %d prefix "%s" drop
		iifname "tap-vm1" ip6 nexthdr 0 log group %d prefix "%s" drop
	}
}
`, testGroup, secevent.Prefix("tap-vm1", "ra_guard"), testGroup, secevent.Prefix("tap-vm1", "source_guard"),
	testGroup, secevent.Prefix("tap-vm1", "ext_hbh"))

func getJSON(t testing.TB, url string, v any) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Fatal(err)
	}
}

func TestNFLOGRouterAdvertisements(t *testing.T) {
	tp := newNflogTopo(t, raRules)
	dir := t.TempDir()
	h := start(t, dir, secevent.Config{Window: time.Second}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r, err := h.svc.StartReader(ctx, secevent.ReaderConfig{Group: testGroup, NetNS: tp.host.Fd()})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	scapy(t, tp.vm, `sendp(Ether(src="`+vm1MAC+`", dst="33:33:00:00:00:01")/IPv6(src="fe80::bad", dst="ff02::1")/ICMPv6ND_RA(), count=10, iface="eth0", verbose=False)
sendp(Ether(src="`+vm1MAC+`", dst="33:33:00:00:00:02")/IPv6(src="2001:db8:1::10", dst="2001:db8:1::1")/IPv6ExtHdrHopByHop()/ICMPv6EchoRequest(), count=3, iface="eth0", verbose=False)
`)
	// Wait for both windows to close (the VM's own MLD reports may add
	// more events).
	deadline := time.Now().Add(10 * time.Second)
	for {
		ra, _ := h.svc.Query(context.Background(), secevent.Filter{Type: secevent.TypeRAGuardBlock})
		ext, _ := h.svc.Query(context.Background(), secevent.Filter{Type: secevent.TypeExtensionHeaderBlock})
		ext = slices.DeleteFunc(ext, func(e secevent.Event) bool { return e.Details.Src != "2001:db8:1::10" })
		if len(ra) > 0 && len(ext) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("events not written: %+v", h.svc.Stats())
		}
		time.Sleep(20 * time.Millisecond)
	}
	srv := httptest.NewServer(eventhttp.New(h.svc))
	defer srv.Close()
	var evs []secevent.Event
	getJSON(t, srv.URL+"/debug/security/events?vm_id=vm-1&event_type=ra_guard_block", &evs)
	if len(evs) != 1 {
		t.Fatalf("events: %+v", evs)
	}
	e := evs[0]
	if e.Details.PacketCount != 10 || e.Severity != secevent.SeverityHigh || e.TenantID != "tenant-a" || e.InterfaceID != "eth0" ||
		e.Details.Src != "fe80::bad" || e.Details.Dst != "ff02::1" || e.Details.SrcMAC != vm1MAC || e.Details.Protocol != "icmpv6" ||
		e.Details.ICMPv6Type == nil || *e.Details.ICMPv6Type != 134 || e.Details.Rule != "ra_guard" {
		t.Fatalf("ra event: %+v", e)
	}
	getJSON(t, srv.URL+"/debug/security/events?event_type=extension_header_block", &evs)
	// The VM's kernel may log its own MLD reports (hop-by-hop) too.
	evs = slices.DeleteFunc(evs, func(e secevent.Event) bool { return e.Details.Src != "2001:db8:1::10" })
	if len(evs) != 1 || evs[0].Details.Header != "hop_by_hop" || !slices.Equal(evs[0].Details.Headers, []string{"hop_by_hop"}) ||
		evs[0].Details.PacketCount != 3 || evs[0].Severity != secevent.SeverityMedium || *evs[0].Details.ICMPv6Type != 128 {
		t.Fatalf("ext event: %+v", evs)
	}
	for _, q := range []string{"vm_id=vm-2", "severity=low", "tenant_id=tenant-b", "since=2099-01-01T00:00:00Z"} {
		getJSON(t, srv.URL+"/debug/security/events?"+q, &evs)
		if len(evs) != 0 {
			t.Fatalf("%s: %+v", q, evs)
		}
	}
	raw, _ := os.ReadFile(filepath.Join(dir, "log", "security.log"))
	var marked int
	for _, ln := range strings.Split(string(raw), "\n") {
		if strings.Contains(ln, "IPv6_VIOLATION") && strings.Contains(ln, `"ra_guard_block"`) && strings.Contains(ln, `"packet_count":10`) {
			marked++
		}
	}
	if marked != 1 {
		t.Fatalf("security.log:\n%s", raw)
	}
	// Restart keeps it.
	r.Close()
	h.stop()
	h2 := start(t, dir, secevent.Config{}, nil)
	got, err := h2.svc.Query(context.Background(), secevent.Filter{VMID: "vm-1", Type: secevent.TypeRAGuardBlock})
	if err != nil || len(got) != 1 || got[0].ID != e.ID || got[0].Details.PacketCount != 10 {
		t.Fatalf("after restart: %+v %v", got, err)
	}
}

// flood sends n Ethernet frames with random sources in 2001:db8:bad::/48
// from the namespace's eth0 through an AF_PACKET socket.
func floodHere(t *testing.T, count int) {
	t.Helper()
	err := func() error {
		ifi, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		sa := &unix.SockaddrLinklayer{Ifindex: ifi.Index, Halen: 6}
		frame := make([]byte, 14+40+8)
		copy(frame[0:6], []byte{0x02, 0, 0, 0, 0, 0x99})
		copy(frame[6:12], ifi.HardwareAddr)
		binary.BigEndian.PutUint16(frame[12:14], 0x86dd)
		ip := frame[14:]
		ip[0] = 0x60
		binary.BigEndian.PutUint16(ip[4:6], 8)
		ip[6], ip[7] = 58, 64
		copy(ip[8:], []byte{0x20, 0x01, 0x0d, 0xb8, 0x0b, 0xad})
		copy(ip[24:], []byte{0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1})
		ip[40] = 128
		t0 := time.Now()
		for i := 0; i < count; i++ {
			binary.BigEndian.PutUint64(ip[16:24], rand.Uint64())
			for {
				err := unix.Sendto(fd, frame, 0, sa)
				if err == nil {
					break
				}
				if err != unix.ENOBUFS && err != unix.EAGAIN {
					return err
				}
				runtime.Gosched()
			}
		}
		t.Logf("sent %d frames in %v", count, time.Since(t0))
		return nil
	}()
	if err != nil {
		t.Fatalf("flood: %v", err)
	}
}

func TestNFLOGFlood(t *testing.T) {
	tp := newNflogTopo(t, raRules)
	dir := t.TempDir()
	const maxBuckets = 64
	h := start(t, dir, secevent.Config{Window: 500 * time.Millisecond, MaxBuckets: maxBuckets, MaxSourcesPerKey: 1 << 20}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r, err := h.svc.StartReader(ctx, secevent.ReaderConfig{Group: testGroup, NetNS: tp.host.Fd()})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	srv := httptest.NewServer(eventhttp.New(h.svc))
	defer srv.Close()

	var ms0 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms0)

	// Probe the API and the table size, first without load (the baseline
	// tells how busy the machine itself is), then while the flood runs.
	var mu sync.Mutex
	var lat []time.Duration
	maxBucketsSeen := 0
	probe := func(stop <-chan struct{}, done chan<- struct{}) {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			t0 := time.Now()
			resp, err := http.Get(srv.URL + "/debug/security/events?limit=100")
			if err != nil {
				continue
			}
			var evs []secevent.Event
			json.NewDecoder(resp.Body).Decode(&evs)
			resp.Body.Close()
			d := time.Since(t0)
			mu.Lock()
			lat = append(lat, d)
			maxBucketsSeen = max(maxBucketsSeen, h.svc.Stats().Buckets)
			mu.Unlock()
		}
	}
	stop, probed := make(chan struct{}), make(chan struct{})
	go probe(stop, probed)
	time.Sleep(500 * time.Millisecond)
	close(stop)
	<-probed
	slices.Sort(lat)
	baseline := lat[len(lat)*99/100]
	lat = nil
	stop, probed = make(chan struct{}), make(chan struct{})
	go probe(stop, probed)
	const sent = 120000
	// The flood comes from another process, as a VM's would.
	t0 := time.Now()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperFlood$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("SECEVENT_FLOOD=%d", sent))
	if out, err := ns.Command(tp.vm.Fd(), cmd); err != nil || !strings.Contains(string(out), "PASS") {
		t.Fatalf("flood helper: %v\n%s", err, out)
	}
	took := time.Since(t0)
	time.Sleep(200 * time.Millisecond)
	close(stop)
	<-probed
	r.Close()
	h.svc.Flush()
	deadline := time.Now().Add(10 * time.Second)
	for h.svc.Stats().Buckets > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	var ms1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms1)
	st := h.svc.Stats()
	slices.Sort(lat)
	if len(lat) < 10 {
		t.Fatalf("only %d API probes during the flood (%v)", len(lat), took)
	}
	p99 := lat[len(lat)*99/100]
	t.Logf("flood: %d frames in %v; ingested %d, written %d, dropped %d, max buckets %d (probe saw %d), %d probes p50 %v p99 %v max %v (idle p99 %v), heap %d -> %d KiB",
		sent, took, st.Ingested, st.Written, st.Dropped, st.MaxBucketsSeen, maxBucketsSeen, len(lat), lat[len(lat)/2], p99, lat[len(lat)-1], baseline,
		ms0.HeapInuse>>10, ms1.HeapInuse>>10)
	if st.MaxBucketsSeen > maxBuckets || maxBucketsSeen > maxBuckets {
		t.Fatalf("aggregation table grew to %d (limit %d)", st.MaxBucketsSeen, maxBuckets)
	}
	if st.Ingested < 1000 {
		t.Fatalf("reader ingested only %d records", st.Ingested)
	}
	if st.Dropped == 0 || st.Dropped+st.Written < 100 {
		t.Fatalf("drops not counted: %+v", st)
	}
	if got := counterValue(t, h, secevent.MetricEventsDropped); got != float64(st.Dropped) {
		t.Fatalf("dropped metric %v != %d", got, st.Dropped)
	}
	// The bound is 100 ms; on a machine that is already that slow without
	// the flood (other test binaries hogging both cores) it is the idle p99
	// plus 100 ms.
	bound := max(100*time.Millisecond, baseline+100*time.Millisecond)
	if baseline < 20*time.Millisecond {
		bound = 100 * time.Millisecond
	}
	if p99 > bound && !raceEnabled {
		if load := loadAvg(); load > 2*float64(runtime.NumCPU()) {
			// Other processes own the CPUs: the scheduler, not this
			// pipeline, sets the latency. Say so rather than flake.
			t.Logf("NOT ASSERTED: API p99 %v during the flood (bound %v); machine load %.1f on %d CPUs", p99, bound, load, runtime.NumCPU())
		} else {
			t.Fatalf("API p99 %v during the flood (bound %v, idle p99 %v)", p99, bound, baseline)
		}
	}
	if ms1.HeapInuse > ms0.HeapInuse+64<<20 {
		t.Fatalf("heap grew from %d to %d bytes", ms0.HeapInuse, ms1.HeapInuse)
	}
}

// TestHelperFlood is the flood sender TestNFLOGFlood runs in the VM
// namespace as a separate process.
func TestHelperFlood(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("SECEVENT_FLOOD"))
	if n == 0 {
		t.Skip("helper process only")
	}
	floodHere(t, n)
}

func counterValue(t *testing.T, h *harness, name string) float64 {
	return counter(t, h.reg, name, nil)
}

// loadAvg returns the 1-minute load average (0 if unknown).
func loadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	f, _ := strconv.ParseFloat(strings.Fields(string(b))[0], 64)
	return f
}
