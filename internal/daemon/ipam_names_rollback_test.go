package daemon_test

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/metald/metald/internal/vm"
)

// subnetNames reads GET /debug/ipv6/subnets as "parent/name" → value.
func subnetNames(t *testing.T, e *env) map[string]int {
	t.Helper()
	resp, err := http.Get(e.url + "/debug/ipv6/subnets")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var list []struct {
		Parent string `json:"parent"`
		Name   string `json:"name"`
		Value  int    `json:"value"`
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /debug/ipv6/subnets: HTTP %d", resp.StatusCode)
	}
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		t.Fatal(err)
	}
	out := map[string]int{}
	for _, n := range list {
		out[n.Parent+"/"+n.Name] = n.Value
	}
	return out
}

func wantSubnetNames(t *testing.T, e *env, when string, want map[string]int) {
	t.Helper()
	if got := subnetNames(t, e); !maps.Equal(got, want) {
		t.Fatalf("%s: subnet names %v, want %v", when, got, want)
	}
}

// allocationCount reads GET /debug/ipv6/allocations.
func allocationCount(t *testing.T, e *env) int {
	t.Helper()
	raw, err := http_get(e.url + "/debug/ipv6/allocations")
	if err != nil {
		t.Fatal(err)
	}
	var out any
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatalf("allocations: %v: %s", err, raw)
	}
	switch v := out.(type) {
	case []any:
		return len(v)
	case map[string]any:
		for _, k := range []string{"allocations", "items"} {
			if l, ok := v[k].([]any); ok {
				return len(l)
			}
		}
	}
	t.Fatalf("allocations: unexpected answer %s", raw)
	return 0
}

func vmIDs(t *testing.T, e *env) []string {
	t.Helper()
	_, out := e.do(http.MethodGet, "ListVms", nil, "")
	var ids []string
	for _, v := range list(out["vms"]) {
		ids = append(ids, str(v, "vmId"))
	}
	slices.Sort(ids)
	return ids
}

// A CreateVm that fails after its addresses were validated (compliance,
// an address conflict at reservation, a kernel error while building)
// leaves no subnet name behind, so the next new name gets the value the
// failed one had; a successful CreateVm keeps its names, across a restart.
func TestIPAMNamesFailedCreateLeavesNone(t *testing.T) {
	e := newEnv(t)
	const parent = "2600:beef:1000::/48"
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-web",
		"config": vmConfig("t1", nic("eth0", "br-nm1", "2600:BEEF:1000:web::10/64", "2600:BEEF:1000:web::1"))})
	names := map[string]int{parent + "/web": 1}
	wantSubnetNames(t, e, "after the first create", names)

	// Compliance is checked after validation resolved (and assigned) dmz.
	cfg := vmConfig("t1", nic("eth0", "br-nm1", "2600:BEEF:1000:dmz::100/64", "2600:BEEF:1000:dmz::1"))
	cfg["compliance"] = map[string]any{"data_residency": "EU"}
	code, out := e.call("CreateVm", map[string]any{"vm_id": "vm-dmz", "config": cfg})
	if code != http.StatusBadRequest || out["code"] != "failed_precondition" ||
		!strings.HasPrefix(str(out, "message"), "config.compliance.data_residency: ") || !strings.Contains(str(out, "message"), `"EU"`) {
		t.Fatalf("data residency EU on a US host: %d %v", code, out)
	}
	wantSubnetNames(t, e, "after the compliance failure", names)

	// eth0's new name is assigned and its address reserved before eth1's
	// address turns out to be vm-web's.
	code, out = e.call("CreateVm", map[string]any{"vm_id": "vm-dup", "config": vmConfig("t1",
		nic("eth0", "br-nm2", "2600:BEEF:1000:fresh::10/64", "2600:BEEF:1000:fresh::1"),
		nic("eth1", "br-nm1", "2600:beef:1000:1::10/64", "2600:beef:1000:1::1"))})
	if code != http.StatusConflict || out["code"] != "already_exists" ||
		!strings.HasPrefix(str(out, "message"), "config.network[1].ipv6.address: ") || !strings.Contains(str(out, "message"), "2600:beef:1000:1::10") {
		t.Fatalf("address conflict: %d %v", code, out)
	}
	wantSubnetNames(t, e, "after the address conflict", names)
	if n := allocationCount(t, e); n != 1 {
		t.Fatalf("%d allocations after the conflict, want vm-web's only", n)
	}

	// A kernel error after the addresses are reserved and the VM's rules
	// and policies (whose plans resolve the new names again) are in place:
	// a link already holds the VM's host device name, so the sandbox step
	// fails.
	h := e.host.Handle(t)
	clash := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: vm.HostDevice("vm-kern", "eth0", 0)}}
	if err := h.LinkAdd(clash); err != nil {
		t.Fatal(err)
	}
	kern := nic("eth0", "br-nmkern", "2600:BEEF:1000:kern::10/64", "2600:BEEF:1000:kern::1")
	obj(kern["ipv6"])["dns_servers"] = []any{"2600:BEEF:1000:dns::53"}
	obj(kern["ipv6"])["security"] = map[string]any{"enable_ra_guard": true, "allowed_ra_sources": []any{"2600:BEEF:1000:ra::1"}}
	kern["security_policy"] = map[string]any{
		"allowed_destinations": []any{"2600:BEEF:1000:dest::/64"},
		"egress_rules":         []any{"allow tcp from any to 2600:BEEF:1000:rule::/64 port 443", "deny all from any to any"},
	}
	code, out = e.call("CreateVm", map[string]any{"vm_id": "vm-kern", "config": vmConfig("t1", kern)})
	if code != http.StatusBadRequest || out["code"] != "failed_precondition" || !strings.Contains(str(out, "message"), clash.Name) {
		t.Fatalf("host device name taken: %d %v", code, out)
	}
	if err := h.LinkDel(clash); err != nil {
		t.Fatal(err)
	}
	wantSubnetNames(t, e, "after the kernel error", names)
	if n := allocationCount(t, e); n != 1 {
		t.Fatalf("%d allocations after the kernel error, want vm-web's only", n)
	}
	if ids := vmIDs(t, e); !slices.Equal(ids, []string{"vm-web"}) {
		t.Fatalf("vms after the failures: %v", ids)
	}

	// The next new name gets 2, the value dmz (and each later failed name)
	// had, and a successful create keeps it.
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-app",
		"config": vmConfig("t1", nic("eth0", "br-nm3", "2600:BEEF:1000:app::10/64", "2600:BEEF:1000:app::1"))})
	st := list(e.getVM("vm-app")["networkStatus"])
	if len(st) != 1 || str(st[0], "ipv6Address") != "2600:beef:1000:2::10/64" {
		t.Fatalf("vm-app status %v, want 2600:beef:1000:2::10/64", st)
	}
	names[parent+"/app"] = 2
	wantSubnetNames(t, e, "after the second create", names)
	e.stop()
	e.start()
	wantSubnetNames(t, e, "after a restart", names)
}

// UpdateSecurityPolicy and UpdateVmNetwork that fail after their new
// addresses were resolved leave no name behind; a successful update keeps
// its name.
func TestIPAMNamesFailedUpdateLeavesNone(t *testing.T) {
	e := newEnv(t)
	const parent = "2600:beef:1000::/48"
	cfg := vmConfig("t1", nic("eth0", "br-nmu", "2001:db8:73::10/64", "2001:db8:73::1"))
	obj(list(cfg["network"])[0])["security_policy"] = map[string]any{"tenant_isolation_level": "strict", "log_security_events": true}
	cfg["compliance"] = map[string]any{"frameworks": []any{"PCI-DSS"}, "encryption_required": true, "audit_logging": true}
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-pci", "config": cfg})
	wantSubnetNames(t, e, "after create", map[string]int{})

	// PCI-DSS is checked after the new destination's name was resolved; the
	// error names the field as the request spells it.
	code, out := e.call("UpdateSecurityPolicy", map[string]any{"vm_id": "vm-pci", "security_policy": map[string]any{
		"allowed_destinations": []any{"2600:BEEF:1000:dst::/64"}, "tenant_isolation_level": "moderate"}})
	if code != http.StatusBadRequest || out["code"] != "failed_precondition" || !strings.Contains(str(out, "message"), "PCI-DSS") ||
		!strings.HasPrefix(str(out, "message"), "security_policy.tenant_isolation_level: ") {
		t.Fatalf("weakening PCI-DSS: %d %v", code, out)
	}
	wantSubnetNames(t, e, "after the failed policy update", map[string]int{})

	// A rule naming a new subnet next to a rule that does not parse.
	code, out = e.call("UpdateSecurityPolicy", map[string]any{"vm_id": "vm-pci", "security_policy": map[string]any{
		"egress_rules": []any{"allow tcp from any to 2600:BEEF:1000:rule::/64 port 443", "allow icmpv6 form any to any"}}})
	if code != http.StatusBadRequest || out["code"] != "invalid_argument" || errorField(out) != "security_policy.egress_rules[1]" {
		t.Fatalf("bad rule: %d %v", code, out)
	}
	wantSubnetNames(t, e, "after the refused rules", map[string]int{})

	// A DNS server in a new subnet next to an invalid RA setting.
	code, out = e.call("UpdateVmNetwork", map[string]any{"vm_id": "vm-pci", "ipv6": map[string]any{
		"dns_servers": []any{"2600:BEEF:1000:dns::53"},
		"security":    map[string]any{"ra_rate_limit": 2000000}}})
	if code != http.StatusBadRequest || out["code"] != "invalid_argument" || errorField(out) != "ipv6.security.ra_rate_limit" {
		t.Fatalf("bad network update: %d %v", code, out)
	}
	wantSubnetNames(t, e, "after the failed network update", map[string]int{})

	// Successful updates keep their names; the first gets value 1, which
	// every failed name had.
	e.mustCall("UpdateSecurityPolicy", map[string]any{"vm_id": "vm-pci", "security_policy": map[string]any{
		"allowed_destinations": []any{"2600:BEEF:1000:dst::/64"}}})
	e.mustCall("UpdateVmNetwork", map[string]any{"vm_id": "vm-pci", "ipv6": map[string]any{"dns_servers": []any{"2600:BEEF:1000:dns::53"}}})
	wantSubnetNames(t, e, "after the successful updates", map[string]int{parent + "/dst": 1, parent + "/dns": 2})
	vm := e.getVM("vm-pci")
	n0 := obj(list(vm["network"])[0])
	if d := fmt.Sprint(obj(n0["securityPolicy"])["allowedDestinations"]); d != "[2600:BEEF:1000:dst::/64]" {
		t.Fatalf("stored destinations %s", d)
	}
}
