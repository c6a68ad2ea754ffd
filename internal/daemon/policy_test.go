package daemon_test

import (
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
	f := e.vmNS("vm-srv")
	srv := exec.Command("python3", "-c", listenScript, "80", "22")
	stdout, _ := srv.StdoutPipe()
	if err := ns.Start(int(f.Fd()), srv); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Signal(syscall.SIGKILL); srv.Wait() })
	buf := make([]byte, 16)
	if n, _ := stdout.Read(buf); !strings.Contains(string(buf[:n]), "ready") {
		t.Fatalf("listener: %q", buf[:n])
	}

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
	if strings.TrimSpace(out) != `["ingress_rules","egress_rules","tenant_isolation_level"]` {
		t.Fatalf("enforcement: %s", out)
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
	if out, _ := e.host.Run("nft", "list", "table", "ip6", "metald_security"); strings.Contains(out, "vm-srv") {
		t.Fatalf("policy of a deleted VM left behind:\n%s", out)
	}
}
