package daemon_test

import (
	"strconv"
	"strings"
	"testing"
	"time"
)

// udpScript sends n UDP datagrams to addr:port as fast as it can.
const udpScript = `
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    s.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
print("sent", sys.argv[3])
`

// packetCount sums details.packet_count of events.
func packetCount(evs []event) int {
	n := 0
	for _, ev := range evs {
		c, _ := strconv.Atoi(detail(ev, "packet_count"))
		n += c
	}
	return n
}

// waitPackets polls until the events matching query and match account for
// want packets, or for 5 s, or until the count stopped growing for a second
// (the aggregation window is 300 ms), and returns the count.
func (e *env) waitPackets(t *testing.T, query string, match func(event) bool, want int) int {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	last, since := -1, time.Now()
	for {
		var sel []event
		for _, ev := range e.events(t, query) {
			if match(ev) {
				sel = append(sel, ev)
			}
		}
		n := packetCount(sel)
		if n != last {
			last, since = n, time.Now()
		}
		if n >= want || time.Now().After(deadline) || (n > 0 && time.Since(since) > time.Second) {
			return n
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Enhanced monitoring for a tenant has a real effect: while the session
// runs, its VMs log every dropped packet (not 10/s per rule) and a sample of
// allowed ones (policy_allow_sample); the rules revert by themselves when
// the session expires.
func TestEventsEnhancedMonitoringThroughDaemon(t *testing.T) {
	e := newEnv(t)
	server := vmConfig("tm", nic("eth0", "br-mo", "2001:db8:73::10/64", "2001:db8:73::1"))
	obj(list(server["network"])[0])["security_policy"] = map[string]any{
		"ingress_rules": []any{"allow tcp from any to any port 80"},
	}
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-mo", "config": server})
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-mc", "config": vmConfig("tm", nic("eth0", "br-mo", "2001:db8:73::11/64", "2001:db8:73::1"))})
	for _, id := range []string{"vm-mo", "vm-mc"} {
		e.mustCall("BootVm", map[string]any{"vm_id": id})
	}
	e.waitDAD("vm-mo")
	e.waitDAD("vm-mc")
	e.startListener(t, "vm-mo", "80")
	isDefaultDeny := func(ev event) bool { return detail(ev, "rule") == "ingress_default" && detail(ev, "protocol") == "udp" }
	isAllow := func(ev event) bool { return detail(ev, "rule") == "ingress_rules[0]" }
	// burst sends n denied datagrams and returns how many packets the
	// events of the burst account for, and the deny counter's delta.
	burst := func(n int) (events int, counted uint64) {
		t.Helper()
		since := time.Now().UTC().Add(-50 * time.Millisecond).Format(time.RFC3339Nano)
		before := e.policyCounter(t, "vm-vm-mo.eth0-in-", "default")
		if out, err := e.inVM("vm-mc", "python3", "-c", udpScript, "2001:db8:73::10", "9", strconv.Itoa(n)); err != nil || !strings.Contains(out, "sent") {
			t.Fatalf("udp burst: %v %s", err, out)
		}
		q := "vm_id=vm-mo&event_type=policy_deny&since=" + since
		return e.waitPackets(t, q, isDefaultDeny, n), e.policyCounter(t, "vm-vm-mo.eth0-in-", "default") - before
	}
	// Warm up ND so the bursts go out at once.
	e.inVM("vm-mc", "ping", "-6", "-c", "1", "-W", "1", "2001:db8:73::10")

	// Without a session: drops are sampled (burst 20), allowed packets are
	// not logged at all.
	table := e.policyTables(t)
	if strings.Contains(table, "allow_sample") {
		t.Fatalf("allow samples logged without a session:\n%s", table)
	}
	logged, counted := burst(60)
	if counted != 60 || logged < 1 || logged >= 60 {
		t.Fatalf("without monitoring: %d of 60 drops logged (want a sample), counter %d (want 60)", logged, counted)
	}
	if !e.tcpConnect(t, "vm-mc", "2001:db8:73::10", "80") {
		t.Fatal("allowed tcp/80 did not connect")
	}

	// Start a short session with the guide's command.
	out := e.shell(t, `TENANT_ID="tm"
curl -sf -X POST http://localhost:8080/debug/security/enhance-monitoring \
  -d "{\"tenant_id\":\"$TENANT_ID\", \"duration\":\"6s\", \"log_level\":\"DEBUG\"}"`)
	if !strings.Contains(out, `"tenant_id": "tm"`) {
		t.Fatalf("enhance-monitoring: %s", out)
	}
	sessionStart := time.Now()
	table = e.policyTables(t)
	if !strings.Contains(table, `limit rate 10/second burst 10 packets log prefix "metald:tap-vm-mo:allow_sample/ingress_rules[0]" group 6420`) ||
		!strings.Contains(table, `limit rate 1000/second burst 100 packets log prefix "metald:tap-vm-mo:policy_deny/ingress_default" group 6420`) {
		t.Fatalf("monitoring rules not in the policy table:\n%s", table)
	}
	// The first-hop drops of the tenant's ports log up to 1000/s too, and
	// only theirs.
	if fh, _ := e.fhList(t, "chain", "vm-tap-vm-mo-out"); !strings.Contains(fh, "limit rate 1000/second") {
		t.Fatalf("first-hop log rate not raised:\n%s", fh)
	}

	// Every drop is logged now.
	logged, counted = burst(60)
	if counted != 60 || logged != 60 {
		t.Fatalf("with monitoring: %d of 60 drops logged, counter %d (want 60 and 60)", logged, counted)
	}
	// Allowed connections are sampled.
	allowSince := time.Now().UTC().Add(-50 * time.Millisecond).Format(time.RFC3339Nano)
	for range 3 {
		if !e.tcpConnect(t, "vm-mc", "2001:db8:73::10", "80") {
			t.Fatal("allowed tcp/80 did not connect under monitoring")
		}
	}
	ev := e.waitEvent(t, "vm_id=vm-mo&event_type=policy_allow_sample&since="+allowSince, isAllow)
	if ev.TenantID != "tm" || ev.InterfaceID != "eth0" || ev.Severity != "low" || detail(ev, "dst_port") != "80" || detail(ev, "src") != "2001:db8:73::11" {
		t.Fatalf("policy_allow_sample: %+v", ev)
	}
	if time.Since(sessionStart) > 5500*time.Millisecond {
		t.Fatalf("the checks under monitoring took %s, longer than the session", time.Since(sessionStart))
	}

	// The session ends by itself and the rules revert.
	deadline := time.Now().Add(8 * time.Second)
	for {
		out := e.shell(t, `curl -sf http://localhost:8080/debug/security/enhance-monitoring | jq -c .`)
		if strings.Contains(out, `"sessions":[]`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("session did not expire: %s", out)
		}
		time.Sleep(200 * time.Millisecond)
	}
	deadline = time.Now().Add(5 * time.Second)
	for {
		table = e.policyTables(t)
		fh, _ := e.fhList(t, "chain", "vm-tap-vm-mo-out")
		if !strings.Contains(table, "allow_sample") && !strings.Contains(table, "1000/second") && !strings.Contains(fh, "1000/second") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("rules did not revert after the session:\n%s\n%s", table, fh)
		}
		time.Sleep(100 * time.Millisecond)
	}
	after := time.Now().UTC().Format(time.RFC3339Nano)
	if !e.tcpConnect(t, "vm-mc", "2001:db8:73::10", "80") {
		t.Fatal("allowed tcp/80 did not connect after the session")
	}
	logged, counted = burst(60)
	if counted != 60 || logged >= 60 {
		t.Fatalf("after the session: %d of 60 drops logged (want a sample), counter %d", logged, counted)
	}
	if evs := e.events(t, "vm_id=vm-mo&event_type=policy_allow_sample&since="+after); len(evs) != 0 {
		t.Fatalf("allow samples after the session: %+v", evs)
	}

	// log_level INFO: every drop is logged, allowed packets are not
	// sampled; raising the running session to DEBUG adds the samples; an
	// operator's DELETE ends it.
	policyRules := func() string {
		table := e.policyTables(t)
		return table
	}
	e.shell(t, `curl -sf -X POST http://localhost:8080/debug/security/enhance-monitoring -d '{"tenant_id":"tm", "duration":"1m", "log_level":"INFO"}'`)
	if table := policyRules(); !strings.Contains(table, `limit rate 1000/second burst 100 packets log prefix "metald:tap-vm-mo:policy_deny/ingress_default"`) ||
		strings.Contains(table, "allow_sample") {
		t.Fatalf("INFO session rules:\n%s", table)
	}
	e.shell(t, `curl -sf -X POST http://localhost:8080/debug/security/enhance-monitoring -d '{"tenant_id":"tm", "duration":"1m", "log_level":"DEBUG"}'`)
	if table := policyRules(); !strings.Contains(table, "allow_sample/ingress_rules[0]") {
		t.Fatalf("a session raised to DEBUG does not sample allowed packets:\n%s", table)
	}
	e.shell(t, `curl -sf -X DELETE http://localhost:8080/debug/security/enhance-monitoring/tm`)
	if table := policyRules(); strings.Contains(table, "allow_sample") || strings.Contains(table, "1000/second") {
		t.Fatalf("rules after DELETE:\n%s", table)
	}
}
