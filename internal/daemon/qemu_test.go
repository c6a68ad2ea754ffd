package daemon_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/metald/metald/internal/daemon"
)

// guestImage returns the test guest image (scripts/guest-image.sh, built
// from Debian packages), building it when missing.
func guestImage(t *testing.T) (kernel, initrd string) {
	t.Helper()
	root, _ := filepath.Abs(filepath.Join("..", ".."))
	kernel, initrd = filepath.Join(root, "build", "guest", "vmlinuz"), filepath.Join(root, "build", "guest", "initrd.img")
	// Always run the build: it is cached (about a second when nothing
	// changed) and rebuilds when metald-init changed.
	cmd := exec.Command("bash", "scripts/guest-image.sh")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build guest image: %v\n%s", err, out)
	}
	return kernel, initrd
}

// console returns a VM's serial console log.
func (e *env) console(id string) string {
	path := str(obj(e.getVM(id)["backendInfo"])["details"], "console_log")
	raw, _ := os.ReadFile(path)
	return string(raw)
}

func (e *env) waitConsole(t *testing.T, id, want string, n int, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for strings.Count(e.console(id), want) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%s: %q not seen %d times on the console within %v:\n%s", id, want, n, d, e.console(id))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// Real VMs: the guide's Example 1 under QEMU (KVM when a probe boot works,
// else TCG), driven through the API. The guest's metald-init configures the
// Example 1 address (symbolic name resolved) and another VM on the bridge
// pings it from inside its guest; rogue RAs sent from inside the guests are
// stopped at their taps and counted; the lifecycle calls, a daemon restart
// and a killed QEMU behave as with the netns backend.
func TestQEMUThroughDaemon(t *testing.T) {
	kernel, initrd := guestImage(t)
	e := newEnvWith(t, func(o *daemon.Options) {
		o.Backend = "qemu"
		o.QEMUAccelerator = "auto"
		o.GuestTest = "rogue-ra,ping6=2600:beef:1000:1::10"
		o.Pools = nil // the guide's prefixes get their own pools below
	})
	e.shell(t, `curl -sf -X POST http://localhost:8080/debug/ipv6/pools -d '{"id":"dmz","prefix":"2600:BEEF:1000::/48"}'`)
	dir := t.TempDir()
	mk := func(id, addr string) map[string]any {
		disk := filepath.Join(dir, id+".ext4")
		if err := os.WriteFile(disk, make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
		req := loadExample(t, "example1-secure-web-server")
		req["vm_id"] = id
		cfg := obj(req["config"])
		obj(cfg["boot"])["kernel_path"] = kernel
		obj(cfg["boot"])["initrd_path"] = initrd
		obj(list(cfg["storage"])[0])["path"] = disk
		obj(obj(list(cfg["network"])[0])["ipv6"])["address"] = addr
		// Example 1's policy denies ping (it is enforced); the guests'
		// probe needs echo in both directions.
		pol := obj(obj(list(cfg["network"])[0])["security_policy"])
		for _, dir := range []string{"ingress_rules", "egress_rules"} {
			pol[dir] = append([]any{"allow icmpv6 type echo-request,echo-reply from any to any"}, list(pol[dir])...)
		}
		return req
	}
	// The qemu backend needs its kernel to exist: the error names the field.
	bad := mk("vm-qbad", "2600:BEEF:1000:web::12/64")
	obj(obj(bad["config"])["boot"])["kernel_path"] = "/opt/vm-assets/vmlinux"
	if code, out := e.call("CreateVm", bad); code != 400 || errorField(out) != "config.boot.kernel_path" {
		t.Fatalf("missing kernel: %d %v", code, out)
	}

	e.mustCall("CreateVm", mk("vm-q1", "2600:BEEF:1000:web::10/64"))
	e.mustCall("CreateVm", mk("vm-q2", "2600:BEEF:1000:web::11/64"))
	bi := obj(e.getVM("vm-q1")["backendInfo"])
	if bi["type"] != "qemu" {
		t.Fatalf("backend %v", bi)
	}
	start := time.Now()
	e.mustCall("BootVm", map[string]any{"vm_id": "vm-q1"})
	e.mustCall("BootVm", map[string]any{"vm_id": "vm-q2"})
	e.waitConsole(t, "vm-q1", "metald-init: network up", 1, 3*time.Minute)
	t.Logf("CreateVm+BootVm → guest network up: %v (accelerator %s)", time.Since(start), str(obj(e.getVM("vm-q1")["backendInfo"])["details"], "accelerator"))
	// The other VM reaches vm-q1's Example 1 address from inside its guest.
	deadline := time.Now().Add(3 * time.Minute)
	for !strings.Contains(e.console("vm-q2"), "metald-init: ping6 2600:beef:1000:1::10 ok") {
		if time.Now().After(deadline) || strings.Contains(e.console("vm-q2"), "ping6 2600:beef:1000:1::10 failed") {
			ev := e.shell(t, `curl -s http://localhost:8080/debug/security/events | jq -c '.[] | {vm_id, event_type, d: .details}'`)
			sets, _ := e.fhList(t, "set", "tap-vm-q2-addrs")
			t.Fatalf("vm-q2 cannot ping vm-q1\nevents:\n%s\nq2 addrs:\n%s\nconsole:\n%s", ev, sets, e.console("vm-q2"))
		}
		time.Sleep(500 * time.Millisecond)
	}

	// Rogue RAs sent by metald-init inside the guests: stopped at the tap
	// by RA Guard and counted.
	e.waitConsole(t, "vm-q1", "rogue-ra: sent RA", 2, time.Minute)
	time.Sleep(500 * time.Millisecond)
	if n := e.counter(t, "tap-vm-q1-ra_guard"); n < 2 {
		t.Fatalf("ra_guard counter of vm-q1's tap is %d after the guest sent RAs (source_guard %d)\nconsole:\n%s",
			n, e.counter(t, "tap-vm-q1-source_guard"), e.console("vm-q1"))
	}

	// Lifecycle through QMP.
	if out := e.mustCall("PauseVm", map[string]any{"vm_id": "vm-q1"}); out["state"] != "VM_STATE_PAUSED" {
		t.Fatalf("pause: %v", out)
	}
	if out := e.mustCall("ResumeVm", map[string]any{"vm_id": "vm-q1"}); out["state"] != "VM_STATE_RUNNING" {
		t.Fatalf("resume: %v", out)
	}
	e.mustCall("RebootVm", map[string]any{"vm_id": "vm-q1"})
	e.waitConsole(t, "vm-q1", "metald-init: network up", 2, 3*time.Minute)
	if out := e.mustCall("ShutdownVm", map[string]any{"vm_id": "vm-q2"}); out["state"] != "VM_STATE_SHUTDOWN" {
		t.Fatalf("shutdown: %v", out)
	}

	// A restart of metald re-adopts the running VM by PID and QMP socket.
	pid := pidOf(e.getVM("vm-q1"))
	e.stop()
	e.start()
	if vm := e.getVM("vm-q1"); vm["state"] != "VM_STATE_RUNNING" || pidOf(vm) != pid {
		t.Fatalf("after restart: %v pid %d (was %d)", vm["state"], pidOf(vm), pid)
	}
	e.mustCall("PauseVm", map[string]any{"vm_id": "vm-q1"})
	e.mustCall("ResumeVm", map[string]any{"vm_id": "vm-q1"})

	// A killed QEMU makes the VM TERMINATED.
	syscall.Kill(pid, syscall.SIGKILL)
	deadline = time.Now().Add(10 * time.Second)
	for e.getVM("vm-q1")["state"] != "VM_STATE_TERMINATED" {
		if time.Now().After(deadline) {
			t.Fatalf("killed QEMU: state %v", e.getVM("vm-q1")["state"])
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, id := range []string{"vm-q1", "vm-q2"} {
		e.mustCall("DeleteVm", map[string]any{"vm_id": id})
	}
}
