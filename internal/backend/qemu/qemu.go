// Package qemu owns the QEMU backend: a VM is one qemu-system-x86_64
// process booting the spec's kernel, with one persistent tap per NIC in the
// host namespace, virtio-blk disks, a serial console log and a QMP socket
// under the VM's directory in the data directory.
//
// Lifecycle goes through QMP (stop/cont, system_powerdown, system_reset,
// quit). A VM survives a daemon restart: QEMU runs in its own session, and
// the Instance (PID, start time, QMP socket) is enough to re-adopt it.
//
// Differences from the netns backend that the VM manager must honour:
// call Validate before Create (the kernel, initrd and disk paths must
// exist); the host ports are taps, created down and unattached by Create
// exactly like netns's veths, but they carry no traffic until Boot starts
// QEMU; and the guest configures its own network (metald-init reads
// metald.net from the kernel command line), so Boot returns when QEMU runs,
// not when the guest's network is up (see WaitNetworkUp).
package qemu

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/metald/metald/cmd/metald-init/guestcfg"
	"github.com/metald/metald/internal/backend"
	"github.com/metald/metald/internal/backend/guestproc"
	"github.com/metald/metald/internal/backend/qemu/tap"
	"github.com/metald/metald/internal/network/link"
	"github.com/metald/metald/internal/network/ns"
)

// Name is the backend's type, as in Instance.Backend.
const Name = "qemu"

// Accelerators.
const (
	AccelAuto = "auto"
	AccelKVM  = "kvm"
	AccelTCG  = "tcg"
)

// Details keys in Instance.Details.
const (
	DetailAccelerator = "accelerator"
	DetailQMPSocket   = "qmp_socket"
	DetailConsoleLog  = "console_log"
	DetailVMDir       = "vm_dir"
	DetailHostDevices = "host_devices"
)

// Files in a VM's directory.
const (
	qmpFile     = "qmp.sock"
	consoleFile = "console.log"
	qemuLogFile = "qemu.log"
	pidFile     = "qemu.pid"
)

// Config configures a Backend.
type Config struct {
	// Binary is the QEMU executable; default "qemu-system-x86_64".
	Binary string
	// DataDir holds one directory per VM (sockets, console log); default
	// "/var/lib/metald/qemu".
	DataDir string
	// Accelerator is AccelAuto (default: KVM when a probe boot of the first
	// VM's kernel works, else TCG), AccelKVM or AccelTCG.
	Accelerator string
	// HostNS is the host network namespace, where taps are created and
	// QEMU runs. Used to build Links when Links is nil, and required.
	HostNS *os.File
	// Links manages host links; when nil New builds one on HostNS.
	Links *link.Manager
	// StartTimeout bounds how long Boot waits for QEMU's QMP socket;
	// default 30s.
	StartTimeout time.Duration
	// GuestTest, when set, is passed to metald-init as metald.test= (e.g.
	// guestcfg.TestRogueRA). For the attack tests only; never in production.
	GuestTest string
	// Logger; default slog.Default().
	Logger *slog.Logger
}

// Backend is the QEMU backend. It is safe for concurrent use on different
// VMs.
type Backend struct {
	bin      string
	dataDir  string
	accelCfg string
	hostNS   *os.File
	links    *link.Manager
	host     *link.Host // owns hostNS, h and (when it built it) links
	h        *netlink.Handle
	startTO  time.Duration
	test     string
	log      *slog.Logger

	accelOnce sync.Mutex
	accel     string // decided accelerator, "" until probed
}

var _ backend.Backend = (*Backend)(nil)

// New returns a Backend for cfg.
func New(cfg Config) (*Backend, error) {
	b := &Backend{bin: cfg.Binary, dataDir: cfg.DataDir, accelCfg: cfg.Accelerator,
		links: cfg.Links, startTO: cfg.StartTimeout, test: cfg.GuestTest, log: cfg.Logger}
	if b.bin == "" {
		b.bin = "qemu-system-x86_64"
	}
	if b.dataDir == "" {
		b.dataDir = "/var/lib/metald/qemu"
	}
	switch b.accelCfg {
	case "", AccelAuto:
		b.accelCfg = AccelAuto
	case AccelKVM, AccelTCG:
		b.accel = b.accelCfg
	default:
		return nil, fmt.Errorf("create qemu backend: unknown accelerator %q", cfg.Accelerator)
	}
	if b.startTO <= 0 {
		b.startTO = 30 * time.Second
	}
	if b.log == nil {
		b.log = slog.Default()
	}
	if cfg.HostNS == nil {
		return nil, errors.New("create qemu backend: need HostNS")
	}
	host, err := link.OpenHost(cfg.HostNS, cfg.Links)
	if err != nil {
		return nil, fmt.Errorf("create qemu backend: %w", err)
	}
	b.host, b.hostNS, b.h, b.links = host, host.NS, host.H, host.Links
	if err := os.MkdirAll(b.dataDir, 0o700); err != nil {
		b.Close()
		return nil, fmt.Errorf("create qemu backend: %w", err)
	}
	return b, nil
}

// Close releases the backend's netlink handle, namespace file and the link
// manager New built. Running VMs are not touched.
func (b *Backend) Close() {
	b.host.Close()
}

// Name returns "qemu".
func (b *Backend) Name() string { return Name }

// Available reports whether the QEMU binary can be found.
func (b *Backend) Available() error {
	if _, err := exec.LookPath(b.bin); err != nil {
		return fmt.Errorf("qemu backend: %w", err)
	}
	return nil
}

func (b *Backend) vmDir(vmID string) string { return filepath.Join(b.dataDir, vmID) }

func validVMID(id string) error {
	if id == "" || id == "." || id == ".." || len(id) > 200 || strings.ContainsAny(id, "/\x00") {
		return fmt.Errorf("invalid vm id %q", id)
	}
	return nil
}

func validIfName(n string) bool {
	return n != "" && len(n) < unix.IFNAMSIZ && n != "." && n != ".." &&
		!strings.ContainsAny(n, "/: \t\n\v\f\r\x00,=")
}

// Validate checks that spec can run under QEMU: the kernel, initrd and
// disk paths exist and are regular files (or block devices for disks), the
// kernel arguments leave metald's own parameters to metald, and the NICs
// are well formed. Errors name the offending field.
func (b *Backend) Validate(spec *backend.Spec) error {
	if err := validVMID(spec.VMID); err != nil {
		return err
	}
	if spec.KernelPath == "" {
		return errors.New("boot.kernel_path: required by the qemu backend")
	}
	if err := regularFile(spec.KernelPath, false); err != nil {
		return fmt.Errorf("boot.kernel_path: %w", err)
	}
	if spec.InitrdPath != "" {
		if err := regularFile(spec.InitrdPath, false); err != nil {
			return fmt.Errorf("boot.initrd_path: %w", err)
		}
	}
	for _, f := range strings.Fields(spec.KernelArgs) {
		if strings.HasPrefix(f, "metald.") {
			return fmt.Errorf("boot.kernel_args: %q is reserved for metald", f)
		}
	}
	ids := map[string]bool{}
	for i, d := range spec.Disks {
		if d.Path == "" {
			return fmt.Errorf("storage[%d].path: required", i)
		}
		if err := regularFile(d.Path, true); err != nil {
			return fmt.Errorf("storage[%d].path (%s): %w", i, d.ID, err)
		}
		if strings.Contains(d.Path, ",") {
			return fmt.Errorf("storage[%d].path: %q contains ','", i, d.Path)
		}
		if ids[d.ID] {
			return fmt.Errorf("storage[%d].id: duplicate %q", i, d.ID)
		}
		ids[d.ID] = true
	}
	hosts := map[string]bool{}
	for _, n := range spec.NICs {
		switch {
		case !validIfName(n.HostDevice):
			return fmt.Errorf("nic %s: invalid host device %q", n.ID, n.HostDevice)
		case hosts[n.HostDevice]:
			return fmt.Errorf("nic %s: duplicate host device %q", n.ID, n.HostDevice)
		case len(n.MAC) != 6:
			return fmt.Errorf("nic %s: mac %q is not 6 bytes", n.ID, n.MAC)
		}
		hosts[n.HostDevice] = true
	}
	if _, err := guestcfg.FromSpec(spec.NICs).Encode(); err != nil {
		return fmt.Errorf("network_interfaces: %w", err)
	}
	if l := len(filepath.Join(b.vmDir(spec.VMID), qmpFile)); l >= 108 {
		return fmt.Errorf("vm id %q: qmp socket path is %d bytes, the limit is 107", spec.VMID, l)
	}
	return nil
}

func regularFile(path string, blockOK bool) error {
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if st.Mode().IsRegular() || (blockOK && st.Mode()&os.ModeDevice != 0) {
		return nil
	}
	return fmt.Errorf("%s is not a regular file", path)
}

// Create validates spec, makes the VM's directory and one persistent tap
// per NIC in the host namespace: down, without master, alias
// link.PortAlias(vmID, nicID). On error it removes what it built.
func (b *Backend) Create(ctx context.Context, spec *backend.Spec) (inst backend.Instance, err error) {
	if err := b.Validate(spec); err != nil {
		return backend.Instance{}, fmt.Errorf("create vm: %w", err)
	}
	vmID := spec.VMID
	var undo []func() error
	defer func() {
		if err == nil {
			return
		}
		for i := len(undo) - 1; i >= 0; i-- {
			if uerr := undo[i](); uerr != nil {
				b.log.Warn("undo create", "vm_id", vmID, "err", uerr)
			}
		}
	}()
	dir := b.vmDir(vmID)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return backend.Instance{}, fmt.Errorf("create vm %s: %w", vmID, err)
	}
	undo = append(undo, func() error { return os.RemoveAll(dir) })

	var devs []string
	for _, n := range spec.NICs {
		if err := ctx.Err(); err != nil {
			return backend.Instance{}, fmt.Errorf("create vm %s: %w", vmID, err)
		}
		if _, err := b.h.LinkByName(n.HostDevice); err == nil {
			return backend.Instance{}, fmt.Errorf("create vm %s: nic %s: tap %s: %w", vmID, n.ID, n.HostDevice, unix.EEXIST)
		}
		if err := tap.Create(int(b.hostNS.Fd()), n.HostDevice); err != nil {
			return backend.Instance{}, fmt.Errorf("create vm %s: nic %s: %w", vmID, n.ID, err)
		}
		dev := n.HostDevice
		undo = append(undo, func() error { return b.links.DeletePort(dev) })
		l, err := b.h.LinkByName(dev)
		if err == nil {
			err = b.h.LinkSetAlias(l, link.PortAlias(vmID, n.ID))
		}
		if err != nil {
			return backend.Instance{}, fmt.Errorf("create vm %s: mark tap %s: %w", vmID, dev, err)
		}
		devs = append(devs, dev)
	}
	return backend.Instance{
		Backend: Name,
		Details: map[string]string{
			DetailVMDir:       dir,
			DetailHostDevices: strings.Join(devs, ","),
			DetailQMPSocket:   filepath.Join(dir, qmpFile),
			DetailConsoleLog:  filepath.Join(dir, consoleFile),
		},
	}, nil
}

// Accelerator returns the accelerator VMs are started with, probing KVM
// with kernel/initrd the first time when the configuration says auto.
func (b *Backend) Accelerator(ctx context.Context, kernel, initrd string) string {
	b.accelOnce.Lock()
	defer b.accelOnce.Unlock()
	if b.accel != "" {
		return b.accel
	}
	b.accel = AccelTCG
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err == nil {
		f.Close()
		if err := b.probeKVM(ctx, kernel, initrd); err == nil {
			b.accel = AccelKVM
		} else {
			b.log.Info("kvm probe boot failed, using tcg", "err", err)
		}
	}
	b.log.Info("qemu accelerator", "accelerator", b.accel)
	return b.accel
}

// probeKVM boots kernel under KVM and waits for the kernel to reach its
// init; QEMU dies at once when KVM cannot run the guest.
func (b *Backend) probeKVM(ctx context.Context, kernel, initrd string) error {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	args := []string{"-machine", "q35,accel=kvm", "-cpu", "host", "-m", "256", "-nodefaults",
		"-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
		"-kernel", kernel, "-append", "console=ttyS0 panic=-1 loglevel=7"}
	if initrd != "" {
		args = append(args, "-initrd", initrd)
	}
	cmd := exec.CommandContext(ctx, b.bin, args...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if strings.Contains(sc.Text(), "Run /init as init process") || strings.Contains(sc.Text(), "Freeing unused kernel") {
			return nil
		}
	}
	return fmt.Errorf("guest did not start under kvm: %s", strings.TrimSpace(stderr.String()))
}

// kernelArgs renders the guest command line: the spec's arguments without
// Firecracker-only ones (pci=off would hide QEMU's virtio-pci devices),
// console=ttyS0 when no console is given, root= for a root disk, and
// metald.net.
func kernelArgs(spec *backend.Spec) (string, error) {
	var out []string
	hasConsole, hasRoot := false, false
	for _, f := range strings.Fields(spec.KernelArgs) {
		switch {
		case f == "pci=off":
			continue
		case strings.HasPrefix(f, "console="):
			hasConsole = true
		case strings.HasPrefix(f, "root="):
			hasRoot = true
		}
		out = append(out, f)
	}
	if !hasConsole {
		out = append(out, "console=ttyS0")
	}
	if !hasRoot {
		for i, d := range spec.Disks {
			if d.Root && i < 26 {
				mode := "rw"
				if d.ReadOnly {
					mode = "ro"
				}
				out = append(out, "root=/dev/vd"+string(rune('a'+i)), mode)
				break
			}
		}
	}
	arg, err := guestcfg.FromSpec(spec.NICs).KernelArg()
	if err != nil {
		return "", err
	}
	return strings.Join(append(out, arg), " "), nil
}

// commandLine returns QEMU's arguments for spec.
func (b *Backend) commandLine(spec *backend.Spec, dir, accel string) ([]string, error) {
	args, err := kernelArgs(spec)
	if err != nil {
		return nil, err
	}
	if b.test != "" {
		args += " " + guestcfg.ParamTest + "=" + b.test
	}
	mem := spec.MemoryBytes >> 20
	if mem <= 0 {
		mem = 256
	}
	cpus := max(spec.VCPUs, 1)
	cpu := "max"
	if accel == AccelKVM {
		cpu = "host"
	}
	a := []string{
		"-name", "metald-" + spec.VMID,
		"-machine", "q35,accel=" + accel,
		"-cpu", cpu,
		"-smp", strconv.Itoa(int(cpus)),
		"-m", strconv.FormatInt(mem, 10),
		"-nodefaults", "-no-user-config", "-display", "none",
		"-kernel", spec.KernelPath,
		"-append", args,
		"-chardev", "file,id=con0,path=" + filepath.Join(dir, consoleFile),
		"-serial", "chardev:con0",
		"-qmp", "unix:" + filepath.Join(dir, qmpFile) + ",server=on,wait=off",
		"-pidfile", filepath.Join(dir, pidFile),
	}
	if spec.InitrdPath != "" {
		a = append(a, "-initrd", spec.InitrdPath)
	}
	for i, d := range spec.Disks {
		drive := fmt.Sprintf("file=%s,if=none,id=disk%d,format=raw,cache=none,aio=threads", d.Path, i)
		if d.ReadOnly {
			drive += ",readonly=on"
		}
		a = append(a, "-drive", drive, "-device", fmt.Sprintf("virtio-blk-pci,drive=disk%d,serial=%s", i, sanitize(d.ID)))
	}
	for i, n := range spec.NICs {
		a = append(a,
			"-netdev", fmt.Sprintf("tap,id=net%d,ifname=%s,script=no,downscript=no", i, n.HostDevice),
			"-device", fmt.Sprintf("virtio-net-pci,netdev=net%d,mac=%s,romfile=", i, n.MAC))
	}
	return a, nil
}

// sanitize keeps a disk id usable as a QEMU option value and serial.
func sanitize(s string) string {
	out := []byte{}
	for _, c := range []byte(s) {
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' {
			out = append(out, c)
		}
	}
	if len(out) > 20 {
		out = out[:20]
	}
	return string(out)
}

// Boot starts QEMU for spec in its own session in the host namespace and
// returns once QMP reports the VM running. The guest then configures its
// network itself (WaitNetworkUp waits for it).
func (b *Backend) Boot(ctx context.Context, spec *backend.Spec, inst backend.Instance) (backend.Instance, error) {
	if err := b.Validate(spec); err != nil {
		return inst, fmt.Errorf("boot vm: %w", err)
	}
	if guestproc.Alive(inst.PID, inst.StartTime) {
		return inst, nil
	}
	dir := b.vmDir(spec.VMID)
	if _, err := os.Stat(dir); err != nil {
		return inst, fmt.Errorf("boot vm %s: %w", spec.VMID, backend.ErrGone)
	}
	accel := b.Accelerator(ctx, spec.KernelPath, spec.InitrdPath)
	args, err := b.commandLine(spec, dir, accel)
	if err != nil {
		return inst, fmt.Errorf("boot vm %s: %w", spec.VMID, err)
	}
	sock := filepath.Join(dir, qmpFile)
	os.Remove(sock)
	os.Remove(filepath.Join(dir, pidFile))
	logf, err := os.OpenFile(filepath.Join(dir, qemuLogFile), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return inst, fmt.Errorf("boot vm %s: %w", spec.VMID, err)
	}
	defer logf.Close()
	cmd := exec.Command(b.bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = dir
	// Its own session: QEMU outlives metald and is not hit by signals sent
	// to metald's process group.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := ns.Start(int(b.hostNS.Fd()), cmd); err != nil {
		return inst, fmt.Errorf("boot vm %s: start %s: %w", spec.VMID, b.bin, err)
	}
	pid := cmd.Process.Pid
	st, err := guestproc.StartTime(pid)
	guestproc.Reap(cmd.Process)
	if err != nil {
		return inst, fmt.Errorf("boot vm %s: qemu exited at once: %s", spec.VMID, tail(filepath.Join(dir, qemuLogFile)))
	}
	out := inst
	out.Backend = Name
	out.PID, out.StartTime = pid, st
	out.Details = map[string]string{}
	for k, v := range inst.Details {
		out.Details[k] = v
	}
	out.Details[DetailAccelerator] = accel
	out.Details[DetailQMPSocket] = sock
	out.Details[DetailConsoleLog] = filepath.Join(dir, consoleFile)
	out.Details[DetailVMDir] = dir

	deadline := time.Now().Add(b.startTO)
	for {
		sctx, cancel := context.WithTimeout(ctx, time.Second)
		status, err := qmpStatus(sctx, sock)
		cancel()
		if err == nil && status == "running" {
			return out, nil
		}
		if !guestproc.Alive(pid, st) {
			return inst, fmt.Errorf("boot vm %s: qemu exited: %s", spec.VMID, tail(filepath.Join(dir, qemuLogFile)))
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			b.kill(context.Background(), pid, st)
			return inst, fmt.Errorf("boot vm %s: qmp not ready after %v (status %q): %v", spec.VMID, b.startTO, status, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// tail returns the last lines of a log file for error messages.
func tail(path string) string {
	b, _ := os.ReadFile(path)
	if len(b) > 800 {
		b = b[len(b)-800:]
	}
	return strings.TrimSpace(string(b))
}

// WaitNetworkUp waits until the guest's metald-init reports on the serial
// console that every NIC is configured.
func (b *Backend) WaitNetworkUp(ctx context.Context, inst backend.Instance) error {
	path := inst.Details[DetailConsoleLog]
	if path == "" {
		return errors.New("wait for guest network: instance has no console log")
	}
	for {
		if data, err := os.ReadFile(path); err == nil && bytes.Contains(data, []byte("metald-init: network up")) {
			return nil
		}
		if !guestproc.Alive(inst.PID, inst.StartTime) {
			return fmt.Errorf("wait for guest network: %w", backend.ErrNotRunning)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for guest network: %w", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// qmp runs one QMP command on a live VM.
func (b *Backend) qmp(ctx context.Context, inst backend.Instance, cmd string, args any) error {
	if !guestproc.Alive(inst.PID, inst.StartTime) {
		return fmt.Errorf("%s: %w", cmd, backend.ErrNotRunning)
	}
	_, err := qmpDo(ctx, inst.Details[DetailQMPSocket], cmd, args)
	return err
}

// Pause stops the guest's vCPUs (QMP stop).
func (b *Backend) Pause(ctx context.Context, inst backend.Instance) error {
	if err := b.qmp(ctx, inst, "stop", nil); err != nil {
		return fmt.Errorf("pause vm: %w", err)
	}
	return nil
}

// Resume continues a paused guest (QMP cont).
func (b *Backend) Resume(ctx context.Context, inst backend.Instance) error {
	if err := b.qmp(ctx, inst, "cont", nil); err != nil {
		return fmt.Errorf("resume vm: %w", err)
	}
	return nil
}

// Reboot resets the guest (QMP system_reset); the QEMU process stays.
func (b *Backend) Reboot(ctx context.Context, spec *backend.Spec, inst backend.Instance) (backend.Instance, error) {
	if err := b.qmp(ctx, inst, "system_reset", nil); err != nil {
		return inst, fmt.Errorf("reboot vm: %w", err)
	}
	// A paused VM stays paused across a reset; a reboot means running.
	if st, err := qmpStatus(ctx, inst.Details[DetailQMPSocket]); err == nil && st == "paused" {
		b.qmp(ctx, inst, "cont", nil)
	}
	return inst, nil
}

// Shutdown presses the ACPI power button (QMP system_powerdown) and waits
// up to timeout for QEMU to exit; then it asks QEMU to quit and finally
// kills it. The returned Instance has no process.
func (b *Backend) Shutdown(ctx context.Context, inst backend.Instance, timeout time.Duration) (backend.Instance, error) {
	out := inst
	out.PID, out.StartTime = 0, 0
	p, err := guestproc.Open(inst.PID, inst.StartTime)
	if errors.Is(err, guestproc.ErrGone) {
		return out, nil
	}
	if err != nil {
		return inst, fmt.Errorf("shutdown vm: %w", err)
	}
	defer p.Close()
	sock := inst.Details[DetailQMPSocket]
	// A paused guest cannot see the button.
	if st, err := qmpStatus(ctx, sock); err == nil && st == "paused" {
		qmpDo(ctx, sock, "cont", nil)
	}
	if _, err := qmpDo(ctx, sock, "system_powerdown", nil); err != nil {
		b.log.Warn("system_powerdown", "pid", inst.PID, "err", err)
	} else if gone, err := p.Wait(ctx, timeout); err != nil {
		return inst, fmt.Errorf("shutdown vm: %w", err)
	} else if gone {
		return out, nil
	}
	qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	qmpDo(qctx, sock, "quit", nil)
	cancel()
	if gone, _ := p.Wait(ctx, 2*time.Second); gone {
		return out, nil
	}
	if err := b.kill(ctx, inst.PID, inst.StartTime); err != nil {
		return inst, fmt.Errorf("shutdown vm: %w", err)
	}
	return out, nil
}

// kill SIGKILLs the process and waits until it is gone.
func (b *Backend) kill(ctx context.Context, pid int, start uint64) error {
	return guestproc.Kill(ctx, pid, start, 10*time.Second)
}

// Check reports the VM directory and QMP socket as the sandbox and the
// QEMU process (PID with the recorded start time) as the guest; Paused
// comes from QMP query-status.
func (b *Backend) Check(ctx context.Context, inst backend.Instance) backend.Health {
	var h backend.Health
	var reasons []string
	dir := inst.Details[DetailVMDir]
	if dir == "" {
		reasons = append(reasons, "instance has no vm directory")
	} else if _, err := os.Stat(dir); err != nil {
		reasons = append(reasons, fmt.Sprintf("vm directory: %v", err))
	} else {
		h.SandboxOK = true
	}
	for _, d := range splitList(inst.Details[DetailHostDevices]) {
		if _, err := b.h.LinkByName(d); err != nil {
			h.SandboxOK = false
			reasons = append(reasons, fmt.Sprintf("tap %s: %v", d, err))
		}
	}
	switch {
	case inst.PID == 0:
		reasons = append(reasons, "guest not started")
	case !guestproc.Alive(inst.PID, inst.StartTime):
		reasons = append(reasons, fmt.Sprintf("qemu process %d is gone", inst.PID))
	default:
		h.Running = true
		qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		st, err := qmpStatus(qctx, inst.Details[DetailQMPSocket])
		cancel()
		if err != nil {
			h.SandboxOK = false
			reasons = append(reasons, fmt.Sprintf("qmp unreachable: %v", err))
		} else {
			h.Paused = st == "paused"
		}
	}
	if !h.SandboxOK || !h.Running {
		h.Reason = strings.Join(reasons, "; ")
	}
	return h
}

func splitList(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, ",")
}

// Destroy kills QEMU (the recorded process, or the one named by the VM's
// pid file after a crash), deletes the VM's taps (by name, or by owner
// alias when inst is empty) and removes the VM directory with its socket
// and logs. It is idempotent.
func (b *Backend) Destroy(ctx context.Context, vmID string, inst backend.Instance) error {
	if err := validVMID(vmID); err != nil {
		return fmt.Errorf("destroy vm: %w", err)
	}
	dir := b.vmDir(vmID)
	var errs []error
	if err := b.kill(ctx, inst.PID, inst.StartTime); err != nil {
		errs = append(errs, err)
	}
	if pid, st, ok := pidFromFile(dir); ok {
		if err := b.kill(ctx, pid, st); err != nil {
			errs = append(errs, err)
		}
	}
	if devs := splitList(inst.Details[DetailHostDevices]); len(devs) > 0 {
		for _, d := range devs {
			if err := b.links.DeletePort(d); err != nil {
				errs = append(errs, err)
			}
		}
	} else if err := b.deleteOwnedTaps(vmID); err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(dir); err != nil {
		errs = append(errs, fmt.Errorf("remove %s: %w", dir, err))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("destroy vm %s: %w", vmID, err)
	}
	return nil
}

// pidFromFile reads the VM's QEMU pid file and accepts the PID only if that
// process is a QEMU whose command line names the VM directory.
func pidFromFile(dir string) (int, uint64, bool) {
	b, err := os.ReadFile(filepath.Join(dir, pidFile))
	if err != nil {
		return 0, 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, 0, false
	}
	cl, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil || !bytes.Contains(cl, []byte(filepath.Join(dir, qmpFile))) {
		return 0, 0, false
	}
	st, err := guestproc.StartTime(pid)
	if err != nil {
		return 0, 0, false
	}
	return pid, st, true
}

// ownedTaps lists the host taps whose alias is a port alias.
func (b *Backend) ownedTaps() (map[string]string, error) {
	links, err := b.h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	out := map[string]string{}
	for _, l := range links {
		if l.Type() != "tuntap" {
			continue
		}
		if vmID, _, ok := link.ParsePortAlias(l.Attrs().Alias); ok {
			out[l.Attrs().Name] = vmID
		}
	}
	return out, nil
}

func (b *Backend) deleteOwnedTaps(vmID string) error {
	taps, err := b.ownedTaps()
	if err != nil {
		return err
	}
	var errs []error
	for name, id := range taps {
		if id == vmID {
			errs = append(errs, b.links.DeletePort(name))
		}
	}
	return errors.Join(errs...)
}

// Owned lists the VM ids that have a directory under the data directory or
// a tap on this host.
func (b *Backend) Owned(ctx context.Context) ([]string, error) {
	set := map[string]bool{}
	ents, err := os.ReadDir(b.dataDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("list owned vms: %w", err)
	}
	for _, e := range ents {
		if e.IsDir() && validVMID(e.Name()) == nil {
			set[e.Name()] = true
		}
	}
	taps, err := b.ownedTaps()
	if err != nil {
		return nil, fmt.Errorf("list owned vms: %w", err)
	}
	for _, id := range taps {
		set[id] = true
	}
	ids := make([]string, 0, len(set))
	for id := range set {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids, nil
}
