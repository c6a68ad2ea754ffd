package daemon_test

import (
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/metald/metald/internal/network/ns"
	"github.com/metald/metald/internal/network/secpolicy"
)

// policyProgrammed returns a number that grows each time NIC key's policy
// is programmed: the highest rule handle of its ingress chain (every
// update rewrites the chain's rules, and rule handles only grow).
func (e *env) policyProgrammed(t *testing.T, key string) int {
	t.Helper()
	chain := "vm-" + key + "-in-g0"
	for _, name := range secpolicy.Tables() {
		out, err := e.host.Run("nft", "-a", "list", "chain", "ip6", name, chain)
		if err != nil {
			continue
		}
		last := -1
		for _, m := range regexp.MustCompile(`# handle (\d+)`).FindAllStringSubmatch(out, -1) {
			if n, _ := strconv.Atoi(m[1]); n > last {
				last = n
			}
		}
		if last > 0 {
			return last
		}
	}
	t.Fatalf("no policy chain %s:\n%s", chain, e.policyTables(t))
	return 0
}

// The /debug/security/optimize switches change behaviour:
// batch_processing writes the events of a flush window in one store
// transaction instead of one per event, cache_policies skips re-programming
// a NIC whose compiled plan did not change, and hardware_acceleration is
// refused because bridged traffic cannot use nftables flowtables.
func TestEventsOptimizeThroughDaemon(t *testing.T) {
	e := newEnv(t)
	cfg := vmConfig("to", nic("eth0", "br-op", "2001:db8:75::10/64", "2001:db8:75::1"))
	cfg["security_profile"] = map[string]any{"profile_name": "high"}
	policy := map[string]any{"ingress_rules": []any{"allow tcp from any to any port 80", "deny all from any to any"}}
	obj(list(cfg["network"])[0])["security_policy"] = policy
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-op", "config": cfg})
	e.mustCall("BootVm", map[string]any{"vm_id": "vm-op"})
	e.waitDAD("vm-op")

	// Defaults, and the reason acceleration is unavailable.
	out := e.shell(t, `curl -sf http://localhost:8080/debug/security/optimize | jq -c .`)
	if !strings.Contains(out, `"batch_processing":false,"hardware_acceleration":false,"cache_policies":false,"hardware_acceleration_supported":false`) ||
		!strings.Contains(out, "bridged traffic cannot use a flowtable") {
		t.Fatalf("GET optimize: %s", out)
	}
	// The guide's command asks for all three: refused, naming the field
	// and why, and nothing changes.
	out = e.shell(t, `curl -s -w ' %{http_code}' -X PUT http://localhost:8080/debug/security/optimize \
  -d '{
    "batch_processing": true,
    "hardware_acceleration": true,
    "cache_policies": true
  }'`)
	if !strings.HasSuffix(strings.TrimSpace(out), " 400") || !strings.Contains(out, `"failed_precondition"`) ||
		!strings.Contains(out, "hardware_acceleration: VM traffic is bridged") {
		t.Fatalf("PUT with hardware_acceleration: %s", out)
	}
	if out := e.shell(t, `curl -sf http://localhost:8080/debug/security/optimize | jq -c '[.batch_processing, .cache_policies]'`); strings.TrimSpace(out) != "[false,false]" {
		t.Fatalf("a refused PUT changed settings: %s", out)
	}
	if out := e.shell(t, `curl -s -w ' %{http_code}' -X PUT http://localhost:8080/debug/security/optimize -d '{"batch_processing": true, "bogus": 1}'`); !strings.HasSuffix(strings.TrimSpace(out), " 400") || !strings.Contains(out, "bogus") {
		t.Fatalf("unknown field: %s", out)
	}

	// batch_processing: 64 spoofed sources at once; the kernel logs a
	// sample (burst 20), one event per logged source, all closing in the
	// same aggregation window.
	spoof := func() (events, txns float64) {
		t.Helper()
		evBefore := e.metric0(`metald_network_security_events_total{severity="high",tenant_id="to"}`)
		txBefore := e.metric0("metald_security_event_store_transactions_total")
		f := e.vmNS("vm-op")
		script := strings.NewReplacer("int(sys.argv[1])", "64", "2001:db8:74::", "2001:db8:75::").Replace(floodScript)
		if out, err := ns.Command(int(f.Fd()), pyCmd(script)); err != nil || !strings.Contains(string(out), "sent 64") {
			t.Fatalf("spoof: %v %s", err, out)
		}
		deadline := time.Now().Add(5 * time.Second)
		last, since := -1.0, time.Now()
		for time.Now().Before(deadline) {
			events = e.metric0(`metald_network_security_events_total{severity="high",tenant_id="to"}`) - evBefore
			if events != last {
				last, since = events, time.Now()
			}
			if events > 0 && time.Since(since) > 700*time.Millisecond {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		return events, e.metric0("metald_security_event_store_transactions_total") - txBefore
	}
	events, txns := spoof()
	if events < 5 || txns != events {
		t.Fatalf("batch_processing off: %v events in %v transactions, want >= 5, one transaction each", events, txns)
	}
	stored := events
	out = e.shell(t, `curl -sf -X PUT http://localhost:8080/debug/security/optimize -d '{"batch_processing": true}' | jq -c '[.batch_processing, .cache_policies]'`)
	if strings.TrimSpace(out) != "[true,false]" {
		t.Fatalf("PUT batch_processing: %s", out)
	}
	events, txns = spoof()
	if events < 5 || txns < 1 || txns > 2 {
		t.Fatalf("batch_processing on: %v events in %v transactions, want >= 5 in one window's transaction", events, txns)
	}
	t.Logf("batch_processing on: %v events in %v transactions", events, txns)
	// Every event was stored either way.
	if n := len(e.events(t, "vm_id=vm-op&event_type=source_guard_violation")); float64(n) != stored+events {
		t.Fatalf("%d source_guard_violation events stored, want %v", n, stored+events)
	}

	// cache_policies: re-applying an unchanged policy does not touch the
	// kernel when on, and does when off.
	update := func() {
		t.Helper()
		e.mustCall("UpdateSecurityPolicy", map[string]any{"vm_id": "vm-op", "security_policy": policy})
	}
	gen := e.policyProgrammed(t, "vm-op.eth0")
	update()
	if g := e.policyProgrammed(t, "vm-op.eth0"); g <= gen {
		t.Fatalf("cache off: last rule handle %d after an update from %d, want the rules rewritten", g, gen)
	}
	out = e.shell(t, `curl -sf -X PUT http://localhost:8080/debug/security/optimize -d '{"cache_policies": true}' | jq -c '[.batch_processing, .cache_policies]'`)
	if strings.TrimSpace(out) != "[true,true]" {
		t.Fatalf("PUT cache_policies: %s", out)
	}
	hits := e.metric0(`metald_security_policy_cache_total{result="hit",table="policy"}`)
	fhHits := e.metric0(`metald_security_policy_cache_total{result="hit",table="first_hop"}`)
	gen = e.policyProgrammed(t, "vm-op.eth0")
	update()
	if g := e.policyProgrammed(t, "vm-op.eth0"); g != gen {
		t.Fatalf("cache on: last rule handle %d after an unchanged update from %d, want no re-programming", g, gen)
	}
	if d := e.metric0(`metald_security_policy_cache_total{result="hit",table="policy"}`) - hits; d != 1 {
		t.Fatalf("policy cache hits moved by %v, want 1", d)
	}
	if d := e.metric0(`metald_security_policy_cache_total{result="hit",table="first_hop"}`) - fhHits; d != 1 {
		t.Fatalf("first-hop cache hits moved by %v, want 1", d)
	}
	// A real change still programs (a miss), and takes effect.
	changed := map[string]any{"ingress_rules": []any{"allow tcp from any to any port 81", "deny all from any to any"}}
	e.mustCall("UpdateSecurityPolicy", map[string]any{"vm_id": "vm-op", "security_policy": changed})
	if g := e.policyProgrammed(t, "vm-op.eth0"); g <= gen {
		t.Fatalf("cache on: last rule handle %d after a real change from %d, want the rules rewritten", g, gen)
	}
	if table := e.policyTables(t); !strings.Contains(table, "tcp dport 81") {
		t.Fatalf("changed policy not programmed:\n%s", table)
	}
	// Settings survive a restart.
	e.stop()
	e.start()
	if out := e.shell(t, `curl -sf http://localhost:8080/debug/security/optimize | jq -c '[.batch_processing, .hardware_acceleration, .cache_policies]'`); strings.TrimSpace(out) != "[true,false,true]" {
		t.Fatalf("settings after restart: %s", out)
	}
}
