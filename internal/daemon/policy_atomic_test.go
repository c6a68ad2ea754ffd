package daemon_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/metald/metald/internal/network/ns"
	"github.com/metald/metald/internal/testpy"
)

// UpdateSecurityPolicy is atomic as seen by packets: 100 updates over HTTP
// alternate between two policies while probe traffic runs. Probes that
// both policies deny (TCP SYNs to 7000, UDP to 7001) never reach the
// server, and an established allowed connection (tcp/80) keeps echoing
// through every update.
func TestAtomicUpdatesThroughDaemon(t *testing.T) {
	e := newEnv(t)
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-at-srv", "config": vmConfig("t1", nic("eth0", "br-at", "2001:db8:76::10/64", "2001:db8:76::1"))})
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-at-cli", "config": vmConfig("t1", nic("eth0", "br-at", "2001:db8:76::11/64", "2001:db8:76::1"))})
	for _, id := range []string{"vm-at-srv", "vm-at-cli"} {
		e.mustCall("BootVm", map[string]any{"vm_id": id})
	}
	e.waitDAD("vm-at-srv")
	e.waitDAD("vm-at-cli")
	policies := []map[string]any{
		{"ingress_rules": []any{"allow tcp from any to any port 80,8080", "deny all from any to any"},
			"egress_rules": []any{"allow all from any to any"}},
		{"ingress_rules": []any{"allow tcp from any to any port 80,9090", "deny udp from any to any port 7001",
			"allow udp from any to any port 5000-6000", "deny all from any to any"},
			"egress_rules": []any{"deny tcp from any to any port 22", "allow all from any to any"}},
	}
	e.mustCall("UpdateSecurityPolicy", map[string]any{"vm_id": "vm-at-srv", "security_policy": policies[0]})

	srvOut, err := os.CreateTemp(t.TempDir(), "srv")
	if err != nil {
		t.Fatal(err)
	}
	srv := exec.Command("python3", "-c", testpy.EchoServer, "tcp:80", "tcp:7000", "udp:7001", "tcp:8080", "tcp:9090")
	srv.Stdout, srv.Stderr = srvOut, srvOut
	if err := ns.Start(int(e.vmNS("vm-at-srv").Fd()), srv); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Signal(syscall.SIGKILL); srv.Wait() })
	srvOutput := func() string { b, _ := os.ReadFile(srvOut.Name()); return string(b) }
	hits := func(port int) int { return strings.Count(srvOutput(), "hit "+strconv.Itoa(port)+" ") }
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(srvOutput(), "ready"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("server did not start: %s", srvOutput())
		}
	}

	stop := filepath.Join(t.TempDir(), "stop")
	probeOut, err := os.CreateTemp(t.TempDir(), "prober")
	if err != nil {
		t.Fatal(err)
	}
	prober := exec.Command("python3", "-c", testpy.AtomicProber, "2001:db8:76::10", stop)
	prober.Stdout, prober.Stderr = probeOut, probeOut
	if err := ns.Start(int(e.vmNS("vm-at-cli").Fd()), prober); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { prober.Process.Signal(syscall.SIGKILL); prober.Wait() })
	for deadline := time.Now().Add(10 * time.Second); hits(80) == 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(probeOut.Name())
			t.Fatalf("the prober did not connect: %s", b)
		}
	}
	time.Sleep(200 * time.Millisecond)

	start := time.Now()
	var slowest time.Duration
	for i := range 100 {
		t0 := time.Now()
		e.mustCall("UpdateSecurityPolicy", map[string]any{"vm_id": "vm-at-srv", "security_policy": policies[(i+1)%2]})
		slowest = max(slowest, time.Since(t0))
	}
	took := time.Since(start)
	time.Sleep(200 * time.Millisecond) // probes keep running under the last policy
	os.WriteFile(stop, nil, 0o644)
	if err := prober.Wait(); err != nil {
		b, _ := os.ReadFile(probeOut.Name())
		t.Fatalf("prober: %v\n%s", err, b)
	}
	res, _ := os.ReadFile(probeOut.Name())
	t.Logf("100 updates over HTTP in %v (slowest %v); prober: %s", took, slowest, strings.TrimSpace(string(res)))

	f := strings.Fields(string(res))
	if len(f) != 10 {
		t.Fatalf("prober output %q", res)
	}
	count := func(i int) int { n, _ := strconv.Atoi(f[i]); return n }
	if count(3) != 0 || f[9] != "True" {
		t.Errorf("the established connection did not survive the updates: %s", res)
	}
	if count(1) < 100 || count(5) < 100 || count(7) < 100 {
		t.Errorf("too little probe traffic during the updates: %s", res)
	}
	if h := hits(7000) + hits(7001); h != 0 {
		t.Errorf("%d probes that both policies deny got through (tcp 7000: %d, udp 7001: %d)", h, hits(7000), hits(7001))
	}
	if hits(80) != 1 {
		t.Errorf("port 80 accepted %d connections, want the prober's one", hits(80))
	}
	// The updates took effect: the last one (policy 0) allows 8080, not 9090.
	if !e.tcpConnectEcho(t, "vm-at-cli", "2001:db8:76::10", "8080") || e.tcpConnectEcho(t, "vm-at-cli", "2001:db8:76::10", "9090") {
		t.Error("the last policy is not the one in force")
	}
	if n := len(list(obj(obj(list(e.getVM("vm-at-srv")["network"])[0])["securityPolicy"])["ingressRules"])); n != 2 {
		t.Errorf("stored policy has %d ingress rules, want policy 0's 2", n)
	}
}

const echoConnectScript = `
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
    c.sendall(b"ping"); print("connected", c.recv(4).decode())
except Exception as e:
    print("failed", e)
`

// tcpConnectEcho reports whether a TCP connection from a VM to an echo
// server at addr:port completes and echoes.
func (e *env) tcpConnectEcho(t *testing.T, from, addr, port string) bool {
	t.Helper()
	out, _ := e.inVM(from, "python3", "-c", echoConnectScript, addr, port)
	return strings.Contains(out, "connected ping")
}
