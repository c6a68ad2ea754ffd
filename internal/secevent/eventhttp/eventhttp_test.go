package eventhttp_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/metald/metald/internal/secevent"
	"github.com/metald/metald/internal/secevent/eventhttp"
	"github.com/metald/metald/internal/store/sqlite"
)

type fixture struct {
	svc *secevent.Service
	srv *httptest.Server
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	db, err := sqlite.Open(ctx, filepath.Join(dir, "metald.db"))
	if err != nil {
		t.Fatal(err)
	}
	svc, err := secevent.New(ctx, secevent.Config{LogDir: filepath.Join(dir, "log")}, secevent.Options{Store: db.Events(),
		FlowtableOffload: func() (bool, string) { return false, "no flowtable hardware offload on this host's devices" }})
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { svc.Run(rctx); close(done) }()
	srv := httptest.NewServer(eventhttp.New(svc))
	t.Cleanup(func() { srv.Close(); cancel(); <-done; db.Close() })
	return &fixture{svc: svc, srv: srv}
}

// seed emits events: vm-a (tenant-1) 3 extension header blocks in the last
// hour and 1 two hours ago, 2 RA guard blocks; vm-b (tenant-2) 1 policy
// deny; vm-c (tenant-1) 1 source guard violation.
func (f *fixture) seed(t *testing.T) time.Time {
	t.Helper()
	now := time.Now().UTC()
	ev := func(vm, tenant string, typ secevent.EventType, sev secevent.Severity, at time.Time, src string, n int64) {
		if err := f.svc.Emit(secevent.Event{Timestamp: secevent.TS(at), Type: typ, Severity: sev, VMID: vm, TenantID: tenant, InterfaceID: "eth0",
			Details: secevent.Details{Src: src, PacketCount: n, FirstSeen: secevent.TS(at), LastSeen: secevent.TS(at)}}); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 3; i++ {
		ev("vm-a", "tenant-1", secevent.TypeExtensionHeaderBlock, secevent.SeverityMedium, now.Add(-time.Duration(i+1)*time.Minute), "2001:db8:bad::1", 5)
	}
	ev("vm-a", "tenant-1", secevent.TypeExtensionHeaderBlock, secevent.SeverityMedium, now.Add(-2*time.Hour), "2001:db8:bad::1", 1)
	ev("vm-a", "tenant-1", secevent.TypeRAGuardBlock, secevent.SeverityHigh, now.Add(-30*time.Minute), "fe80::bad", 10)
	ev("vm-a", "tenant-1", secevent.TypeRAGuardBlock, secevent.SeverityHigh, now.Add(-20*time.Minute), "fe80::bad", 10)
	ev("vm-b", "tenant-2", secevent.TypePolicyDeny, secevent.SeverityLow, now.Add(-10*time.Minute), "2001:db8:2::5", 1)
	ev("vm-c", "tenant-1", secevent.TypeSourceGuardViolation, secevent.SeverityHigh, now.Add(-5*time.Minute), "2001:db8:9::9", 2)
	deadline := time.Now().Add(5 * time.Second)
	for f.svc.Stats().Written < 8 {
		if time.Now().After(deadline) {
			t.Fatal("events not written")
		}
		time.Sleep(5 * time.Millisecond)
	}
	return now
}

func do(t *testing.T, method, url, body string) (int, []byte) {
	t.Helper()
	req, _ := http.NewRequest(method, url, strings.NewReader(body))
	if body != "" {
		// What curl -d sends.
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

func jq(t *testing.T, input []byte, filter string) string {
	t.Helper()
	path, err := exec.LookPath("jq")
	if err != nil {
		t.Skip("jq not installed")
	}
	cmd := exec.Command(path, "-c", filter)
	cmd.Stdin = strings.NewReader(string(input))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("jq %s: %v\n%s", filter, err, out)
	}
	return strings.TrimSpace(string(out))
}

func TestSeedCommands(t *testing.T) {
	f := newFixture(t)
	now := f.seed(t)
	code, body := do(t, "GET", f.srv.URL+"/debug/security/events", "")
	if code != 200 {
		t.Fatalf("%d %s", code, body)
	}
	// Investigation step 1.
	if got := jq(t, body, `group_by(.event_type) | map({event_type: .[0].event_type, count: length}) | sort_by(.count) | reverse`); got !=
		`[{"event_type":"extension_header_block","count":4},{"event_type":"ra_guard_block","count":2},{"event_type":"source_guard_violation","count":1},{"event_type":"policy_deny","count":1}]` {
		t.Errorf("by type: %s", got)
	}
	// Step 2.
	if got := jq(t, body, `group_by(.vm_id) | map({vm_id: .[0].vm_id, violations: length}) | sort_by(.violations) | reverse | .[0:10]`); got !=
		`[{"vm_id":"vm-a","violations":6},{"vm_id":"vm-c","violations":1},{"vm_id":"vm-b","violations":1}]` {
		t.Errorf("by vm: %s", got)
	}
	// Step 3.
	if got := jq(t, body, `group_by(.tenant_id) | map({tenant_id: .[0].tenant_id, violations: length}) | sort_by(.violations) | reverse`); got !=
		`[{"tenant_id":"tenant-1","violations":7},{"tenant_id":"tenant-2","violations":1}]` {
		t.Errorf("by tenant: %s", got)
	}
	// Step 4, with `date -d '1 hour ago' -Is` output.
	hourAgo := now.Add(-time.Hour).Format("2006-01-02T15:04:05-07:00")
	hourAgo = strings.Replace(hourAgo, "Z", "+00:00", 1)
	if got := jq(t, body, `[.[] | select(.event_type == "extension_header_block" and .timestamp > "`+hourAgo+`")] | length`); got != "3" {
		t.Errorf("recent extension header blocks: %s", got)
	}
	// Examples: select by VM, and by VM and type.
	if got := jq(t, body, `[.[] | select(.vm_id == "vm-a")] | length`); got != "6" {
		t.Errorf("vm-a: %s", got)
	}
	if got := jq(t, body, `[.[] | select(.vm_id == "vm-a" and .event_type == "ra_guard_block")] | map(.details.packet_count)`); got != "[10,10]" {
		t.Errorf("vm-a ra: %s", got)
	}
	// Query filters, including a '+' that arrived as a space.
	for q, want := range map[string]int{
		"vm_id=vm-a": 6, "tenant_id=tenant-1": 7, "event_type=ra_guard_block": 2, "severity=high": 3,
		"since=" + strings.Replace(hourAgo, "+", "%2B", 1): 7, "since=" + hourAgo: 7,
		"until=" + now.Add(-time.Hour).Format(time.RFC3339): 1, "limit=2": 2, "vm_id=vm-a&severity=medium&limit=3": 3,
		// Bounds beyond what Unix nanoseconds hold mean "no bound".
		"until=3000-01-01T00:00:00Z": 8, "since=1600-01-01T00:00:00Z": 8,
	} {
		code, b := do(t, "GET", f.srv.URL+"/debug/security/events?"+q, "")
		var evs []secevent.Event
		if code != 200 || json.Unmarshal(b, &evs) != nil || len(evs) != want {
			t.Errorf("%s: %d %d events, want %d: %s", q, code, len(evs), want, b)
		}
	}
	code, b := do(t, "GET", f.srv.URL+"/debug/security/events?order=asc&limit=1", "")
	if got := jq(t, b, `.[0].timestamp`); code != 200 || got != `"`+secevent.TS(now.Add(-2*time.Hour)).String()+`"` {
		t.Errorf("oldest first: %s", got)
	}
	for _, q := range []string{"vmid=x", "severity=urgent", "since=yesterday", "limit=0", "event_type=bogus", "limit=1&limit=2"} {
		if code, b := do(t, "GET", f.srv.URL+"/debug/security/events?"+q, ""); code != 400 {
			t.Errorf("%s: %d %s", q, code, b)
		}
	}

	// Report, as the seed generates it (POST with -d, date -Is times).
	start := strings.Replace(now.Add(-24*time.Hour).Format("2006-01-02T15:04:05Z07:00"), "Z", "+00:00", 1)
	end := strings.Replace(now.Add(time.Minute).Format("2006-01-02T15:04:05Z07:00"), "Z", "+00:00", 1)
	code, b = do(t, "POST", f.srv.URL+"/debug/security/report", `{"start_time":"`+start+`", "end_time":"`+end+`"}`)
	if code != 200 {
		t.Fatalf("report: %d %s", code, b)
	}
	// Every hour from the start's to the end's: 25, or 26 when now+1m is
	// in the next hour.
	hours := now.Add(time.Minute).Truncate(time.Hour).Sub(now.Add(-24*time.Hour).Truncate(time.Hour))/time.Hour + 1
	for filter, want := range map[string]string{
		".total_events":                   "8",
		".total_packets":                  "39",
		".by_type.extension_header_block": "4",
		".by_severity":                    `{"critical":0,"high":3,"low":1,"medium":4}`,
		".by_vm[0]":                       `{"vm_id":"vm-a","tenant_id":"tenant-1","events":6,"packets":36}`,
		".by_tenant | map(.tenant_id)":    `["tenant-1","tenant-2"]`,
		".top_sources[0].src":             `"fe80::bad"`,
		".timeline | length":              strconv.Itoa(int(hours)),
		"[.timeline[].events] | add":      "8",
	} {
		if got := jq(t, b, filter); got != want {
			t.Errorf("report %s = %s, want %s", filter, got, want)
		}
	}
	// GET with the same query.
	code, b2 := do(t, "GET", f.srv.URL+"/debug/security/report?start_time="+strings.Replace(start, "+", "%2B", 1)+"&end_time="+strings.Replace(end, "+", "%2B", 1), "")
	if code != 200 || jq(t, b2, ".total_events") != "8" {
		t.Errorf("GET report: %d %s", code, b2)
	}
	if code, b := do(t, "POST", f.srv.URL+"/debug/security/report", `{"start_time":"`+start+`", "end":"x"}`); code != 400 || !strings.Contains(string(b), `\"end\"`) {
		t.Errorf("unknown field: %d %s", code, b)
	}
}

func TestEnhanceMonitoring(t *testing.T) {
	f := newFixture(t)
	changes := make(chan string, 10)
	f.svc.OnChange(func(tenant string, active bool) {
		if active {
			changes <- "+" + tenant
		} else {
			changes <- "-" + tenant
		}
	})
	code, b := do(t, "POST", f.srv.URL+"/debug/security/enhance-monitoring", `{"tenant_id":"suspicious-tenant", "duration":"2s", "log_level":"DEBUG"}`)
	if code != 200 || jq(t, b, ".tenant_id") != `"suspicious-tenant"` || jq(t, b, ".log_level") != `"DEBUG"` {
		t.Fatalf("%d %s", code, b)
	}
	if code, b := do(t, "POST", f.srv.URL+"/debug/security/enhance-monitoring", `{"tenant_id":"other", "duration":"24h", "log_level":"INFO"}`); code != 200 {
		t.Fatalf("%d %s", code, b)
	}
	if c := <-changes; c != "+suspicious-tenant" {
		t.Fatal(c)
	}
	_, b = do(t, "GET", f.srv.URL+"/debug/security/enhance-monitoring", "")
	if got := jq(t, b, "[.sessions[].tenant_id]"); got != `["other","suspicious-tenant"]` {
		t.Fatalf("sessions: %s", got)
	}
	<-changes // +other
	select {
	case c := <-changes:
		if c != "-suspicious-tenant" {
			t.Fatal(c)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("session did not expire")
	}
	_, b = do(t, "GET", f.srv.URL+"/debug/security/enhance-monitoring", "")
	if got := jq(t, b, "[.sessions[].tenant_id]"); got != `["other"]` {
		t.Fatalf("after expiry: %s", got)
	}
	if code, _ := do(t, "DELETE", f.srv.URL+"/debug/security/enhance-monitoring/other", ""); code != 204 {
		t.Fatal(code)
	}
	for body, want := range map[string]string{
		`{"tenant_id":"t", "duration":"24h", "log_level":"DEBUG", "extra":1}`: `unknown field \"extra\"`,
		`{"duration":"24h"}`:                                      "tenant_id is required",
		`{"tenant_id":"t", "duration":"forever"}`:                 "duration",
		`{"tenant_id":"t", "duration":"24h", "log_level":"LOUD"}`: "log_level",
		`{"tenant_id":"t", "duration":"90d"}`:                     "duration",
	} {
		code, b := do(t, "POST", f.srv.URL+"/debug/security/enhance-monitoring", body)
		if code != 400 || !strings.Contains(string(b), want) || strings.Contains(string(b), ": invalid argument") {
			t.Errorf("%s: %d %s", body, code, b)
		}
	}
}

func TestOptimize(t *testing.T) {
	f := newFixture(t)
	var seen []secevent.Settings
	f.svc.OnSettingsChange(func(s secevent.Settings) { seen = append(seen, s) })
	// The seed's command asks for hardware acceleration: refused with the reason.
	code, b := do(t, "PUT", f.srv.URL+"/debug/security/optimize", `{
    "batch_processing": true,
    "hardware_acceleration": true,
    "cache_policies": true
  }`)
	if code != 400 || !strings.Contains(string(b), "flowtable") {
		t.Fatalf("%d %s", code, b)
	}
	code, b = do(t, "PUT", f.srv.URL+"/debug/security/optimize", `{"batch_processing": true, "cache_policies": true}`)
	if code != 200 || jq(t, b, "[.batch_processing, .hardware_acceleration, .cache_policies, .hardware_acceleration_supported]") != "[true,false,true,false]" {
		t.Fatalf("%d %s", code, b)
	}
	code, b = do(t, "PUT", f.srv.URL+"/debug/security/optimize", `{"cache_policies": false}`)
	if code != 200 || jq(t, b, "[.batch_processing, .cache_policies]") != "[true,false]" {
		t.Fatalf("partial update: %d %s", code, b)
	}
	_, b = do(t, "GET", f.srv.URL+"/debug/security/optimize", "")
	if jq(t, b, ".batch_processing") != "true" || !strings.Contains(jq(t, b, ".hardware_acceleration_reason"), "flowtable") {
		t.Fatalf("GET: %s", b)
	}
	if code, b := do(t, "PUT", f.srv.URL+"/debug/security/optimize", `{"batch": true}`); code != 400 || !strings.Contains(string(b), `\"batch\"`) {
		t.Fatalf("unknown field: %d %s", code, b)
	}
	if code, b := do(t, "PUT", f.srv.URL+"/debug/security/optimize", `{"batch_processing": "yes"}`); code != 400 || !strings.Contains(string(b), "batch_processing") {
		t.Fatalf("wrong type: %d %s", code, b)
	}
	if len(seen) != 3 || !seen[1].BatchProcessing || seen[2].CachePolicies {
		t.Fatalf("callbacks: %+v", seen)
	}
}
