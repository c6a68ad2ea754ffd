package daemon_test

import (
	"fmt"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/metald/metald/internal/network/ns"
)

// pyCmd runs python3 with a private mount namespace whose /sys shows the
// current network namespace (as `ip netns exec` does): scapy resolves
// interface names through /sys, and the test process shares the machine's.
func pyCmd(prog string) *exec.Cmd {
	return exec.Command("unshare", "-m", "--propagation", "private", "sh", "-c",
		`mount -t sysfs sysfs /sys && exec /usr/bin/python3 -c "$0"`, prog)
}

// scapy runs a python3/scapy program inside a VM's namespace.
func (e *env) scapy(id, prog string) (string, error) {
	f := e.vmNS(id)
	out, err := ns.Command(int(f.Fd()), pyCmd("from scapy.all import *\nconf.verb = 0\n"+prog))
	return string(out), err
}

// sniffWhile captures frames matching filter on a VM's eth0 while send
// runs, and returns how many arrived.
func (e *env) sniffWhile(t *testing.T, id, filter string, send func()) int {
	t.Helper()
	f := e.vmNS(id)
	cmd := pyCmd(fmt.Sprintf(`
from scapy.all import *
import sys
conf.verb = 0
s = AsyncSniffer(iface="eth0", filter=%q, store=True)
s.start()
print("ready", flush=True)
sys.stdin.readline()
time.sleep(0.5)
s.stop()
print("count", len(s.results or []), flush=True)
`, filter))
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := ns.Start(int(f.Fd()), cmd); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	if n, _ := stdout.Read(buf); !strings.Contains(string(buf[:n]), "ready") {
		t.Fatalf("sniffer did not start: %q", buf[:n])
	}
	time.Sleep(300 * time.Millisecond)
	send()
	stdin.Write([]byte("\n"))
	var out strings.Builder
	for {
		n, err := stdout.Read(buf)
		out.Write(buf[:n])
		if err != nil {
			break
		}
	}
	cmd.Wait()
	m := regexp.MustCompile(`count (\d+)`).FindStringSubmatch(out.String())
	if m == nil {
		t.Fatalf("sniffer output %q", out.String())
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// counter reads one named nftables counter of metald's first-hop tables in
// the host namespace.
// sourceCounters sums the port's counters that
// metald_ipv6_source_guard_violations_total reports: source address, source
// MAC and ND link-layer options.
func (e *env) sourceCounters(t *testing.T, dev string) uint64 {
	t.Helper()
	return e.counter(t, dev+"-source_guard") + e.counter(t, dev+"-mac_spoof") + e.counter(t, dev+"-nd_strict")
}

func (e *env) counter(t *testing.T, name string) uint64 {
	t.Helper()
	out, err := e.fhList(t, "counter", name)
	if err != nil {
		t.Fatalf("nft list counter %s: %v\n%s", name, err, out)
	}
	m := regexp.MustCompile(`packets (\d+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("counter %s: %q", name, out)
	}
	n, _ := strconv.ParseUint(m[1], 10, 64)
	return n
}

// createHigh creates a "high"-profile VM of tenant t1 on bridge, with gw
// its gateway and only allowed RA source.
func (e *env) createHigh(id, bridge, addr, gw string) {
	cfg := vmConfig("t1", map[string]any{"id": "eth0", "bridge_name": bridge, "ipv6": map[string]any{
		"address": addr, "gateway": gw,
		"security": map[string]any{"allowed_ra_sources": []any{gw}},
	}})
	cfg["security_profile"] = map[string]any{"profile_name": "high"}
	e.mustCall("CreateVm", map[string]any{"vm_id": id, "config": cfg})
}

// The first-hop controls of a "high" profile VM, through the whole daemon:
// the rules are in place when CreateVm returns, a rogue RA and a spoofed
// source from the VM do not reach its neighbour and move the counters, the
// gateway's own RA reaches the VM, and ND/ping keep working.
func TestFirstHopThroughDaemon(t *testing.T) {
	e := newEnv(t)
	mk := func(id, addr string) { e.createHigh(id, "br-f", addr, "2001:db8:f::1") }
	mk("vm-f1", "2001:db8:f::10/64")
	mk("vm-f2", "2001:db8:f::11/64")
	// Weakening a control under "high" is refused, naming field and profile.
	bad := vmConfig("t1", map[string]any{"id": "eth0", "bridge_name": "br-f", "ipv6": map[string]any{"security": map[string]any{"enable_ra_guard": false}}})
	bad["security_profile"] = map[string]any{"profile_name": "high"}
	if code, out := e.call("CreateVm", map[string]any{"config": bad}); code != 400 || errorField(out) != "config.network[0].ipv6.security.enable_ra_guard" ||
		!strings.Contains(str(out, "message"), `profile "high"`) {
		t.Fatalf("weakening under high: %d %v", code, out)
	}
	// Rules exist before boot; GetVm reports them enforced.
	st := list(e.getVM("vm-f1")["networkStatus"])[0]
	enforced := map[string]string{}
	for _, c := range list(obj(st)["controls"]) {
		enforced[str(c, "control")] = str(c, "status")
	}
	for _, c := range []string{"enable_ra_guard", "enable_source_guard", "strict_source_validation", "block_hop_by_hop", "block_routing_header",
		"block_fragment_header", "block_destination_options", "nd_rate_limit", "icmpv6_rate_limit", "ra_rate_limit", "multicast_rate_limit"} {
		if enforced[c] != "enforced" {
			t.Errorf("control %s: %q", c, enforced[c])
		}
	}
	if enforced["enable_mld_snooping"] != "enforced" {
		t.Errorf("mld snooping: %q", enforced["enable_mld_snooping"])
	}
	if out, _ := e.host.Run("ip", "-d", "link", "show", "br-f"); !strings.Contains(out, "mcast_snooping 1") || !strings.Contains(out, "mcast_querier 1") {
		t.Errorf("bridge snooping/querier not on:\n%s", out)
	}
	if sec := obj(obj(st)["effectiveSecurity"]); sec["blockDestinationOptions"] != true || sec["ndRateLimit"] != float64(100) {
		t.Errorf("effective security: %v", sec)
	}
	if out, err := e.fhList(t, "chain", "vm-tap-vm-f1-out"); err != nil {
		t.Fatalf("chain of vm-f1 missing before boot: %v\n%s", err, out)
	}

	for _, id := range []string{"vm-f1", "vm-f2"} {
		e.mustCall("BootVm", map[string]any{"vm_id": id})
	}
	e.waitDAD("vm-f1")
	e.waitDAD("vm-f2")
	if ll := str(list(e.getVM("vm-f1")["networkStatus"])[0], "guestLinkLocal"); !strings.HasPrefix(ll, "fe80::") {
		t.Fatalf("guest link-local not learned: %q", ll)
	}
	// Not over-blocking: ping the neighbour and the gateway (ND included).
	for _, target := range []string{"2001:db8:f::11", "2001:db8:f::1"} {
		if out, err := e.inVM("vm-f1", "ping", "-6", "-c", "2", "-W", "3", target); err != nil {
			t.Fatalf("ping %s with every control on: %v\n%s", target, err, out)
		}
	}

	// Rogue RA from vm-f1: not at vm-f2, counted.
	before := e.counter(t, "tap-vm-f1-ra_guard")
	metricBefore := e.metric(`metald_ipv6_ra_guard_blocks_total{tenant_id="t1"}`)
	got := e.sniffWhile(t, "vm-f2", "icmp6 and ip6[40] == 134", func() {
		out, err := e.scapy("vm-f1", `
p = Ether(src=get_if_hwaddr("eth0"), dst="33:33:00:00:00:01")/IPv6(src="2001:db8:f::10", dst="ff02::1", hlim=255)/ICMPv6ND_RA()/ICMPv6NDOptPrefixInfo(prefix="2001:db8:bad::", prefixlen=64)
sendp([p]*3, iface="eth0")`)
		if err != nil {
			t.Fatalf("send RA: %v\n%s", err, out)
		}
	})
	if got != 0 {
		t.Fatalf("%d rogue RAs reached the neighbour", got)
	}
	if d := e.counter(t, "tap-vm-f1-ra_guard") - before; d != 3 {
		t.Fatalf("ra_guard counter moved by %d, want 3", d)
	}
	if d := e.metric(`metald_ipv6_ra_guard_blocks_total{tenant_id="t1"}`) - metricBefore; d != 3 {
		t.Fatalf("metald_ipv6_ra_guard_blocks_total moved by %v, want 3", d)
	}
	srcMetric := e.metric(`metald_ipv6_source_guard_violations_total{tenant_id="t1"}`)
	// The drops became one aggregated, attributed security event, visible
	// to the guide's own jq commands, in security.log, and in the metrics.
	var ev string
	for i := 0; i < 50; i++ {
		ev = e.shell(t, `curl -s http://localhost:8080/debug/security/events | jq -c '.[] | select(.vm_id == "vm-f1" and .event_type == "ra_guard_block")'`)
		if strings.TrimSpace(ev) != "" {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, want := range []string{`"tenant_id":"t1"`, `"interface_id":"eth0"`, `"severity":"high"`, `"packet_count":3`, `"icmpv6_type":134`} {
		if !strings.Contains(ev, want) {
			t.Fatalf("ra_guard_block event %q lacks %s", ev, want)
		}
	}
	out := e.shell(t, `curl -s http://localhost:8080/debug/security/events | jq 'group_by(.event_type) | map({event_type: .[0].event_type, count: length}) | sort_by(.count) | reverse'`)
	if !strings.Contains(out, `"event_type": "ra_guard_block"`) {
		t.Fatalf("group_by: %s", out)
	}
	if log := e.shell(t, "grep IPv6_VIOLATION "+e.dir+"/log/security.log"); !strings.Contains(log, "ra_guard_block") {
		t.Fatalf("security.log: %s", log)
	}
	if e.metric(`metald_network_security_events_total{severity="high",tenant_id="t1"}`) < 1 {
		t.Fatal("metald_network_security_events_total{severity=high} did not move")
	}

	// Spoofed source: not at vm-f2, counted. The metric also counts the
	// port's source-MAC and ND-option drops (scapy's getmacbyip6 solicits
	// from an all-zero source MAC, dropped at the port as a MAC spoof).
	before = e.counter(t, "tap-vm-f1-source_guard")
	owned0 := e.sourceCounters(t, "tap-vm-f1")
	srcMetric = e.metric(`metald_ipv6_source_guard_violations_total{tenant_id="t1"}`)
	got = e.sniffWhile(t, "vm-f2", "icmp6 and src host 2001:db8:f::99", func() {
		e.scapy("vm-f1", `
p = Ether(src=get_if_hwaddr("eth0"), dst=getmacbyip6("2001:db8:f::11"))/IPv6(src="2001:db8:f::99", dst="2001:db8:f::11")/ICMPv6EchoRequest()
sendp([p]*2, iface="eth0")`)
	})
	if got != 0 {
		t.Fatalf("%d spoofed packets reached the neighbour", got)
	}
	if d := e.counter(t, "tap-vm-f1-source_guard") - before; d != 2 {
		t.Fatalf("source_guard counter moved by %d, want 2", d)
	}
	if d, want := e.metric(`metald_ipv6_source_guard_violations_total{tenant_id="t1"}`)-srcMetric, float64(e.sourceCounters(t, "tap-vm-f1")-owned0); d != want || d < 2 {
		t.Fatalf("metald_ipv6_source_guard_violations_total moved by %v, want %v (the port's source counters, at least 2)", d, want)
	}

	// The gateway's RA (from the bridge metald owns) reaches the VM.
	got = e.sniffWhile(t, "vm-f2", "icmp6 and ip6[40] == 134", func() {
		out, err := ns.Command(e.host.Fd(), pyCmd(`
from scapy.all import *
conf.verb = 0
ll = [a[0] for a in in6_getifaddr() if a[2] == "br-f" and a[0].startswith("fe80")][0]
p = Ether(src=get_if_hwaddr("br-f"), dst="33:33:00:00:00:01")/IPv6(src=ll, dst="ff02::1", hlim=255)/ICMPv6ND_RA()
sendp([p]*2, iface="br-f")`))
		if err != nil {
			t.Fatalf("send gateway RA: %v\n%s", err, out)
		}
	})
	if got != 2 {
		t.Fatalf("%d of 2 gateway RAs reached the VM", got)
	}

	// The guide's troubleshooting reads, verbatim.
	out = e.shell(t, `curl -s http://localhost:8080/debug/network/vm/vm-f1 | jq -c '.ipv6.security.allowed_ra_sources'`)
	if strings.TrimSpace(out) != `["2001:db8:f::1"]` {
		t.Fatalf("allowed_ra_sources: %q", out)
	}
	out = e.shell(t, `curl -s http://localhost:8080/debug/network/vm/vm-f1 | jq -c '[.counters.ra_guard, .counters.source_guard, .vlan_mode, .host_device]'`)
	if strings.TrimSpace(out) != `[3,2,"none","tap-vm-f1"]` {
		t.Fatalf("counters on the debug endpoint: %q", out)
	}
	out = e.shell(t, `curl -s http://localhost:8080/debug/vm/vm-f1/security-policy | jq -c '.ingress_rules, .ingress_default'`)
	if strings.TrimSpace(out) != "[]\n\"allow\"" {
		t.Fatalf("security-policy: %q", out)
	}

	// A kernel that matches is left alone: no repair besides creating the
	// table at the first start.
	e.logs.mu.Lock()
	repairs := strings.Count(e.logs.buf.String(), "repaired first-hop firewall drift")
	e.logs.mu.Unlock()
	if repairs > 1 {
		t.Fatalf("%d drift repairs on an untouched kernel", repairs)
	}

	// Deleting a VM removes its chains; flushed tables are repaired.
	e.mustCall("DeleteVm", map[string]any{"vm_id": "vm-f2"})
	if out, err := e.fhList(t, "chain", "vm-tap-vm-f2-out"); err == nil {
		t.Fatalf("chain of a deleted VM left behind:\n%s", out)
	}
	for _, tbl := range e.fhTables(t) {
		e.host.MustRun(t, "nft", "flush", "table", "netdev", tbl)
	}
	if err := e.d.Manager().ReconcileFirewall(t.Context()); err != nil {
		t.Fatal(err)
	}
	if out, err := e.fhList(t, "chain", "vm-tap-vm-f1-out"); err != nil || !strings.Contains(out, "ra_guard") {
		t.Fatalf("flushed rules not repaired: %v\n%s", err, out)
	}
}

// VLANs separate ports on one bridge (nftables port groups on this kernel),
// and a guest with privacy extensions can use its temporary addresses
// (learned from its DAD) under source guard.
func TestVLANAndPrivacyThroughDaemon(t *testing.T) {
	e := newEnv(t)
	mk := func(id, vlan, addr string, privacy bool) {
		nicCfg := map[string]any{"id": "eth0", "bridge_name": "br-v", "vlan_id": vlan, "ipv6": map[string]any{
			"address": addr, "gateway": "2001:db8:5::1", "enable_privacy_extensions": privacy, "temp_valid_lifetime": 600}}
		cfg := vmConfig("t1", nicCfg)
		cfg["security_profile"] = map[string]any{"profile_name": "high"}
		e.mustCall("CreateVm", map[string]any{"vm_id": id, "config": cfg})
		e.mustCall("BootVm", map[string]any{"vm_id": id})
	}
	mk("vm-v1", "100", "2001:db8:5::10/64", true)
	mk("vm-v2", "200", "2001:db8:5::11/64", false)
	mk("vm-v3", "100", "2001:db8:5::12/64", false)
	for _, id := range []string{"vm-v1", "vm-v2", "vm-v3"} {
		e.waitDAD(id)
	}
	st := list(e.getVM("vm-v1")["networkStatus"])[0]
	if str(st, "vlanMode") != "nftables" {
		t.Fatalf("vlan mode %q", str(st, "vlanMode"))
	}
	if out, err := e.inVM("vm-v1", "ping", "-6", "-c", "1", "-W", "3", "2001:db8:5::12"); err != nil {
		t.Fatalf("same VLAN: %v\n%s", err, out)
	}
	if out, err := e.inVM("vm-v1", "ping", "-6", "-c", "1", "-W", "2", "2001:db8:5::11"); err == nil {
		t.Fatalf("VLAN 100 reached VLAN 200:\n%s", out)
	}
	// A temporary address, bound by the guest's own DAD, works as a source.
	temp := e.tempAddr(t, "vm-v1")
	if out, err := e.inVM("vm-v1", "ping", "-6", "-c", "1", "-W", "3", "-I", temp, "2001:db8:5::12"); err != nil {
		t.Fatalf("ping from temporary address %s: %v\n%s", temp, err, out)
	}
}

// tempAddr waits for the guest's first temporary address to finish DAD and
// returns it.
func (e *env) tempAddr(t *testing.T, id string) string {
	t.Helper()
	for range 50 {
		out, _ := e.inVM(id, "ip", "-6", "-o", "addr", "show", "dev", "eth0", "temporary")
		if m := regexp.MustCompile(`inet6 (\S+)/64`).FindStringSubmatch(out); m != nil && !strings.Contains(out, "tentative") {
			return m[1]
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("no temporary address in %s", id)
	return ""
}

// TestBridgeQuerierNotAViolation: the MLD querier metald turns on with
// snooping sends its queries from the bridge's link-local address from
// the first one on (the bridge's addresses skip DAD), so the hop-by-hop
// block of a VM on a new bridge neither drops nor reports them: no
// ext_hbh drop and no extension-header event after the first VM boots.
func TestBridgeQuerierNotAViolation(t *testing.T) {
	e := newEnv(t)
	e.createHigh("vm-q1", "br-q", "2001:db8:e::10/64", "2001:db8:e::1")
	e.mustCall("BootVm", map[string]any{"vm_id": "vm-q1"})
	e.waitDAD("vm-q1")
	time.Sleep(2 * time.Second)
	dev := str(list(e.getVM("vm-q1")["networkStatus"])[0], "hostDevice")
	if n := e.counter(t, dev+"-ext_hbh"); n != 0 {
		t.Errorf("%d hop-by-hop drops on the VM's port after boot", n)
	}
	for _, ev := range e.events(t, "vm_id=vm-q1") {
		if ev.Type == "extension_header_block" {
			t.Errorf("event %+v", ev)
		}
	}
	if out := e.host.MustRun(t, "ip", "-6", "addr", "show", "dev", "br-q"); strings.Contains(out, "tentative") || !strings.Contains(out, "fe80::") {
		t.Errorf("bridge addresses:\n%s", out)
	}
}
