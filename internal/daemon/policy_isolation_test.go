package daemon_test

import (
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/metald/metald/internal/daemon"
	"github.com/metald/metald/internal/network/ns"
	"github.com/metald/metald/internal/testpy"
)

// startListener runs listenScript (greeting "hi" on each port) in a VM.
func (e *env) startListener(t *testing.T, id string, ports ...string) {
	t.Helper()
	f := e.vmNS(id)
	srv := exec.Command("python3", append([]string{"-c", listenScript}, ports...)...)
	stdout, _ := srv.StdoutPipe()
	if err := ns.Start(int(f.Fd()), srv); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Signal(syscall.SIGKILL); srv.Wait() })
	buf := make([]byte, 16)
	if n, _ := stdout.Read(buf); !strings.Contains(string(buf[:n]), "ready") {
		t.Fatalf("listener in %s: %q", id, buf[:n])
	}
}

// A bad management-access rule stops the daemon from starting, naming the
// key, the rule and the column.
func TestManagementAccessRejectedAtStart(t *testing.T) {
	_, err := daemon.New(context.Background(), daemon.Options{ManagementAccess: []string{
		"allow tcp from 2001:db8:ff::/48 to any port 22", "allow tcp from sg:ops to any port 22"}})
	if err == nil || !strings.HasPrefix(err.Error(), `isolation.management_access[1]: col 16: "sg:ops": security groups are not allowed here`) {
		t.Fatalf("start with a group in management access: %v", err)
	}
}

// Quarantine keeps the operator's management access: with
// isolation.management_access allowing SSH from the management prefix, an
// isolated VM still accepts SSH from a management host (its replies pass),
// while a peer outside that prefix cannot reach it, even on SSH, and the
// VM itself cannot open any connection, even to the management host.
// ReleaseVm brings the VM's own policy back.
func TestIsolateManagementAccessThroughDaemon(t *testing.T) {
	e := newEnvWith(t, func(o *daemon.Options) {
		o.ManagementAccess = []string{"allow tcp from 2001:db8:75::/64 to any port 22"}
	})
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-q", "config": vmConfig("t1", nic("eth0", "br-q", "2001:db8:74::10/64", "2001:db8:74::1"))})
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-qpeer", "config": vmConfig("t1", nic("eth0", "br-q", "2001:db8:74::11/64", "2001:db8:74::1"))})
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-mgmt", "config": vmConfig("ops", nic("eth0", "br-m", "2001:db8:75::10/64", "2001:db8:75::1"))})
	ids := []string{"vm-q", "vm-qpeer", "vm-mgmt"}
	for _, id := range ids {
		e.mustCall("BootVm", map[string]any{"vm_id": id})
	}
	for _, id := range ids {
		e.waitDAD(id)
	}
	e.startEchoServer(t, "vm-q", "tcp:22", "tcp:80")
	e.startListener(t, "vm-qpeer", "22", "80")
	e.startListener(t, "vm-mgmt", "22")

	type probe struct {
		from, to, port string
	}
	const q, peer, mgmt = "2001:db8:74::10", "2001:db8:74::11", "2001:db8:75::10"
	check := func(when string, want map[probe]bool) {
		t.Helper()
		for p, w := range want {
			connect := e.tcpConnect
			if p.to == q {
				connect = e.tcpConnectEcho
			}
			if got := connect(t, p.from, p.to, p.port); got != w {
				t.Errorf("%s: %s -> %s port %s: connected=%v, want %v", when, p.from, p.to, p.port, got, w)
			}
		}
	}
	check("before isolation", map[probe]bool{
		{"vm-mgmt", q, "22"}: true, {"vm-qpeer", q, "22"}: true, {"vm-qpeer", q, "80"}: true, {"vm-q", peer, "80"}: true,
	})

	// A connection the peer opened before the quarantine is cut by it; a
	// management connection opened before it carries on.
	held := e.holdConnection(t, "vm-qpeer", q, "80")
	heldMgmt := e.holdConnection(t, "vm-mgmt", q, "22")

	e.shell(t, `VM_ID="vm-q"
curl -sf -X POST http://localhost:8080/vmprovisioner.v1.VmService/IsolateVm \
  -d "{\"vm_id\":\"$VM_ID\", \"reason\":\"Security violation investigation\"}"`)
	if got := held(); !strings.HasPrefix(got, "cut") {
		t.Errorf("a connection established before IsolateVm still works: %q", got)
	}
	if got := heldMgmt(); got != "still" {
		t.Errorf("a management connection established before IsolateVm: %q", got)
	}
	// The policy endpoint says the VM is isolated and what still passes.
	if out := e.shell(t, `curl -s http://localhost:8080/debug/vm/vm-q/security-policy | jq -c '[.isolated, .isolation_reason, .management_access]'`); strings.TrimSpace(out) !=
		`[true,"Security violation investigation",["allow tcp from 2001:db8:75::/64 to any port 22"]]` {
		t.Errorf("security-policy while isolated: %s", out)
	}
	check("isolated", map[probe]bool{
		{"vm-mgmt", q, "22"}:  true,  // management access, replies included
		{"vm-mgmt", q, "80"}:  false, // not management access
		{"vm-qpeer", q, "22"}: false, // not from the management prefix
		{"vm-qpeer", q, "80"}: false,
		{"vm-q", peer, "80"}:  false, // the VM cannot initiate
		{"vm-q", mgmt, "22"}:  false, // not even toward the management host
	})
	if _, err := e.inVM("vm-q", "ping", "-6", "-c", "1", "-W", "2", "2001:db8:74::1"); err == nil {
		t.Error("isolated: the VM pinged its gateway")
	}
	// The isolated NIC's chains count the management rule and the drops.
	out := e.policyTables(t)
	if !strings.Contains(out, `management_ingress[0]: allow tcp from 2001:db8:75::/64 to any port 22`) {
		t.Errorf("no management rule in the table:\n%s", out)
	}

	e.mustCall("ReleaseVm", map[string]any{"vm_id": "vm-q"})
	check("released", map[probe]bool{
		{"vm-mgmt", q, "22"}: true, {"vm-qpeer", q, "22"}: true, {"vm-qpeer", q, "80"}: true, {"vm-q", peer, "80"}: true,
	})
}

// startEchoServer runs testpy.EchoServer in a VM.
func (e *env) startEchoServer(t *testing.T, id string, specs ...string) {
	t.Helper()
	srv := exec.Command("python3", append([]string{"-c", testpy.EchoServer}, specs...)...)
	stdout, _ := srv.StdoutPipe()
	if err := ns.Start(int(e.vmNS(id).Fd()), srv); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Signal(syscall.SIGKILL); srv.Wait() })
	go io.Copy(io.Discard, stdout)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if e.tcpConnectEcho(t, id, "::1", strings.Split(specs[0], ":")[1]) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("echo server in %s did not start", id)
		}
	}
}

const holdScript = `
import os, socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
def echo():
    c.sendall(b"ab"); d = b""
    while len(d) < 2:
        r = c.recv(2 - len(d))
        if not r: raise EOFError("closed")
        d += r
echo(); print("up", flush=True)
while not os.path.exists(sys.argv[3]): time.sleep(0.05)
try:
    echo(); print("still", flush=True)
except Exception as e:
    print("cut", e, flush=True)
`

// holdConnection opens a TCP connection from a VM to an echo server and
// keeps it; the returned function echoes once more over it and returns
// "still" when that works, "cut ..." when not.
func (e *env) holdConnection(t *testing.T, from, addr, port string) func() string {
	t.Helper()
	dir := t.TempDir()
	out, err := os.Create(filepath.Join(dir, "out"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("python3", "-c", holdScript, addr, port, filepath.Join(dir, "go"))
	cmd.Stdout, cmd.Stderr = out, out
	if err := ns.Start(int(e.vmNS(from).Fd()), cmd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Signal(syscall.SIGKILL); cmd.Wait() })
	read := func() string { b, _ := os.ReadFile(out.Name()); return string(b) }
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(read(), "up"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("connection %s -> %s port %s: %s", from, addr, port, read())
		}
	}
	return func() string {
		os.WriteFile(filepath.Join(dir, "go"), nil, 0o644)
		cmd.Wait()
		return strings.TrimSpace(strings.TrimPrefix(read(), "up\n"))
	}
}
