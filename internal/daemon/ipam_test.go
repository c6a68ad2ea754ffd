package daemon_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/metald/metald/internal/daemon"
	"github.com/metald/metald/internal/ipam"
)

func loadExample(t *testing.T, name string) map[string]any {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("..", "..", "examples", "seed", name+".json"))
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func statusAddrs(vm map[string]any) []string {
	var out []string
	for _, s := range list(vm["networkStatus"]) {
		out = append(out, str(s, "ipv6Address")+" via "+str(s, "ipv6Gateway"))
	}
	return out
}

// The guide's Examples 1-3, verbatim with their symbolic subnet names, create
// VMs with consistent canonical addresses: a name means the same subnet
// everywhere under the same parent, a different one under another parent,
// and `db` stays hex.
func TestSeedExamplesVerbatim(t *testing.T) {
	e := newEnvWith(t, func(o *daemon.Options) {
		o.Pools = []ipam.PoolConfig{
			{ID: "dmz", Prefixes: []string{"2600:BEEF:1000::/48"}},
			{ID: "app", Prefixes: []string{"2600:BEEF:1001::/48"}},
			{ID: "db", Prefixes: []string{"2600:BEEF:1002::/48"}, TenantIDs: []string{"app-customer-db"}},
			{ID: "financial", Prefixes: []string{"2600:BEEF:2000::/48", "2600:BEEF:2001::/48"}, TenantIDs: []string{"financial-services-corp"}},
		}
	})
	want := map[string][]string{
		// web is the first name under 2600:beef:1000::/48 (value 1); the
		// rules of Example 1 then name mgmt (2).
		"example1-secure-web-server": {"2600:beef:1000:1::10/64 via 2600:beef:1000:1::1"},
		// dmz is the next new name under the same parent (3).
		"example2-web-tier": {"2600:beef:1000:3::100/64 via 2600:beef:1000:3::1"},
		// app is the first name under 2600:beef:1001::/48.
		"example2-app-tier": {"2600:beef:1001:1::100/64 via 2600:beef:1001:1::1"},
		// db is hex.
		"example2-db-tier": {"2600:beef:1002:db::100/64 via 2600:beef:1002:db::1"},
		"example3-financial-services": {
			"2600:beef:2000:1::100/64 via 2600:beef:2000:1::1",
			"2600:beef:2001:1::100/64 via 2600:beef:2001:1::1",
		},
	}
	for _, name := range []string{"example1-secure-web-server", "example2-web-tier", "example2-app-tier", "example2-db-tier", "example3-financial-services"} {
		out := e.mustCall("CreateVm", loadExample(t, name))
		vm := e.getVM(out["vmId"].(string))
		if got := statusAddrs(vm); !slices.Equal(got, want[name]) {
			t.Errorf("%s: addresses %v, want %v", name, got, want[name])
		}
		// GetVm echoes the config as given.
		if a := str(obj(list(vm["network"])[0])["ipv6"], "address"); !strings.Contains(a, ":") || strings.ToLower(a) == a && strings.Contains(name, "example1") {
			t.Errorf("%s: config not echoed as given: %q", name, a)
		}
	}
	// The registry: web/mgmt/dmz under 1000, mgmt again under 1002 with its
	// own value.
	resp, err := http_get(e.url + "/debug/ipv6/subnets")
	if err != nil {
		t.Fatal(err)
	}
	var names []map[string]any
	json.Unmarshal(resp, &names)
	got := map[string]float64{}
	for _, n := range names {
		got[fmt.Sprint(n["parent"], "/", n["name"])] = n["value"].(float64)
	}
	for k, v := range map[string]float64{
		"2600:beef:1000::/48/web": 1, "2600:beef:1000::/48/mgmt": 2, "2600:beef:1000::/48/dmz": 3,
		"2600:beef:1001::/48/app": 1, "2600:beef:1002::/48/mgmt": 1, "2600:beef:2000::/48/fin": 1, "2600:beef:2001::/48/backup": 1,
	} {
		if got[k] != v {
			t.Errorf("subnet %s = %v, want %v (all: %v)", k, got[k], v, got)
		}
	}
	// A wrong tenant cannot use a tenant's pool.
	bad := loadExample(t, "example2-db-tier")
	obj(bad["config"])["tenant_id"] = "someone-else"
	obj(obj(list(obj(bad["config"])["network"])[0])["ipv6"])["address"] = "2600:BEEF:1002:db::101/64"
	code, out := e.call("CreateVm", bad)
	if code != 403 || out["code"] != "permission_denied" || !strings.Contains(str(out, "message"), "someone-else") ||
		!strings.Contains(str(out, "message"), "'db'") || !strings.HasPrefix(str(out, "message"), "config.network[0].ipv6.address: ") {
		t.Fatalf("foreign tenant: %d %v", code, out)
	}
	// The same address twice names the holder.
	dup := loadExample(t, "example1-secure-web-server")
	code, out = e.call("CreateVm", dup)
	if code != 409 || out["code"] != "already_exists" || !strings.Contains(str(out, "message"), "2600:beef:1000:1::10") {
		t.Fatalf("duplicate address: %d %v", code, out)
	}
	// An address outside every pool.
	dup = loadExample(t, "example1-secure-web-server")
	obj(obj(list(obj(dup["config"])["network"])[0])["ipv6"])["address"] = "2600:BEEF:9000:web::10/64"
	obj(obj(list(obj(dup["config"])["network"])[0])["ipv6"])["gateway"] = "2600:BEEF:9000:web::1"
	code, out = e.call("CreateVm", dup)
	if code != 400 || errorField(out) != "config.network[0].ipv6.address" || !strings.Contains(str(out, "message"), "not inside any pool") {
		t.Fatalf("outside pools: %d %v", code, out)
	}
	// No address, and no pool allocates for the tenant: the address field
	// is named, with what to do.
	code, out = e.call("CreateVm", map[string]any{"config": vmConfig("t-nopool", nic("eth0", "br-np", "", ""))})
	if code != 400 || errorField(out) != "config.network[0].ipv6.address" || !strings.Contains(str(out, "message"), `not given, and no pool allocates for tenant "t-nopool"`) {
		t.Fatalf("no pool for the tenant: %d %v", code, out)
	}
	// No address, and a gateway on the subnet Example 1's bridge uses:
	// the gateway field is named.
	code, out = e.call("CreateVm", map[string]any{"config": vmConfig("t-gw", nic("eth0", "br-elsewhere", "", "2600:beef:1000:1::1"))})
	if code != 400 || errorField(out) != "config.network[0].ipv6.gateway" || !strings.Contains(str(out, "message"), "is on bridge") {
		t.Fatalf("gateway on another bridge's subnet: %d %v", code, out)
	}
	// No address, and a gateway outside every pool: the gateway is named
	// (not "no pool allocates for the tenant").
	code, out = e.call("CreateVm", map[string]any{"config": vmConfig("t-gw", nic("eth0", "br-elsewhere", "", "2600:beef:9000::1"))})
	if code != 400 || errorField(out) != "config.network[0].ipv6.gateway" || !strings.Contains(str(out, "message"), "gateway 2600:beef:9000::1: not inside any pool") {
		t.Fatalf("gateway outside every pool: %d %v", code, out)
	}
	// An address with a gateway outside its prefix: the gateway is named.
	code, out = e.call("CreateVm", map[string]any{"config": vmConfig("t-gw", nic("eth0", "br-elsewhere", "2600:beef:1000:8::10/64", "2600:beef:1000:9::1"))})
	if code != 400 || errorField(out) != "config.network[0].ipv6.gateway" || !strings.Contains(str(out, "message"), "outside the address's prefix") {
		t.Fatalf("gateway outside the address's prefix: %d %v", code, out)
	}
	// An on-link prefix wider than the address's /64 (it would route a
	// /16 onto the VM's bridge): refused, and no route appears.
	dup = loadExample(t, "example1-secure-web-server")
	obj(obj(list(obj(dup["config"])["network"])[0])["ipv6"])["address"] = "2600:beef:1000:7::10/16"
	obj(obj(list(obj(dup["config"])["network"])[0])["ipv6"])["gateway"] = "2600:beef:1000:7::1"
	code, out = e.call("CreateVm", dup)
	if code != 400 || errorField(out) != "config.network[0].ipv6.address" || !strings.Contains(str(out, "message"), "wider than the address's subnet") {
		t.Fatalf("wide prefix: %d %v", code, out)
	}
	if routes := e.host.MustRun(t, "ip", "-6", "route"); strings.Contains(routes, "2600::/16") {
		t.Fatalf("route of the refused prefix:\n%s", routes)
	}
}

func http_get(url string) ([]byte, error) {
	out, err := exec.Command("curl", "-sf", url).Output()
	return out, err
}

// shell runs one of the guide's command lines verbatim with curl and jq,
// against the test daemon instead of localhost:8080.
func (e *env) shell(t *testing.T, cmd string) string {
	t.Helper()
	cmd = strings.ReplaceAll(cmd, "http://localhost:8080", e.url)
	cmd = strings.ReplaceAll(cmd, "http://localhost:9464/metrics", e.metrics)
	out, err := exec.Command("bash", "-o", "pipefail", "-c", cmd).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", cmd, err, out)
	}
	return string(out)
}

// The guide's "Issue 3: IPv6 Pool Exhaustion" commands, verbatim, against a
// daemon on its embedded defaults (pool "default" on a random ULA /48).
func TestSeedPoolCommandsVerbatim(t *testing.T) {
	e := newEnvWith(t, func(o *daemon.Options) { o.Pools = nil })
	out := e.shell(t, `curl -s http://localhost:8080/debug/ipv6/pools | jq '.[] | {id: .id, utilization: .utilization, available: .available_addresses}'`)
	if !strings.Contains(out, `"id": "default"`) || !strings.Contains(out, `"utilization": 0`) {
		t.Fatalf("pools: %s", out)
	}
	out = e.shell(t, `curl -s http://localhost:8080/debug/ipv6/allocations | jq '.[] | select(.vm_id == null)'`)
	if strings.TrimSpace(out) != "" {
		t.Fatalf("orphans on a fresh daemon: %s", out)
	}
	e.shell(t, `curl -X POST http://localhost:8080/debug/ipv6/cleanup-allocations`)
	out = e.shell(t, `curl -s -X PUT http://localhost:8080/debug/ipv6/pools/default \
  -d '{
    "prefix": "2600:BEEF:1001::/48",
    "description": "Expanded pool for growth"
  }'`)
	if !strings.Contains(out, "2600:beef:1001::/48") {
		t.Fatalf("expand: %s", out)
	}
	out = e.shell(t, `curl -s -X POST http://localhost:8080/debug/ipv6/pools \
  -d '{
    "id": "enterprise-pool",
    "prefix": "2600:BEEF:2000::/48",
    "description": "Dedicated enterprise customer pool",
    "rate_limit": 1000
  }'`)
	if !strings.Contains(out, "enterprise-pool") {
		t.Fatalf("create pool: %s", out)
	}
	out = e.shell(t, `curl -s http://localhost:8080/debug/ipv6/pools | jq -r '.[].id' | sort | tr '\n' ' '`)
	if out != "default enterprise-pool " {
		t.Fatalf("pools after: %q", out)
	}
	// The expanded prefix is usable at once (the guide's app tier).
	e.mustCall("CreateVm", loadExample(t, "example2-app-tier"))
	// Metrics.
	out = e.shell(t, `curl -s http://localhost:9464/metrics | grep metald_ipv6_pool_utilization`)
	if !strings.Contains(out, `metald_ipv6_pool_utilization{pool_id="default"}`) {
		t.Fatalf("metrics: %s", out)
	}
	if e.metric(`metald_ipv6_allocations_per_hour`) != 1 || e.metric(`metald_ipv6_allocations_total{pool_id="default"}`) != 1 {
		t.Fatal("allocation metrics did not move")
	}
}

// Automatic allocation until exhaustion: the guide's exact error; a failed
// CreateVm leaves nothing behind; DeleteVm releases; rate limit details.
func TestAllocationExhaustionAndRateLimit(t *testing.T) {
	e := newEnv(t)
	e.shell(t, `curl -sf -X POST http://localhost:8080/debug/ipv6/pools -d '{"id":"tiny","prefixes":["2001:db9::/120"],"tenant_ids":["small"],"max_allocations":3}'`)
	var ids []string
	addrs := map[string]bool{}
	for i := 0; i < 3; i++ {
		out := e.mustCall("CreateVm", map[string]any{"config": vmConfig("small", map[string]any{"id": "eth0", "bridge_name": "br-t"})})
		ids = append(ids, out["vmId"].(string))
		a := str(list(e.getVM(out["vmId"].(string))["networkStatus"])[0], "ipv6Address")
		if !strings.HasPrefix(a, "2001:db9::") || addrs[a] {
			t.Fatalf("allocated %q (have %v)", a, addrs)
		}
		addrs[a] = true
	}
	code, out := e.call("CreateVm", map[string]any{"vm_id": "vm-over", "config": vmConfig("small", map[string]any{"id": "eth0", "bridge_name": "br-t2"})})
	if code != 429 || out["code"] != "resource_exhausted" || out["message"] != "no available IPv6 addresses in pool 'tiny'" {
		t.Fatalf("exhausted: %d %v", code, out)
	}
	if e.metric(`metald_ipv6_pool_utilization{pool_id="tiny"}`) != 1 {
		t.Fatal("utilization of the full pool is not 1")
	}
	if slices.Contains(e.links(), "br-t2") || slices.Contains(e.netnsNames(), "metald-vm-over") {
		t.Fatalf("failed create left things: %v %v", e.links(), e.netnsNames())
	}
	e.mustCall("DeleteVm", map[string]any{"vm_id": ids[0]})
	e.mustCall("CreateVm", map[string]any{"config": vmConfig("small", map[string]any{"id": "eth0", "bridge_name": "br-t"})})

	// Rate limit: 2 allocations per hour per tenant.
	e.shell(t, `curl -sf -X POST http://localhost:8080/debug/ipv6/pools -d '{"id":"slow","prefix":"2001:dba::/64","tenant_ids":["hasty"],"rate_limit":2}'`)
	for i := 0; i < 2; i++ {
		e.mustCall("CreateVm", map[string]any{"config": vmConfig("hasty", map[string]any{"id": "eth0", "bridge_name": "br-h"})})
	}
	code, out = e.call("CreateVm", map[string]any{"config": vmConfig("hasty", map[string]any{"id": "eth0", "bridge_name": "br-h"})})
	msg := str(out, "message")
	if code != 429 || out["code"] != "resource_exhausted" || !strings.Contains(msg, `"hasty"`) || !strings.Contains(msg, "limit 2 per hour") || !strings.Contains(msg, "retry after") {
		t.Fatalf("rate limited: %d %v", code, out)
	}
	var retry, info bool
	for _, d := range list(out["details"]) {
		switch str(d, "type") {
		case "google.rpc.RetryInfo":
			retry = true
		case "google.rpc.ErrorInfo":
			md := obj(obj(obj(d)["debug"])["metadata"])
			info = md["tenant_id"] == "hasty" && md["limit_per_hour"] == "2" && md["current_per_hour"] == "2"
		}
	}
	if !retry || !info {
		t.Fatalf("rate limit details: %v", out["details"])
	}
}

// 64 concurrent CreateVm calls with automatic allocation: no duplicate, no
// lost address; the allocations survive a restart.
func TestConcurrentAllocation(t *testing.T) {
	e := newEnv(t)
	var wg sync.WaitGroup
	var mu sync.Mutex
	ids := []string{}
	errs := []string{}
	for i := 0; i < 64; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			code, out := e.call("CreateVm", map[string]any{"config": vmConfig("t1", map[string]any{"id": "eth0", "bridge_name": fmt.Sprintf("br-c%d", i%4),
				"ipv6": map[string]any{"gateway": fmt.Sprintf("2001:db8:c%d::1", i%4)}})})
			mu.Lock()
			defer mu.Unlock()
			if code != 200 {
				errs = append(errs, fmt.Sprint(code, out))
				return
			}
			ids = append(ids, out["vmId"].(string))
		}()
	}
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("failed creates: %v", errs)
	}
	seen := map[string]string{}
	for _, id := range ids {
		st := list(e.getVM(id)["networkStatus"])[0]
		a := str(st, "ipv6Address")
		p, err := netip.ParsePrefix(a)
		gw, _ := netip.ParseAddr(str(st, "ipv6Gateway"))
		if err != nil || !p.Masked().Contains(gw) || p.Addr() == gw {
			t.Fatalf("%s: address %q outside its gateway's subnet %s", id, a, gw)
		}
		if other, dup := seen[a]; dup {
			t.Fatalf("%s and %s both got %s", id, other, a)
		}
		seen[a] = id
	}
	e.stop()
	e.start()
	var allocs []map[string]any
	raw, _ := http_get(e.url + "/debug/ipv6/allocations")
	json.Unmarshal(raw, &allocs)
	if len(allocs) != 64 {
		t.Fatalf("%d allocations after restart, want 64", len(allocs))
	}
	for _, a := range allocs {
		if seen[fmt.Sprint(a["address"])] == "" && seen[fmt.Sprint(a["address"], "/64")] == "" {
			t.Fatalf("allocation %v unknown", a)
		}
	}
	// A new VM after the restart gets a fresh address.
	out := e.mustCall("CreateVm", map[string]any{"config": vmConfig("t1", map[string]any{"id": "eth0", "bridge_name": "br-c0", "ipv6": map[string]any{"gateway": "2001:db8:c0::1"}})})
	if a := str(list(e.getVM(out["vmId"].(string))["networkStatus"])[0], "ipv6Address"); seen[a] != "" {
		t.Fatalf("restart reused %s", a)
	}
}

// Leaked allocations of a TERMINATED VM are released by the cleanup
// endpoint once the grace period has passed, and reported.
func TestLeakedAllocationCleanup(t *testing.T) {
	e := newEnvWith(t, func(o *daemon.Options) { o.LeakGrace = 1 }) // 1 ns grace
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-leak", "config": vmConfig("t1", nic("eth0", "br-l", "2001:db8:1e::10/64", "2001:db8:1e::1"))})
	e.mustCall("BootVm", map[string]any{"vm_id": "vm-leak"})
	if err := exec.Command("kill", "-9", fmt.Sprint(pidOf(e.getVM("vm-leak")))).Run(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 50 && e.getVM("vm-leak")["state"] != "VM_STATE_TERMINATED"; i++ {
		e.d.Manager().CheckAll(t.Context())
	}
	out := e.shell(t, `curl -s -X POST http://localhost:8080/debug/ipv6/cleanup-allocations`)
	if !strings.Contains(out, "2001:db8:1e::10") {
		t.Fatalf("cleanup released: %s", out)
	}
	out = e.shell(t, `curl -s http://localhost:8080/debug/ipv6/allocations | jq -r '.[].address'`)
	if strings.Contains(out, "2001:db8:1e::10") {
		t.Fatalf("still allocated: %s", out)
	}
	if e.metric("metald_ipv6_leaked_allocations_reclaimed_total") != 1 {
		t.Fatal("reclaimed metric did not move")
	}
}

// With automatic subnet names off, an unknown label is invalid_argument
// naming the field and the label; a declared one works.
func TestUnknownSubnetNameRejected(t *testing.T) {
	e := newEnvWith(t, func(o *daemon.Options) { o.NoAutoSubnetNames = true })
	code, out := e.call("CreateVm", loadExample(t, "example1-secure-web-server"))
	if code != 400 || errorField(out) != "config.network[0].ipv6.address" || !strings.Contains(str(out, "message"), `"web"`) {
		t.Fatalf("unknown name: %d %v", code, out)
	}
	e.shell(t, `curl -sf -X POST http://localhost:8080/debug/ipv6/subnets -d '{"parent":"2600:beef:1000::/48","name":"web","value":16}'`)
	e.shell(t, `curl -sf -X POST http://localhost:8080/debug/ipv6/subnets -d '{"parent":"2600:beef:1000::/48","name":"mgmt"}'`)
	out = e.mustCall("CreateVm", loadExample(t, "example1-secure-web-server"))
	if a := str(list(e.getVM(out["vmId"].(string))["networkStatus"])[0], "ipv6Address"); a != "2600:beef:1000:10::10/64" {
		t.Fatalf("declared name resolved to %q", a)
	}
}

// The guide's Example 3 declares PCI-DSS, SOC2 and ISO27001 and US data
// residency: it passes as written, and each weakening is failed_precondition
// naming the framework and the field, creating nothing.
func TestComplianceThroughDaemon(t *testing.T) {
	e := newEnvWith(t, func(o *daemon.Options) {
		o.Pools = []ipam.PoolConfig{{ID: "financial", Prefixes: []string{"2600:BEEF:2000::/48", "2600:BEEF:2001::/48"}}}
	})
	bad := loadExample(t, "example3-financial-services")
	obj(obj(list(obj(bad["config"])["network"])[1])["security_policy"])["tenant_isolation_level"] = "moderate"
	code, out := e.call("CreateVm", bad)
	if code != 400 || out["code"] != "failed_precondition" || !strings.Contains(str(out, "message"), "PCI-DSS") ||
		!strings.HasPrefix(str(out, "message"), "config.network[1].security_policy.tenant_isolation_level: ") {
		t.Fatalf("weakened PCI-DSS config: %d %v", code, out)
	}
	bad = loadExample(t, "example3-financial-services")
	obj(obj(bad["config"])["compliance"])["data_residency"] = "EU"
	if code, out := e.call("CreateVm", bad); code != 400 || out["code"] != "failed_precondition" || !strings.Contains(str(out, "message"), `"EU"`) {
		t.Fatalf("data residency: %d %v", code, out)
	}
	if _, out := e.do(http.MethodGet, "ListVms", nil, ""); len(list(out["vms"])) != 0 {
		t.Fatalf("refused configs created VMs: %v", out)
	}
	e.mustCall("CreateVm", loadExample(t, "example3-financial-services"))
}

// compliance.audit_logging records every change to the VM (what, when, by
// whom) in a persisted log; VMs without it record nothing.
func TestAuditLogThroughDaemon(t *testing.T) {
	e := newEnvWith(t, func(o *daemon.Options) {
		o.Pools = []ipam.PoolConfig{{ID: "financial", Prefixes: []string{"2600:BEEF:2000::/48", "2600:BEEF:2001::/48"}}}
	})
	req := loadExample(t, "example3-financial-services")
	req["vm_id"] = "vm-fin"
	e.mustCall("CreateVm", req)
	e.mustCall("BootVm", map[string]any{"vm_id": "vm-fin"})
	e.mustCall("UpdateSecurityPolicy", map[string]any{"vm_id": "vm-fin", "interface_id": "primary",
		"security_policy": map[string]any{"egress_rules": []any{"allow tcp from any to any port 443", "deny all from any to any"}}})
	e.mustCall("IsolateVm", map[string]any{"vm_id": "vm-fin", "reason": "audit test"})
	e.mustCall("ReleaseVm", map[string]any{"vm_id": "vm-fin"})
	e.mustCall("DeleteVm", map[string]any{"vm_id": "vm-fin"})
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-plain", "config": vmConfig("t1", nic("eth0", "br-a1", "2600:beef:2000:9::10/64", ""))})
	out := e.shell(t, `curl -s "http://localhost:8080/debug/audit?vm_id=vm-fin" | jq -r '.[].action' | tr '\n' ','`)
	if out != "CreateVm,BootVm,Update security_policy,IsolateVm,ReleaseVm,DeleteVm," {
		t.Fatalf("audit actions: %q", out)
	}
	out = e.shell(t, `curl -s "http://localhost:8080/debug/audit?vm_id=vm-fin" | jq -r '.[0] | .caller + " | " + .timestamp'`)
	if !strings.Contains(out, "127.0.0.1:") || !strings.Contains(out, "Go-http-client") {
		t.Fatalf("caller and time: %q", out)
	}
	if out := e.shell(t, `curl -s "http://localhost:8080/debug/audit?vm_id=vm-plain" | jq length`); strings.TrimSpace(out) != "0" {
		t.Fatalf("a VM without audit_logging was audited: %s", out)
	}
	// Persisted: a restart keeps the log.
	e.stop()
	e.start()
	if out := e.shell(t, `curl -s "http://localhost:8080/debug/audit?vm_id=vm-fin" | jq length`); strings.TrimSpace(out) != "6" {
		t.Fatalf("audit entries after restart: %s", out)
	}
}
