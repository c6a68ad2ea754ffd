package secpolicy

import (
	"net/netip"
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

// TestAtomicUpdates: 100 updates alternating two policies (one with helper
// chains, one without) while probe traffic runs. Nothing both policies deny gets through, and an
// established allowed connection survives every update.
func TestAtomicUpdates(t *testing.T) {
	tp := newTopo(t, 1)
	a, b := tp.addVM("a", 0, 0x10), tp.addVM("b", 0, 0x11)
	srv := b.serve(t, "tcp:80", "tcp:7000", "udp:7001", "tcp:8080", "tcp:9090")
	p1, p2 := b.plan("t1"), b.plan("t1")
	p1.Ingress = rules(t, "ingress", "allow tcp from any to any port 80,8080", "deny all from any to any")
	p2.Ingress = rules(t, "ingress", "allow tcp from any to any port 80,9090", "deny udp from any to any port 7001", "allow udp from any to any port 5000-6000", "deny all from any to any")
	p2.Egress = rules(t, "egress", "deny tcp from any to any port 22", "allow all from any to any")
	// p2 has helper chains (strict isolation, allowed destinations) and p1
	// none: every update also creates or deletes them.
	p2.TenantIsolation = IsolationStrict
	p2.AllowedDestinations = []netip.Prefix{netip.MustParsePrefix("2001:db8::/32")}
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
	// And the table holds b's two main chains (generation 0, rewritten in
	// place by every update) that the maps point at, and no helper chain
	// of an earlier generation.
	listing := listTable(t, tp.host)
	if n, main := strings.Count(listing, "chain vm-b.eth0-"), strings.Count(listing, "chain vm-b.eth0-in-g0")+strings.Count(listing, "chain vm-b.eth0-out-g0"); n != 2 || main != 2 {
		t.Errorf("%d chains for b (%d main chains), want the 2 main chains", n, main)
	}
	// p2's helper chains come and go with it.
	tp.upsert(p2)
	if n := strings.Count(listTable(t, tp.host), "chain vm-b.eth0-"); n != 5 {
		t.Errorf("%d chains for b with p2, want the 2 main chains and 3 helpers (strict both ways, allowed destinations)", n)
	}
	tp.upsert(p1)
	if n := strings.Count(listTable(t, tp.host), "chain vm-b.eth0-"); n != 2 {
		t.Errorf("%d chains for b back on p1, want 2", n)
	}
}
