package daemon_test

import (
	"encoding/json"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/metald/metald/internal/network/ns"
)

const listenScript = `
import socket, sys, threading
def serve(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port)); s.listen(16)
    while True:
        c, _ = s.accept(); c.sendall(b"hi"); c.close()
for p in sys.argv[1:]:
    threading.Thread(target=serve, args=(int(p),), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
`

const connectScript = `
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
    print("connected", c.recv(2).decode())
except Exception as e:
    print("failed", e)
`

// tcpConnect reports whether a TCP connection from a VM to addr:port
// completes (and the server's greeting arrives).
func (e *env) tcpConnect(t *testing.T, from, addr, port string) bool {
	t.Helper()
	out, _ := e.inVM(from, "python3", "-c", connectScript, addr, port)
	return strings.Contains(out, "connected hi")
}

// The per-VM security policy is enforced for VMs created through the API:
// first match wins, default deny, stateful replies, strict tenant
// isolation, and the operator's blocked_sources set, which metald never
// touches (a restart keeps it).
func TestPolicyThroughDaemon(t *testing.T) {
	e := newEnv(t)
	server := vmConfig("t1", nic("eth0", "br-p", "2001:db8:70::10/64", "2001:db8:70::1"))
	obj(list(server["network"])[0])["security_policy"] = map[string]any{
		"ingress_rules":          []any{"allow tcp from any to any port 80", "deny all from any to any"},
		"egress_rules":           []any{"deny all from any to any"},
		"tenant_isolation_level": "strict",
	}
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-srv", "config": server})
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-cli", "config": vmConfig("t1", nic("eth0", "br-p", "2001:db8:70::11/64", "2001:db8:70::1"))})
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-oth", "config": vmConfig("t2", nic("eth0", "br-p", "2001:db8:70::12/64", "2001:db8:70::1"))})
	for _, id := range []string{"vm-srv", "vm-cli", "vm-oth"} {
		e.mustCall("BootVm", map[string]any{"vm_id": id})
	}
	for _, id := range []string{"vm-srv", "vm-cli", "vm-oth"} {
		e.waitDAD(id)
	}
	e.startListener(t, "vm-srv", "80", "22")

	// Same tenant: port 80 is allowed, and its replies pass the server's
	// `deny all` egress (stateful); port 22 and ping are denied.
	if !e.tcpConnect(t, "vm-cli", "2001:db8:70::10", "80") {
		t.Fatal("allowed tcp/80 from the same tenant did not connect")
	}
	if e.tcpConnect(t, "vm-cli", "2001:db8:70::10", "22") {
		t.Fatal("tcp/22 connected through `deny all`")
	}
	if out, err := e.inVM("vm-cli", "ping", "-6", "-c", "1", "-W", "2", "2001:db8:70::10"); err == nil {
		t.Fatalf("ping passed `deny all`:\n%s", out)
	}
	// The server's egress denies new connections it opens itself.
	if e.tcpConnect(t, "vm-srv", "2001:db8:70::11", "80") {
		t.Fatal("the server opened a connection through its `deny all` egress")
	}
	// Strict isolation: another tenant cannot reach even the allowed port.
	if e.tcpConnect(t, "vm-oth", "2001:db8:70::10", "80") {
		t.Fatal("another tenant reached a strictly isolated VM")
	}
	// ND to the neighbours still works under `deny all` (RFC 4890).
	if out, err := e.inVM("vm-cli", "ping", "-6", "-c", "1", "-W", "2", "2001:db8:70::12"); err != nil {
		t.Fatalf("unrelated VMs lost connectivity: %v\n%s", err, out)
	}
	// The policy endpoint says the rules are enforced.
	out := e.shell(t, `curl -s http://localhost:8080/debug/vm/vm-srv/security-policy | jq -c '[.enforcement[] | select(.status == "enforced") | .control]'`)
	if strings.TrimSpace(out) != `["ingress_rules","egress_rules","tenant_isolation_level","bridged_traffic_at_l3"]` {
		t.Fatalf("enforcement: %s", out)
	}
	// GetVm says the same per NIC.
	enforced := map[string]string{}
	for _, c := range list(obj(list(e.getVM("vm-srv")["networkStatus"])[0])["policyControls"]) {
		enforced[str(c, "control")] = str(c, "status")
	}
	if enforced["ingress_rules"] != "enforced" || enforced["bridged_traffic_at_l3"] != "enforced" || enforced["bandwidth_limit_mbps"] != "off" {
		t.Fatalf("GetVm policy controls: %v", enforced)
	}
	// No profile, so no source guard: the policy cannot attribute a packet
	// from an address the VM was not given, and GetVm says so.
	if enforced["policy_address_identity"] != "not_enforced" {
		t.Fatalf("GetVm policy controls: %v", enforced)
	}

	// blocked_sources, by the operator with the nft CLI: the client is cut
	// off, and metald keeps the element across a restart.
	e.host.MustRun(t, "nft", "add", "element", "ip6", "metald_security", "blocked_sources", "{ 2001:db8:70::11 }")
	if e.tcpConnect(t, "vm-cli", "2001:db8:70::10", "80") {
		t.Fatal("a blocked source still connects")
	}
	e.stop()
	e.start()
	if out, _ := e.host.Run("nft", "list", "set", "ip6", "metald_security", "blocked_sources"); !strings.Contains(out, "2001:db8:70::11") {
		t.Fatalf("restart dropped the operator's element:\n%s", out)
	}
	e.host.MustRun(t, "nft", "delete", "element", "ip6", "metald_security", "blocked_sources", "{ 2001:db8:70::11 }")
	deadline := time.Now().Add(5 * time.Second)
	for !e.tcpConnect(t, "vm-cli", "2001:db8:70::10", "80") {
		if time.Now().After(deadline) {
			t.Fatal("the client did not get back in after the element was removed")
		}
	}

	// Deleting the VM removes its policy chains.
	e.mustCall("DeleteVm", map[string]any{"vm_id": "vm-srv"})
	if out := e.policyTables(t); strings.Contains(out, "vm-srv") {
		t.Fatalf("policy of a deleted VM left behind:\n%s", out)
	}
}

// Live changes with the guide's own commands: UpdateVmNetwork patches the
// RA-guard fields without switching off the other guards, and
// UpdateSecurityPolicy replaces the rules in one transaction (ping starts
// to pass); bad updates change nothing.
func TestLiveUpdatesThroughDaemon(t *testing.T) {
	e := newEnv(t)
	cfg := vmConfig("t1", nic("eth0", "br-u", "2001:db8:71::10/64", "2001:db8:71::1"))
	cfg["security_profile"] = map[string]any{"profile_name": "high"}
	obj(list(cfg["network"])[0])["security_policy"] = map[string]any{
		"ingress_rules": []any{"allow tcp from any to any port 80", "deny all from any to any"}}
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-u1", "config": cfg})
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-u2", "config": vmConfig("t1", nic("eth0", "br-u", "2001:db8:71::11/64", "2001:db8:71::1"))})
	for _, id := range []string{"vm-u1", "vm-u2"} {
		e.mustCall("BootVm", map[string]any{"vm_id": id})
	}
	e.waitDAD("vm-u1")
	e.waitDAD("vm-u2")
	if _, err := e.inVM("vm-u2", "ping", "-6", "-c", "1", "-W", "2", "2001:db8:71::10"); err == nil {
		t.Fatal("ping passed the initial `deny all`")
	}

	// The guide's "Fix RA Guard configuration" command, verbatim but for
	// the address.
	e.shell(t, `VM_ID=vm-u1; curl -sf -X PUT http://localhost:8080/vmprovisioner.v1.VmService/UpdateVmNetwork \
  -d '{
    "vm_id": "'$VM_ID'",
    "interface_id": "eth0", 
    "ipv6": {
      "security": {
        "enable_ra_guard": true,
        "allowed_ra_sources": ["2001:db8:71::1"]
      }
    }
  }'`)
	st := obj(list(e.getVM("vm-u1")["networkStatus"])[0])
	eff := obj(st["effectiveSecurity"])
	if eff["blockHopByHop"] != true || eff["enableSourceGuard"] != true || len(list(eff["allowedRaSources"])) != 1 {
		t.Fatalf("patch switched other guards off: %v", eff)
	}
	code, out := e.call("UpdateVmNetwork", map[string]any{"vm_id": "vm-u1", "ipv6": map[string]any{"security": map[string]any{"enable_source_guard": false}}})
	if code != 400 || errorField(out) != "ipv6.security.enable_source_guard" {
		t.Fatalf("weakening under high: %d %v", code, out)
	}
	code, out = e.call("UpdateVmNetwork", map[string]any{"vm_id": "vm-u1", "ipv6": map[string]any{"address": "2001:db8:71::99/64"}})
	if code != 400 || errorField(out) != "ipv6.address" {
		t.Fatalf("address change: %d %v", code, out)
	}

	// A bad rule is refused with its path and changes nothing.
	code, out = e.call("UpdateSecurityPolicy", map[string]any{"vm_id": "vm-u1", "security_policy": map[string]any{"ingress_rules": []any{"allow icmpv6 form any to any"}}})
	if code != 400 || errorField(out) != "security_policy.ingress_rules[0]" || !strings.Contains(str(out, "message"), `expected "from", got "form"`) {
		t.Fatalf("bad rule: %d %v", code, out)
	}
	if _, err := e.inVM("vm-u2", "ping", "-6", "-c", "1", "-W", "2", "2001:db8:71::10"); err == nil {
		t.Fatal("a refused update changed the policy")
	}
	// The guide's "Update security policy to allow communication" command.
	e.shell(t, `VM_ID=vm-u1; curl -sf -X PUT http://localhost:8080/vmprovisioner.v1.VmService/UpdateSecurityPolicy \
  -d '{
    "vm_id": "'$VM_ID'",
    "security_policy": {
      "ingress_rules": [
        "allow tcp from 2001:db8:71::/64 to any port 80,443",
        "allow icmpv6 from any to any",
        "deny all from any to any"
      ]
    }
  }'`)
	if out, err := e.inVM("vm-u2", "ping", "-6", "-c", "1", "-W", "3", "2001:db8:71::10"); err != nil {
		t.Fatalf("ping after the update: %v\n%s", err, out)
	}
	if rules := list(obj(obj(list(e.getVM("vm-u1")["network"])[0])["securityPolicy"])["ingressRules"]); len(rules) != 3 {
		t.Fatalf("stored rules: %v", rules)
	}

	// A list cannot be emptied by sending [] (JSON cannot tell it from
	// absent), so clear_fields names it: with no ingress rules the VM is
	// open again. A field both given and cleared, an unknown one and a
	// boot-time one are refused and change nothing.
	e.startListener(t, "vm-u1", "8080")
	if e.tcpConnect(t, "vm-u2", "2001:db8:71::10", "8080") {
		t.Fatal("tcp/8080 connected through `deny all`")
	}
	for _, c := range []struct {
		method string
		req    map[string]any
		field  string
		reason string
	}{
		{"UpdateSecurityPolicy", map[string]any{"vm_id": "vm-u1", "security_policy": map[string]any{"ingress_rules": []any{"allow all from any to any"}}, "clear_fields": []any{"ingress_rules"}}, "clear_fields[0]", "clear it or set it, not both"},
		{"UpdateSecurityPolicy", map[string]any{"vm_id": "vm-u1", "clear_fields": []any{"ingres_rules"}}, "clear_fields[0]", `SecurityPolicy has no field "ingres_rules"`},
		{"UpdateSecurityPolicy", map[string]any{"vm_id": "vm-u1", "clear_fields": []any{"egress_rules", "ingress_rules.x"}}, "clear_fields[1]", "not a message"},
		{"UpdateVmNetwork", map[string]any{"vm_id": "vm-u1", "clear_fields": []any{"address"}}, "clear_fields[0]", "cannot change on an existing vm"},
		{"UpdateVmNetwork", map[string]any{"vm_id": "vm-u1", "clear_fields": []any{"security.allowed_ra_source"}}, "clear_fields[0]", `Ipv6Security has no field "allowed_ra_source"`},
		{"UpdateSecurityPolicy", map[string]any{"vm_id": "vm-u1"}, "security_policy", "required"},
		{"UpdateSecurityPolicy", map[string]any{"vm_id": "vm-u1", "security_policy": map[string]any{"ingress_rules": []any{}}}, "security_policy", "to empty a list, name it in clear_fields"},
		{"UpdateVmNetwork", map[string]any{"vm_id": "vm-u1", "ipv6": map[string]any{"security": map[string]any{}}}, "ipv6", "sets no field"},
		{"UpdateSecurityPolicy", map[string]any{"vm_id": "vm-u1", "clear_fields": []any{"ingress_rules", "ingressRules"}}, "clear_fields[1]", "named twice"},
	} {
		code, out := e.call(c.method, c.req)
		if code != 400 || errorField(out) != c.field || !strings.Contains(str(out, "message"), c.reason) {
			t.Fatalf("%s %v: %d %v", c.method, c.req, code, out)
		}
	}
	if e.tcpConnect(t, "vm-u2", "2001:db8:71::10", "8080") {
		t.Fatal("a refused clear changed the policy")
	}
	e.shell(t, `curl -sf -X PUT http://localhost:8080/vmprovisioner.v1.VmService/UpdateSecurityPolicy \
  -d '{"vm_id": "vm-u1", "clear_fields": ["ingress_rules"]}'`)
	if !e.tcpConnect(t, "vm-u2", "2001:db8:71::10", "8080") {
		t.Fatal("tcp/8080 still denied after ingress_rules were cleared")
	}
	if pol := obj(list(e.getVM("vm-u1")["network"])[0])["securityPolicy"]; pol != nil && obj(pol)["ingressRules"] != nil {
		t.Fatalf("stored policy after the clear: %v", pol)
	}
	// Under "high", clearing a guard falls back to the profile's default
	// (on), and clearing allowed_ra_sources empties the list.
	e.mustCall("UpdateVmNetwork", map[string]any{"vm_id": "vm-u1", "clear_fields": []any{"security.allowed_ra_sources", "security.block_hop_by_hop"}})
	eff = obj(obj(list(e.getVM("vm-u1")["networkStatus"])[0])["effectiveSecurity"])
	if eff["blockHopByHop"] != true || eff["enableRaGuard"] != true || len(list(eff["allowedRaSources"])) != 0 {
		t.Fatalf("after clearing: %v", eff)
	}
	e.mustCall("UpdateSecurityPolicy", map[string]any{"vm_id": "vm-u1", "security_policy": map[string]any{"ingress_rules": []any{
		"allow tcp from 2001:db8:71::/64 to any port 80,443", "allow icmpv6 from any to any", "deny all from any to any"}}})
	// Persisted: a restart keeps the new policy in force.
	e.stop()
	e.start()
	if out, err := e.inVM("vm-u2", "ping", "-6", "-c", "1", "-W", "3", "2001:db8:71::10"); err != nil {
		t.Fatalf("ping after restart: %v\n%s", err, out)
	}
}

// Quarantine with the guide's IsolateVm command: everything to and from the
// VM stops (allowed flows too), a policy update meanwhile is stored but
// isolation wins, GetVm and the events show it, and ReleaseVm lifts it.
func TestIsolateThroughDaemon(t *testing.T) {
	e := newEnv(t)
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-suspicious-123", "config": vmConfig("t1", nic("eth0", "br-i", "2001:db8:72::10/64", "2001:db8:72::1"))})
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-peer", "config": vmConfig("t1", nic("eth0", "br-i", "2001:db8:72::11/64", "2001:db8:72::1"))})
	for _, id := range []string{"vm-suspicious-123", "vm-peer"} {
		e.mustCall("BootVm", map[string]any{"vm_id": id})
	}
	e.waitDAD("vm-suspicious-123")
	e.waitDAD("vm-peer")
	ping := func(from, to string) bool {
		_, err := e.inVM(from, "ping", "-6", "-c", "1", "-W", "2", to)
		return err == nil
	}
	if !ping("vm-peer", "2001:db8:72::10") {
		t.Fatal("no connectivity before isolation")
	}
	e.shell(t, `VM_ID="vm-suspicious-123"
curl -sf -X POST http://localhost:8080/vmprovisioner.v1.VmService/IsolateVm \
  -d "{\"vm_id\":\"$VM_ID\", \"reason\":\"Security violation investigation\"}"`)
	// The reason is bounded: it is stored and written to both logs.
	if code, out := e.call("IsolateVm", map[string]any{"vm_id": "vm-peer", "reason": strings.Repeat("r", 1025)}); code != 400 || errorField(out) != "reason" || !strings.Contains(str(out, "message"), "at most 1024 bytes") {
		t.Fatalf("oversized reason: %d %v", code, out)
	}
	if e.getVM("vm-peer")["isolation"] != nil {
		t.Fatal("a refused IsolateVm isolated the VM")
	}
	iso := obj(e.getVM("vm-suspicious-123")["isolation"])
	if iso["isolated"] != true || iso["reason"] != "Security violation investigation" || iso["since"] == nil {
		t.Fatalf("GetVm isolation: %v", iso)
	}
	if ping("vm-peer", "2001:db8:72::10") || ping("vm-suspicious-123", "2001:db8:72::11") {
		t.Fatal("an isolated VM still exchanges packets")
	}
	// A policy update while isolated is stored, isolation still wins.
	e.mustCall("UpdateSecurityPolicy", map[string]any{"vm_id": "vm-suspicious-123", "security_policy": map[string]any{
		"ingress_rules": []any{"allow icmpv6 from any to any", "deny all from any to any"}}})
	if ping("vm-peer", "2001:db8:72::10") {
		t.Fatal("a policy update lifted the isolation")
	}
	out := e.shell(t, `curl -s http://localhost:8080/debug/security/events | jq -r '.[] | select(.vm_id == "vm-suspicious-123") | .event_type + " " + .details.reason'`)
	if !strings.Contains(out, "vm_isolated Security violation investigation") {
		t.Fatalf("events: %q", out)
	}
	e.mustCall("ReleaseVm", map[string]any{"vm_id": "vm-suspicious-123"})
	if !ping("vm-peer", "2001:db8:72::10") {
		t.Fatal("no connectivity after release (the stored policy allows icmpv6)")
	}
	if e.getVM("vm-suspicious-123")["isolation"] != nil {
		t.Fatal("GetVm still shows isolation")
	}
	if code, out := e.call("ReleaseVm", map[string]any{"vm_id": "vm-suspicious-123"}); code != 400 || out["code"] != "failed_precondition" {
		t.Fatalf("release twice: %d %v", code, out)
	}
}

// bandwidth_limit_mbps is applied to the VM's port in both directions
// (measured with iperf3 through the API-created VMs), follows a policy
// update, and leaves nothing behind on delete.
func TestLimitsThroughDaemon(t *testing.T) {
	e := newEnv(t)
	cfg := vmConfig("t1", nic("eth0", "br-l", "2001:db8:73::10/64", "2001:db8:73::1"))
	obj(list(cfg["network"])[0])["security_policy"] = map[string]any{"bandwidth_limit_mbps": 100}
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-lim", "config": cfg})
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-lpeer", "config": vmConfig("t1", nic("eth0", "br-l", "2001:db8:73::11/64", "2001:db8:73::1"))})
	for _, id := range []string{"vm-lim", "vm-lpeer"} {
		e.mustCall("BootVm", map[string]any{"vm_id": id})
	}
	e.waitDAD("vm-lim")
	e.waitDAD("vm-lpeer")
	f := e.vmNS("vm-lpeer")
	srv := exec.Command("iperf3", "-s")
	if err := ns.Start(int(f.Fd()), srv); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Signal(syscall.SIGKILL); srv.Wait() })
	rate := func(reverse bool) float64 {
		args := []string{"-6", "-c", "2001:db8:73::11", "-t", "2", "-O", "1", "-J"}
		if reverse {
			args = append(args, "-R")
		}
		for range 20 {
			out, err := e.inVM("vm-lim", "iperf3", args...)
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
		t.Fatal("iperf3 never measured a transfer")
		return 0
	}
	from, to := rate(false), rate(true)
	t.Logf("limit 100 Mbit/s: from the VM %.1f, toward it %.1f", from, to)
	for _, v := range []float64{from, to} {
		if v < 90 || v > 110 {
			t.Fatalf("rate %.1f Mbit/s outside 100 ±10%%", v)
		}
	}
	out := e.shell(t, `curl -s http://localhost:8080/debug/vm/vm-lim/security-policy | jq -r '.enforcement[] | select(.control == "bandwidth_limit_mbps") | .status'`)
	if strings.TrimSpace(out) != "enforced" {
		t.Fatalf("bandwidth status %q", out)
	}
	e.mustCall("UpdateSecurityPolicy", map[string]any{"vm_id": "vm-lim", "security_policy": map[string]any{"bandwidth_limit_mbps": 50}})
	if v := rate(false); v < 45 || v > 55 {
		t.Fatalf("after the update to 50: %.1f Mbit/s", v)
	}
	// Deleting the VM leaves no shaping behind: no IFB device (earlier
	// versions' way), no policer (checked by the environment's cleanup
	// too).
	e.mustCall("DeleteVm", map[string]any{"vm_id": "vm-lim"})
	for _, l := range e.links() {
		if strings.HasPrefix(l, "ifb") {
			t.Fatalf("%s left behind", l)
		}
	}
	if out, _ := e.host.Run("nft", "list", "tables", "netdev"); strings.Contains(out, "metald_shape_bw") {
		t.Fatalf("bandwidth policer table left behind:\n%s", out)
	}
}

// A MAC is unique on the host (the policy finds a VM's egress rules by
// it): CreateVm with another VM's MAC, in any case, on another bridge, is
// invalid_argument naming the field, and leaves no row, port, rule or
// allocation.
func TestDuplicateMACRefused(t *testing.T) {
	e := newEnv(t)
	n1 := nic("eth0", "br-m", "2001:db8:7a::10/64", "2001:db8:7a::1")
	n1["mac_address"] = "02:aa:00:00:00:01"
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-m1", "config": vmConfig("t1", n1)})
	n2 := nic("eth0", "br-n", "2001:db8:7b::10/64", "2001:db8:7b::1")
	n2["mac_address"] = "02:AA:00:00:00:01"
	code, out := e.call("CreateVm", map[string]any{"vm_id": "vm-m2", "config": vmConfig("t2", n2)})
	if code != 400 || out["code"] != "invalid_argument" || errorField(out) != "config.network[0].mac_address" || !strings.Contains(str(out, "message"), "vm-m1") {
		t.Fatalf("CreateVm with vm-m1's MAC: %d %v", code, out)
	}
	if code, _ := e.call("GetVm", map[string]any{"vm_id": "vm-m2"}); code != 404 {
		t.Fatalf("refused VM answers GetVm: %d", code)
	}
	for _, l := range e.links() {
		if l == "tap-vm-m2" || l == "br-n" {
			t.Fatalf("%s built for a refused VM: %v", l, e.links())
		}
	}
	if rules := e.host.MustRun(t, "nft", "list", "ruleset"); strings.Contains(rules, "vm-m2") {
		t.Fatalf("rules of a refused VM:\n%s", rules)
	}
	if allocs := e.shell(t, `curl -s http://localhost:8080/debug/ipv6/allocations`); strings.Contains(allocs, "2001:db8:7b::10") || strings.Contains(allocs, "vm-m2") {
		t.Fatalf("allocations of a refused VM: %s", allocs)
	}
	// Another MAC is fine.
	n2["mac_address"] = "02:aa:00:00:00:02"
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-m2", "config": vmConfig("t2", n2)})
}
