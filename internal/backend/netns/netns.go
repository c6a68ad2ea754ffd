// Package netns owns the netns sandbox backend: a VM is a named network
// namespace (metald-<vm_id>) holding one small guest process, wired to the
// host by one veth pair per NIC.
//
// The sandbox lets metald's whole network path (bridges, filters, IPAM,
// DAD, routing) run and be tested for real without a hypervisor. The guest
// side of each NIC is configured by the backend from the spec, the way a
// guest agent would: metald sets the static address and the default route
// itself.
//
// Host links are created and deleted through link.Manager; nothing in this
// package acts in the calling thread's namespace.
package netns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/metald/metald/internal/backend"
	"github.com/metald/metald/internal/backend/guestproc"
	"github.com/metald/metald/internal/network/link"
	"github.com/metald/metald/internal/network/ns"
)

// Name is the backend's type, as in Instance.Backend.
const Name = "netns"

// NamePrefix starts the name of every VM network namespace.
const NamePrefix = "metald-"

// Details keys in Instance.Details.
const (
	DetailNetnsPath   = "netns_path"
	DetailHostDevices = "host_devices"
	DetailResolvConf  = "resolv_conf"
)

// Config configures a Backend.
type Config struct {
	// NetnsDir holds the named namespaces; default "/run/netns" (where
	// `ip netns` looks).
	NetnsDir string
	// EtcNetnsDir holds per-namespace files that `ip netns exec` binds
	// over /etc; default "/etc/netns".
	EtcNetnsDir string
	// GuestCommand is the guest process; default ["sleep", "infinity"].
	GuestCommand []string
	// HostNS is the host network namespace. Used only to build Links
	// when Links is nil.
	HostNS *os.File
	// Links manages host links. When nil, New builds one on HostNS and
	// Close releases it.
	Links *link.Manager
	// StopTimeout is how long Reboot lets the guest stop gracefully;
	// default 10s.
	StopTimeout time.Duration
	// Logger receives undo failures and other best-effort problems;
	// default slog.Default().
	Logger *slog.Logger
	// Owner is this metald's instance id (its database's). Create marks
	// each namespace with it (OwnerAlias, the alias of the namespace's
	// loopback) and Owned lists only namespaces with the mark, so a
	// metald with another database, sharing the namespace directory,
	// leaves them alone.
	Owner string
}

// OwnerAlias is the link alias of the loopback device of a namespace
// that the metald with instance id owner created.
func OwnerAlias(owner string) string { return "metald-owner:" + owner }

// Backend is the netns sandbox backend. It is safe for concurrent use on
// different VMs.
type Backend struct {
	netnsDir    string
	etcDir      string
	command     []string
	links       *link.Manager
	ownLinks    bool
	stopTimeout time.Duration
	log         *slog.Logger
	mark        string
}

var _ backend.Backend = (*Backend)(nil)

// New returns a Backend for cfg.
func New(cfg Config) (*Backend, error) {
	b := &Backend{
		netnsDir:    cfg.NetnsDir,
		etcDir:      cfg.EtcNetnsDir,
		command:     slices.Clone(cfg.GuestCommand),
		links:       cfg.Links,
		stopTimeout: cfg.StopTimeout,
		log:         cfg.Logger,
		mark:        OwnerAlias(cfg.Owner),
	}
	if b.netnsDir == "" {
		b.netnsDir = "/run/netns"
	}
	if b.etcDir == "" {
		b.etcDir = "/etc/netns"
	}
	if len(b.command) == 0 {
		b.command = []string{"sleep", "infinity"}
	}
	if b.stopTimeout <= 0 {
		b.stopTimeout = 10 * time.Second
	}
	if b.log == nil {
		b.log = slog.Default()
	}
	if b.links == nil {
		if cfg.HostNS == nil {
			return nil, errors.New("create netns backend: need Links or HostNS")
		}
		m, err := link.New(cfg.HostNS)
		if err != nil {
			return nil, fmt.Errorf("create netns backend: %w", err)
		}
		b.links, b.ownLinks = m, true
	}
	return b, nil
}

// Close releases the link manager New built, if any.
func (b *Backend) Close() {
	if b.ownLinks {
		b.links.Close()
	}
}

// Name returns "netns".
func (b *Backend) Name() string { return Name }

// NetnsName is the network namespace name of VM vmID.
func NetnsName(vmID string) string { return NamePrefix + vmID }

func (b *Backend) netnsPath(vmID string) string { return filepath.Join(b.netnsDir, NetnsName(vmID)) }
func (b *Backend) etcPath(vmID string) string   { return filepath.Join(b.etcDir, NetnsName(vmID)) }

// validVMID rejects ids that would escape the namespace directories.
func validVMID(id string) error {
	if id == "" || id == "." || id == ".." || strings.ContainsAny(id, "/\x00") || len(NetnsName(id)) > 255 {
		return fmt.Errorf("invalid vm id %q", id)
	}
	return nil
}

// validIfName applies the kernel's rules for interface names.
func validIfName(n string) bool {
	return n != "" && len(n) < unix.IFNAMSIZ && n != "." && n != ".." &&
		!strings.ContainsAny(n, "/: \t\n\v\f\r\x00")
}

func validateSpec(spec *backend.Spec) error {
	if err := validVMID(spec.VMID); err != nil {
		return err
	}
	ids := map[string]bool{"lo": true}
	hosts := map[string]bool{}
	for _, nic := range spec.NICs {
		switch {
		case !validIfName(nic.ID):
			return fmt.Errorf("invalid nic id %q", nic.ID)
		case !validIfName(nic.HostDevice):
			return fmt.Errorf("nic %s: invalid host device %q", nic.ID, nic.HostDevice)
		case ids[nic.ID]:
			return fmt.Errorf("duplicate nic id %q", nic.ID)
		case hosts[nic.HostDevice]:
			return fmt.Errorf("duplicate host device %q", nic.HostDevice)
		case nic.MAC != nil && len(nic.MAC) != 6:
			return fmt.Errorf("nic %s: mac %s is not 6 bytes", nic.ID, nic.MAC)
		case nic.Address.IsValid() && (!nic.Address.Addr().Is6() || nic.Address.Addr().Is4In6()):
			return fmt.Errorf("nic %s: address %s is not IPv6", nic.ID, nic.Address)
		case nic.Gateway.IsValid() && !nic.Gateway.Is6():
			return fmt.Errorf("nic %s: gateway %s is not IPv6", nic.ID, nic.Gateway)
		}
		ids[nic.ID] = true
		hosts[nic.HostDevice] = true
	}
	return nil
}

// Create builds the VM's named namespace with lo up, one veth pair per NIC
// (host end nic.HostDevice in the host namespace, down, no master, alias
// link.PortAlias; guest end nic.ID with nic.MAC in the VM namespace, down)
// and the VM's resolv.conf. An existing namespace of that name is an error
// wrapping os.ErrExist and is left alone. On any error Create removes what
// it built.
func (b *Backend) Create(ctx context.Context, spec *backend.Spec) (inst backend.Instance, err error) {
	if err := validateSpec(spec); err != nil {
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

	path := b.netnsPath(vmID)
	f, err := ns.CreateNamed(path)
	if err != nil {
		return backend.Instance{}, fmt.Errorf("create vm %s: %w", vmID, err)
	}
	defer f.Close()
	undo = append(undo, func() error { return ns.RemoveNamed(path) })

	// The owner mark first: from here on the namespace is recognisably
	// this metald's (a crash leaves an orphan that Owned finds).
	if err := inNetns(int(f.Fd()), func(h *netlink.Handle) error {
		lo, err := h.LinkByName("lo")
		if err != nil {
			return err
		}
		if err := h.LinkSetAlias(lo, b.mark); err != nil {
			return err
		}
		return h.LinkSetUp(lo)
	}); err != nil {
		return backend.Instance{}, fmt.Errorf("set lo up in %s: %w", NetnsName(vmID), err)
	}

	var hostDevs []string
	for _, nic := range spec.NICs {
		if err := ctx.Err(); err != nil {
			return backend.Instance{}, fmt.Errorf("create vm %s: %w", vmID, err)
		}
		err := b.links.AddVethPort(link.VethPort{
			Name:     nic.HostDevice,
			Alias:    link.PortAlias(vmID, nic.ID),
			PeerName: nic.ID,
			PeerMAC:  nic.MAC,
			PeerNSFd: int(f.Fd()),
		})
		if err != nil {
			return backend.Instance{}, fmt.Errorf("create vm %s: nic %s: %w", vmID, nic.ID, err)
		}
		dev := nic.HostDevice
		undo = append(undo, func() error { return b.links.DeletePort(dev) })
		hostDevs = append(hostDevs, dev)
	}

	etc := b.etcPath(vmID)
	if err := os.MkdirAll(etc, 0o755); err != nil {
		return backend.Instance{}, fmt.Errorf("create vm %s: %w", vmID, err)
	}
	undo = append(undo, func() error { return os.RemoveAll(etc) })
	if err := b.UpdateDNS(ctx, spec, backend.Instance{}); err != nil {
		return backend.Instance{}, fmt.Errorf("create vm %s: %w", vmID, err)
	}

	return backend.Instance{
		Backend: Name,
		Netns:   NetnsName(vmID),
		Details: map[string]string{
			DetailNetnsPath:   path,
			DetailHostDevices: strings.Join(hostDevs, ","),
			DetailResolvConf:  b.resolvPath(vmID),
		},
	}, nil
}

// UpdateDNS rewrites the VM's resolv.conf from spec's DNS servers (replaced
// whole: `ip netns exec` binds the current file at each exec).
// Create writes the first one through it.
func (b *Backend) UpdateDNS(ctx context.Context, spec *backend.Spec, inst backend.Instance) error {
	return writeFileAtomic(b.resolvPath(spec.VMID), resolvConf(spec.VMID, spec.NICs))
}

// resolvPath is the VM's resolv.conf under the etc directory.
func (b *Backend) resolvPath(vmID string) string {
	return filepath.Join(b.etcPath(vmID), "resolv.conf")
}

// resolvConf renders the VM's resolv.conf: the DNS servers of all NICs in
// order, without duplicates.
func resolvConf(vmID string, nics []backend.NIC) []byte {
	var sb strings.Builder
	fmt.Fprintf(&sb, "# written by metald for vm %s\n", vmID)
	seen := map[netip.Addr]bool{}
	for _, nic := range nics {
		for _, d := range nic.DNS {
			if !d.IsValid() || seen[d] {
				continue
			}
			seen[d] = true
			fmt.Fprintf(&sb, "nameserver %s\n", d)
		}
	}
	return []byte(sb.String())
}

func writeFileAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// inNetns runs f with a netlink handle whose socket lives in the namespace
// open at fd, on a thread that joined that namespace (so f may also touch
// /proc/sys/net and start processes there).
func inNetns(fd int, f func(h *netlink.Handle) error) error {
	return ns.Do(fd, func() error {
		h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return fmt.Errorf("open netlink handle: %w", err)
		}
		defer h.Close()
		return f(h)
	})
}

// openVM opens the VM's namespace; a missing one is backend.ErrGone.
func (b *Backend) openVM(vmID string) (*os.File, error) {
	f, err := ns.OpenNamed(b.netnsPath(vmID))
	if errors.Is(err, ns.ErrNotExist) {
		return nil, fmt.Errorf("open namespace %s: %w", NetnsName(vmID), backend.ErrGone)
	}
	if err != nil {
		return nil, fmt.Errorf("open namespace %s: %w", NetnsName(vmID), err)
	}
	return f, nil
}

// vmIDOf recovers the VM id from an Instance.
func vmIDOf(inst backend.Instance) (string, error) {
	id, ok := strings.CutPrefix(inst.Netns, NamePrefix)
	if !ok || validVMID(id) != nil {
		return "", fmt.Errorf("instance netns %q is not a metald namespace", inst.Netns)
	}
	return id, nil
}

// Check reports whether the VM's namespace is still mounted and whether its
// guest process (PID with the recorded start time) is alive and stopped.
func (b *Backend) Check(ctx context.Context, inst backend.Instance) backend.Health {
	var h backend.Health
	var reasons []string
	if id, err := vmIDOf(inst); err != nil {
		reasons = append(reasons, err.Error())
	} else if f, err := b.openVM(id); err != nil {
		reasons = append(reasons, err.Error())
	} else {
		f.Close()
		h.SandboxOK = true
	}
	switch st, err := guestproc.LiveStat(inst.PID, inst.StartTime); {
	case inst.PID == 0:
		reasons = append(reasons, "guest not started")
	case err != nil:
		reasons = append(reasons, fmt.Sprintf("guest process %d: %v", inst.PID, err))
	default:
		h.Running = true
		h.Paused = st.State == 'T'
	}
	if !h.SandboxOK || !h.Running {
		h.Reason = strings.Join(reasons, "; ")
	}
	return h
}

// Destroy kills the guest (the recorded process and any other process in
// the VM's namespace), deletes every host link whose alias says it belongs
// to vmID, and removes the named namespace and the VM's /etc/netns
// directory. It needs only vmID, so it cleans up after a crash; inst may be
// zero. It is idempotent.
func (b *Backend) Destroy(ctx context.Context, vmID string, inst backend.Instance) error {
	if err := validVMID(vmID); err != nil {
		return fmt.Errorf("destroy vm: %w", err)
	}
	var errs []error
	if err := b.kill(ctx, inst.PID, inst.StartTime); err != nil {
		errs = append(errs, err)
	}
	if f, err := ns.OpenNamed(b.netnsPath(vmID)); err == nil {
		ino, err := ns.Inode(f)
		f.Close()
		if err == nil {
			errs = append(errs, b.killNetns(ctx, ino))
		}
	}
	if devs := inst.Details[DetailHostDevices]; devs != "" {
		// The usual case: the ports are known by name, so no host-wide
		// link dump (whose cost grows with the number of VMs) is needed.
		for _, d := range strings.Split(devs, ",") {
			if err := b.links.DeletePort(d); err != nil {
				errs = append(errs, err)
			}
		}
	} else if _, err := b.links.DeleteOwnedPorts(vmID); err != nil {
		// After a crash the instance may be empty: find ports by owner.
		errs = append(errs, err)
	}
	// /etc/netns first: a crash in between leaves the marked namespace,
	// which Owned finds, not a directory nobody can attribute.
	if err := os.RemoveAll(b.etcPath(vmID)); err != nil {
		errs = append(errs, fmt.Errorf("remove %s: %w", b.etcPath(vmID), err))
	}
	if err := ns.RemoveNamed(b.netnsPath(vmID)); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("destroy vm %s: %w", vmID, err)
	}
	return nil
}

// killNetns kills every process left in the namespace with inode ino: a
// guest started just before a crash, before its PID was persisted.
func (b *Backend) killNetns(ctx context.Context, ino uint64) error {
	pids, err := guestproc.PIDsInNetns(ino)
	if err != nil {
		return err
	}
	var errs []error
	for _, pid := range pids {
		st, err := guestproc.ReadStat(pid)
		if err != nil {
			continue
		}
		if err := b.kill(ctx, pid, st.StartTime); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// kill SIGKILLs the process and waits until it is gone.
func (b *Backend) kill(ctx context.Context, pid int, start uint64) error {
	return guestproc.Kill(ctx, pid, start, 10*time.Second)
}

// Owned lists the VM ids that have a namespace with this metald's owner
// mark, or a host port, on this host. A namespace with another mark (a
// metald with another database sharing the directory) or none (made by
// something else, or by a metald before marks) is left alone and logged;
// so is a /etc/netns directory without its namespace (Create makes it
// after the namespace, Destroy removes it before).
func (b *Backend) Owned(ctx context.Context) ([]string, error) {
	return b.OwnedMarking(ctx, nil)
}

// OwnedMarking is Owned, and in the same pass over the namespaces gives
// the namespace of every VM known reports (the caller's database holds
// it) this metald's mark when it has none: a namespace made before the
// marks existed stays recognisably this metald's. Such a namespace is not
// listed (its VM is known). A namespace with another mark is left alone.
func (b *Backend) OwnedMarking(ctx context.Context, known func(vmID string) bool) ([]string, error) {
	set := map[string]bool{}
	ents, err := os.ReadDir(b.netnsDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("list owned vms: %w", err)
	}
	for _, e := range ents {
		id, ok := strings.CutPrefix(e.Name(), NamePrefix)
		if !ok || validVMID(id) != nil {
			continue
		}
		mark, err := b.ownerMark(id, known != nil && known(id))
		switch {
		case err != nil:
			b.log.Warn("namespace left alone: cannot read its owner mark", "netns", e.Name(), "err", err)
		case mark == b.mark:
			set[id] = true
		default:
			b.log.Info("namespace left alone: not this metald's", "netns", e.Name(), "owner_mark", mark)
		}
	}
	ports, err := b.links.OwnedPorts()
	if err != nil {
		return nil, fmt.Errorf("list owned vms: %w", err)
	}
	for _, p := range ports {
		set[p.VMID] = true
	}
	ids := make([]string, 0, len(set))
	for id := range set {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids, nil
}

// ownerMark reads the alias of the loopback device in vmID's namespace;
// with claim, an empty alias is first set to this metald's mark.
func (b *Backend) ownerMark(vmID string, claim bool) (string, error) {
	f, err := ns.OpenNamed(b.netnsPath(vmID))
	if err != nil {
		return "", err
	}
	defer f.Close()
	var alias string
	err = inNetns(int(f.Fd()), func(h *netlink.Handle) error {
		lo, err := h.LinkByName("lo")
		if err != nil {
			return err
		}
		alias = lo.Attrs().Alias
		if alias == "" && claim {
			if err := h.LinkSetAlias(lo, b.mark); err != nil {
				return err
			}
			alias = b.mark
		}
		return nil
	})
	return alias, err
}
