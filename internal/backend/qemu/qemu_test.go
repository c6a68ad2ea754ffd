package qemu_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/metald/metald/cmd/metald-init/guestcfg"
	"github.com/metald/metald/internal/backend"
	"github.com/metald/metald/internal/backend/qemu"
	"github.com/metald/metald/internal/netnstest"
	"github.com/metald/metald/internal/network"
	"github.com/metald/metald/internal/network/link"
	"github.com/metald/metald/internal/network/nft"
	"github.com/metald/metald/internal/network/ns"
)

var (
	repoRoot  = filepath.Join("..", "..", "..")
	kernel    = filepath.Join(repoRoot, "build", "guest", "vmlinuz")
	initrd    = filepath.Join(repoRoot, "build", "guest", "initrd.img")
	imageErr  error
	imageOnce sync.Once
)

func TestMain(m *testing.M) { os.Exit(netnstest.Main(m)) }

// requireImage builds the guest image with scripts/guest-image.sh when it
// is missing (CI runs `make guest-image` first) and requires QEMU. Both
// fail the test in CI and skip it elsewhere.
func requireImage(t testing.TB) {
	t.Helper()
	netnstest.RequireRoot(t)
	fail := t.Skipf
	if os.Getenv("CI") != "" {
		fail = t.Fatalf
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		fail("qemu-system-x86_64 not found (make deps): %v", err)
	}
	imageOnce.Do(func() {
		_, e1 := os.Stat(kernel)
		_, e2 := os.Stat(initrd)
		if e1 == nil && e2 == nil {
			return
		}
		cmd := exec.Command("bash", filepath.Join(repoRoot, "scripts", "guest-image.sh"))
		if out, err := cmd.CombinedOutput(); err != nil {
			imageErr = fmt.Errorf("scripts/guest-image.sh: %v\n%s", err, out)
		}
	})
	if imageErr != nil {
		fail("guest image: %v", imageErr)
	}
	var err error
	if kernel, err = filepath.Abs(kernel); err != nil {
		t.Fatal(err)
	}
	if initrd, err = filepath.Abs(initrd); err != nil {
		t.Fatal(err)
	}
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// env is a private host namespace with bridge br0 (gateway
// 2001:db8:1::1/64) and a neighbour namespace on it at 2001:db8:1::20.
type env struct {
	host, nb *netnstest.NS
	links    *link.Manager
	dataDir  string
	b        *qemu.Backend
}

func newEnv(t testing.TB, cfg qemu.Config) *env {
	t.Helper()
	requireImage(t)
	e := &env{host: netnstest.New(t), nb: netnstest.New(t), dataDir: t.TempDir()}
	var err error
	if e.links, err = link.New(e.host.File); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.links.Close)
	if _, err := e.links.EnsureBridge("br0"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.links.EnsureGateway("br0", netip.MustParsePrefix("2001:db8:1::1/64")); err != nil {
		t.Fatal(err)
	}
	e.nb.MustRun(t, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
	if err := e.links.AddVethPort(link.VethPort{Name: "nb-host", PeerName: "nb0", PeerNSFd: e.nb.Fd(),
		PeerMAC: net.HardwareAddr{2, 0, 0, 0, 0, 0x20}}); err != nil {
		t.Fatal(err)
	}
	if err := e.links.AttachPort("nb-host", "br0"); err != nil {
		t.Fatal(err)
	}
	e.nb.MustRun(t, "ip", "addr", "add", "2001:db8:1::20/64", "dev", "nb0", "nodad")
	e.nb.MustRun(t, "ip", "link", "set", "nb0", "up")
	cfg.HostNS = e.host.File
	cfg.Links = e.links
	cfg.DataDir = e.dataDir
	cfg.Logger = slog.New(slog.NewTextHandler(testWriter{t}, nil))
	if e.b, err = qemu.New(cfg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.b.Close)
	return e
}

func spec(vmID, tap string, mac byte, addr string) *backend.Spec {
	return &backend.Spec{
		VMID: vmID, VCPUs: 1, MemoryBytes: 256 << 20,
		KernelPath: kernel, InitrdPath: initrd,
		KernelArgs: "console=ttyS0 reboot=k panic=1 pci=off quiet",
		NICs: []backend.NIC{{
			ID: "eth0", HostDevice: tap, MAC: net.HardwareAddr{2, 0, 0, 0, 0, mac},
			Address: netip.MustParsePrefix(addr), Gateway: netip.MustParseAddr("2001:db8:1::1"),
			DNS:               []netip.Addr{netip.MustParseAddr("2001:db8::53")},
			PrivacyExtensions: true, StableSecret: "2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff", TempValidLifetime: time.Hour,
		}},
	}
}

// createBoot runs Create, attaches the tap (after install, if set, ran on
// it), Boot and waits for the guest network; it destroys the VM at the end.
func (e *env) createBoot(t testing.TB, s *backend.Spec, install func(tap string)) (backend.Instance, time.Duration) {
	t.Helper()
	start := time.Now()
	inst := e.createStart(t, s, install)
	e.waitUp(t, inst)
	return inst, time.Since(start)
}

// waitUp waits for the guest's network.
func (e *env) waitUp(t testing.TB, inst backend.Instance) {
	t.Helper()
	wctx, cancel := context.WithTimeout(context.Background(), 150*time.Second)
	defer cancel()
	if err := e.b.WaitNetworkUp(wctx, inst); err != nil {
		t.Fatalf("%v\nconsole:\n%s", err, console(inst))
	}
}

// createStart runs Create, attaches the tap (after install, if set, ran on
// it) and Boot; it destroys the VM at the end of the test.
func (e *env) createStart(t testing.TB, s *backend.Spec, install func(tap string)) backend.Instance {
	t.Helper()
	ctx := context.Background()
	inst, err := e.b.Create(ctx, s)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	t.Cleanup(func() {
		if err := e.b.Destroy(context.Background(), s.VMID, inst); err != nil {
			t.Errorf("cleanup Destroy: %v", err)
		}
	})
	tap := s.NICs[0].HostDevice
	p, err := e.links.Port(tap)
	if err != nil {
		t.Fatal(err)
	}
	if p.Up || p.Master != "" || p.VMID != s.VMID || p.NICID != "eth0" {
		t.Fatalf("tap after Create: %+v", p)
	}
	if install != nil {
		install(tap)
	}
	if err := e.links.AttachPort(tap, "br0"); err != nil {
		t.Fatal(err)
	}
	if inst, err = e.b.Boot(ctx, s, inst); err != nil {
		t.Fatalf("Boot: %v", err)
	}
	return inst
}

func console(inst backend.Instance) string {
	b, _ := os.ReadFile(inst.Details[qemu.DetailConsoleLog])
	return string(b)
}

// pingOK pings dst from the neighbour until it answers or d passes.
func (e *env) pingOK(t testing.TB, dst string, d time.Duration) bool {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		if _, err := e.nb.Run("ping", "-6", "-n", "-c1", "-W1", dst); err == nil {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestLifecycle(t *testing.T) {
	e := newEnv(t, qemu.Config{})
	ctx := context.Background()
	s := spec("vm1", "qt-vm1-0", 0x10, "2001:db8:1::10/64")
	for i, ro := range []bool{false, true} {
		p := filepath.Join(t.TempDir(), fmt.Sprintf("disk%d.img", i))
		if err := os.WriteFile(p, make([]byte, 1<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		s.Disks = append(s.Disks, backend.Disk{ID: fmt.Sprintf("d%d", i), Path: p, ReadOnly: ro})
	}
	inst, took := e.createBoot(t, s, nil)
	// storage[] became virtio-blk drives, read-only as asked.
	raw, err := qemu.QMPForTest(ctx, inst.Details[qemu.DetailQMPSocket], "query-block")
	if err != nil {
		t.Fatal(err)
	}
	var blocks []struct {
		Device   string `json:"device"`
		Inserted struct {
			File string `json:"file"`
			RO   bool   `json:"ro"`
		} `json:"inserted"`
	}
	if err := json.Unmarshal(raw, &blocks); err != nil {
		t.Fatal(err)
	}
	ro := map[string]bool{}
	for _, bl := range blocks {
		ro[bl.Inserted.File] = bl.Inserted.RO
	}
	if v, ok := ro[s.Disks[0].Path]; !ok || v {
		t.Errorf("disk0 (read-write): %s", raw)
	}
	if v, ok := ro[s.Disks[1].Path]; !ok || !v {
		t.Errorf("disk1 (readonly): %s", raw)
	}
	t.Logf("create -> guest network up: %v (accelerator %s)", took, inst.Details[qemu.DetailAccelerator])
	if a := inst.Details[qemu.DetailAccelerator]; a != qemu.AccelTCG && a != qemu.AccelKVM {
		t.Errorf("accelerator %q", a)
	}
	if !e.pingOK(t, "2001:db8:1::10", 40*time.Second) {
		t.Fatalf("guest does not answer ping6\nconsole:\n%s", console(inst))
	}
	// The guest applied the privacy settings and the resolver.
	c := console(inst)
	if !strings.Contains(c, "address 2001:db8:1::10/64 gateway 2001:db8:1::1 privacy true") {
		t.Errorf("console lacks the guest's network report:\n%s", c)
	}
	if h := e.b.Check(ctx, inst); !h.Running || !h.SandboxOK || h.Paused {
		t.Fatalf("Check after boot: %+v", h)
	}

	// Pause: the guest stops answering.
	if err := e.b.Pause(ctx, inst); err != nil {
		t.Fatal(err)
	}
	if h := e.b.Check(ctx, inst); !h.Running || !h.Paused {
		t.Fatalf("Check after pause: %+v", h)
	}
	if _, err := e.nb.Run("ping", "-6", "-n", "-c2", "-W1", "2001:db8:1::10"); err == nil {
		t.Error("paused guest answered ping")
	}
	if err := e.b.Resume(ctx, inst); err != nil {
		t.Fatal(err)
	}
	if !e.pingOK(t, "2001:db8:1::10", 10*time.Second) {
		t.Fatal("resumed guest does not answer ping")
	}

	// Re-adoption: a new Backend (a restarted metald) drives the same VM
	// from the persisted Instance alone.
	b2, err := qemu.New(qemu.Config{HostNS: e.host.File, Links: e.links, DataDir: e.dataDir})
	if err != nil {
		t.Fatal(err)
	}
	defer b2.Close()
	if h := b2.Check(ctx, inst); !h.Running || h.Paused || !h.SandboxOK {
		t.Fatalf("adopted Check: %+v", h)
	}
	if err := b2.Pause(ctx, inst); err != nil {
		t.Fatal(err)
	}
	if h := b2.Check(ctx, inst); !h.Paused {
		t.Fatalf("adopted pause: %+v", h)
	}
	if err := b2.Resume(ctx, inst); err != nil {
		t.Fatal(err)
	}
	if owned, err := b2.Owned(ctx); err != nil || len(owned) != 1 || owned[0] != "vm1" {
		t.Fatalf("Owned = %v, %v", owned, err)
	}

	// Reboot: the guest comes up a second time in the same QEMU process.
	if inst, err = b2.Reboot(ctx, s, inst); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(150 * time.Second)
	for strings.Count(console(inst), "metald-init: network up") < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("no second boot after Reboot\nconsole:\n%s", console(inst))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !e.pingOK(t, "2001:db8:1::10", 40*time.Second) {
		t.Fatal("rebooted guest does not answer ping")
	}

	// Shutdown: graceful through the ACPI power button.
	pid := inst.PID
	start := time.Now()
	if inst, err = b2.Shutdown(ctx, inst, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	t.Logf("graceful shutdown took %v", time.Since(start))
	if inst.PID != 0 || !exited(pid) {
		t.Fatalf("qemu %d still there after Shutdown (inst %+v)", pid, inst)
	}
	if !strings.Contains(console(inst), "powering off") {
		t.Errorf("shutdown was not graceful:\n%s", console(inst))
	}
	if h := e.b.Check(ctx, inst); h.Running {
		t.Fatalf("Check after shutdown: %+v", h)
	}
	if _, err := e.b.Shutdown(ctx, inst, time.Second); err != nil {
		t.Fatalf("second Shutdown: %v", err)
	}

	// Boot again, then kill QEMU behind metald's back: Check says so.
	if inst, err = e.b.Boot(ctx, s, inst); err != nil {
		t.Fatal(err)
	}
	if err := unix.Kill(inst.PID, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(5 * time.Second)
	for h := e.b.Check(ctx, inst); h.Running; h = e.b.Check(ctx, inst) {
		if time.Now().After(deadline) {
			t.Fatalf("killed qemu still reported running: %+v", h)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := e.b.Pause(ctx, inst); !errors.Is(err, backend.ErrNotRunning) {
		t.Fatalf("Pause of dead VM: %v", err)
	}

	// Destroy removes taps, sockets, logs; twice is fine.
	for range 2 {
		if err := e.b.Destroy(ctx, "vm1", inst); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.links.Port("qt-vm1-0"); !errors.Is(err, link.ErrNotFound) {
		t.Errorf("tap after Destroy: %v", err)
	}
	if _, err := os.Stat(filepath.Join(e.dataDir, "vm1")); !os.IsNotExist(err) {
		t.Errorf("vm dir after Destroy: %v", err)
	}
}

// TestDestroyAfterCrash: with an empty Instance (metald crashed before
// persisting it), Destroy finds QEMU by its pid file and the taps by alias.
func TestDestroyAfterCrash(t *testing.T) {
	e := newEnv(t, qemu.Config{})
	ctx := context.Background()
	s := spec("vm2", "qt-vm2-0", 0x12, "2001:db8:1::12/64")
	inst, err := e.b.Create(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	if inst, err = e.b.Boot(ctx, s, inst); err != nil {
		t.Fatal(err)
	}
	if err := e.b.Destroy(ctx, "vm2", backend.Instance{}); err != nil {
		t.Fatal(err)
	}
	if !exited(inst.PID) {
		time.Sleep(200 * time.Millisecond)
		if !exited(inst.PID) {
			t.Errorf("qemu %d survived Destroy", inst.PID)
		}
	}
	if _, err := e.links.Port("qt-vm2-0"); !errors.Is(err, link.ErrNotFound) {
		t.Errorf("tap after Destroy: %v", err)
	}
	if owned, _ := e.b.Owned(ctx); len(owned) != 0 {
		t.Errorf("Owned after Destroy: %v", owned)
	}
}

func TestValidate(t *testing.T) {
	netnstest.RequireRoot(t)
	host := netnstest.New(t)
	b, err := qemu.New(qemu.Config{HostNS: host.File, DataDir: t.TempDir(), Accelerator: qemu.AccelTCG})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	f := filepath.Join(t.TempDir(), "file")
	os.WriteFile(f, nil, 0o644)
	ok := func() *backend.Spec {
		return &backend.Spec{VMID: "v", KernelPath: f, InitrdPath: f, Disks: []backend.Disk{{ID: "root", Path: f, Root: true}},
			NICs: []backend.NIC{{ID: "eth0", HostDevice: "tap0", MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}}}}
	}
	if err := b.Validate(ok()); err != nil {
		t.Fatal(err)
	}
	for want, mod := range map[string]func(*backend.Spec){
		"boot.kernel_path":  func(s *backend.Spec) { s.KernelPath = "/nonexistent/vmlinux" },
		"boot.initrd_path":  func(s *backend.Spec) { s.InitrdPath = "/nonexistent/initrd" },
		"storage[0].path":   func(s *backend.Spec) { s.Disks[0].Path = "/nonexistent/rootfs.ext4" },
		"boot.kernel_args":  func(s *backend.Spec) { s.KernelArgs = "console=ttyS0 metald.net=x" },
		"invalid host":      func(s *backend.Spec) { s.NICs[0].HostDevice = "a/b" },
		"mac":               func(s *backend.Spec) { s.NICs[0].MAC = nil },
		"kernel_path: requ": func(s *backend.Spec) { s.KernelPath = "" },
	} {
		s := ok()
		mod(s)
		err := b.Validate(s)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: err = %v", want, err)
		}
		if _, err := b.Create(context.Background(), s); err == nil {
			t.Errorf("%s: Create accepted it", want)
		}
	}
}

// raWatcher counts Router Advertisements whose source link-layer option is
// mac, as they arrive at the neighbour.
type raWatcher struct {
	mu    sync.Mutex
	count map[string]int
}

func watchRAs(t *testing.T, nb *netnstest.NS) *raWatcher {
	t.Helper()
	var fd int
	if err := ns.Do(nb.Fd(), func() error {
		var err error
		fd, err = unix.Socket(unix.AF_INET6, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMPV6)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 200000})
	w := &raWatcher{count: map[string]int{}}
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		buf := make([]byte, 2048)
		for {
			select {
			case <-done:
				return
			default:
			}
			n, _, err := unix.Recvfrom(fd, buf, 0)
			if err != nil || n < 24 || buf[0] != 134 {
				continue
			}
			for o := 16; o+8 <= n && buf[o+1] > 0; o += int(buf[o+1]) * 8 {
				if buf[o] == 1 {
					w.mu.Lock()
					w.count[net.HardwareAddr(buf[o+2:o+8]).String()]++
					w.mu.Unlock()
				}
			}
		}
	}()
	t.Cleanup(func() { close(done); <-stopped; unix.Close(fd) })
	return w
}

func (w *raWatcher) get(mac net.HardwareAddr) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.count[mac.String()]
}

// TestRogueRAFromGuest: metald-init's rogue-ra test mode sends RAs from
// inside two real guests. From the unfiltered one they reach the
// neighbour (so the test is meaningful); the other's tap got nft's RA guard
// before it was attached, so none arrive and the ra_guard counter moves.
func TestRogueRAFromGuest(t *testing.T) {
	e := newEnv(t, qemu.Config{GuestTest: guestcfg.TestRogueRA})
	w := watchRAs(t, e.nb)
	fw, err := nft.New(e.host.Fd())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fw.Close() })
	open := spec("open", "qt-open-0", 0x30, "2001:db8:1::30/64")
	guarded := spec("guarded", "qt-guard-0", 0x31, "2001:db8:1::31/64")
	// Both guests boot at once to keep the test short.
	instOpen := e.createStart(t, open, nil)
	instGuarded := e.createStart(t, guarded, func(tap string) {
		n := guarded.NICs[0]
		if err := fw.AddNIC(network.NICPlan{VMID: guarded.VMID, NICID: n.ID, HostDevice: tap, MAC: n.MAC,
			Addresses: []netip.Addr{n.Address.Addr()}, Controls: network.Controls{RAGuard: true}}); err != nil {
			t.Errorf("AddNIC: %v", err)
		}
		t.Cleanup(func() { fw.RemoveNIC(tap) })
	})
	e.waitUp(t, instOpen)
	e.waitUp(t, instGuarded)
	deadline := time.Now().Add(60 * time.Second)
	var guardCount uint64
	for {
		cs, err := fw.Counters("qt-guard-0")
		if err != nil {
			t.Fatal(err)
		}
		guardCount = cs[network.CtlRAGuard]
		if (w.get(open.NICs[0].MAC) >= 1 && guardCount >= 1) || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(1500 * time.Millisecond) // let the guarded guest send more
	cs, _ := fw.Counters("qt-guard-0")
	t.Logf("RAs at neighbour: unfiltered guest %d, guarded guest %d; ra_guard counter %d",
		w.get(open.NICs[0].MAC), w.get(guarded.NICs[0].MAC), cs[network.CtlRAGuard])
	if w.get(open.NICs[0].MAC) < 1 {
		t.Error("no rogue RA from the unfiltered guest reached the neighbour: the attack test proves nothing")
	}
	if n := w.get(guarded.NICs[0].MAC); n != 0 {
		t.Errorf("%d rogue RAs from the guarded guest reached the neighbour", n)
	}
	if cs[network.CtlRAGuard] < 1 {
		t.Errorf("ra_guard counter on qt-guard-0 = %d, want >= 1", cs[network.CtlRAGuard])
	}
}

// BenchmarkCreateToNetworkUp measures CreateVm+BootVm until the guest's
// network is configured and it answers ping6 from the neighbour (TCG here;
// KVM where the probe boot succeeds).
func BenchmarkCreateToNetworkUp(b *testing.B) {
	e := newEnv(b, qemu.Config{})
	for i := range b.N {
		// A fresh address each round: the neighbour's cache still maps
		// the previous round's address to the previous guest's MAC.
		addr := fmt.Sprintf("2001:db8:1::%x", 0x40+i)
		s := spec(fmt.Sprintf("bench%d", i), fmt.Sprintf("qt-bench%d", i), byte(0x40+i%64), addr+"/64")
		start := time.Now()
		inst, _ := e.createBoot(b, s, nil)
		up := time.Since(start)
		if !e.pingOK(b, addr, 40*time.Second) {
			b.Fatal("guest does not answer ping")
		}
		ping := time.Since(start)
		b.ReportMetric(up.Seconds(), "s/network-up")
		b.ReportMetric(ping.Seconds(), "s/first-ping")
		b.Logf("accelerator %s: network up %v, first ping %v", inst.Details[qemu.DetailAccelerator], up, ping)
		b.StopTimer()
		if err := e.b.Destroy(context.Background(), s.VMID, inst); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}

// exited reports whether pid has exited: it is gone, or a zombie waiting to
// be reaped (a zombie runs nothing; its parent collects it asynchronously).
func exited(pid int) bool {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	i := bytes.LastIndexByte(raw, ')')
	return i >= 0 && i+2 < len(raw) && (raw[i+2] == 'Z' || raw[i+2] == 'X')
}
