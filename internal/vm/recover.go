package vm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/metald/metald/internal/backend"
	"github.com/metald/metald/internal/store"
)

// RecoveryReport says what Recover changed.
type RecoveryReport struct {
	Adopted         []string
	Terminated      []string
	RolledBack      []string // creations interrupted by a crash
	DeletesFinished []string // deletions interrupted by a crash
	Reattached      []string // ports put back on their bridge
	OrphanSandboxes []string // backend resources with no VM row, removed
	OrphanPorts     []string // host links with no VM row, removed
}

// Recover reconciles the database with the kernel after a start: it adopts
// VMs whose sandbox is intact, marks those whose sandbox vanished
// TERMINATED, finishes or rolls back operations a crash interrupted, and
// removes backend resources and ports metald owns that no VM row claims.
// It never touches anything metald does not own.
func (m *Manager) Recover(ctx context.Context) (*RecoveryReport, error) {
	rep := &RecoveryReport{}
	all, err := m.opt.Store.ListVMs(ctx)
	if err != nil {
		return nil, err
	}
	known := map[string]bool{}
	var errs []error
	for _, vm := range all {
		known[vm.ID] = true
		unlock := m.lock(vm.ID)
		err := m.recoverOne(ctx, vm, rep)
		unlock()
		if err != nil {
			errs = append(errs, fmt.Errorf("recover vm %s: %w", vm.ID, err))
		}
	}
	// Orphans: resources of ours that no row claims. A backend that marks
	// its sandboxes gives those of our rows that predate the marks ours in
	// the same pass, so that they stay recognisably ours.
	var owned []string
	if mk, ok := m.opt.Backend.(interface {
		OwnedMarking(ctx context.Context, known func(vmID string) bool) ([]string, error)
	}); ok {
		owned, err = mk.OwnedMarking(ctx, func(id string) bool { return known[id] })
	} else {
		owned, err = m.opt.Backend.Owned(ctx)
	}
	if err != nil {
		errs = append(errs, fmt.Errorf("list backend resources: %w", err))
	}
	for _, id := range owned {
		if known[id] {
			continue
		}
		if err := m.opt.Backend.Destroy(ctx, id, backend.Instance{Backend: m.opt.Backend.Name()}); err != nil {
			errs = append(errs, fmt.Errorf("remove orphan sandbox %s: %w", id, err))
			continue
		}
		rep.OrphanSandboxes = append(rep.OrphanSandboxes, id)
		m.log.Warn("removed orphaned sandbox", "vm_id", id)
	}
	// First-hop rules and policies: exactly the NICs of the VMs that exist.
	if err := m.ReconcileFirewall(ctx); err != nil {
		errs = append(errs, fmt.Errorf("reconcile first-hop rules: %w", err))
	}
	if err := m.ReconcilePolicies(ctx); err != nil {
		errs = append(errs, fmt.Errorf("reconcile security policies: %w", err))
	}
	ports, err := m.opt.Ports.OwnedPorts()
	if err != nil {
		errs = append(errs, fmt.Errorf("list ports: %w", err))
	}
	for dev, id := range ports {
		if known[id] {
			continue
		}
		if err := m.opt.Ports.DeletePort(dev); err != nil {
			errs = append(errs, fmt.Errorf("remove orphan port %s: %w", dev, err))
			continue
		}
		rep.OrphanPorts = append(rep.OrphanPorts, dev)
		m.log.Warn("removed orphaned port", "device", dev, "vm_id", id)
	}
	return rep, errors.Join(errs...)
}

func (m *Manager) recoverOne(ctx context.Context, vm *store.VM, rep *RecoveryReport) error {
	switch vm.State {
	case store.StateCreating:
		if err := m.teardown(ctx, vm); err != nil {
			return err
		}
		rep.RolledBack = append(rep.RolledBack, vm.ID)
		m.log.Warn("rolled back interrupted creation", "vm_id", vm.ID)
		return nil
	case store.StateDeleting:
		if err := m.teardown(ctx, vm); err != nil {
			return err
		}
		rep.DeletesFinished = append(rep.DeletesFinished, vm.ID)
		m.log.Warn("finished interrupted deletion", "vm_id", vm.ID)
		return nil
	case store.StateTerminated:
		return nil
	}
	h := m.opt.Backend.Check(ctx, Instance(vm))
	if vm.State == store.StateRunning && vm.StateReason == reasonRebooting && h.SandboxOK && !h.Running {
		// metald stopped while RebootVm had the guest down: the guest did
		// not die outside metald. SHUTDOWN, so BootVm starts it again.
		inst := Instance(vm)
		inst.PID, inst.StartTime = 0, 0
		vm.Instance, _ = json.Marshal(inst)
		vm.State, vm.StateReason, vm.UpdatedAt = store.StateShutdown, "reboot interrupted by a metald restart: boot it again", m.opt.Now().UTC()
		m.log.Warn("interrupted reboot: vm left shut down", "vm_id", vm.ID)
		if err := m.opt.Store.UpdateVM(ctx, vm); err != nil {
			return err
		}
	} else if reason := lostReason(vm.State, h); reason != "" {
		rep.Terminated = append(rep.Terminated, vm.ID)
		return m.terminate(ctx, vm, reason, h.Running)
	}
	// The sandbox is intact: make sure its bridges and gateways are there
	// and its ports are on their bridges (a bridge may have been recreated
	// while metald was down).
	nics := slices.Clone(vm.NICs)
	if err := m.ensureBridges(ctx, vm.ID, nics, true); err != nil {
		return err
	}
	for _, n := range vm.NICs {
		exists, attached, err := m.opt.Ports.PortAttached(n.HostDevice, n.Bridge)
		if err != nil {
			return err
		}
		if !exists {
			rep.Terminated = append(rep.Terminated, vm.ID)
			return m.terminate(ctx, vm, fmt.Sprintf("port %s vanished", n.HostDevice), h.Running)
		}
		if !attached {
			if err := m.opt.Ports.AttachPort(n.HostDevice, n.Bridge); err != nil {
				return err
			}
			rep.Reattached = append(rep.Reattached, n.HostDevice)
			m.log.Warn("reattached port to bridge", "vm_id", vm.ID, "device", n.HostDevice, "bridge", n.Bridge)
		}
	}
	rep.Adopted = append(rep.Adopted, vm.ID)
	m.log.Info("adopted vm", "vm_id", vm.ID, "state", vm.State)
	return nil
}

// lostReason says why a VM in state can no longer be what the database
// says, or "" when it still is.
func lostReason(state string, h backend.Health) string {
	if !h.SandboxOK {
		if h.Reason != "" {
			return "sandbox vanished: " + h.Reason
		}
		return "sandbox vanished"
	}
	if (state == store.StateRunning || state == store.StatePaused) && !h.Running {
		if h.Reason != "" {
			return "guest process exited: " + h.Reason
		}
		return "guest process exited"
	}
	return ""
}

// terminate marks vm TERMINATED for reason. A guest process that is still
// alive (its sandbox or a port vanished around it) stays recorded, so that
// DeleteVm's teardown kills it rather than leaving it running where no
// one can reach it.
func (m *Manager) terminate(ctx context.Context, vm *store.VM, reason string, guestAlive bool) error {
	inst := Instance(vm)
	if !guestAlive {
		inst.PID, inst.StartTime = 0, 0
	}
	vm.Instance, _ = json.Marshal(inst)
	vm.State, vm.StateReason, vm.UpdatedAt = store.StateTerminated, reason, m.opt.Now().UTC()
	m.log.Warn("vm terminated outside metald", "vm_id", vm.ID, "reason", reason)
	return m.opt.Store.UpdateVM(ctx, vm)
}

// Watch checks every VM's sandbox and guest at each interval until ctx ends,
// marking the ones that vanished TERMINATED.
func (m *Manager) Watch(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			m.CheckAll(ctx)
			if err := m.ReconcileFirewall(ctx); err != nil {
				m.log.Error("reconcile first-hop rules", "err", err)
			}
			if m.opt.PolicyDrift != nil && m.opt.PolicyDrift() {
				if err := m.ResyncPolicies(ctx); err != nil {
					m.log.Error("rebuild security policies after a foreign nftables change", "err", err)
				}
			}
		}
	}
}

// CheckAll runs one liveness pass over every VM. The pass reads the table
// once and takes a VM's lock only when its check failed, to re-check it
// against the current row before marking it TERMINATED.
func (m *Manager) CheckAll(ctx context.Context) {
	all, err := m.opt.Store.ListVMs(ctx)
	if err != nil {
		m.log.Error("list vms for liveness check", "err", err)
		return
	}
	for _, vm := range all {
		if !watched(vm.State) || lostReason(vm.State, m.opt.Backend.Check(ctx, Instance(vm))) == "" {
			continue
		}
		unlock := m.lock(vm.ID)
		cur, err := m.opt.Store.GetVM(ctx, vm.ID)
		if err == nil && watched(cur.State) {
			h := m.opt.Backend.Check(ctx, Instance(cur))
			if reason := lostReason(cur.State, h); reason != "" {
				if err := m.terminate(ctx, cur, reason, h.Running); err != nil {
					m.log.Error("mark vm terminated", "vm_id", vm.ID, "err", err)
				}
			}
		}
		unlock()
	}
}

func watched(state string) bool {
	switch state {
	case store.StateCreated, store.StateRunning, store.StatePaused, store.StateShutdown:
		return true
	}
	return false
}
