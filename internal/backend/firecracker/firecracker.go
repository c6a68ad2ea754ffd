// Package firecracker owns the Firecracker backend: a VM is one firecracker
// process (optionally under its jailer) configured and driven through its
// HTTP API on a unix socket, with one persistent tap per NIC in the host
// namespace.
//
// Boot configures the microVM in the order Firecracker requires before
// InstanceStart: PUT /machine-config, /boot-source (the guest network
// configuration rides on the kernel command line as metald.net, which
// metald-init reads), /drives/{id}, /network-interfaces/{id}, /mmds/config
// and /mmds (the same configuration, {"metald":{"net":...}}, for guest
// agents that prefer MMDS), then PUT /actions InstanceStart. Pause and
// Resume are PATCH /vm; Shutdown is PUT /actions SendCtrlAltDel (the guest
// reboots with reboot=k, which ends the VMM), then SIGKILL after the
// timeout. Firecracker has no reset: Reboot is Shutdown followed by Boot.
//
// What has been run: the request sequence and bodies against a test server
// that checks them against Firecracker's documented API shapes. A real
// Firecracker has NOT been run here (none is installable on these
// machines); TestRealFirecracker runs when METALD_FIRECRACKER_BIN is set
// and KVM works.
package firecracker

import (
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
const Name = "firecracker"

// Details keys in Instance.Details.
const (
	DetailAPISocket   = "api_socket"
	DetailConsoleLog  = "console_log"
	DetailVMDir       = "vm_dir"
	DetailHostDevices = "host_devices"
	DetailJailed      = "jailed"
)

// Jailer configures Firecracker's jailer.
type Jailer struct {
	// Binary is the jailer executable.
	Binary string
	// UID and GID the VMM drops to.
	UID, GID int
	// ChrootBaseDir is the jailer's --chroot-base-dir; the VM's root is
	// <ChrootBaseDir>/firecracker/<vm id>/root.
	ChrootBaseDir string
}

// Config configures a Backend.
type Config struct {
	// Binary is the firecracker executable (required).
	Binary string
	// Jailer, when set, runs firecracker under the jailer.
	Jailer *Jailer
	// DataDir holds one directory per VM; default
	// "/var/lib/metald/firecracker".
	DataDir string
	// HostNS is the host network namespace (required): taps are created
	// and the VMM runs there.
	HostNS *os.File
	// Links manages host links; when nil New builds one on HostNS.
	Links *link.Manager
	// StartTimeout bounds the wait for the API socket; default 10s.
	StartTimeout time.Duration
	Logger       *slog.Logger
}

// Backend is the Firecracker backend.
type Backend struct {
	cfg    Config
	hostNS *os.File
	links  *link.Manager
	host   *link.Host // owns hostNS, h and (when it built it) links
	h      *netlink.Handle
	log    *slog.Logger
}

var _ backend.Backend = (*Backend)(nil)

// New returns a Backend for cfg.
func New(cfg Config) (*Backend, error) {
	if cfg.Binary == "" {
		return nil, errors.New("create firecracker backend: no firecracker binary configured")
	}
	if cfg.HostNS == nil {
		return nil, errors.New("create firecracker backend: need HostNS")
	}
	if cfg.DataDir == "" {
		cfg.DataDir = "/var/lib/metald/firecracker"
	}
	if cfg.StartTimeout <= 0 {
		cfg.StartTimeout = 10 * time.Second
	}
	b := &Backend{cfg: cfg, links: cfg.Links, log: cfg.Logger}
	if b.log == nil {
		b.log = slog.Default()
	}
	host, err := link.OpenHost(cfg.HostNS, cfg.Links)
	if err != nil {
		return nil, fmt.Errorf("create firecracker backend: %w", err)
	}
	b.host, b.hostNS, b.h, b.links = host, host.NS, host.H, host.Links
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		b.Close()
		return nil, fmt.Errorf("create firecracker backend: %w", err)
	}
	return b, nil
}

// Close releases the backend's handles; VMs keep running.
func (b *Backend) Close() {
	b.host.Close()
}

// Name returns "firecracker".
func (b *Backend) Name() string { return Name }

// Available reports whether the configured binary exists and /dev/kvm
// can be opened (the backend choice "auto" uses it).
func Available(bin string) error {
	if bin == "" {
		return errors.New("firecracker: no binary configured")
	}
	if _, err := exec.LookPath(bin); err != nil {
		return fmt.Errorf("firecracker: %w", err)
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("firecracker: %w", err)
	}
	return f.Close()
}

func (b *Backend) vmDir(vmID string) string { return filepath.Join(b.cfg.DataDir, vmID) }

func validVMID(id string) error {
	if id == "" || id == "." || id == ".." || len(id) > 64 || strings.ContainsAny(id, "/\x00") {
		return fmt.Errorf("invalid vm id %q", id)
	}
	return nil
}

// Validate checks that spec can run under Firecracker: the kernel, initrd
// and disk paths exist (errors name the field) and NICs are well formed.
func (b *Backend) Validate(spec *backend.Spec) error {
	if err := validVMID(spec.VMID); err != nil {
		return err
	}
	if spec.KernelPath == "" {
		return errors.New("boot.kernel_path: required by the firecracker backend")
	}
	if _, err := os.Stat(spec.KernelPath); err != nil {
		return fmt.Errorf("boot.kernel_path: %w", err)
	}
	if spec.InitrdPath != "" {
		if _, err := os.Stat(spec.InitrdPath); err != nil {
			return fmt.Errorf("boot.initrd_path: %w", err)
		}
	}
	for _, f := range strings.Fields(spec.KernelArgs) {
		if strings.HasPrefix(f, "metald.") {
			return fmt.Errorf("boot.kernel_args: %q is reserved for metald", f)
		}
	}
	roots := 0
	for i, d := range spec.Disks {
		if _, err := os.Stat(d.Path); err != nil {
			return fmt.Errorf("storage[%d].path (%s): %w", i, d.ID, err)
		}
		if d.Root {
			roots++
		}
	}
	if roots > 1 {
		return errors.New("storage: more than one root device")
	}
	for _, n := range spec.NICs {
		if len(n.MAC) != 6 || n.HostDevice == "" || len(n.HostDevice) >= unix.IFNAMSIZ {
			return fmt.Errorf("nic %s: needs a 6-byte mac and a host device name", n.ID)
		}
	}
	if _, err := guestcfg.FromSpec(spec.NICs).Encode(); err != nil {
		return fmt.Errorf("network_interfaces: %w", err)
	}
	return nil
}

// Create validates spec and makes the VM directory and one tap per NIC
// (down, detached, alias link.PortAlias), like the qemu backend.
func (b *Backend) Create(ctx context.Context, spec *backend.Spec) (inst backend.Instance, err error) {
	if err := b.Validate(spec); err != nil {
		return backend.Instance{}, fmt.Errorf("create vm: %w", err)
	}
	dir := b.vmDir(spec.VMID)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return backend.Instance{}, fmt.Errorf("create vm %s: %w", spec.VMID, err)
	}
	var devs []string
	defer func() {
		if err != nil {
			for _, d := range devs {
				b.links.DeletePort(d)
			}
			os.RemoveAll(dir)
		}
	}()
	for _, n := range spec.NICs {
		if _, err := b.h.LinkByName(n.HostDevice); err == nil {
			return backend.Instance{}, fmt.Errorf("create vm %s: tap %s: %w", spec.VMID, n.HostDevice, unix.EEXIST)
		}
		if err := tap.Create(int(b.hostNS.Fd()), n.HostDevice); err != nil {
			return backend.Instance{}, fmt.Errorf("create vm %s: %w", spec.VMID, err)
		}
		devs = append(devs, n.HostDevice)
		l, err := b.h.LinkByName(n.HostDevice)
		if err == nil {
			err = b.h.LinkSetAlias(l, link.PortAlias(spec.VMID, n.ID))
		}
		if err != nil {
			return backend.Instance{}, fmt.Errorf("create vm %s: mark tap %s: %w", spec.VMID, n.HostDevice, err)
		}
	}
	return backend.Instance{Backend: Name, Details: map[string]string{
		DetailVMDir:       dir,
		DetailHostDevices: strings.Join(devs, ","),
	}}, nil
}

// bootArgs renders the guest command line: the spec's arguments (defaults
// as Firecracker's getting-started guide when empty) plus metald.net.
func bootArgs(spec *backend.Spec) (string, error) {
	args := spec.KernelArgs
	if strings.TrimSpace(args) == "" {
		args = "console=ttyS0 reboot=k panic=1 pci=off"
	}
	net, err := guestcfg.FromSpec(spec.NICs).KernelArg()
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(args) + " " + net, nil
}

// configure sends the whole pre-boot configuration and InstanceStart.
// pathOf maps a host path to the path the VMM sees (inside the jail).
func configure(ctx context.Context, c *client, spec *backend.Spec, pathOf func(string) string) error {
	mem := spec.MemoryBytes >> 20
	if mem <= 0 {
		mem = 128
	}
	if err := c.put(ctx, "/machine-config", machineConfig{VCPUCount: max(spec.VCPUs, 1), MemSizeMiB: mem}); err != nil {
		return err
	}
	args, err := bootArgs(spec)
	if err != nil {
		return err
	}
	bs := bootSource{KernelImagePath: pathOf(spec.KernelPath), BootArgs: args}
	if spec.InitrdPath != "" {
		bs.InitrdPath = pathOf(spec.InitrdPath)
	}
	if err := c.put(ctx, "/boot-source", bs); err != nil {
		return err
	}
	for _, d := range spec.Disks {
		if err := c.put(ctx, "/drives/"+d.ID, drive{DriveID: d.ID, PathOnHost: pathOf(d.Path),
			IsRootDevice: d.Root, IsReadOnly: d.ReadOnly}); err != nil {
			return err
		}
	}
	var ifaces []string
	for _, n := range spec.NICs {
		if err := c.put(ctx, "/network-interfaces/"+n.ID, networkInterface{IfaceID: n.ID,
			HostDevName: n.HostDevice, GuestMAC: n.MAC.String()}); err != nil {
			return err
		}
		ifaces = append(ifaces, n.ID)
	}
	if len(ifaces) > 0 {
		if err := c.put(ctx, "/mmds/config", mmdsConfig{Version: "V2", NetworkInterfaces: ifaces}); err != nil {
			return err
		}
		data := map[string]any{"metald": map[string]any{"net": guestcfg.FromSpec(spec.NICs)}}
		if err := c.put(ctx, "/mmds", data); err != nil {
			return err
		}
	}
	return c.put(ctx, "/actions", action{ActionType: actionInstanceStart})
}

// jailRoot is the jailer's chroot of vmID.
func (b *Backend) jailRoot(vmID string) string {
	return filepath.Join(b.cfg.Jailer.ChrootBaseDir, filepath.Base(b.cfg.Binary), vmID, "root")
}

// command returns the VMM command line and its API socket path on the host.
func (b *Backend) command(vmID string) (*exec.Cmd, string) {
	if j := b.cfg.Jailer; j != nil {
		cmd := exec.Command(j.Binary, "--id", vmID, "--exec-file", b.cfg.Binary,
			"--uid", strconv.Itoa(j.UID), "--gid", strconv.Itoa(j.GID),
			"--chroot-base-dir", j.ChrootBaseDir, "--",
			"--api-sock", "/run/firecracker.socket")
		return cmd, filepath.Join(b.jailRoot(vmID), "run", "firecracker.socket")
	}
	sock := filepath.Join(b.vmDir(vmID), "firecracker.sock")
	return exec.Command(b.cfg.Binary, "--api-sock", sock, "--id", vmID), sock
}

// jailFiles hard-links (or copies) the VM's files into the jail and
// returns the mapping to in-jail paths.
func (b *Backend) jailFiles(spec *backend.Spec) (func(string) string, error) {
	if b.cfg.Jailer == nil {
		return func(p string) string { return p }, nil
	}
	root := b.jailRoot(spec.VMID)
	if err := os.MkdirAll(filepath.Join(root, "run"), 0o755); err != nil {
		return nil, err
	}
	m := map[string]string{}
	files := []string{spec.KernelPath, spec.InitrdPath}
	for _, d := range spec.Disks {
		files = append(files, d.Path)
	}
	for i, f := range files {
		if f == "" {
			continue
		}
		in := fmt.Sprintf("/f%d-%s", i, filepath.Base(f))
		dst := filepath.Join(root, in)
		os.Remove(dst)
		if err := os.Link(f, dst); err != nil {
			return nil, fmt.Errorf("link %s into jail: %w", f, err)
		}
		os.Chown(dst, b.cfg.Jailer.UID, b.cfg.Jailer.GID)
		m[f] = in
	}
	return func(p string) string { return m[p] }, nil
}

// Boot starts the VMM in the host namespace, configures the microVM and
// starts it.
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
	pathOf, err := b.jailFiles(spec)
	if err != nil {
		return inst, fmt.Errorf("boot vm %s: %w", spec.VMID, err)
	}
	cmd, sock := b.command(spec.VMID)
	os.Remove(sock)
	console := filepath.Join(dir, "console.log")
	logf, err := os.OpenFile(console, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return inst, fmt.Errorf("boot vm %s: %w", spec.VMID, err)
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := ns.Start(int(b.hostNS.Fd()), cmd); err != nil {
		return inst, fmt.Errorf("boot vm %s: start %s: %w", spec.VMID, cmd.Path, err)
	}
	pid := cmd.Process.Pid
	st, _ := guestproc.StartTime(pid)
	go cmd.Wait()
	fail := func(err error) (backend.Instance, error) {
		b.kill(context.Background(), pid, st)
		return inst, fmt.Errorf("boot vm %s: %w", spec.VMID, err)
	}
	c := newClient(sock)
	deadline := time.Now().Add(b.cfg.StartTimeout)
	for {
		if _, err := c.info(ctx); err == nil {
			break
		} else if time.Now().After(deadline) || !guestproc.Alive(pid, st) {
			return fail(fmt.Errorf("api socket not ready: %w", err))
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := configure(ctx, c, spec, pathOf); err != nil {
		return fail(err)
	}
	out := inst
	out.Backend, out.PID, out.StartTime = Name, pid, st
	out.Details = map[string]string{}
	for k, v := range inst.Details {
		out.Details[k] = v
	}
	out.Details[DetailAPISocket] = sock
	out.Details[DetailConsoleLog] = console
	out.Details[DetailVMDir] = dir
	out.Details[DetailJailed] = strconv.FormatBool(b.cfg.Jailer != nil)
	return out, nil
}

func (b *Backend) api(inst backend.Instance) (*client, error) {
	if !guestproc.Alive(inst.PID, inst.StartTime) {
		return nil, backend.ErrNotRunning
	}
	return newClient(inst.Details[DetailAPISocket]), nil
}

// Pause is PATCH /vm {"state":"Paused"}.
func (b *Backend) Pause(ctx context.Context, inst backend.Instance) error {
	c, err := b.api(inst)
	if err == nil {
		err = c.do(ctx, "PATCH", "/vm", vmState{State: statePaused}, nil)
	}
	if err != nil {
		return fmt.Errorf("pause vm: %w", err)
	}
	return nil
}

// Resume is PATCH /vm {"state":"Resumed"}.
func (b *Backend) Resume(ctx context.Context, inst backend.Instance) error {
	c, err := b.api(inst)
	if err == nil {
		err = c.do(ctx, "PATCH", "/vm", vmState{State: stateResumed}, nil)
	}
	if err != nil {
		return fmt.Errorf("resume vm: %w", err)
	}
	return nil
}

// Shutdown sends Ctrl-Alt-Del, waits up to timeout for the VMM to exit,
// then kills it.
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
	c := newClient(inst.Details[DetailAPISocket])
	if ii, err := c.info(ctx); err == nil && ii.State == "Paused" {
		c.do(ctx, "PATCH", "/vm", vmState{State: stateResumed}, nil)
	}
	if err := c.put(ctx, "/actions", action{ActionType: actionSendCtrlAltDel}); err != nil {
		b.log.Warn("SendCtrlAltDel", "pid", inst.PID, "err", err)
	} else if gone, _ := p.Wait(ctx, timeout); gone {
		return out, nil
	}
	if err := b.kill(ctx, inst.PID, inst.StartTime); err != nil {
		return inst, fmt.Errorf("shutdown vm: %w", err)
	}
	return out, nil
}

// Reboot is Shutdown then Boot: Firecracker cannot reset a guest.
func (b *Backend) Reboot(ctx context.Context, spec *backend.Spec, inst backend.Instance) (backend.Instance, error) {
	inst, err := b.Shutdown(ctx, inst, 10*time.Second)
	if err != nil {
		return inst, fmt.Errorf("reboot vm: %w", err)
	}
	return b.Boot(ctx, spec, inst)
}

// Check: the VM directory and API socket are the sandbox, the VMM process
// the guest; Paused comes from GET /.
func (b *Backend) Check(ctx context.Context, inst backend.Instance) backend.Health {
	var h backend.Health
	var reasons []string
	if dir := inst.Details[DetailVMDir]; dir == "" {
		reasons = append(reasons, "instance has no vm directory")
	} else if _, err := os.Stat(dir); err != nil {
		reasons = append(reasons, err.Error())
	} else {
		h.SandboxOK = true
	}
	switch {
	case inst.PID == 0:
		reasons = append(reasons, "guest not started")
	case !guestproc.Alive(inst.PID, inst.StartTime):
		reasons = append(reasons, fmt.Sprintf("firecracker process %d is gone", inst.PID))
	default:
		h.Running = true
		ii, err := newClient(inst.Details[DetailAPISocket]).info(ctx)
		if err != nil {
			h.SandboxOK = false
			reasons = append(reasons, fmt.Sprintf("api unreachable: %v", err))
		}
		h.Paused = ii.State == "Paused"
	}
	if !h.SandboxOK || !h.Running {
		h.Reason = strings.Join(reasons, "; ")
	}
	return h
}

func (b *Backend) kill(ctx context.Context, pid int, start uint64) error {
	return guestproc.Kill(ctx, pid, start, 10*time.Second)
}

// Destroy kills the VMM, deletes the taps (by name, or by owner alias
// when inst is empty), the VM directory and the jail. Idempotent.
func (b *Backend) Destroy(ctx context.Context, vmID string, inst backend.Instance) error {
	if err := validVMID(vmID); err != nil {
		return fmt.Errorf("destroy vm: %w", err)
	}
	var errs []error
	if err := b.kill(ctx, inst.PID, inst.StartTime); err != nil {
		errs = append(errs, err)
	}
	if devs := inst.Details[DetailHostDevices]; devs != "" {
		for _, d := range strings.Split(devs, ",") {
			errs = append(errs, b.links.DeletePort(d))
		}
	} else if taps, err := b.ownedTaps(); err != nil {
		errs = append(errs, err)
	} else {
		for name, id := range taps {
			if id == vmID {
				errs = append(errs, b.links.DeletePort(name))
			}
		}
	}
	errs = append(errs, os.RemoveAll(b.vmDir(vmID)))
	if b.cfg.Jailer != nil {
		errs = append(errs, os.RemoveAll(filepath.Dir(b.jailRoot(vmID))))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("destroy vm %s: %w", vmID, err)
	}
	return nil
}

func (b *Backend) ownedTaps() (map[string]string, error) {
	links, err := b.h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	out := map[string]string{}
	for _, l := range links {
		if id, _, ok := link.ParsePortAlias(l.Attrs().Alias); ok && l.Type() == "tuntap" {
			out[l.Attrs().Name] = id
		}
	}
	return out, nil
}

// Owned lists VM ids with a directory or a tap on this host.
func (b *Backend) Owned(ctx context.Context) ([]string, error) {
	set := map[string]bool{}
	ents, err := os.ReadDir(b.cfg.DataDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("list owned vms: %w", err)
	}
	for _, e := range ents {
		if e.IsDir() {
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
