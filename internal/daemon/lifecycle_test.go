package daemon_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/metald/metald/internal/daemon"
	"github.com/metald/metald/internal/network/ns"
	"github.com/metald/metald/internal/vm"
)

func pidOf(vm map[string]any) int {
	f, _ := obj(vm["backendInfo"])["pid"].(float64)
	return int(f)
}

// VMs on one bridge reach each other; VMs on different bridges reach each
// other through the host's gateway addresses; every lifecycle call does what
// it says to the guest process.
func TestLifecycleAndConnectivity(t *testing.T) {
	e := newEnv(t)
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-a1", "config": vmConfig("t1", nic("eth0", "br-a", "2001:db8:a::10/64", "2001:db8:a::1"))})
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-a2", "config": vmConfig("t1", nic("eth0", "br-a", "2001:db8:a::11/64", "2001:db8:a::1"))})
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-b1", "config": vmConfig("t1", nic("eth0", "br-b", "2001:db8:b::10/64", "2001:db8:b::1"))})
	for _, id := range []string{"vm-a1", "vm-a2", "vm-b1"} {
		if out := e.mustCall("BootVm", map[string]any{"vm_id": id}); out["state"] != "VM_STATE_RUNNING" {
			t.Fatalf("boot %s: %v", id, out)
		}
	}
	for _, id := range []string{"vm-a1", "vm-a2", "vm-b1"} {
		e.waitDAD(id)
	}
	if st := list(e.getVM("vm-a1")["networkStatus"])[0]; obj(st)["gatewayOnBridge"] != true || str(st, "linkState") != "up" {
		t.Fatalf("status %v", st)
	}
	for _, target := range []string{"2001:db8:a::11", "2001:db8:b::10", "2001:db8:a::1"} {
		if out, err := e.inVM("vm-a1", "ping", "-6", "-c", "1", "-W", "3", target); err != nil {
			t.Fatalf("ping %s from vm-a1: %v\n%s", target, err, out)
		}
	}
	// The guest's default route goes via its gateway.
	if out, _ := e.inVM("vm-b1", "ip", "-6", "route", "show", "default"); !strings.Contains(out, "via 2001:db8:b::1") {
		t.Fatalf("default route in vm-b1: %q", out)
	}

	// Pause stops the guest process, Resume continues it.
	vm := e.getVM("vm-a1")
	pid := pidOf(vm)
	if pid <= 0 {
		t.Fatalf("no pid: %v", vm["backendInfo"])
	}
	if out := e.mustCall("PauseVm", map[string]any{"vm_id": "vm-a1"}); out["state"] != "VM_STATE_PAUSED" {
		t.Fatalf("pause: %v", out)
	}
	if s, _ := procState(pid); s != 'T' {
		t.Fatalf("paused guest state %c, want T", s)
	}
	// Wrong-state calls are failed_precondition and change nothing.
	if code, out := e.call("PauseVm", map[string]any{"vm_id": "vm-a1"}); code != 400 || out["code"] != "failed_precondition" {
		t.Fatalf("pause twice: %d %v", code, out)
	}
	if out := e.mustCall("ResumeVm", map[string]any{"vm_id": "vm-a1"}); out["state"] != "VM_STATE_RUNNING" {
		t.Fatalf("resume: %v", out)
	}
	if s, _ := procState(pid); s == 'T' {
		t.Fatal("resumed guest still stopped")
	}

	// Reboot replaces the guest process.
	e.mustCall("RebootVm", map[string]any{"vm_id": "vm-a1"})
	newPID := pidOf(e.getVM("vm-a1"))
	if newPID == pid || newPID <= 0 {
		t.Fatalf("reboot kept pid %d (now %d)", pid, newPID)
	}
	if _, err := procState(pid); err == nil {
		t.Fatalf("old guest %d still alive after reboot", pid)
	}

	// Shutdown stops it and keeps resources; Boot starts it again.
	if out := e.mustCall("ShutdownVm", map[string]any{"vm_id": "vm-a1"}); out["state"] != "VM_STATE_SHUTDOWN" {
		t.Fatalf("shutdown: %v", out)
	}
	if _, err := procState(newPID); err == nil {
		t.Fatalf("guest %d alive after shutdown", newPID)
	}
	if vm := e.getVM("vm-a1"); pidOf(vm) != 0 || vm["state"] != "VM_STATE_SHUTDOWN" {
		t.Fatalf("after shutdown: %v", vm)
	}
	if code, out := e.call("ResumeVm", map[string]any{"vm_id": "vm-a1"}); code != 400 || out["code"] != "failed_precondition" {
		t.Fatalf("resume a shut-down vm: %d %v", code, out)
	}
	e.mustCall("BootVm", map[string]any{"vm_id": "vm-a1"})
	e.waitDAD("vm-a1")
	if out, err := e.inVM("vm-a1", "ping", "-6", "-c", "1", "-W", "3", "2001:db8:a::11"); err != nil {
		t.Fatalf("ping after re-boot: %v\n%s", err, out)
	}
	// Shutdown of a paused VM works too.
	e.mustCall("PauseVm", map[string]any{"vm_id": "vm-a2"})
	if out := e.mustCall("ShutdownVm", map[string]any{"vm_id": "vm-a2"}); out["state"] != "VM_STATE_SHUTDOWN" {
		t.Fatalf("shutdown paused: %v", out)
	}

	// Delete releases everything: process, namespace, port; the bridge
	// metald created goes with its last VM.
	pidB := pidOf(e.getVM("vm-b1"))
	e.mustCall("DeleteVm", map[string]any{"vm_id": "vm-b1"})
	if code, _ := e.call("GetVm", map[string]any{"vm_id": "vm-b1"}); code != 404 {
		t.Fatalf("deleted vm still answers: %d", code)
	}
	if _, err := procState(pidB); err == nil {
		t.Fatal("guest alive after delete")
	}
	for _, l := range e.links() {
		if l == "tap-vm-b1" || l == "br-b" {
			t.Fatalf("%s left after delete: %v", l, e.links())
		}
	}
	if _, err := os.Stat(filepath.Join(e.dir, "netns", "metald-vm-b1")); !os.IsNotExist(err) {
		t.Fatalf("namespace left after delete: %v", err)
	}
	if _, err := os.Stat(filepath.Join(e.dir, "etc", "metald-vm-b1")); !os.IsNotExist(err) {
		t.Fatalf("resolv.conf dir left after delete: %v", err)
	}
	if code, out := e.call("DeleteVm", map[string]any{"vm_id": "vm-b1"}); code != 404 || out["code"] != "not_found" {
		t.Fatalf("delete twice: %d %v", code, out)
	}

	// A bridge and gateway two VMs share stay with the one left, and go
	// with it.
	gatewayOnBrA := func() bool {
		out := e.host.MustRun(t, "ip", "-6", "addr", "show", "dev", "br-a")
		return strings.Contains(out, "2001:db8:a::1/64")
	}
	if !gatewayOnBrA() {
		t.Fatal("gateway 2001:db8:a::1 not on br-a")
	}
	e.mustCall("DeleteVm", map[string]any{"vm_id": "vm-a2"})
	if !slices.Contains(e.links(), "br-a") || !gatewayOnBrA() {
		t.Fatalf("br-a or its gateway went with vm-a2, vm-a1 still uses them: %v", e.links())
	}
	if out, err := e.inVM("vm-a1", "ping", "-6", "-c", "1", "-W", "3", "2001:db8:a::1"); err != nil {
		t.Fatalf("ping the gateway after vm-a2's delete: %v\n%s", err, out)
	}
	e.mustCall("DeleteVm", map[string]any{"vm_id": "vm-a1"})
	if slices.Contains(e.links(), "br-a") {
		t.Fatalf("br-a left after its last VM's delete: %v", e.links())
	}
}

// The guest's IPv6 settings: DNS in the VM's resolv.conf, privacy
// extensions and stable privacy as guest sysctls.
func TestGuestIPv6Settings(t *testing.T) {
	e := newEnv(t)
	cfg := vmConfig("t1", map[string]any{"id": "eth0", "bridge_name": "br-g", "ipv6": map[string]any{
		"address": "2001:db8:9::10/64", "gateway": "2001:db8:9::1", "dns_servers": []any{"2001:4860:4860::8888", "2001:4860:4860::8844"},
		"enable_privacy_extensions": true, "enable_stable_privacy": true, "temp_valid_lifetime": 3600}})
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-g", "config": cfg})
	e.mustCall("BootVm", map[string]any{"vm_id": "vm-g"})
	raw, err := os.ReadFile(filepath.Join(e.dir, "etc", "metald-vm-g", "resolv.conf"))
	if err != nil || !strings.Contains(string(raw), "nameserver 2001:4860:4860::8888\nnameserver 2001:4860:4860::8844") {
		t.Fatalf("resolv.conf: %q %v", raw, err)
	}
	f := e.vmNS("vm-g")
	for key, want := range map[string]string{
		"net/ipv6/conf/eth0/use_tempaddr":   "2",
		"net/ipv6/conf/eth0/temp_valid_lft": "3600",
	} {
		if got, err := ns.ReadSysctl(int(f.Fd()), key); err != nil || got != want {
			t.Errorf("%s = %q (%v), want %q", key, got, err, want)
		}
	}
	secret, err := ns.ReadSysctl(int(f.Fd()), "net/ipv6/conf/eth0/stable_secret")
	if err != nil || secret == "" || secret == "::" {
		t.Errorf("stable_secret = %q (%v)", secret, err)
	}
	// metald computes the stable-privacy link-local address from the secret
	// exactly as the guest kernel derives it (it binds it to the port for
	// guests it cannot look into).
	row, err := e.d.Manager().Get(t.Context(), "vm-g")
	if err != nil {
		t.Fatal(err)
	}
	// A veth has no permanent hardware address (the kernel hashes zeros);
	// a virtio NIC's permanent address is its MAC.
	want, ok := vm.StableLinkLocal(row.NICs[0].StableSecret, make(net.HardwareAddr, 6))
	if got := str(list(e.getVM("vm-g")["networkStatus"])[0], "guestLinkLocal"); !ok || got != want.String() {
		t.Fatalf("guest link-local %s, computed %s", got, want)
	}
	// New DNS servers reach the live guest's resolv.conf; a refused update
	// leaves it as it was; clearing them empties it.
	resolv := func() string {
		raw, err := os.ReadFile(filepath.Join(e.dir, "etc", "metald-vm-g", "resolv.conf"))
		if err != nil {
			t.Fatal(err)
		}
		return string(raw)
	}
	e.mustCall("UpdateVmNetwork", map[string]any{"vm_id": "vm-g", "ipv6": map[string]any{"dns_servers": []any{"2001:db8:9::53"}}})
	if got := resolv(); !strings.Contains(got, "nameserver 2001:db8:9::53\n") || strings.Contains(got, "8888") {
		t.Fatalf("resolv.conf after the update: %q", got)
	}
	if code, out := e.call("UpdateVmNetwork", map[string]any{"vm_id": "vm-g", "ipv6": map[string]any{"dns_servers": []any{"2001:db8:9::54"}, "security": map[string]any{"ra_rate_limit": 1 << 20}}}); code != 400 {
		t.Fatalf("bad update: %d %v", code, out)
	}
	if got := resolv(); !strings.Contains(got, "nameserver 2001:db8:9::53\n") || strings.Contains(got, "::54") {
		t.Fatalf("resolv.conf after a refused update: %q", got)
	}
	e.mustCall("UpdateVmNetwork", map[string]any{"vm_id": "vm-g", "clear_fields": []any{"dns_servers"}})
	if got := resolv(); strings.Contains(got, "nameserver") {
		t.Fatalf("resolv.conf after clearing: %q", got)
	}
	// The secret is persisted: a reboot keeps it.
	e.mustCall("RebootVm", map[string]any{"vm_id": "vm-g"})
	if again, _ := ns.ReadSysctl(int(f.Fd()), "net/ipv6/conf/eth0/stable_secret"); again != secret {
		t.Errorf("stable_secret changed across reboot: %q → %q", secret, again)
	}
}

// A VM whose guest process or namespace vanishes outside metald becomes
// TERMINATED with a reason, keeps its resources until deleted, and is
// reported by metald_vms.
func TestTerminatedOutsideMetald(t *testing.T) {
	e := newEnv(t)
	for _, id := range []string{"vm-k1", "vm-k2"} {
		e.mustCall("CreateVm", map[string]any{"vm_id": id, "config": vmConfig("t1", nic("eth0", "br-k", "", ""))})
		e.mustCall("BootVm", map[string]any{"vm_id": id})
	}
	syscall.Kill(pidOf(e.getVM("vm-k1")), syscall.SIGKILL)
	// vm-k2's guest outlives its sandbox's mount.
	k2 := pidOf(e.getVM("vm-k2"))
	if err := syscall.Unmount(filepath.Join(e.dir, "netns", "metald-vm-k2"), syscall.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		a, b := e.getVM("vm-k1"), e.getVM("vm-k2")
		if a["state"] == "VM_STATE_TERMINATED" && b["state"] == "VM_STATE_TERMINATED" {
			if !strings.Contains(str(a, "stateReason"), "guest process exited") || !strings.Contains(str(b, "stateReason"), "sandbox vanished") {
				t.Fatalf("reasons: %q / %q", a["stateReason"], b["stateReason"])
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not terminated: %v / %v", a["state"], b["state"])
		}
		time.Sleep(100 * time.Millisecond)
	}
	if e.metric(`metald_vms{state="TERMINATED"}`) != 2 {
		t.Fatal("metald_vms{state=TERMINATED} != 2")
	}
	if code, out := e.call("BootVm", map[string]any{"vm_id": "vm-k1"}); code != 400 || out["code"] != "failed_precondition" {
		t.Fatalf("boot terminated: %d %v", code, out)
	}
	// Resources are held until DeleteVm, which then releases them.
	found := 0
	for _, l := range e.links() {
		if l == "tap-vm-k1" || l == "tap-vm-k2" {
			found++
		}
	}
	if found != 2 {
		t.Fatalf("terminated VMs' ports released early: %v", e.links())
	}
	if pidOf(e.getVM("vm-k2")) != k2 {
		t.Fatalf("vm-k2's live guest (pid %d) no longer recorded: %v", k2, e.getVM("vm-k2")["backendInfo"])
	}
	for _, id := range []string{"vm-k1", "vm-k2"} {
		e.mustCall("DeleteVm", map[string]any{"vm_id": id})
	}
	vms, _ := e.d.Manager().List(context.Background())
	if len(vms) != 0 {
		t.Fatalf("left: %v", vms)
	}
	// DeleteVm killed the guest that had lost its sandbox.
	if stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", k2)); err == nil && !strings.Contains(string(stat), ") Z ") {
		t.Fatalf("vm-k2's guest (pid %d) still runs after DeleteVm: %s", k2, stat)
	}
}

// A delete racing a create on the same bridge: the create took the gateway
// as present (the deleted VM's row recorded it) before its own row records
// it; the delete must leave the gateway on the bridge for it.
func TestGatewayKeptForCreateInFlight(t *testing.T) {
	var pause atomic.Bool
	reached, release := make(chan struct{}), make(chan struct{})
	e := newEnvWith(t, func(o *daemon.Options) {
		o.Step = func(step string) {
			if step == "create:bridges" && pause.CompareAndSwap(true, false) {
				close(reached)
				<-release
			}
		}
	})
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-r1", "config": vmConfig("t1", nic("eth0", "br-r", "2001:db8:7a::10/64", "2001:db8:7a::1"))})
	pause.Store(true)
	done := make(chan error, 1)
	go func() {
		code, out := e.call("CreateVm", map[string]any{"vm_id": "vm-r2", "config": vmConfig("t1", nic("eth0", "br-r", "2001:db8:7a::11/64", "2001:db8:7a::1"))})
		if code != 200 {
			done <- fmt.Errorf("create vm-r2: %d %v", code, out)
			return
		}
		done <- nil
	}()
	<-reached
	e.mustCall("DeleteVm", map[string]any{"vm_id": "vm-r1"})
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if out := e.host.MustRun(t, "ip", "-6", "addr", "show", "dev", "br-r"); !strings.Contains(out, "2001:db8:7a::1/64") {
		t.Fatalf("the gateway left br-r while vm-r2 counts on it:\n%s", out)
	}
	if st := list(e.getVM("vm-r2")["networkStatus"])[0]; obj(st)["gatewayOnBridge"] != true {
		t.Fatalf("status %v", st)
	}
	// vm-r2's own delete then takes it away with the bridge.
	e.mustCall("DeleteVm", map[string]any{"vm_id": "vm-r2"})
	if slices.Contains(e.links(), "br-r") {
		t.Fatal("br-r left after its last VM's delete")
	}
}
