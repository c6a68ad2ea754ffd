package netns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strconv"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/metald/metald/internal/backend"
	"github.com/metald/metald/internal/backend/guestproc"
	"github.com/metald/metald/internal/network/ns"
)

// Boot applies the guest network configuration inside the VM namespace and
// starts the guest process there. It is idempotent: addresses and routes
// that already exist are kept, and a guest that is already running is not
// started twice.
//
// Per NIC, before the link comes up (so that the link-local address already
// follows them): disable_ipv6=0, use_tempaddr (2 with PrivacyExtensions,
// else 0), stable_secret when set, temp_valid_lft when set. Then the link
// goes up, the static address is added with duplicate address detection
// (Boot does not wait for DAD; see NICStatus) and, with PrivacyExtensions
// and a /64, IFA_F_MANAGETEMPADDR so the kernel derives RFC 8981 temporary
// addresses from it; then a default route via the gateway (onlink, metric
// 1024+NIC index so several NICs do not replace each other's route).
//
// accept_ra is left at the kernel default (1): metald configures the
// address and default route itself, so RAs are not needed, but a real guest
// kernel accepts them, and keeping that behaviour lets RA-guard tests see a
// rogue RA that got through in the guest's routing table. Protection from
// rogue RAs is the bridge filters' job, not the guest's.
func (b *Backend) Boot(ctx context.Context, spec *backend.Spec, inst backend.Instance) (backend.Instance, error) {
	if err := validateSpec(spec); err != nil {
		return inst, fmt.Errorf("boot vm: %w", err)
	}
	f, err := b.openVM(spec.VMID)
	if err != nil {
		return inst, fmt.Errorf("boot vm %s: %w", spec.VMID, err)
	}
	defer f.Close()

	running := false
	if _, err := guestproc.LiveStat(inst.PID, inst.StartTime); err == nil {
		running = true
	}
	var cmd *exec.Cmd
	if !running {
		cmd = exec.Command(b.command[0], b.command[1:]...)
		cmd.Dir = "/"
		// Its own session: no controlling terminal, and it outlives a
		// daemon restart. Stdin/out/err default to /dev/null.
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	}
	err = inNetns(int(f.Fd()), func(h *netlink.Handle) error {
		for i, nic := range spec.NICs {
			if err := configureNIC(h, i, nic); err != nil {
				return fmt.Errorf("configure nic %s: %w", nic.ID, err)
			}
		}
		if cmd != nil {
			// Started from this thread, so the guest inherits the
			// VM namespace.
			if err := cmd.Start(); err != nil {
				return fmt.Errorf("start guest: %w", err)
			}
		}
		return nil
	})
	if err != nil {
		return inst, fmt.Errorf("boot vm %s: %w", spec.VMID, err)
	}
	if cmd == nil {
		return inst, nil
	}
	// Read the start time before anything can reap the child.
	pid := cmd.Process.Pid
	st, serr := guestproc.ReadStat(pid)
	if serr != nil {
		cmd.Process.Kill()
		guestproc.Reap(cmd.Process)
		return inst, fmt.Errorf("boot vm %s: guest exited at once: %w", spec.VMID, serr)
	}
	guestproc.Reap(cmd.Process)
	inst.PID = pid
	inst.StartTime = st.StartTime
	return inst, nil
}

func configureNIC(h *netlink.Handle, index int, nic backend.NIC) error {
	l, err := h.LinkByName(nic.ID)
	if err != nil {
		return err
	}
	tempaddr := "0"
	if nic.PrivacyExtensions {
		tempaddr = "2"
	}
	sysctls := [][2]string{
		{"disable_ipv6", "0"},
		{"use_tempaddr", tempaddr},
	}
	if nic.StableSecret != "" {
		sysctls = append(sysctls, [2]string{"stable_secret", nic.StableSecret})
	}
	if nic.TempValidLifetime > 0 {
		secs := max(int64(nic.TempValidLifetime/time.Second), 1)
		sysctls = append(sysctls, [2]string{"temp_valid_lft", strconv.FormatInt(secs, 10)})
	}
	// Nothing to write when the interface already has every setting (a
	// first boot without privacy settings: a fresh namespace's interface
	// has the defaults). Reading them over rtnetlink is cheap; opening
	// /proc/sys/net/ipv6 costs more the more namespaces the host has.
	// Otherwise all are written, in this order, so a boot with privacy
	// settings does exactly what it did before the read was added.
	if conf, err := inet6Conf(l.Attrs().Index); err == nil && len(changedSysctls(conf, sysctls)) == 0 {
		sysctls = nil
	}
	if len(sysctls) > 0 {
		if err := ns.WriteSysctlsIn("net/ipv6/conf/"+nic.ID, sysctls); err != nil {
			return err
		}
	}
	if err := h.LinkSetUp(l); err != nil {
		return fmt.Errorf("set link up: %w", err)
	}
	if nic.Address.IsValid() {
		a := &netlink.Addr{IPNet: &net.IPNet{
			IP:   net.IP(nic.Address.Addr().AsSlice()),
			Mask: net.CIDRMask(nic.Address.Bits(), 128),
		}}
		if nic.PrivacyExtensions && nic.Address.Bits() == 64 {
			a.Flags = unix.IFA_F_MANAGETEMPADDR
		}
		if err := h.AddrReplace(l, a); err != nil {
			return fmt.Errorf("add address %s: %w", nic.Address, err)
		}
	}
	if nic.Gateway.IsValid() {
		r := &netlink.Route{
			LinkIndex: l.Attrs().Index,
			Dst:       &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)},
			Gw:        net.IP(nic.Gateway.AsSlice()),
			Flags:     int(netlink.FLAG_ONLINK),
			Priority:  1024 + index,
		}
		if err := h.RouteReplace(r); err != nil {
			return fmt.Errorf("add default route via %s: %w", nic.Gateway, err)
		}
	}
	return nil
}

// Shutdown sends the guest SIGTERM (and SIGCONT, so a paused guest can act
// on it), waits up to timeout, then SIGKILLs it and waits until it is gone.
// It works on guests that are not the daemon's children (after a restart).
// It then sets the guest's links down, as a powered-off VM would leave
// them: its addresses and routes go with them and Boot restores them. An
// already stopped guest is not an error.
func (b *Backend) Shutdown(ctx context.Context, inst backend.Instance, timeout time.Duration) (backend.Instance, error) {
	if err := b.stop(ctx, inst, timeout); err != nil {
		return inst, fmt.Errorf("shut down vm: %w", err)
	}
	inst.PID, inst.StartTime = 0, 0
	if id, err := vmIDOf(inst); err == nil {
		if err := b.guestLinksDown(id); err != nil && !errors.Is(err, backend.ErrGone) {
			return inst, fmt.Errorf("shut down vm %s: %w", id, err)
		}
	}
	return inst, nil
}

func (b *Backend) stop(ctx context.Context, inst backend.Instance, timeout time.Duration) error {
	p, err := guestproc.Open(inst.PID, inst.StartTime)
	if errors.Is(err, guestproc.ErrGone) {
		return nil
	}
	if err != nil {
		return err
	}
	defer p.Close()
	for _, sig := range []unix.Signal{unix.SIGTERM, unix.SIGCONT} {
		if err := p.Signal(sig); errors.Is(err, guestproc.ErrGone) {
			return nil
		} else if err != nil {
			return err
		}
	}
	if gone, err := p.Wait(ctx, timeout); err != nil || gone {
		return err
	}
	b.log.Info("guest ignored SIGTERM, killing it", "pid", inst.PID, "timeout", timeout)
	if err := p.Signal(unix.SIGKILL); errors.Is(err, guestproc.ErrGone) {
		return nil
	} else if err != nil {
		return err
	}
	gone, err := p.Wait(ctx, 10*time.Second)
	if err != nil {
		return err
	}
	if !gone {
		return fmt.Errorf("guest %d still alive 10s after SIGKILL", inst.PID)
	}
	return nil
}

func (b *Backend) guestLinksDown(vmID string) error {
	f, err := b.openVM(vmID)
	if err != nil {
		return err
	}
	defer f.Close()
	return inNetns(int(f.Fd()), func(h *netlink.Handle) error {
		ls, err := h.LinkList()
		if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
			return fmt.Errorf("list guest links: %w", err)
		}
		for _, l := range ls {
			if l.Attrs().Flags&net.FlagLoopback != 0 || l.Attrs().Flags&net.FlagUp == 0 {
				continue
			}
			if err := h.LinkSetDown(l); err != nil {
				return fmt.Errorf("set %s down: %w", l.Attrs().Name, err)
			}
		}
		return nil
	})
}

// Pause stops the guest process with SIGSTOP and waits until it is stopped.
// Only the process freezes: the namespace's kernel network stack still
// answers neighbour discovery and pings. A guest that is not running is
// backend.ErrNotRunning.
func (b *Backend) Pause(ctx context.Context, inst backend.Instance) error {
	if err := b.sendTo(inst, unix.SIGSTOP); err != nil {
		return fmt.Errorf("pause vm: %w", err)
	}
	if err := guestproc.WaitState(inst.PID, inst.StartTime, time.Second, func(s byte) bool { return s == 'T' }); err != nil {
		return fmt.Errorf("pause vm: %w", err)
	}
	return nil
}

// Resume continues a paused guest with SIGCONT and waits until it is no
// longer stopped. A guest that is not running is backend.ErrNotRunning.
func (b *Backend) Resume(ctx context.Context, inst backend.Instance) error {
	if err := b.sendTo(inst, unix.SIGCONT); err != nil {
		return fmt.Errorf("resume vm: %w", err)
	}
	if err := guestproc.WaitState(inst.PID, inst.StartTime, time.Second, func(s byte) bool { return s != 'T' }); err != nil {
		return fmt.Errorf("resume vm: %w", err)
	}
	return nil
}

func (b *Backend) sendTo(inst backend.Instance, sig unix.Signal) error {
	p, err := guestproc.Open(inst.PID, inst.StartTime)
	if errors.Is(err, guestproc.ErrGone) {
		return backend.ErrNotRunning
	}
	if err != nil {
		return err
	}
	defer p.Close()
	if err := p.Signal(sig); errors.Is(err, guestproc.ErrGone) {
		return backend.ErrNotRunning
	} else if err != nil {
		return err
	}
	return nil
}

// Reboot stops the running guest (gracefully within Config.StopTimeout)
// and boots it again: a new guest process, the network configuration
// re-applied (duplicate address detection runs again, as on a real
// reboot). A guest that is not running is backend.ErrNotRunning.
func (b *Backend) Reboot(ctx context.Context, spec *backend.Spec, inst backend.Instance) (backend.Instance, error) {
	if _, err := guestproc.LiveStat(inst.PID, inst.StartTime); err != nil {
		return inst, fmt.Errorf("reboot vm %s: %w", spec.VMID, backend.ErrNotRunning)
	}
	inst, err := b.Shutdown(ctx, inst, b.stopTimeout)
	if err != nil {
		return inst, fmt.Errorf("reboot vm %s: %w", spec.VMID, err)
	}
	return b.Boot(ctx, spec, inst)
}

// DAD states NICStatus reports.
const (
	DADTentative  = "tentative"
	DADPreferred  = "preferred"
	DADDeprecated = "deprecated"
	DADFailed     = "dadfailed"
	DADAbsent     = "absent"
)

// LinkAbsent is NICStatus's link state for a NIC that does not exist.
const LinkAbsent = "absent"

// NICStatus reports, from inside the VM's namespace, the duplicate address
// detection state of addr on NIC nicID (DADTentative, DADPreferred,
// DADDeprecated, DADFailed or DADAbsent) and the NIC's operational state
// ("up", "down", "lowerlayerdown", ... or LinkAbsent). A missing namespace
// is backend.ErrGone.
func (b *Backend) NICStatus(vmID, nicID string, addr netip.Prefix) (dad, linkState string, err error) {
	if err := validVMID(vmID); err != nil {
		return "", "", fmt.Errorf("nic status: %w", err)
	}
	f, err := b.openVM(vmID)
	if err != nil {
		return "", "", fmt.Errorf("nic status: %w", err)
	}
	defer f.Close()
	dad, linkState = DADAbsent, LinkAbsent
	err = inNetns(int(f.Fd()), func(h *netlink.Handle) error {
		l, err := h.LinkByName(nicID)
		if err != nil {
			var nf netlink.LinkNotFoundError
			if errors.As(err, &nf) {
				return nil
			}
			return err
		}
		linkState = l.Attrs().OperState.String()
		if !addr.IsValid() {
			return nil
		}
		as, err := h.AddrList(l, netlink.FAMILY_V6)
		if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
			return err
		}
		for _, a := range as {
			ip, ok := netip.AddrFromSlice(a.IP)
			if !ok || ip.Unmap() != addr.Addr() {
				continue
			}
			switch {
			case a.Flags&unix.IFA_F_DADFAILED != 0:
				dad = DADFailed
			case a.Flags&unix.IFA_F_TENTATIVE != 0:
				dad = DADTentative
			case a.Flags&unix.IFA_F_DEPRECATED != 0:
				dad = DADDeprecated
			default:
				dad = DADPreferred
			}
		}
		return nil
	})
	if err != nil {
		return "", "", fmt.Errorf("nic status of %s/%s: %w", vmID, nicID, err)
	}
	return dad, linkState, nil
}
