package daemon_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/metald/metald/internal/network/secpolicy"
)

// event is the JSON form of a security event.
type event struct {
	ID          string         `json:"id"`
	Timestamp   string         `json:"timestamp"`
	Type        string         `json:"event_type"`
	Severity    string         `json:"severity"`
	VMID        string         `json:"vm_id"`
	TenantID    string         `json:"tenant_id"`
	InterfaceID string         `json:"interface_id"`
	Details     map[string]any `json:"details"`
}

// events reads GET /debug/security/events?<query>.
func (e *env) events(t *testing.T, query string) []event {
	t.Helper()
	resp, err := http.Get(e.url + "/debug/security/events?" + query)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out []event
	if resp.StatusCode != 200 {
		t.Fatalf("events?%s: HTTP %d", query, resp.StatusCode)
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatalf("events?%s: %v", query, err)
	}
	return out
}

// waitEvent polls the events endpoint until one matches, for up to 5 s.
func (e *env) waitEvent(t *testing.T, query string, match func(event) bool) event {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		for _, ev := range e.events(t, query) {
			if match(ev) {
				return ev
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no matching event for ?%s; have %v", query, e.events(t, query))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func detail(ev event, k string) string {
	v, ok := ev.Details[k]
	if !ok {
		return ""
	}
	return fmt.Sprint(v)
}

// Drops by the per-VM policy table become security events attributed to
// VM, tenant, NIC and rule (policy_deny, tenant_isolation_block,
// blocked_source), next to the kernel-log line they always had, and move
// metald_network_security_events_total; exact counts stay the counters'.
func TestEventsPolicyDenyThroughDaemon(t *testing.T) {
	e := newEnv(t)
	server := vmConfig("t1", nic("eth0", "br-pe", "2001:db8:72::10/64", "2001:db8:72::1"))
	obj(list(server["network"])[0])["security_policy"] = map[string]any{
		"ingress_rules":          []any{"allow tcp from any to any port 80", "deny tcp from any to any port 22"},
		"tenant_isolation_level": "strict",
		"log_security_events":    true,
	}
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-pd", "config": server})
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-pc", "config": vmConfig("t1", nic("eth0", "br-pe", "2001:db8:72::11/64", "2001:db8:72::1"))})
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-po", "config": vmConfig("t2", nic("eth0", "br-pe", "2001:db8:72::12/64", "2001:db8:72::1"))})
	for _, id := range []string{"vm-pd", "vm-pc", "vm-po"} {
		e.mustCall("BootVm", map[string]any{"vm_id": id})
	}
	for _, id := range []string{"vm-pd", "vm-pc", "vm-po"} {
		e.waitDAD(id)
	}
	e.startListener(t, "vm-pd", "80", "22")

	// The rule logs to the kernel log (journalctl -k | grep
	// metald-ipv6-deny) and, rate-limited, to metald's NFLOG group with a
	// prefix naming device and rule.
	table := e.policyTables(t)
	for _, want := range []string{`log prefix "metald-ipv6-deny "`,
		`limit rate 10/second burst 20 packets log prefix "metald:tap-vm-pd:policy_deny/ingress_rules[1]" group 6420`,
		`log prefix "metald:tap-vm-pd:tenant_isolation/ingress_strict" group 6420`} {
		if !strings.Contains(table, want) {
			t.Fatalf("policy table lacks %s:\n%s", want, table)
		}
	}

	lowBefore := e.metric0(`metald_network_security_events_total{severity="low",tenant_id="t1"}`)
	if !e.tcpConnect(t, "vm-pc", "2001:db8:72::10", "80") {
		t.Fatal("allowed tcp/80 did not connect")
	}
	start := time.Now()
	if e.tcpConnect(t, "vm-pc", "2001:db8:72::10", "22") {
		t.Fatal("tcp/22 connected through the deny rule")
	}
	ev := e.waitEvent(t, "vm_id=vm-pd&event_type=policy_deny", func(ev event) bool { return detail(ev, "rule") == "ingress_rules[1]" })
	if ev.TenantID != "t1" || ev.InterfaceID != "eth0" || ev.Severity != "low" {
		t.Fatalf("policy_deny attribution: %+v", ev)
	}
	for k, want := range map[string]string{"src": "2001:db8:72::11", "dst": "2001:db8:72::10", "protocol": "tcp", "dst_port": "22", "host_device": "tap-vm-pd"} {
		if got := detail(ev, k); got != want {
			t.Fatalf("policy_deny details.%s = %q, want %q: %+v", k, got, want, ev)
		}
	}
	// A SYN and its retransmissions within 2 s: sampled, at least one.
	if n := detail(ev, "packet_count"); n == "" || n == "0" {
		t.Fatalf("packet_count %q", n)
	}
	if ts, _ := time.Parse(time.RFC3339, ev.Timestamp); ts.Before(start.Add(-time.Second)) {
		t.Fatalf("event timestamp %s before the attempt %s", ev.Timestamp, start)
	}
	if d := e.metric0(`metald_network_security_events_total{severity="low",tenant_id="t1"}`) - lowBefore; d < 1 {
		t.Fatalf("metald_network_security_events_total{severity=low,tenant_id=t1} moved by %v", d)
	}
	// The exact count is the rule's counter (GetVm / debug endpoint read it
	// from nftables): at least the SYNs the client sent.
	n := e.policyCounter(t, "vm-vm-pd.eth0-in-", "ingress[1]")
	if n < 1 {
		t.Fatalf("deny rule counter: %d", n)
	}
	// The policy endpoint's per-rule hit counters are the kernel's.
	out := e.shell(t, `curl -s http://localhost:8080/debug/vm/vm-pd/security-policy | jq -c '[.rule_counters[] | select(.direction == "ingress" and (.rule | startswith("ingress[1]:"))) | .packets] | add'`)
	v, err := strconv.ParseUint(strings.TrimSpace(out), 10, 64)
	// A late retransmission may land between the reads: bracket it.
	if n2 := e.policyCounter(t, "vm-vm-pd.eth0-in-", "ingress[1]"); err != nil || v < n || v > n2 {
		t.Fatalf("security-policy rule_counters for ingress[1]: %s, the kernel counted %d then %d", out, n, n2)
	}
	if out := e.shell(t, `curl -s http://localhost:8080/debug/vm/vm-pd/security-policy | jq -c '[.isolated, (.rule_counters | length > 0), .rule_counters_error]'`); strings.TrimSpace(out) != "[false,true,null]" {
		t.Fatalf("security-policy: %s", out)
	}

	// Strict tenant isolation: another tenant's attempt is attributed to
	// the isolated VM.
	if e.tcpConnect(t, "vm-po", "2001:db8:72::10", "80") {
		t.Fatal("another tenant reached a strictly isolated VM")
	}
	ev = e.waitEvent(t, "vm_id=vm-pd&event_type=tenant_isolation_block", func(ev event) bool { return detail(ev, "src") == "2001:db8:72::12" })
	if ev.TenantID != "t1" || ev.InterfaceID != "eth0" || detail(ev, "rule") != "ingress_strict" || detail(ev, "dst_port") != "80" {
		t.Fatalf("tenant_isolation_block: %+v", ev)
	}

	// blocked_sources (operator-owned): attributed to the blocked VM.
	e.host.MustRun(t, "nft", "add", "element", "ip6", "metald_security", "blocked_sources", "{ 2001:db8:72::11 }")
	if e.tcpConnect(t, "vm-pc", "2001:db8:72::10", "80") {
		t.Fatal("a blocked source still connects")
	}
	ev = e.waitEvent(t, "event_type=blocked_source", func(ev event) bool { return detail(ev, "src") == "2001:db8:72::11" })
	if ev.VMID != "vm-pc" || ev.TenantID != "t1" || ev.Severity != "high" {
		t.Fatalf("blocked_source: %+v", ev)
	}
	e.host.MustRun(t, "nft", "delete", "element", "ip6", "metald_security", "blocked_sources", "{ 2001:db8:72::11 }")
}

// policyTables lists the policy tables: the main table (base chains,
// blocked_sources) and the shard tables holding the NIC chains
// (secpolicy.Tables).
func (e *env) policyTables(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	for _, name := range secpolicy.Tables() {
		out, err := e.host.Run("nft", "list", "table", "ip6", name)
		if err != nil {
			t.Fatalf("nft list table %s: %v\n%s", name, err, out)
		}
		b.WriteString(out)
	}
	return b.String()
}

// policyCounter sums the counters of the policy-table rules of chains named
// chain* whose comment starts with prefix.
func (e *env) policyCounter(t *testing.T, chain, prefix string) uint64 {
	t.Helper()
	type ruleDoc struct {
		Rule *struct {
			Chain   string           `json:"chain"`
			Comment string           `json:"comment"`
			Expr    []map[string]any `json:"expr"`
		} `json:"rule"`
	}
	var all []ruleDoc
	for _, name := range secpolicy.Tables() {
		out, err := e.host.Run("nft", "-j", "list", "table", "ip6", name)
		if err != nil {
			t.Fatalf("nft -j list table %s: %v\n%s", name, err, out)
		}
		var doc struct {
			Nftables []ruleDoc `json:"nftables"`
		}
		if err := json.Unmarshal([]byte(out), &doc); err != nil {
			t.Fatal(err)
		}
		all = append(all, doc.Nftables...)
	}
	var n uint64
	for _, o := range all {
		if o.Rule == nil || !strings.HasPrefix(o.Rule.Chain, chain) || !strings.HasPrefix(o.Rule.Comment, prefix) {
			continue
		}
		for _, x := range o.Rule.Expr {
			if c, ok := x["counter"].(map[string]any); ok {
				p, _ := c["packets"].(float64)
				n += uint64(p)
			}
		}
	}
	return n
}

// TestRAFromUnguardedVMReported: a VM whose port has no RA guard still
// cannot advertise itself as a router (the policy table drops RAs from
// VM addresses), and that drop is reported like the guard's: an
// ra_guard_block event attributed to the VM, the security-event metric
// moving.
func TestRAFromUnguardedVMReported(t *testing.T) {
	e := newEnv(t)
	for _, v := range []struct{ id, addr string }{{"vm-ru", "2001:db8:73::10/64"}, {"vm-rn", "2001:db8:73::11/64"}} {
		e.mustCall("CreateVm", map[string]any{"vm_id": v.id, "config": vmConfig("t1", nic("eth0", "br-ru", v.addr, "2001:db8:73::1"))})
		e.mustCall("BootVm", map[string]any{"vm_id": v.id})
	}
	e.waitDAD("vm-ru")
	e.waitDAD("vm-rn")
	highBefore := e.metric0(`metald_network_security_events_total{severity="high",tenant_id="t1"}`)
	got := e.sniffWhile(t, "vm-rn", "icmp6 and ip6[40] == 134", func() {
		out, err := e.scapy("vm-ru", `
p = Ether(src=get_if_hwaddr("eth0"), dst="33:33:00:00:00:01")/IPv6(src="2001:db8:73::10", dst="ff02::1", hlim=255)/ICMPv6ND_RA()/ICMPv6NDOptPrefixInfo(prefix="2001:db8:bad::", prefixlen=64)
sendp([p]*3, iface="eth0")`)
		if err != nil {
			t.Fatalf("send RA: %v\n%s", err, out)
		}
	})
	if got != 0 {
		t.Fatalf("%d RAs from an unguarded VM reached its neighbour", got)
	}
	ev := e.waitEvent(t, "vm_id=vm-ru&event_type=ra_guard_block", func(ev event) bool { return detail(ev, "src") == "2001:db8:73::10" })
	if ev.TenantID != "t1" || ev.Severity != "high" || detail(ev, "dst") != "ff02::1" {
		t.Fatalf("ra_guard_block: %+v", ev)
	}
	if d := e.metric0(`metald_network_security_events_total{severity="high",tenant_id="t1"}`) - highBefore; d < 1 {
		t.Fatalf("metald_network_security_events_total{severity=high} moved by %v", d)
	}

	// The tenant label comes from API callers: once a tenant's last VM is
	// deleted its series end, so /metrics does not keep every tenant ever
	// seen.
	if !strings.Contains(e.metricsText(t), `tenant_id="t1"`) {
		t.Fatal("no series of tenant t1 while its VMs run")
	}
	e.mustCall("DeleteVm", map[string]any{"vm_id": "vm-ru"})
	if !strings.Contains(e.metricsText(t), `metald_ipv6_ra_guard_blocks_total{tenant_id="t1"}`) {
		t.Fatal("tenant t1's first-hop series ended while it still has a VM")
	}
	e.mustCall("DeleteVm", map[string]any{"vm_id": "vm-rn"})
	if text := e.metricsText(t); strings.Contains(text, `tenant_id="t1"`) {
		t.Fatalf("series of tenant t1 after its last VM was deleted:\n%s", grepLines(text, `tenant_id="t1"`))
	}
}

// metricsText returns the whole metrics page.
func (e *env) metricsText(t *testing.T) string {
	t.Helper()
	resp, err := http.Get(e.metrics)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func grepLines(text, sub string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestPolicyDriftRepaired: an operator's nft command that empties a VM's
// policy chain opens the VM up; metald notices the foreign commit, finds
// the chain changed, and programs every policy again within a few watch
// intervals (packets), counting the repair. Adding an element to
// blocked_sources, also a foreign commit, is not drift.
func TestPolicyDriftRepaired(t *testing.T) {
	e := newEnv(t)
	server := vmConfig("t1", nic("eth0", "br-dr", "2001:db8:74::10/64", "2001:db8:74::1"))
	obj(list(server["network"])[0])["security_policy"] = map[string]any{
		"ingress_rules": []any{"allow tcp from any to any port 80", "deny all from any to any"},
	}
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-ds", "config": server})
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-dc", "config": vmConfig("t1", nic("eth0", "br-dr", "2001:db8:74::11/64", "2001:db8:74::1"))})
	for _, id := range []string{"vm-ds", "vm-dc"} {
		e.mustCall("BootVm", map[string]any{"vm_id": id})
	}
	e.waitDAD("vm-ds")
	e.waitDAD("vm-dc")
	e.startListener(t, "vm-ds", "80", "22")
	if !e.tcpConnect(t, "vm-dc", "2001:db8:74::10", "80") || e.tcpConnect(t, "vm-dc", "2001:db8:74::10", "22") {
		t.Fatal("policy not in force before the test")
	}
	repairs := func() float64 { return e.metric0(`metald_firewall_repairs_total{kind="policy"}`) }

	e.host.MustRun(t, "nft", "add", "element", "ip6", secpolicy.TableName, secpolicy.BlockedSources, "{ 2001:db8:bad::1 }")
	time.Sleep(time.Second)
	if n := repairs(); n != 0 {
		t.Fatalf("a blocked_sources element counted as %v policy repairs", n)
	}

	k := secpolicy.Key("vm-ds", "eth0")
	chain := "vm-" + k + "-in-g0"
	e.host.MustRun(t, "nft", "flush", "chain", "ip6", secpolicy.ShardTable(secpolicy.Shard(k)), chain)
	deadline := time.Now().Add(5 * time.Second)
	for repairs() < 1 {
		if time.Now().After(deadline) {
			t.Fatal("the flushed policy chain was not repaired")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if e.tcpConnect(t, "vm-dc", "2001:db8:74::10", "22") {
		t.Fatal("tcp/22 connects after the repair")
	}
	if !e.tcpConnect(t, "vm-dc", "2001:db8:74::10", "80") {
		t.Fatal("tcp/80 refused after the repair")
	}
	e.logs.mu.Lock()
	logged := strings.Contains(e.logs.buf.String(), "repaired security policy drift")
	e.logs.mu.Unlock()
	if !logged {
		t.Fatal("repair not logged")
	}
}
