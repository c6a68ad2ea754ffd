package secpolicy

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/metald/metald/internal/netnstest"
	"github.com/metald/metald/internal/network/ns"
	"github.com/metald/metald/internal/policy"
	"github.com/metald/metald/internal/testpy"
)

func TestMain(m *testing.M) { os.Exit(netnstest.Main(m)) }

const py = "/usr/bin/python3"

// topo is a host namespace acting as router for bridges br0..br2
// (2001:db8:N+1::1/64, fe80::1 on each), with br_netfilter on.
type topo struct {
	t    testing.TB
	host *netnstest.NS
	mgr  *Manager
	vms  map[string]*vm
}

type vm struct {
	name   string
	ns     *netnstest.NS
	addr   netip.Addr
	ll     netip.Addr
	bridge string
	gw     netip.Addr
	port   string // host-side device
	mac    net.HardwareAddr
}

func noDAD(t testing.TB, n *netnstest.NS) {
	for _, k := range []string{"net/ipv6/conf/all/accept_dad", "net/ipv6/conf/default/accept_dad"} {
		if err := ns.WriteSysctl(n.Fd(), k, "0"); err != nil {
			t.Fatal(err)
		}
	}
}

func newTopo(t testing.TB, bridges int) *topo {
	t.Helper()
	tp := &topo{t: t, host: netnstest.New(t), vms: map[string]*vm{}}
	noDAD(t, tp.host)
	if err := ns.WriteSysctl(tp.host.Fd(), "net/ipv6/conf/all/forwarding", "1"); err != nil {
		t.Fatal(err)
	}
	hh := tp.host.Handle(t)
	for i := range bridges {
		name := fmt.Sprintf("br%d", i)
		if err := hh.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}}); err != nil {
			t.Fatal(err)
		}
		tp.host.MustRun(t, "ip", "link", "set", name, "up")
		tp.host.MustRun(t, "ip", "-6", "addr", "add", "fe80::1/64", "dev", name, "nodad")
		tp.host.MustRun(t, "ip", "-6", "addr", "add", fmt.Sprintf("2001:db8:%d::1/64", i+1), "dev", name, "nodad")
		if err := EnsureBridgeNetfilter(tp.host.Fd(), name); err != nil {
			t.Fatal(err)
		}
	}
	m, err := New(tp.host.Fd())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	tp.mgr = m
	return tp
}

// addVM creates a VM namespace on bridge br<bridge> with address
// 2001:db8:<bridge+1>::<host> and link-local fe80::<host>.
func (tp *topo) addVM(name string, bridge, host int) *vm {
	t := tp.t
	t.Helper()
	v := &vm{name: name, ns: netnstest.New(t), bridge: fmt.Sprintf("br%d", bridge), port: "v-" + name}
	v.addr = netip.MustParseAddr(fmt.Sprintf("2001:db8:%d::%x", bridge+1, host))
	// Link-local addresses are map keys too, so they are unique per host
	// (as MAC-derived ones are in production).
	v.ll = netip.MustParseAddr(fmt.Sprintf("fe80::%x:%x", bridge+1, host))
	v.gw = netip.MustParseAddr(fmt.Sprintf("2001:db8:%d::1", bridge+1))
	noDAD(t, v.ns)
	if err := ns.WriteSysctl(v.ns.Fd(), "net/ipv6/conf/default/addr_gen_mode", "1"); err != nil {
		t.Fatal(err)
	}
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: v.port, PeerNamespace: netlink.NsFd(tp.host.Fd())}
	if err := v.ns.Handle(t).LinkAdd(veth); err != nil {
		t.Fatalf("veth: %v", err)
	}
	l, err := v.ns.Handle(t).LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	v.mac = l.Attrs().HardwareAddr
	tp.host.MustRun(t, "ip", "link", "set", v.port, "master", v.bridge, "up")
	v.ns.MustRun(t, "ip", "link", "set", "eth0", "up")
	v.ns.MustRun(t, "ip", "-6", "addr", "add", v.ll.String()+"/64", "dev", "eth0", "nodad")
	v.ns.MustRun(t, "ip", "-6", "addr", "add", v.addr.String()+"/64", "dev", "eth0", "nodad")
	v.ns.MustRun(t, "ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")
	tp.vms[name] = v
	return v
}

// plan returns an open policy for v (no rules) in tenant.
func (v *vm) plan(tenant string) NICPolicy {
	return NICPolicy{VMID: v.name, NIC: "eth0", Tenant: tenant, HostDevice: v.port, Bridge: v.bridge, MAC: v.mac,
		Addrs: []netip.Addr{v.addr, v.ll}, Gateways: []netip.Addr{v.gw, netip.MustParseAddr("fe80::1")}}
}

func rules(t testing.TB, field string, text ...string) []policy.Rule {
	t.Helper()
	rs, err := policy.ParseList(field, text, policy.ParseOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

func (tp *topo) upsert(p NICPolicy) {
	tp.t.Helper()
	if err := tp.mgr.Upsert(context.Background(), p); err != nil {
		tp.t.Fatalf("upsert %s: %v", p.VMID, err)
	}
}

type server struct {
	cmd *exec.Cmd
	out *os.File
}

// serve starts testpy.EchoServer in v; specs are "tcp:PORT" or "udp:PORT".
func (v *vm) serve(t *testing.T, specs ...string) *server {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "srv")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(py, append([]string{"-c", testpy.EchoServer}, specs...)...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := ns.Start(v.ns.Fd(), cmd); err != nil {
		t.Fatal(err)
	}
	s := &server{cmd: cmd, out: f}
	t.Cleanup(func() { cmd.Process.Signal(syscall.SIGKILL); cmd.Wait() })
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(s.output(), "ready") {
		if time.Now().After(deadline) {
			t.Fatalf("server in %s did not start: %s", v.name, s.output())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return s
}

func (s *server) output() string {
	b, _ := os.ReadFile(s.out.Name())
	return string(b)
}

// hits counts "hit PORT" lines.
func (s *server) hits(port int) int {
	return strings.Count(s.output(), "hit "+strconv.Itoa(port)+" ")
}

const probeScript = `
import socket, sys, threading
res = {}
def one(i, addr, port):
    try:
        s = socket.create_connection((addr, int(port)), timeout=float(sys.argv[1]))
        s.sendall(b"ping"); ok = s.recv(4) == b"ping"; s.close()
        res[i] = "ok" if ok else "noecho"
    except Exception as e:
        res[i] = "fail"
ts = []
for i, a in enumerate(sys.argv[2:]):
    addr, port = a.rsplit(",", 1)
    t = threading.Thread(target=one, args=(i, addr, port)); t.start(); ts.append(t)
for t in ts: t.join()
print(" ".join(res[i] for i in range(len(ts))))
`

type target struct {
	addr netip.Addr
	port int
}

// connect tries a TCP connection (and an echo) to each target from v in
// parallel and reports which succeeded.
func (v *vm) connect(t *testing.T, targets ...target) []bool {
	t.Helper()
	args := []string{"-c", probeScript, "0.7"}
	for _, tg := range targets {
		args = append(args, tg.addr.String()+","+strconv.Itoa(tg.port))
	}
	out, err := v.ns.Run(py, args...)
	if err != nil {
		t.Fatalf("probe: %v\n%s", err, out)
	}
	f := strings.Fields(out)
	if len(f) != len(targets) {
		t.Fatalf("probe output %q", out)
	}
	res := make([]bool, len(f))
	for i, r := range f {
		res[i] = r == "ok"
	}
	return res
}

// expect checks one flow per line: from, to, port, want.
type flow struct {
	from, to *vm
	port     int
	want     bool
}

func expectFlows(t *testing.T, flows ...flow) {
	t.Helper()
	for _, f := range flows {
		got := f.from.connect(t, target{f.to.addr, f.port})[0]
		if got != f.want {
			t.Errorf("%s -> %s port %d: connected=%v, want %v", f.from.name, f.to.name, f.port, got, f.want)
		}
	}
}

// listTable lists every policy table (the main table and the shards).
func listTable(t testing.TB, n *netnstest.NS) string {
	t.Helper()
	var b strings.Builder
	for _, name := range Tables() {
		b.WriteString(n.MustRun(t, "nft", "list", "table", "ip6", name))
	}
	return b.String()
}
