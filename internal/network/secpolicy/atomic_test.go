package secpolicy

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/metald/metald/internal/network/ns"
	"github.com/metald/metald/internal/testpy"
)

// TestAtomicUpdates: 100 updates alternating two policies while probe
// traffic runs. Nothing both policies deny gets through, and an
// established allowed connection survives every update.
func TestAtomicUpdates(t *testing.T) {
	tp := newTopo(t, 1)
	a, b := tp.addVM("a", 0, 0x10), tp.addVM("b", 0, 0x11)
	srv := b.serve(t, "tcp:80", "tcp:7000", "udp:7001", "tcp:8080", "tcp:9090")
	p1, p2 := b.plan("t1"), b.plan("t1")
	p1.Ingress = rules(t, "ingress", "allow tcp from any to any port 80,8080", "deny all from any to any")
	p2.Ingress = rules(t, "ingress", "allow tcp from any to any port 80,9090", "deny udp from any to any port 7001", "allow udp from any to any port 5000-6000", "deny all from any to any")
	p2.Egress = rules(t, "egress", "deny tcp from any to any port 22", "allow all from any to any")
	tp.upsert(p1)
	tp.upsert(a.plan("t1"))

	stop := filepath.Join(t.TempDir(), "stop")
	out, err := os.CreateTemp(t.TempDir(), "prober")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(py, "-c", testpy.AtomicProber, b.addr.String(), stop)
	cmd.Stdout, cmd.Stderr = out, out
	if err := ns.Start(a.ns.Fd(), cmd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Signal(syscall.SIGKILL); cmd.Wait() })
	time.Sleep(300 * time.Millisecond)
	start := time.Now()
	for i := range 100 {
		p := p1
		if i%2 == 0 {
			p = p2
		}
		tp.upsert(p)
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("100 updates in %v", time.Since(start))
	os.WriteFile(stop, nil, 0o644)
	if err := cmd.Wait(); err != nil {
		b, _ := os.ReadFile(out.Name())
		t.Fatalf("prober: %v\n%s", err, b)
	}
	res, _ := os.ReadFile(out.Name())
	t.Logf("prober: %s", res)
	f := strings.Fields(string(res))
	if len(f) < 10 || f[3] != "0" || f[9] != "True" {
		t.Errorf("established connection did not survive: %s", res)
	}
	if f[5] == "0" || f[7] == "0" {
		t.Errorf("no probe traffic: %s", res)
	}
	if h := srv.hits(7000) + srv.hits(7001); h != 0 {
		t.Errorf("%d probes that both policies deny got through (tcp 7000: %d, udp 7001: %d)", h, srv.hits(7000), srv.hits(7001))
	}
	if srv.hits(80) != 1 {
		t.Errorf("port 80 accepted %d connections, want 1", srv.hits(80))
	}
	// And the table holds exactly one generation of b's chains, plus its
	// two trampolines (generation 0) that the maps point at.
	listing := listTable(t, tp.host)
	if n, tr := strings.Count(listing, "chain vm-b.eth0-"), strings.Count(listing, "chain vm-b.eth0-in-g0")+strings.Count(listing, "chain vm-b.eth0-out-g0"); n != 4 || tr != 2 {
		t.Errorf("%d chains for b (%d trampolines), want 2 plus 2 trampolines", n, tr)
	}
}
