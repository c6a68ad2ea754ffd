package daemon_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/metald/metald/internal/daemon"
	"github.com/metald/metald/internal/network/ns"
)

// floodScript sends at least want IPv6/UDP frames from spoofed sources
// (256 of them, none the VM's) through a packet socket as fast as it can,
// and prints how many the socket accepted.
const floodScript = `
import socket, struct, sys
want = int(sys.argv[1])
mac = bytes.fromhex(open("/sys/class/net/eth0/address").read().strip().replace(":", ""))
dst = socket.inet_pton(socket.AF_INET6, "2001:db8:74::11")
frames = []
for i in range(256):
    src = socket.inet_pton(socket.AF_INET6, "2001:db8:74::%x" % (0x1000 + i))
    udp = struct.pack("!HHHH", 40000 + i, 9, 12, 0) + b"spam"
    ip6 = struct.pack("!IHBB", 6 << 28, len(udp), 17, 64) + src + dst
    frames.append(bytes.fromhex("020000000099") + mac + b"\x86\xdd" + ip6 + udp)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
sent = 0
while sent < want:
    try:
        s.send(frames[sent & 255])
        sent += 1
    except OSError:
        pass
print("sent", sent, flush=True)
`

func heapAlloc() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

func percentile(d []time.Duration, p float64) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

// A VM created through the API floods 100,000 spoofed-source frames: the
// API stays responsive (GetVm/ListVms p99 < 100 ms during the flood), the
// source-guard counter and metald_ipv6_source_guard_violations_total move by
// exactly the frames sent, the events are a bounded sample (folded spoofed
// sources), and the daemon's heap stays bounded; any event lost to
// back-pressure is counted in metald_security_events_dropped_total.
func TestEventsSpoofFloodThroughDaemon(t *testing.T) {
	const frames = 200000
	// The liveness/reconcile pass at its production interval (the test
	// harness runs it every 200 ms).
	e := newEnvWith(t, func(o *daemon.Options) { o.WatchInterval = 2 * time.Second })
	cfg := vmConfig("tf", nic("eth0", "br-fl", "2001:db8:74::10/64", "2001:db8:74::1"))
	cfg["security_profile"] = map[string]any{"profile_name": "high"}
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-fl", "config": cfg})
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-fn", "config": vmConfig("tf", nic("eth0", "br-fl", "2001:db8:74::11/64", "2001:db8:74::1"))})
	e.mustCall("BootVm", map[string]any{"vm_id": "vm-fl"})
	e.mustCall("BootVm", map[string]any{"vm_id": "vm-fn"})
	e.waitDAD("vm-fl")
	e.waitDAD("vm-fn")

	const counter = "tap-vm-fl-source_guard"
	const series = `metald_ipv6_source_guard_violations_total{tenant_id="tf"}`
	counterBefore := e.counter(t, counter)
	metricBefore := e.metric0(series)
	droppedBefore := e.metric("metald_security_events_dropped_total")
	heapBefore := heapAlloc()
	start := time.Now()

	// API load during the flood.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var lat []time.Duration
	var apiErr error
	var slow []string
	for w := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				proc, body := "GetVm", `{"vm_id":"vm-fl"}`
				if (i+w)%2 == 1 {
					proc, body = "ListVms", `{}`
				}
				t0 := time.Now()
				resp, err := http.Post(e.url+"/vmprovisioner.v1.VmService/"+proc, "application/json", bytes.NewBufferString(body))
				if err == nil {
					var out map[string]any
					err = json.NewDecoder(resp.Body).Decode(&out)
					resp.Body.Close()
					if err == nil && resp.StatusCode != 200 {
						err = &httpErr{proc, resp.StatusCode}
					}
				}
				d := time.Since(t0)
				mu.Lock()
				lat = append(lat, d)
				if d > 50*time.Millisecond {
					slow = append(slow, fmt.Sprintf("%s at +%s took %s", proc, t0.Sub(start).Round(time.Millisecond), d.Round(time.Millisecond)))
				}
				if err != nil && apiErr == nil {
					apiErr = err
				}
				mu.Unlock()
			}
		}()
	}

	f := e.vmNS("vm-fl")
	out, err := ns.Command(int(f.Fd()), pyCmd(strings.ReplaceAll(floodScript, "int(sys.argv[1])", strconv.Itoa(frames))))
	close(stop)
	wg.Wait()
	floodTime := time.Since(start)
	m := regexp.MustCompile(`sent (\d+)`).FindStringSubmatch(string(out))
	if err != nil || m == nil {
		t.Fatalf("flood: %v\n%s", err, out)
	}
	sent, _ := strconv.ParseUint(m[1], 10, 64)
	if sent < frames {
		t.Fatalf("sent %d frames, want %d", sent, frames)
	}
	if apiErr != nil {
		t.Fatalf("API call during the flood: %v", apiErr)
	}
	if len(lat) < 20 {
		t.Fatalf("only %d API calls during the flood (%s)", len(lat), floodTime)
	}
	p50, p99 := percentile(lat, 0.5), percentile(lat, 0.99)
	t.Logf("flood: %d frames in %s (%.0f/s); API during it: %d calls, p50 %s, p99 %s, max %s",
		sent, floodTime, float64(sent)/floodTime.Seconds(), len(lat), p50, p99, slices.Max(lat))
	if p99 >= 100*time.Millisecond {
		t.Errorf("API p99 %s during the flood, want < 100ms; slow calls: %v", p99, slow)
	}

	// Exact counts.
	if d := e.counter(t, counter) - counterBefore; d != sent {
		t.Errorf("source_guard counter moved by %d, sent %d", d, sent)
	}
	if d := e.metric(series) - metricBefore; d != float64(sent) {
		t.Errorf("%s moved by %.0f, sent %d", series, d, sent)
	}
	// Events are a sample: attributed, spoofed sources folded, far fewer
	// packets than sent.
	ev := e.waitEvent(t, "vm_id=vm-fl&event_type=source_guard_violation", func(ev event) bool { return ev.TenantID == "tf" })
	logged := packetCount(e.events(t, "vm_id=vm-fl&event_type=source_guard_violation"))
	folded := e.events(t, "vm_id=vm-fl&event_type=source_guard_violation")
	nfolded := 0
	for _, ev := range folded {
		if detail(ev, "sources_folded") == "true" {
			nfolded++
		}
	}
	t.Logf("events: %d source_guard_violation events for %d logged packets (%d folded); first %+v", len(folded), logged, nfolded, ev)
	if logged <= 0 || uint64(logged) >= sent {
		t.Errorf("%d packets logged as events for %d sent: not a sample", logged, sent)
	}
	if len(folded) > 256 {
		t.Errorf("%d events for one flood: spoofed sources not folded", len(folded))
	}

	// Under enhanced monitoring the tenant's drops are logged up to the
	// 1000/s per rule safety cap: the reader takes far more records, the
	// counts stay exact and memory bounded.
	e.shell(t, `curl -sf -X POST http://localhost:8080/debug/security/enhance-monitoring -d '{"tenant_id":"tf","duration":"1m"}'`)
	counterBefore, metricBefore = e.counter(t, counter), e.metric(series)
	recordsBefore := e.metric("metald_security_log_records_total")
	t1 := time.Now()
	out, err = ns.Command(int(f.Fd()), pyCmd(strings.ReplaceAll(floodScript, "int(sys.argv[1])", strconv.Itoa(frames))))
	took := time.Since(t1)
	m = regexp.MustCompile(`sent (\d+)`).FindStringSubmatch(string(out))
	if err != nil || m == nil {
		t.Fatalf("monitored flood: %v\n%s", err, out)
	}
	sent, _ = strconv.ParseUint(m[1], 10, 64)
	if d := e.counter(t, counter) - counterBefore; d != sent {
		t.Errorf("monitored: source_guard counter moved by %d, sent %d", d, sent)
	}
	if d := e.metric(series) - metricBefore; d != float64(sent) {
		t.Errorf("monitored: %s moved by %.0f, sent %d", series, d, sent)
	}
	time.Sleep(500 * time.Millisecond) // the reader's last batch
	records := e.metric("metald_security_log_records_total") - recordsBefore
	t.Logf("monitored flood: %d frames in %s; %.0f log records read (cap 1000/s + burst 100)", sent, took, records)
	if records < 200 || records > 1000*took.Seconds()+100+200 {
		t.Errorf("monitored flood: %.0f log records in %s, want more than the unmonitored sample and at most the 1000/s cap", records, took)
	}

	dropped := e.metric("metald_security_events_dropped_total") - droppedBefore
	heapAfter := heapAlloc()
	growth := int64(heapAfter) - int64(heapBefore)
	t.Logf("heap before %d KiB, after %d KiB (growth %d KiB); events dropped by back-pressure: %.0f",
		heapBefore>>10, heapAfter>>10, growth>>10, dropped)
	if growth > 64<<20 {
		t.Errorf("heap grew by %d MiB during the flood", growth>>20)
	}
	if dropped < 0 {
		t.Errorf("metald_security_events_dropped_total went down: %v", dropped)
	}
	if time.Since(start) > 40*time.Second {
		t.Errorf("flood test took %s", time.Since(start))
	}
}

type httpErr struct {
	proc string
	code int
}

func (e *httpErr) Error() string { return e.proc + ": HTTP " + strconv.Itoa(e.code) }
