package daemon_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"connectrpc.com/connect"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/protobuf/encoding/protowire"

	vmv1 "github.com/metald/metald/internal/gen/vmprovisioner/v1"
	"github.com/metald/metald/internal/gen/vmprovisioner/v1/vmprovisionerv1connect"
)

// The seed's Example 1 walk-through, with the seed's own curl forms: create
// by form-encoded POST, GetVm with -d, BootVm, ListVms by bare GET.
func TestSeedExample1Walkthrough(t *testing.T) {
	e := newEnv(t)
	var req map[string]any
	loadJSON(t, "example1.json", &req)

	created := e.mustCall("CreateVm", req)
	id, _ := created["vmId"].(string)
	if !strings.HasPrefix(id, "vm-") || len(id) != 11 {
		t.Fatalf(".vmId = %q, want vm- plus 8 characters", id)
	}
	if created["state"] != "VM_STATE_CREATED" {
		t.Fatalf("state %v", created["state"])
	}

	vm := e.getVM(id)
	// jq '.network[0].ipv6.security' shows every control as given.
	sec := obj(obj(obj(list(vm["network"])[0])["ipv6"])["security"])
	wantSec := obj(obj(obj(list(obj(req["config"])["network"])[0])["ipv6"])["security"])
	for k := range wantSec {
		camel := snakeToCamel(k)
		got, _ := json.Marshal(sec[camel])
		want, _ := json.Marshal(wantSec[k])
		if string(got) != string(want) {
			t.Errorf(".network[0].ipv6.security.%s = %s, want %s", camel, got, want)
		}
	}
	if len(sec) != len(wantSec) {
		t.Errorf("security has %d fields, want %d: %v", len(sec), len(wantSec), sec)
	}
	st := list(vm["networkStatus"])[0]
	if str(st, "hostDevice") != "tap-"+id || str(st, "bridgeName") != "br-dmz" || str(st, "vlanId") != "100" ||
		str(st, "ipv6Address") != "2600:beef:1000:1::10/64" || str(st, "guestDevice") != "eth0" {
		t.Errorf("network status %v", st)
	}
	if vm["tenantId"] != "secure-web-customer" || vm["state"] != "VM_STATE_CREATED" {
		t.Errorf("vm %v", vm)
	}
	bi := obj(vm["backendInfo"])
	if bi["type"] != "netns" || bi["netns"] != "metald-"+id {
		t.Errorf("backendInfo %v", bi)
	}

	// The seed runs `bridge vlan show dev tap-$VM_ID`: the device exists.
	found := false
	for _, l := range e.links() {
		found = found || l == "tap-"+id
	}
	if !found {
		t.Fatalf("host device tap-%s missing: %v", id, e.links())
	}

	booted := e.mustCall("BootVm", map[string]any{"vm_id": id})
	if booted["state"] != "VM_STATE_RUNNING" {
		t.Fatalf("BootVm: %v", booted)
	}
	code, listed := e.do(http.MethodGet, "ListVms", nil, "")
	if code != 200 || len(list(listed["vms"])) != 1 || str(list(listed["vms"])[0], "vmId") != id {
		t.Fatalf("bare GET ListVms: %d %v", code, listed)
	}
	if e.metric(`metald_vms{state="RUNNING"}`) != 1 {
		t.Errorf("metald_vms{state=RUNNING} != 1")
	}
}

func snakeToCamel(s string) string {
	parts := strings.Split(s, "_")
	for i := 1; i < len(parts); i++ {
		parts[i] = strings.ToUpper(parts[i][:1]) + parts[i][1:]
	}
	return strings.Join(parts, "")
}

// Every curl form the seed uses behaves like a JSON POST, and Connect's own
// GET form keeps working.
func TestCurlForms(t *testing.T) {
	e := newEnv(t)
	body := map[string]any{"vm_id": "vm-forms", "config": vmConfig("t1", nic("eth0", "br-f", "2001:db8:f::10/64", "2001:db8:f::1"))}
	if code, out := e.do(http.MethodPut, "CreateVm", body, ""); code != 200 || out["vmId"] != "vm-forms" {
		t.Fatalf("PUT without content type: %d %v", code, out)
	}
	for _, ct := range []string{"application/json", "application/x-www-form-urlencoded", "text/plain", ""} {
		if code, out := e.do(http.MethodPost, "GetVm", `{"vm_id":"vm-forms"}`, ct); code != 200 || out["vmId"] != "vm-forms" {
			t.Fatalf("POST GetVm with content type %q: %d %v", ct, code, out)
		}
	}
	// camelCase is accepted too.
	if code, out := e.do(http.MethodPost, "GetVm", `{"vmId":"vm-forms"}`, ""); code != 200 || out["vmId"] != "vm-forms" {
		t.Fatalf("camelCase: %d %v", code, out)
	}
	// Bare GET and POST with no body: an empty request.
	e.mustCall("DeleteVm", map[string]any{"vm_id": "vm-forms"})
	if out := e.shell(t, `curl -s http://localhost:8080/vmprovisioner.v1.VmService/ListVms | jq -c '[.vms[].vmId]'`); strings.TrimSpace(out) != "[]" {
		t.Fatalf("empty ListVms: %q", out)
	}
	e.mustCall("CreateVm", body)
	if code, out := e.do(http.MethodGet, "ListVms", nil, ""); code != 200 || len(list(out["vms"])) != 1 {
		t.Fatalf("bare GET: %d %v", code, out)
	}
	if code, out := e.do(http.MethodPost, "ListVms", nil, ""); code != 200 || len(list(out["vms"])) != 1 {
		t.Fatalf("empty POST: %d %v", code, out)
	}
	// Connect GET: ?encoding=json&message=...
	u := e.url + "/vmprovisioner.v1.VmService/GetVm?encoding=json&message=" + url.QueryEscape(`{"vm_id":"vm-forms"}`)
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	var out map[string]any
	json.NewDecoder(resp.Body).Decode(&out)
	resp.Body.Close()
	if resp.StatusCode != 200 || out["vmId"] != "vm-forms" {
		t.Fatalf("Connect GET: %d %v", resp.StatusCode, out)
	}
	// An unknown field in a Connect GET is named by its path too.
	resp, err = http.Get(e.url + "/vmprovisioner.v1.VmService/GetVm?encoding=json&message=" + url.QueryEscape(`{"vm_id":"vm-forms","verbose":true}`))
	if err != nil {
		t.Fatal(err)
	}
	out = nil
	json.NewDecoder(resp.Body).Decode(&out)
	resp.Body.Close()
	if resp.StatusCode != 400 || out["code"] != "invalid_argument" || !strings.Contains(str(out, "message"), "verbose: unknown field") {
		t.Fatalf("Connect GET with an unknown field: %d %v", resp.StatusCode, out)
	}
	// Connect serves GET only for methods without side effects; for the
	// others the 405 says so in the JSON error shape, and nothing happens.
	resp, err = http.Get(e.url + "/vmprovisioner.v1.VmService/DeleteVm?encoding=json&message=" + url.QueryEscape(`{"vm_id":"vm-forms"}`))
	if err != nil {
		t.Fatal(err)
	}
	out = nil
	json.NewDecoder(resp.Body).Decode(&out)
	resp.Body.Close()
	if resp.StatusCode != 405 || out["code"] != "unimplemented" || !strings.Contains(str(out, "message"), "DeleteVm changes state") || resp.Header.Get("Allow") != "POST, PUT" {
		t.Fatalf("Connect GET of DeleteVm: %d %v", resp.StatusCode, out)
	}
	if code, _ := e.call("GetVm", map[string]any{"vm_id": "vm-forms"}); code != 200 {
		t.Fatal("the refused GET deleted the VM")
	}
	// A mistyped procedure is a JSON error too.
	if code, out := e.call("GetVms", map[string]any{}); code != 404 || out["code"] != "unimplemented" || str(out, "message") != `no procedure "GetVms" in vmprovisioner.v1.VmService` {
		t.Fatalf("unknown procedure: %d %v", code, out)
	}
	// Errors keep the seed's shape: {"code": "...", "message": "..."}.
	code, out := e.call("GetVm", map[string]any{"vm_id": "vm-nope"})
	if code != 404 || out["code"] != "not_found" || !strings.Contains(str(out, "message"), "vm-nope") {
		t.Fatalf("unknown vm: %d %v", code, out)
	}
	code, out = e.call("GetVm", map[string]any{})
	if code != 400 || out["code"] != "invalid_argument" || errorField(out) != "vm_id" {
		t.Fatalf("missing vm_id: %d %v", code, out)
	}
	// A vm_id no VM can have is a bad argument, not an unknown VM.
	for _, proc := range []string{"GetVm", "DeleteVm", "BootVm"} {
		code, out = e.call(proc, map[string]any{"vm_id": "BAD ID"})
		if code != 400 || out["code"] != "invalid_argument" || errorField(out) != "vm_id" || !strings.Contains(str(out, "message"), "DNS label") {
			t.Fatalf("%s with a malformed vm_id: %d %v", proc, code, out)
		}
	}
}

// Unknown JSON fields are rejected, naming the full path, and create
// nothing. A typo in a security setting must never disable it silently.
func TestUnknownFieldsRejected(t *testing.T) {
	e := newEnv(t)
	var base map[string]any
	loadJSON(t, "example1.json", &base)
	cases := []struct {
		name   string
		mutate func(m map[string]any)
		field  string
		reason string
	}{
		{"top level", func(m map[string]any) { m["vmid"] = "x" }, "vmid", "unknown field"},
		{"security typo", func(m map[string]any) { sec(m)["enable_ra_gaurd"] = true }, "config.network[0].ipv6.security.enable_ra_gaurd", "unknown field"},
		{"policy typo", func(m map[string]any) { pol(m)["ingress_rule"] = []any{} }, "config.network[0].security_policy.ingress_rule", "unknown field"},
		{"profile typo", func(m map[string]any) { obj(obj(m["config"])["security_profile"])["profil_name"] = "high" }, "config.security_profile.profil_name", "unknown field"},
		{"compliance", func(m map[string]any) { obj(m["config"])["compliance"] = map[string]any{"framework": []any{"SOC2"}} }, "config.compliance.framework", "unknown field"},
		{"storage", func(m map[string]any) { obj(list(obj(m["config"])["storage"])[0])["read_only"] = true }, "config.storage[0].read_only", "unknown field"},
		{"vlan as number", func(m map[string]any) { obj(list(obj(m["config"])["network"])[0])["vlan_id"] = 100 }, "config.network[0].vlan_id", "must be a string, got number"},
		{"bool as string", func(m map[string]any) { sec(m)["block_hop_by_hop"] = "yes" }, "config.network[0].ipv6.security.block_hop_by_hop", "must be true or false, got string"},
		{"rules not a list", func(m map[string]any) { pol(m)["egress_rules"] = "deny all from any to any" }, "config.network[0].security_policy.egress_rules", "must be an array, got string"},
		{"negative limit", func(m map[string]any) { sec(m)["nd_rate_limit"] = -5 }, "config.network[0].ipv6.security.nd_rate_limit", "must be an integer from 0 to 4294967295, got -5"},
		{"field twice", func(m map[string]any) { m["vm_id"], m["vmId"] = "one", "other" }, "vm_id", `given twice (as "vmId" and "vm_id")`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			m := clone(t, base)
			c.mutate(m)
			code, out := e.call("CreateVm", m)
			if code != 400 || out["code"] != "invalid_argument" {
				t.Fatalf("got %d %v", code, out)
			}
			if errorField(out) != c.field || str(out, "message") != c.field+": "+c.reason {
				t.Fatalf("field %q message %q, want %q: %s", errorField(out), out["message"], c.field, c.reason)
			}
		})
	}
	if _, out := e.do(http.MethodGet, "ListVms", nil, ""); len(list(out["vms"])) != 0 {
		t.Fatalf("rejected requests created VMs: %v", out)
	}
	e.assertNothingLeft()
}

func sec(m map[string]any) map[string]any {
	return obj(obj(obj(list(obj(m["config"])["network"])[0])["ipv6"])["security"])
}

func pol(m map[string]any) map[string]any {
	return obj(obj(list(obj(m["config"])["network"])[0])["security_policy"])
}

func clone(t *testing.T, m map[string]any) map[string]any {
	raw, _ := json.Marshal(m)
	var out map[string]any
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// Every invalid configuration of the validation table is refused over HTTP
// with invalid_argument naming its exact field, and leaves nothing behind.
func TestInvalidConfigsOverHTTP(t *testing.T) {
	e := newEnv(t)
	var cases []struct {
		Name           string         `json:"name"`
		Request        map[string]any `json:"request"`
		Field          string         `json:"field"`
		ReasonContains string         `json:"reason_contains"`
	}
	loadJSON(t, "invalid_create_requests.json", &cases)
	if len(cases) < 30 {
		t.Fatalf("only %d invalid cases", len(cases))
	}
	for _, c := range cases {
		code, out := e.call("CreateVm", c.Request)
		msg := str(out, "message")
		if code != 400 || out["code"] != "invalid_argument" || errorField(out) != c.Field ||
			!strings.HasPrefix(msg, c.Field+": ") || !strings.Contains(msg, c.ReasonContains) {
			t.Errorf("%s: got %d %v, want invalid_argument on %s containing %q", c.Name, code, out, c.Field, c.ReasonContains)
		}
	}
	if _, out := e.do(http.MethodGet, "ListVms", nil, ""); len(list(out["vms"])) != 0 {
		t.Fatalf("invalid requests created VMs: %v", out)
	}
	rows, err := e.d.Manager().List(context.Background())
	if err != nil || len(rows) != 0 {
		t.Fatalf("rows left: %v %v", rows, err)
	}
	e.assertNothingLeft()
}

// The generated Connect client works over Connect (binary), gRPC (h2c) and
// gRPC-Web.
func TestGeneratedClients(t *testing.T) {
	e := newEnv(t)
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	h2c := &http.Client{Transport: &http.Transport{Protocols: &p}}
	clients := map[string]vmprovisionerv1connect.VmServiceClient{
		"connect":  vmprovisionerv1connect.NewVmServiceClient(http.DefaultClient, e.url),
		"grpc":     vmprovisionerv1connect.NewVmServiceClient(h2c, e.url, connect.WithGRPC()),
		"grpc-web": vmprovisionerv1connect.NewVmServiceClient(http.DefaultClient, e.url, connect.WithGRPCWeb()),
	}
	ctx := context.Background()
	for name, c := range clients {
		t.Run(name, func(t *testing.T) {
			id := "vm-" + strings.ReplaceAll(name, "-", "")
			_, err := c.CreateVm(ctx, connect.NewRequest(&vmv1.CreateVmRequest{VmId: id, Config: &vmv1.VmConfig{
				Cpu: &vmv1.CpuConfig{VcpuCount: 1}, Memory: &vmv1.MemoryConfig{SizeBytes: 128 << 20},
				Boot: &vmv1.BootConfig{KernelPath: "/opt/vm-assets/vmlinux"}, TenantId: "t1",
				Network: []*vmv1.NetworkInterface{{Id: "eth0", BridgeName: "br-c", Ipv6: &vmv1.Ipv6Config{Address: "2001:db8:c::" + map[string]string{"connect": "1", "grpc": "2", "grpc-web": "3"}[name] + "/64"}}},
			}}))
			if err != nil {
				t.Fatal(err)
			}
			got, err := c.GetVm(ctx, connect.NewRequest(&vmv1.GetVmRequest{VmId: id}))
			if err != nil || got.Msg.GetState() != vmv1.VmState_VM_STATE_CREATED || got.Msg.GetNetworkStatus()[0].GetHostDevice() == "" {
				t.Fatalf("GetVm: %v %v", got, err)
			}
			_, err = c.GetVm(ctx, connect.NewRequest(&vmv1.GetVmRequest{VmId: "vm-absent"}))
			if connect.CodeOf(err) != connect.CodeNotFound {
				t.Fatalf("absent vm: %v", err)
			}
			_, err = c.CreateVm(ctx, connect.NewRequest(&vmv1.CreateVmRequest{VmId: id, Config: &vmv1.VmConfig{}}))
			var ce *connect.Error
			if !errors.As(err, &ce) || ce.Code() != connect.CodeInvalidArgument || len(ce.Details()) == 0 {
				t.Fatalf("invalid create: %v", err)
			}
			d, _ := ce.Details()[0].Value()
			if br, ok := d.(*errdetails.BadRequest); !ok || br.GetFieldViolations()[0].GetField() != "config.cpu" {
				t.Fatalf("detail %v", d)
			}
			// A field this API does not define is refused with its path,
			// in binary (field number 99 inside ipv6) as in JSON.
			unknown := &vmv1.CreateVmRequest{VmId: id + "u", Config: &vmv1.VmConfig{Network: []*vmv1.NetworkInterface{{Id: "eth0", Ipv6: &vmv1.Ipv6Config{}}}}}
			unknown.GetConfig().GetNetwork()[0].GetIpv6().ProtoReflect().SetUnknown(protowire.AppendVarint(protowire.AppendTag(nil, 99, protowire.VarintType), 1))
			_, err = c.CreateVm(ctx, connect.NewRequest(unknown))
			if connect.CodeOf(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), "config.network[0].ipv6.#99: unknown field number") {
				t.Fatalf("unknown field number: %v", err)
			}
			if _, err := c.DeleteVm(ctx, connect.NewRequest(&vmv1.DeleteVmRequest{VmId: id})); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestDebugEndpointsStrict: a debug endpoint refuses a query parameter it
// does not read (a filter it does not have would be ignored in silence),
// and a path or method the API port does not serve answers in the same
// JSON error shape as everything else.
func TestDebugEndpointsStrict(t *testing.T) {
	e := newEnv(t)
	get := func(method, path string) (int, map[string]any) {
		t.Helper()
		req, err := http.NewRequest(method, e.url+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var out map[string]any
		if err := json.NewDecoder(resp.Body).Decode(&out); err != nil && resp.StatusCode != 200 {
			t.Fatalf("%s %s: %d, body not JSON: %v", method, path, resp.StatusCode, err)
		}
		return resp.StatusCode, out
	}
	for _, c := range []struct {
		method, path string
		code         int
		errCode, msg string
	}{
		{"GET", "/debug/ipv6/allocations?vm_id=vm-x", 400, "invalid_argument", `unknown query parameter "vm_id"`},
		{"GET", "/debug/network/vm/vm-x?interface_id=eth9", 400, "invalid_argument", `unknown query parameter "interface_id"`},
		{"PATCH", "/debug/ipv6/pools/default", 405, "unimplemented", "method not allowed"},
		{"GET", "/debug/no-such-thing", 404, "not_found", "no such endpoint"},
	} {
		code, out := get(c.method, c.path)
		if code != c.code || str(out, "code") != c.errCode || !strings.Contains(str(out, "message"), c.msg) {
			t.Errorf("%s %s: %d %v", c.method, c.path, code, out)
		}
	}
	for _, path := range []string{"/debug/security/events?limit=1", "/debug/audit?vm_id=vm-x"} {
		if code, out := get("GET", path); code != 200 {
			t.Errorf("GET %s: %d %v", path, code, out)
		}
	}
}
