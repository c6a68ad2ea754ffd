package daemon

import (
	"context"
	"net/netip"
	"reflect"
	"sync"
	"time"

	"github.com/metald/metald/internal/network"
	"github.com/metald/metald/internal/network/secpolicy"
	"github.com/metald/metald/internal/secevent"
	"github.com/metald/metald/internal/store"
	"github.com/metald/metald/internal/vm"
)

// Security-event wiring between the event service and the rule owners.
//
// Every NIC plan the VM manager programs passes through eventFirewall
// (first-hop table) and eventPolicy (policy table), which
//
//   - mark the plan for enhanced monitoring when its tenant has an active
//     session (network.NICPlan.Monitor, secpolicy.NICPolicy.Monitor), and
//     make policy drops log to metald's NFLOG group;
//   - with the cache_policies setting, skip programming a NIC whose
//     compiled plan equals the one last programmed (the kernel already holds
//     it); metald_security_policy_cache_total counts hits and misses.
//
// A monitoring session that starts or ends re-programs the tenant's NICs
// (reprogramTenant).

// bridgedOffloadReason is why hardware_acceleration is refused.
const bridgedOffloadReason = "VM traffic is bridged (VM ports are bridge ports): nftables flowtables offload only routed flows " +
	"(flow add in an ip/ip6/inet forward chain); bridged traffic cannot use a flowtable, so there is nothing to accelerate"

// flowtableOffload reports that hardware acceleration cannot be enabled.
func flowtableOffload() (bool, string) { return false, bridgedOffloadReason }

// Policy cache table labels.
const (
	cacheFirstHop = "first_hop"
	cachePolicy   = "policy"
)

type eventFirewall struct {
	inner   vm.Firewall
	ev      *secevent.Service
	metrics *secevent.Metrics

	mu   sync.Mutex
	last map[string]network.NICPlan // host device → plan in the kernel
	// removed, when set, is told of each NIC removed (its device's
	// learned temporary addresses go with it).
	removed func(hostDev string)
}

func newEventFirewall(inner vm.Firewall, ev *secevent.Service, m *secevent.Metrics) *eventFirewall {
	return &eventFirewall{inner: inner, ev: ev, metrics: m, last: map[string]network.NICPlan{}}
}

func (w *eventFirewall) mark(p network.NICPlan) network.NICPlan {
	p.Monitor = p.TenantID != "" && w.ev.MonitoringActive(p.TenantID)
	return p
}

func (w *eventFirewall) AddNIC(p network.NICPlan) error {
	p = w.mark(p)
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.ev.Settings().CachePolicies {
		old, ok := w.last[p.HostDevice]
		hit := ok && reflect.DeepEqual(old, p)
		w.metrics.PolicyCache(cacheFirstHop, hit)
		if hit {
			return nil
		}
	}
	if err := w.inner.AddNIC(p); err != nil {
		delete(w.last, p.HostDevice)
		return err
	}
	w.last[p.HostDevice] = p
	return nil
}

func (w *eventFirewall) RemoveNIC(hostDev string) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	delete(w.last, hostDev)
	err := w.inner.RemoveNIC(hostDev)
	if err == nil && w.removed != nil {
		w.removed(hostDev)
	}
	return err
}

// Reconcile marks the listed plans for monitoring. It does not hold w.mu
// while the inner firewall compares (AddNIC must not wait for a pass);
// plans it repaired are forgotten from the cache, so the next AddNIC of
// those NICs programs them again.
func (w *eventFirewall) Reconcile(ctx context.Context, list func(context.Context) ([]network.NICPlan, error)) ([]string, error) {
	marked := func(ctx context.Context) ([]network.NICPlan, error) {
		desired, err := list(ctx)
		for i, p := range desired {
			desired[i] = w.mark(p)
		}
		return desired, err
	}
	rep, err := w.inner.Reconcile(ctx, marked)
	if len(rep) > 0 || err != nil {
		w.mu.Lock()
		clear(w.last)
		w.mu.Unlock()
	}
	return rep, err
}

type eventPolicy struct {
	inner   vm.PolicyEnforcer
	ev      *secevent.Service
	metrics *secevent.Metrics

	mu   sync.Mutex
	last map[string]secpolicy.NICPolicy // secpolicy.Key → policy in the kernel
}

func newEventPolicy(inner vm.PolicyEnforcer, ev *secevent.Service, m *secevent.Metrics) *eventPolicy {
	return &eventPolicy{inner: inner, ev: ev, metrics: m, last: map[string]secpolicy.NICPolicy{}}
}

func (w *eventPolicy) mark(p secpolicy.NICPolicy) secpolicy.NICPolicy {
	p.EventLogGroup = secevent.DefaultGroup
	if p.Tenant != "" {
		lvl, ok := w.ev.MonitoringLevel(p.Tenant)
		p.Monitor, p.SampleAllowed = ok, ok && lvl == "DEBUG"
	}
	return p
}

func (w *eventPolicy) Upsert(ctx context.Context, p secpolicy.NICPolicy) error {
	p = w.mark(p)
	k := secpolicy.Key(p.VMID, p.NIC)
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.ev.Settings().CachePolicies {
		old, ok := w.last[k]
		hit := ok && reflect.DeepEqual(old, p)
		w.metrics.PolicyCache(cachePolicy, hit)
		if hit {
			return nil
		}
	}
	if err := w.inner.Upsert(ctx, p); err != nil {
		delete(w.last, k)
		return err
	}
	w.last[k] = p
	return nil
}

func (w *eventPolicy) Remove(ctx context.Context, vmID, nic string) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	delete(w.last, secpolicy.Key(vmID, nic))
	return w.inner.Remove(ctx, vmID, nic)
}

func (w *eventPolicy) Apply(ctx context.Context, all []secpolicy.NICPolicy) error {
	return w.applyAll(ctx, all, w.inner.Apply)
}

// applyAll marks every policy, programs them all with apply, and caches
// what is now in the kernel.
func (w *eventPolicy) applyAll(ctx context.Context, all []secpolicy.NICPolicy, apply func(context.Context, []secpolicy.NICPolicy) error) error {
	marked := make([]secpolicy.NICPolicy, len(all))
	for i, p := range all {
		marked[i] = w.mark(p)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	err := apply(ctx, marked)
	clear(w.last)
	if err == nil {
		for _, p := range marked {
			w.last[secpolicy.Key(p.VMID, p.NIC)] = p
		}
	}
	return err
}

// Resync implements vm.PolicyResyncer (Apply when the inner enforcer
// cannot resync).
func (w *eventPolicy) Resync(ctx context.Context, all []secpolicy.NICPolicy) error {
	if r, ok := w.inner.(vm.PolicyResyncer); ok {
		return w.applyAll(ctx, all, r.Resync)
	}
	return w.Apply(ctx, all)
}

func (w *eventPolicy) SetGroupMembers(ctx context.Context, group string, addrs []netip.Addr) error {
	return w.inner.SetGroupMembers(ctx, group, addrs)
}

// reprogramTenant re-programs the first-hop rules and policies of every
// NIC of tenant's VMs, so an enhanced-monitoring session that started or
// ended takes effect (the wrappers read the session state).
func (d *Daemon) reprogramTenant(tenant string, active bool) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	rows, err := d.store.ListVMs(ctx)
	if err != nil {
		d.log.Error("enhanced monitoring: list vms", "tenant_id", tenant, "err", err)
		return
	}
	n := 0
	for _, row := range rows {
		if row.TenantID != tenant || row.State == store.StateCreating || row.State == store.StateDeleting {
			continue
		}
		d.reprogramVM(ctx, row)
		n++
	}
	d.log.Info("enhanced monitoring: rules re-programmed", "tenant_id", tenant, "active", active, "vms", n, "took", time.Since(start))
}

// reprogramVM programs one VM's NICs again from its current row, under
// the VM's lock (vm.Manager.Reprogram).
func (d *Daemon) reprogramVM(ctx context.Context, row *store.VM) {
	if err := d.vms.Reprogram(ctx, row.ID); err != nil {
		d.log.Error("enhanced monitoring: program rules", "vm_id", row.ID, "err", err)
	}
}

// eventWiring holds the wrappers.
type eventWiring struct {
	fw  *eventFirewall
	pol *eventPolicy
}
