package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/metald/metald/cmd/metald-init/guestcfg"
	"github.com/metald/metald/internal/backend"
)

// field kinds of the schema checker.
const (
	kInt    = "integer"
	kString = "string"
	kBool   = "boolean"
	kArray  = "array"
	kObject = "object"
)

type field struct {
	kind     string
	required bool
	enum     []string
}

// schemas are the request body shapes of Firecracker's API definition
// (firecracker.yaml: MachineConfiguration, BootSource, Drive,
// NetworkInterface, MmdsConfig, InstanceActionInfo, Vm), written out from
// its public documentation. Unknown fields are rejected, as Firecracker's
// serde(deny_unknown_fields) does.
var schemas = map[string]map[string]field{
	"PUT /machine-config": {
		"vcpu_count": {kind: kInt, required: true}, "mem_size_mib": {kind: kInt, required: true},
		"smt": {kind: kBool}, "track_dirty_pages": {kind: kBool}, "cpu_template": {kind: kString},
		"huge_pages": {kind: kString, enum: []string{"None", "2M"}},
	},
	"PUT /boot-source": {
		"kernel_image_path": {kind: kString, required: true}, "boot_args": {kind: kString}, "initrd_path": {kind: kString},
	},
	"PUT /drives/": {
		"drive_id": {kind: kString, required: true}, "path_on_host": {kind: kString},
		"is_root_device": {kind: kBool, required: true}, "is_read_only": {kind: kBool},
		"partuuid": {kind: kString}, "cache_type": {kind: kString, enum: []string{"Unsafe", "Writeback"}},
		"rate_limiter": {kind: kObject}, "io_engine": {kind: kString, enum: []string{"Sync", "Async"}}, "socket": {kind: kString},
	},
	"PUT /network-interfaces/": {
		"iface_id": {kind: kString, required: true}, "host_dev_name": {kind: kString, required: true},
		"guest_mac": {kind: kString}, "rx_rate_limiter": {kind: kObject}, "tx_rate_limiter": {kind: kObject},
	},
	"PUT /mmds/config": {
		"version": {kind: kString, enum: []string{"V1", "V2"}}, "network_interfaces": {kind: kArray, required: true},
		"ipv4_address": {kind: kString}, "imds_compat": {kind: kBool},
	},
	"PUT /mmds":    nil, // any JSON object
	"PUT /actions": {"action_type": {kind: kString, required: true, enum: []string{"FlushMetrics", "InstanceStart", "SendCtrlAltDel"}}},
	"PATCH /vm":    {"state": {kind: kString, required: true, enum: []string{"Paused", "Resumed"}}},
}

func kindOf(v any) string {
	switch x := v.(type) {
	case string:
		return kString
	case bool:
		return kBool
	case float64:
		if x == float64(int64(x)) {
			return kInt
		}
		return "number"
	case []any:
		return kArray
	case map[string]any:
		return kObject
	}
	return "null"
}

// fakeFC is a Firecracker API stand-in on a unix socket: it validates each
// request against schemas, enforces the pre-boot/post-boot split, and
// records what it accepted.
type fakeFC struct {
	mu     sync.Mutex
	reqs   []string
	bodies map[string]map[string]any
	state  string // "Not started", "Running", "Paused"
	ifaces map[string]bool
	errs   []string
	srv    *http.Server
	sock   string
}

func newFakeFC(t *testing.T, sock string) *fakeFC {
	f := &fakeFC{bodies: map[string]map[string]any{}, state: "Not started", ifaces: map[string]bool{}, sock: sock}
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	f.srv = &http.Server{Handler: f}
	go f.srv.Serve(l)
	t.Cleanup(func() { f.srv.Close() })
	return f
}

func (f *fakeFC) fault(w http.ResponseWriter, key, format string, a ...any) {
	msg := fmt.Sprintf(format, a...)
	f.errs = append(f.errs, key+": "+msg)
	w.WriteHeader(http.StatusBadRequest)
	json.NewEncoder(w).Encode(map[string]string{"fault_message": msg})
}

func (f *fakeFC) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r.Method == http.MethodGet && r.URL.Path == "/" {
		json.NewEncoder(w).Encode(map[string]string{"id": "x", "state": f.state, "vmm_version": "1.x-fake", "app_name": "Firecracker"})
		return
	}
	key := r.Method + " " + r.URL.Path
	schemaKey, id := key, ""
	for _, p := range []string{"/drives/", "/network-interfaces/"} {
		if rest, ok := strings.CutPrefix(r.URL.Path, p); ok {
			schemaKey, id = r.Method+" "+p, rest
		}
	}
	schema, known := schemas[schemaKey]
	if !known {
		f.fault(w, key, "unknown endpoint")
		return
	}
	if ct := r.Header.Get("Content-Type"); ct != "application/json" {
		f.fault(w, key, "content type %q", ct)
		return
	}
	var body map[string]any
	dec := json.NewDecoder(r.Body)
	var raw json.RawMessage
	if err := dec.Decode(&raw); err != nil {
		f.fault(w, key, "bad json: %v", err)
		return
	}
	if err := json.Unmarshal(raw, &body); err != nil {
		f.fault(w, key, "body is not an object: %v", err)
		return
	}
	for k, v := range body {
		fd, ok := schema[k]
		if schema == nil {
			break
		}
		if !ok {
			f.fault(w, key, "unknown field %q", k)
			return
		}
		if got := kindOf(v); got != fd.kind {
			f.fault(w, key, "field %s: %s, want %s", k, got, fd.kind)
			return
		}
		if fd.enum != nil && !contains(fd.enum, v.(string)) {
			f.fault(w, key, "field %s: %q not in %v", k, v, fd.enum)
			return
		}
	}
	for k, fd := range schema {
		if _, ok := body[k]; fd.required && !ok {
			f.fault(w, key, "missing required field %q", k)
			return
		}
	}
	preBoot := r.Method == http.MethodPut && r.URL.Path != "/actions"
	switch {
	case preBoot && f.state != "Not started":
		f.fault(w, key, "the requested operation is not supported after starting the microVM")
		return
	case id != "" && body["drive_id"] != nil && body["drive_id"] != id:
		f.fault(w, key, "drive_id %v does not match path %s", body["drive_id"], id)
		return
	case id != "" && body["iface_id"] != nil && body["iface_id"] != id:
		f.fault(w, key, "iface_id %v does not match path %s", body["iface_id"], id)
		return
	}
	switch key {
	case "PUT /mmds/config":
		for _, n := range body["network_interfaces"].([]any) {
			if !f.ifaces[n.(string)] {
				f.fault(w, key, "network interface %v not configured", n)
				return
			}
		}
	case "PUT /actions":
		switch body["action_type"] {
		case "InstanceStart":
			if f.state != "Not started" {
				f.fault(w, key, "already started")
				return
			}
			if f.bodies["PUT /boot-source"] == nil || f.bodies["PUT /machine-config"] == nil {
				f.fault(w, key, "boot source or machine config missing")
				return
			}
			f.state = "Running"
		case "SendCtrlAltDel":
			if f.state != "Running" {
				f.fault(w, key, "not running")
				return
			}
		}
	case "PATCH /vm":
		if f.state == "Not started" {
			f.fault(w, key, "not started")
			return
		}
		f.state = map[string]string{"Paused": "Paused", "Resumed": "Running"}[body["state"].(string)]
	}
	if schemaKey == "PUT /network-interfaces/" {
		f.ifaces[id] = true
	}
	f.reqs = append(f.reqs, key)
	f.bodies[key] = body
	w.WriteHeader(http.StatusNoContent)
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func testSpec(t *testing.T) *backend.Spec {
	dir := t.TempDir()
	for _, f := range []string{"vmlinux", "rootfs.ext4", "data.img"} {
		os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o644)
	}
	return &backend.Spec{
		VMID: "vm1", VCPUs: 2, MemoryBytes: 512 << 20,
		KernelPath: filepath.Join(dir, "vmlinux"), KernelArgs: "console=ttyS0 reboot=k panic=1 pci=off",
		Disks: []backend.Disk{{ID: "rootfs", Path: filepath.Join(dir, "rootfs.ext4"), Root: true},
			{ID: "data", Path: filepath.Join(dir, "data.img"), ReadOnly: true}},
		NICs: []backend.NIC{{ID: "eth0", HostDevice: "fc-vm1-0", MAC: net.HardwareAddr{2, 0, 0, 0, 0, 0x10},
			Address: netip.MustParsePrefix("2001:db8:1::10/64"), Gateway: netip.MustParseAddr("2001:db8:1::1")}},
	}
}

func TestConfigureSequence(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "fc.sock")
	fc := newFakeFC(t, sock)
	spec := testSpec(t)
	c := newClient(sock)
	ctx := context.Background()
	if err := configure(ctx, c, spec, func(p string) string { return p }); err != nil {
		t.Fatalf("configure: %v (server saw: %v)", err, fc.errs)
	}
	want := []string{"PUT /machine-config", "PUT /boot-source", "PUT /drives/rootfs", "PUT /drives/data",
		"PUT /network-interfaces/eth0", "PUT /mmds/config", "PUT /mmds", "PUT /actions"}
	if strings.Join(fc.reqs, ",") != strings.Join(want, ",") {
		t.Fatalf("requests:\n got %v\nwant %v", fc.reqs, want)
	}
	if len(fc.errs) != 0 {
		t.Fatalf("schema errors: %v", fc.errs)
	}
	mc := fc.bodies["PUT /machine-config"]
	if mc["vcpu_count"] != float64(2) || mc["mem_size_mib"] != float64(512) {
		t.Errorf("machine-config %v", mc)
	}
	bs := fc.bodies["PUT /boot-source"]
	args := bs["boot_args"].(string)
	if !strings.HasPrefix(args, "console=ttyS0 reboot=k panic=1 pci=off metald.net=") {
		t.Errorf("boot_args %q", args)
	}
	cl, err := guestcfg.ParseCmdline(args)
	if err != nil || cl.Net == nil || cl.Net.NICs[0].Address.String() != "2001:db8:1::10/64" {
		t.Errorf("metald-init cannot read boot_args: %v %+v", err, cl)
	}
	if d := fc.bodies["PUT /drives/data"]; d["is_read_only"] != true || d["is_root_device"] != false {
		t.Errorf("data drive %v", d)
	}
	if d := fc.bodies["PUT /drives/rootfs"]; d["is_root_device"] != true {
		t.Errorf("root drive %v", d)
	}
	if n := fc.bodies["PUT /network-interfaces/eth0"]; n["host_dev_name"] != "fc-vm1-0" || n["guest_mac"] != "02:00:00:00:00:10" {
		t.Errorf("nic %v", n)
	}
	mmds, _ := json.Marshal(fc.bodies["PUT /mmds"])
	if !bytes.Contains(mmds, []byte(`"metald":{"net":{"nics":[{"address":"2001:db8:1::10/64"`)) && !bytes.Contains(mmds, []byte(`"address":"2001:db8:1::10/64"`)) {
		t.Errorf("mmds %s", mmds)
	}

	// Post-boot: pre-boot resources are refused, actions and PATCH /vm work.
	if err := c.put(ctx, "/boot-source", bootSource{KernelImagePath: "/x"}); err == nil {
		t.Error("fake accepted boot-source after start")
	}
	for _, st := range []string{statePaused, stateResumed} {
		if err := c.do(ctx, "PATCH", "/vm", vmState{State: st}, nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.put(ctx, "/actions", action{ActionType: actionSendCtrlAltDel}); err != nil {
		t.Fatal(err)
	}
}

// The checker itself must reject wrong shapes, or the test above proves
// nothing.
func TestFakeRejectsBadShapes(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "fc.sock")
	newFakeFC(t, sock)
	c := newClient(sock)
	ctx := context.Background()
	for path, body := range map[string]any{
		"/machine-config":          map[string]any{"vcpu_count": 1},
		"/boot-source":             map[string]any{"kernel_image_path": "/k", "bootargs": "x"},
		"/drives/a":                map[string]any{"drive_id": "b", "is_root_device": false},
		"/network-interfaces/eth0": map[string]any{"iface_id": "eth0"},
		"/actions":                 map[string]any{"action_type": "Reboot"},
		"/mmds/config":             map[string]any{"network_interfaces": []string{"nope"}},
	} {
		var apiErr *APIError
		if err := c.put(ctx, path, body); err == nil || !errorsAs(err, &apiErr) || apiErr.Status != 400 {
			t.Errorf("PUT %s %v: err = %v", path, body, err)
		}
	}
}

func errorsAs(err error, target **APIError) bool {
	e, ok := err.(*APIError)
	if ok {
		*target = e
	}
	return ok
}

func TestJailerCommand(t *testing.T) {
	b := &Backend{cfg: Config{Binary: "/usr/bin/firecracker", DataDir: "/data",
		Jailer: &Jailer{Binary: "/usr/bin/jailer", UID: 123, GID: 456, ChrootBaseDir: "/srv/jail"}}}
	cmd, sock := b.command("vm1")
	want := "/usr/bin/jailer --id vm1 --exec-file /usr/bin/firecracker --uid 123 --gid 456 --chroot-base-dir /srv/jail -- --api-sock /run/firecracker.socket"
	if got := strings.Join(cmd.Args, " "); got != want {
		t.Errorf("jailer args:\n got %s\nwant %s", got, want)
	}
	if sock != "/srv/jail/firecracker/vm1/root/run/firecracker.socket" {
		t.Errorf("socket %s", sock)
	}
	b.cfg.Jailer = nil
	cmd, sock = b.command("vm1")
	if got := strings.Join(cmd.Args, " "); got != "/usr/bin/firecracker --api-sock /data/vm1/firecracker.sock --id vm1" {
		t.Errorf("args %s", got)
	}
	_ = sock
	_ = time.Second
}
