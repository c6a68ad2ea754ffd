package ipamhttp

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/metald/metald/internal/ipam"
)

// do sends body the way curl -d does (form content type).
func do(t *testing.T, srv *httptest.Server, method, path, body string) (int, string) {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, srv.URL+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestSeedPoolCommands(t *testing.T) {
	ctx := context.Background()
	m, err := ipam.Open(ctx, ipam.NewMemStore(), []ipam.PoolConfig{{ID: "default", Prefixes: []string{"2600:BEEF:1000::100/120"}}},
		ipam.Options{AutoSubnetNames: true, OrphanMinAge: -1})
	if err != nil {
		t.Fatal(err)
	}
	states := map[string]string{"vm1": "RUNNING", "vm2": "TERMINATED"}
	srv := httptest.NewServer(New(m, Options{
		VMState: func(_ context.Context, id string) (string, bool) { s, ok := states[id]; return s, ok },
		Live: func(id string) (bool, time.Time) {
			if states[id] == "TERMINATED" {
				return true, time.Now().Add(-time.Hour)
			}
			_, ok := states[id]
			return ok, time.Time{}
		},
	}))
	defer srv.Close()

	for i := 0; i < 256; i++ {
		if _, err := m.Reserve(ctx, ipam.Request{VMID: fmt.Sprint("vm", i), NICID: "eth0", TenantID: "t"}); err != nil {
			t.Fatal(err)
		}
	}
	_, err = m.Reserve(ctx, ipam.Request{VMID: "x", NICID: "eth0", TenantID: "t"})
	if err == nil || err.Error() != "no available IPv6 addresses in pool 'default'" {
		t.Fatalf("exhaustion: %v", err)
	}

	// 1. Check pool utilization.
	code, body := do(t, srv, "GET", "/debug/ipv6/pools", "")
	var pools []map[string]any
	if err := json.Unmarshal([]byte(body), &pools); code != 200 || err != nil || len(pools) != 1 {
		t.Fatalf("%d %s", code, body)
	}
	if pools[0]["id"] != "default" || pools[0]["utilization"] != 1.0 || pools[0]["available_addresses"] != 0.0 || pools[0]["allocated"] != 256.0 {
		t.Fatalf("pool %v", pools[0])
	}
	for _, k := range []string{"prefixes", "description", "tenant_ids", "rate_limit", "max_allocations"} {
		if _, ok := pools[0][k]; !ok {
			t.Errorf("pool lacks %q", k)
		}
	}

	// 2. Find unused allocations: vm_id is null for VMs that do not exist.
	code, body = do(t, srv, "GET", "/debug/ipv6/allocations", "")
	var allocs []map[string]any
	if err := json.Unmarshal([]byte(body), &allocs); code != 200 || err != nil || len(allocs) != 256 {
		t.Fatalf("%d %.300s", code, body)
	}
	orphans := 0
	for _, a := range allocs {
		if a["vm_id"] == nil {
			orphans++
			if a["vm_state"] != nil {
				t.Fatalf("orphan with state: %v", a)
			}
		}
	}
	if orphans != 254 || allocs[1]["vm_id"] != "vm1" || allocs[1]["vm_state"] != "RUNNING" || allocs[1]["address"] != "2600:beef:1000::101" {
		t.Fatalf("orphans %d, %v", orphans, allocs[1])
	}

	// Resolution: clean up leaked allocations (missing VMs and vm2, TERMINATED an hour ago).
	code, body = do(t, srv, "POST", "/debug/ipv6/cleanup-allocations", "")
	var res CleanupResult
	if err := json.Unmarshal([]byte(body), &res); code != 200 || err != nil || res.ReleasedCount != 255 {
		t.Fatalf("%d %.300s", code, body)
	}
	if left := m.Allocations(); len(left) != 1 || left[0].VMID != "vm1" {
		t.Fatalf("left %v", left)
	}

	// Expand pool (verbatim body).
	code, body = do(t, srv, "PUT", "/debug/ipv6/pools/default", `{
    "prefix": "2600:BEEF:1001::/48",
    "description": "Expanded pool for growth"
  }`)
	if code != 200 || !strings.Contains(body, `"2600:beef:1001::/48"`) || !strings.Contains(body, "Expanded pool for growth") || !strings.Contains(body, `"2600:beef:1000::100/120"`) {
		t.Fatalf("%d %s", code, body)
	}

	// Add new pool for a specific tenant (verbatim body).
	create := `{
    "id": "enterprise-pool",
    "prefix": "2600:BEEF:2000::/48",
    "description": "Dedicated enterprise customer pool",
    "rate_limit": 1000
  }`
	code, body = do(t, srv, "POST", "/debug/ipv6/pools", create)
	if code != 201 || !strings.Contains(body, `"rate_limit": 1000`) || !strings.Contains(body, `"available_addresses": 1208925819614629174640640`) {
		t.Fatalf("%d %s", code, body)
	}
	if code, body = do(t, srv, "POST", "/debug/ipv6/pools", create); code != 409 || !strings.Contains(body, "already_exists") {
		t.Fatalf("again: %d %s", code, body)
	}
	if code, body = do(t, srv, "POST", "/debug/ipv6/pools", `{"id":"o","prefix":"2600:beef:2000:1::/64"}`); code != 400 || !strings.Contains(body, "overlaps 2600:beef:2000::/48 of pool 'enterprise-pool'") {
		t.Fatalf("overlap: %d %s", code, body)
	}
	if code, body = do(t, srv, "POST", "/debug/ipv6/pools", `{"id":"o","prefix":"2600:beef:5000::/48","ratelimit":1}`); code != 400 || !strings.Contains(body, `unknown field \"ratelimit\"`) {
		t.Fatalf("unknown field: %d %s", code, body)
	}
	if code, body = do(t, srv, "POST", "/debug/ipv6/pools", `{"id":"o","prefix":"2600:beef:5000::1/48"}`); code != 400 || !strings.Contains(body, "host bits") {
		t.Fatalf("host bits: %d %s", code, body)
	}
	if code, body = do(t, srv, "POST", "/debug/ipv6/pools", `{"id":"t","prefixes":["2600:beef:6000::/48"],"tenant_ids":["a"],"max_allocations":5}`); code != 201 || !strings.Contains(body, `"max_allocations": 5`) {
		t.Fatalf("full create: %d %s", code, body)
	}

	// Delete only when empty.
	if code, body = do(t, srv, "DELETE", "/debug/ipv6/pools/default", ""); code != 409 {
		t.Fatalf("delete non-empty: %d %s", code, body)
	}
	if code, _ = do(t, srv, "DELETE", "/debug/ipv6/pools/t", ""); code != 204 {
		t.Fatalf("delete: %d", code)
	}
	if code, _ = do(t, srv, "DELETE", "/debug/ipv6/pools/t", ""); code != 404 {
		t.Fatalf("delete again: %d", code)
	}

	// Subnet names.
	if code, body = do(t, srv, "POST", "/debug/ipv6/subnets", `{"parent":"2600:BEEF:1000::/48","name":"web"}`); code != 201 || !strings.Contains(body, `"prefix": "2600:beef:1000:1::/64"`) {
		t.Fatalf("declare: %d %s", code, body)
	}
	if code, body = do(t, srv, "POST", "/debug/ipv6/subnets", `{"parent":"2600:BEEF:1000::/48","name":"ops","value":"0x0042"}`); code != 201 || !strings.Contains(body, `"value": 66`) {
		t.Fatalf("declare value: %d %s", code, body)
	}
	if code, body = do(t, srv, "POST", "/debug/ipv6/subnets", `{"parent":"2600:BEEF:1000::/48","name":"web","value":7}`); code != 409 {
		t.Fatalf("redeclare: %d %s", code, body)
	}
	code, body = do(t, srv, "GET", "/debug/ipv6/subnets", "")
	if code != 200 || strings.Count(body, `"name"`) != 2 || strings.Contains(body, `"tentative"`) {
		t.Fatalf("list: %d %s", code, body)
	}
	// A name of a request in flight is listed as tentative until the
	// request finishes.
	tx := m.BeginNames(ctx)
	if _, err := tx.ResolvePrefix("2600:beef:1000:inflight::/64"); err != nil {
		t.Fatal(err)
	}
	code, body = do(t, srv, "GET", "/debug/ipv6/subnets", "")
	if code != 200 || strings.Count(body, `"tentative": true`) != 1 || !strings.Contains(body, `"name": "inflight"`) {
		t.Fatalf("list with a request in flight: %d %s", code, body)
	}
	tx.Commit()
	code, body = do(t, srv, "GET", "/debug/ipv6/subnets", "")
	if code != 200 || strings.Count(body, `"name"`) != 3 || strings.Contains(body, `"tentative"`) {
		t.Fatalf("list after the commit: %d %s", code, body)
	}
}
