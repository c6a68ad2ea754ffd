package secevent_test

import (
	"bufio"
	"context"
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/metald/metald/internal/secevent"
	"github.com/metald/metald/internal/store/sqlite"
)

// clock is a settable clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

type harness struct {
	t       *testing.T
	dir     string
	db      *sqlite.Store
	svc     *secevent.Service
	reg     *prometheus.Registry
	stop    func()
	offload bool
}

func resolver(dev string) (string, string, string, bool) {
	switch dev {
	case "tap-vm1":
		return "vm-1", "tenant-a", "eth0", true
	case "tap-vm2":
		return "vm-2", "tenant-b", "eth0", true
	}
	return "", "", "", false
}

// start opens (or reopens) the database in dir and runs a service on it.
func start(t *testing.T, dir string, cfg secevent.Config, now func() time.Time) *harness {
	t.Helper()
	return startWith(t, dir, cfg, now, nil)
}

// startWith is start with opt changing the service's options.
func startWith(t *testing.T, dir string, cfg secevent.Config, now func() time.Time, opt func(*secevent.Options)) *harness {
	t.Helper()
	ctx := context.Background()
	db, err := sqlite.Open(ctx, filepath.Join(dir, "metald.db"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.LogDir == "" {
		cfg.LogDir = filepath.Join(dir, "log")
	}
	h := &harness{t: t, dir: dir, db: db, reg: prometheus.NewRegistry()}
	o := secevent.Options{
		Store: db.Events(), Resolve: resolver, Metrics: secevent.NewMetrics(h.reg), Now: now,
		FlowtableOffload: func() (bool, string) {
			if h.offload {
				return true, ""
			}
			return false, "kernel has no flowtable offload for these devices"
		},
	}
	if opt != nil {
		opt(&o)
	}
	svc, err := secevent.New(ctx, cfg, o)
	if err != nil {
		t.Fatal(err)
	}
	h.svc = svc
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { svc.Run(rctx); close(done) }()
	var once sync.Once
	h.stop = func() {
		once.Do(func() {
			cancel()
			<-done
			db.Close()
		})
	}
	t.Cleanup(h.stop)
	return h
}

// waitWritten waits until the service has written n events in total.
func (h *harness) waitWritten(n int64) {
	h.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for h.svc.Stats().Written < n {
		if time.Now().After(deadline) {
			h.t.Fatalf("written %d events, want %d (stats %+v)", h.svc.Stats().Written, n, h.svc.Stats())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func raRecord(dev, src string) secevent.LogRecord {
	return secevent.LogRecord{Prefix: secevent.Prefix(dev, secevent.CtlRAGuard), HwProtocol: secevent.EtherTypeIPv6,
		Payload: ra(src)}
}

// ra is a router advertisement from src.
func ra(src string) []byte {
	b := make([]byte, 40+16)
	b[0] = 0x60
	b[5] = 16
	b[6], b[7] = 58, 255
	a := mustAddr(src)
	copy(b[8:24], a[:])
	dst := mustAddr("ff02::1")
	copy(b[24:40], dst[:])
	b[40] = 134
	return b
}

func mustAddr(s string) [16]byte {
	a, err := netipParse(s)
	if err != nil {
		panic(err)
	}
	return a
}

func readLog(t *testing.T, path string) []map[string]any {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []map[string]any
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("security.log line %q: %v", sc.Text(), err)
		}
		out = append(out, m)
	}
	return out
}

func TestAggregation(t *testing.T) {
	clk := &clock{t: time.Date(2026, 5, 1, 10, 0, 0, 0, time.UTC)}
	h := start(t, t.TempDir(), secevent.Config{Window: time.Hour, MaxSourcesPerKey: 4}, clk.Now)
	for i := 0; i < 10; i++ {
		h.svc.Ingest(raRecord("tap-vm1", "fe80::bad"))
		clk.Add(100 * time.Millisecond)
	}
	h.svc.Ingest(raRecord("tap-vm2", "fe80::bad"))
	// Spoofing flood: 100 sources from vm1 fold beyond 4 distinct ones.
	for i := 0; i < 100; i++ {
		r := raRecord("tap-vm1", "fe80::1:"+itoa(i))
		h.svc.Ingest(r)
	}
	// Not ours.
	h.svc.Ingest(secevent.LogRecord{Prefix: "other", Payload: ra("fe80::1")})
	h.svc.Flush()
	h.waitWritten(6) // vm1: bad + 3 more sources (4 tracked) + folded; vm2: bad
	evs, err := h.svc.Query(context.Background(), secevent.Filter{VMID: "vm-1", Ascending: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(evs) != 5 {
		t.Fatalf("vm-1 events: %d", len(evs))
	}
	var total int64
	var bad, folded *secevent.Event
	for i := range evs {
		e := &evs[i]
		total += e.Details.PacketCount
		switch e.Details.Src {
		case "fe80::bad":
			bad = e
		case "*":
			folded = e
		}
	}
	if total != 110 {
		t.Fatalf("packets in vm-1 events: %d, want 110", total)
	}
	if bad == nil || bad.Details.PacketCount != 10 || bad.Type != secevent.TypeRAGuardBlock || bad.Severity != secevent.SeverityHigh ||
		bad.TenantID != "tenant-a" || bad.InterfaceID != "eth0" || bad.Details.HostDevice != "tap-vm1" ||
		bad.Details.ICMPv6Type == nil || *bad.Details.ICMPv6Type != 134 || bad.Details.Protocol != "icmpv6" ||
		bad.Details.LastSeen.Sub(bad.Details.FirstSeen.Time) != 900*time.Millisecond || !bad.Timestamp.Equal(bad.Details.FirstSeen.Time) {
		t.Fatalf("aggregated event: %+v", bad)
	}
	if folded == nil || !folded.Details.SourcesFolded || folded.Details.PacketCount != 97 {
		t.Fatalf("folded event: %+v", folded)
	}
	if got := (counter(t, h.reg, secevent.MetricEventsTotal, map[string]string{"severity": "high", "tenant_id": "tenant-a"})); got != 5 {
		t.Fatalf("events_total{high,tenant-a} = %v", got)
	}
	lines := readLog(t, filepath.Join(h.dir, "log", "security.log"))
	if len(lines) != 6 || lines[0]["marker"] != "IPv6_VIOLATION" {
		t.Fatalf("security.log: %v", lines)
	}
	raw, _ := os.ReadFile(filepath.Join(h.dir, "log", "security.log"))
	if !strings.HasPrefix(string(raw), `{"marker":"IPv6_VIOLATION","id":"evt-`) {
		t.Fatalf("line format: %.100s", raw)
	}
}

func TestWindowFlushAndEmit(t *testing.T) {
	h := start(t, t.TempDir(), secevent.Config{Window: 200 * time.Millisecond}, nil)
	for i := 0; i < 3; i++ {
		h.svc.Ingest(raRecord("tap-vm1", "fe80::bad"))
	}
	if err := h.svc.Emit(secevent.Event{Type: secevent.TypeVMIsolated, Severity: secevent.SeverityHigh, VMID: "vm-1", TenantID: "tenant-a",
		Details: secevent.Details{Reason: "Security violation investigation"}}); err != nil {
		t.Fatal(err)
	}
	h.waitWritten(2) // the window closes by itself
	evs, _ := h.svc.Query(context.Background(), secevent.Filter{})
	if len(evs) != 2 {
		t.Fatalf("%+v", evs)
	}
	lines := readLog(t, filepath.Join(h.dir, "log", "security.log"))
	for _, l := range lines {
		_, marked := l["marker"]
		if marked != (l["event_type"] != "vm_isolated") {
			t.Fatalf("marker on %v", l)
		}
	}
}

func TestBoundedDrops(t *testing.T) {
	clk := &clock{t: time.Date(2026, 5, 1, 10, 0, 0, 0, time.UTC)}
	h := start(t, t.TempDir(), secevent.Config{Window: time.Hour, MaxBuckets: 8, QueueSize: 2}, clk.Now)
	for i := 0; i < 20; i++ { // 20 distinct devices: 8 buckets, 12 dropped
		h.svc.Ingest(raRecord("tap-x"+itoa(i), "fe80::1"))
	}
	st := h.svc.Stats()
	if st.Buckets != 8 || st.Dropped != 12 {
		t.Fatalf("stats %+v", st)
	}
	if got := (counter(t, h.reg, secevent.MetricEventsDropped, nil)); got != 12 {
		t.Fatalf("dropped metric %v", got)
	}
}

func TestRestartAndPrune(t *testing.T) {
	dir := t.TempDir()
	clk := &clock{t: time.Date(2026, 5, 1, 10, 0, 0, 0, time.UTC)}
	h := start(t, dir, secevent.Config{Window: time.Hour, MaxEvents: 5, MaxAge: 48 * time.Hour}, clk.Now)
	for i := 0; i < 8; i++ {
		h.svc.Emit(secevent.Event{Type: secevent.TypeFirewallDriftRepaired, Severity: secevent.SeverityMedium, VMID: "vm-" + itoa(i)})
		clk.Add(time.Hour)
	}
	h.waitWritten(8)
	h.stop()
	// Reopen: events survive; pruning at start keeps the newest 5.
	clk.Add(time.Hour)
	h2 := start(t, dir, secevent.Config{Window: time.Hour, MaxEvents: 5, MaxAge: 48 * time.Hour}, clk.Now)
	deadline := time.Now().Add(5 * time.Second)
	for {
		evs, err := h2.svc.Query(context.Background(), secevent.Filter{})
		if err != nil {
			t.Fatal(err)
		}
		if len(evs) == 5 {
			if evs[0].VMID != "vm-7" || evs[4].VMID != "vm-3" {
				t.Fatalf("kept %v .. %v", evs[0].VMID, evs[4].VMID)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after restart: %d events", len(evs))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestLogRotation(t *testing.T) {
	dir := t.TempDir()
	lf, err := secevent.OpenLogFile(dir, 1000, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	for i := 0; i < 30; i++ {
		if err := lf.Write([]secevent.Event{{ID: "evt-" + itoa(i), Type: secevent.TypeRAGuardBlock, Severity: secevent.SeverityHigh}}); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"security.log", "security.log.1", "security.log.2"} {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil || st.Size() > 1000 || st.Size() == 0 {
			t.Fatalf("%s: %v %v", name, st, err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "security.log.3")); err == nil {
		t.Fatal("kept more than 2 rotated files")
	}
	last := readLog(t, filepath.Join(dir, "security.log"))
	if last[len(last)-1]["id"] != "evt-29" {
		t.Fatal(last)
	}
}

func TestMonitoringSessions(t *testing.T) {
	dir := t.TempDir()
	h := start(t, dir, secevent.Config{}, nil)
	type change struct {
		tenant string
		active bool
	}
	ch := make(chan change, 10)
	h.svc.OnChange(func(tenant string, active bool) { ch <- change{tenant, active} })
	ctx := context.Background()
	if _, err := h.svc.StartMonitoring(ctx, "t1", 300*time.Millisecond, "debug"); err != nil {
		t.Fatal(err)
	}
	if _, err := h.svc.StartMonitoring(ctx, "t2", time.Hour, "INFO"); err != nil {
		t.Fatal(err)
	}
	if _, err := h.svc.StartMonitoring(ctx, "t3", time.Hour, "LOUD"); err == nil {
		t.Fatal("bad level accepted")
	}
	if got := <-ch; got != (change{"t1", true}) {
		t.Fatal(got)
	}
	if got := <-ch; got != (change{"t2", true}) {
		t.Fatal(got)
	}
	if n := len(h.svc.ActiveSessions()); n != 2 {
		t.Fatal(n)
	}
	select {
	case got := <-ch:
		if got != (change{"t1", false}) {
			t.Fatal(got)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("session did not expire")
	}
	if s := h.svc.ActiveSessions(); len(s) != 1 || s[0].TenantID != "t2" || s[0].LogLevel != "INFO" {
		t.Fatal(s)
	}
	// Restart: t2 is still on, and a late subscriber hears of it.
	h.stop()
	h2 := start(t, dir, secevent.Config{}, nil)
	ch2 := make(chan change, 10)
	h2.svc.OnChange(func(tenant string, active bool) { ch2 <- change{tenant, active} })
	if got := <-ch2; got != (change{"t2", true}) {
		t.Fatal(got)
	}
}

func TestOptimizeSettings(t *testing.T) {
	dir := t.TempDir()
	h := start(t, dir, secevent.Config{}, nil)
	ctx := context.Background()
	var seen []secevent.Settings
	h.svc.OnSettingsChange(func(s secevent.Settings) { seen = append(seen, s) })
	err := h.svc.SetSettings(ctx, secevent.Settings{BatchProcessing: true, HardwareAcceleration: true})
	if err == nil || !strings.Contains(err.Error(), "flowtable") {
		t.Fatalf("hardware acceleration accepted: %v", err)
	}
	if err := h.svc.SetSettings(ctx, secevent.Settings{BatchProcessing: true, CachePolicies: true}); err != nil {
		t.Fatal(err)
	}
	h.offload = true
	if err := h.svc.SetSettings(ctx, secevent.Settings{BatchProcessing: true, CachePolicies: true, HardwareAcceleration: true}); err != nil {
		t.Fatal(err)
	}
	if len(seen) != 3 || !seen[2].HardwareAcceleration {
		t.Fatal(seen)
	}
	h.stop()
	h2 := start(t, dir, secevent.Config{}, nil)
	h2.offload = true // (checked at load through the capability func)
	if s := h2.svc.Settings(); !s.BatchProcessing || !s.CachePolicies {
		t.Fatal(s)
	}
}

// A "learned" record (the first-hop rule that binds a temporary address
// from the guest's DAD) is a notice: its NS target goes to
// Options.Learned, with the port, and no event is recorded; other ND
// packets under that control are ignored.
func TestLearnedNotice(t *testing.T) {
	type notice struct {
		dev  string
		addr string
	}
	var mu sync.Mutex
	var got []notice
	h := startWith(t, t.TempDir(), secevent.Config{Window: 10 * time.Millisecond}, nil, func(o *secevent.Options) {
		o.Learned = func(dev string, a netip.Addr) {
			mu.Lock()
			got = append(got, notice{dev, a.String()})
			mu.Unlock()
		}
	})
	nd := func(typ byte, target string) []byte {
		b := make([]byte, 40+24)
		b[0] = 0x60
		b[5] = 24
		b[6], b[7] = 58, 255
		dst := mustAddr("ff02::1:ff00:1234")
		copy(b[24:40], dst[:])
		b[40] = typ
		tg := mustAddr(target)
		copy(b[48:64], tg[:])
		return b
	}
	prefix := secevent.Prefix("tap-vm1", secevent.ControlLearned)
	h.svc.Ingest(secevent.LogRecord{Prefix: prefix, HwProtocol: secevent.EtherTypeIPv6, Payload: nd(135, "2001:db8:5::9a3f:1234")})
	h.svc.Ingest(secevent.LogRecord{Prefix: prefix, HwProtocol: secevent.EtherTypeIPv6, Payload: nd(136, "2001:db8:5::1")})
	h.svc.Ingest(secevent.LogRecord{Prefix: prefix, HwProtocol: secevent.EtherTypeIPv6, Payload: nd(135, "2001:db8:5::2")[:50]})
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 1 || got[0] != (notice{"tap-vm1", "2001:db8:5::9a3f:1234"}) {
		t.Fatalf("learned notices %v", got)
	}
	if st := h.svc.Stats(); st.Ingested != 0 {
		t.Fatalf("a notice was aggregated as an event: %+v", st)
	}
}
