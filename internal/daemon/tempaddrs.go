package daemon

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/metald/metald/internal/network"
	"github.com/metald/metald/internal/network/nft"
	"github.com/metald/metald/internal/secevent"
)

// tempAddrs holds, per host device, the temporary addresses its guest has
// bound by DAD (privacy extensions): the first-hop rules learn them into
// the port's <dev>-temp set, and the security policy counts them as the
// NIC's own, so a connection to one is judged by the VM's ingress rules
// and a peer knows the VM by it (tenant and group sets). The kernel's set
// is the record: a notice from the learning rule (NFLOG) makes metald read
// that port's set at once, and every device is read again each interval,
// which also drops expired addresses and catches a missed notice.
type tempAddrs struct {
	mu    sync.Mutex
	byDev map[string][]netip.Addr
	// until is when each binding ends, as last read: a repair that
	// rewrote a port's sets empty (its table was deleted) restores them
	// from it (restoreAfterRepair). Kept through empty reads, pruned as
	// bindings end.
	until map[string]map[netip.Addr]time.Time
	// kick carries devices to read now; full, the next pass reads all.
	kick chan string
}

func newTempAddrs() *tempAddrs {
	return &tempAddrs{byDev: map[string][]netip.Addr{}, until: map[string]map[netip.Addr]time.Time{}, kick: make(chan string, 256)}
}

// record notes when dev's bindings end (left: as read at now).
func (t *tempAddrs) record(dev string, left map[netip.Addr]time.Duration, now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	u := t.until[dev]
	if u == nil {
		u = map[netip.Addr]time.Time{}
		t.until[dev] = u
	}
	for a, d := range left {
		u[a] = now.Add(d)
	}
	for a, end := range u {
		if !end.After(now) {
			delete(u, a)
		}
	}
	if len(u) == 0 {
		delete(t.until, dev)
	}
}

// unbound forgets bindings metald itself took away.
func (t *tempAddrs) unbound(dev string, addrs []netip.Addr) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, a := range addrs {
		delete(t.until[dev], a)
	}
}

// left returns the time dev's recorded bindings have left at now.
func (t *tempAddrs) left(dev string, now time.Time) map[netip.Addr]time.Duration {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := map[netip.Addr]time.Duration{}
	for a, end := range t.until[dev] {
		if d := end.Sub(now); d > 0 {
			out[a] = d
		}
	}
	return out
}

// get returns dev's learned temporary addresses (vm.Options.TempAddrs).
func (t *tempAddrs) get(dev string) []netip.Addr {
	t.mu.Lock()
	defer t.mu.Unlock()
	return slices.Clone(t.byDev[dev])
}

// set records dev's addresses and reports whether they changed.
func (t *tempAddrs) set(dev string, addrs []netip.Addr) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if slices.Equal(t.byDev[dev], addrs) {
		return false
	}
	if len(addrs) == 0 {
		delete(t.byDev, dev)
	} else {
		t.byDev[dev] = addrs
	}
	return true
}

// forget drops dev's addresses (its NIC was removed: a NIC that later
// gets the same device name starts with none).
func (t *tempAddrs) forget(dev string) {
	t.set(dev, nil)
	t.mu.Lock()
	delete(t.until, dev)
	t.mu.Unlock()
}

// holders returns the devices other than dev that hold one of addrs.
func (t *tempAddrs) holders(dev string, addrs []netip.Addr) []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []string
	for d, have := range t.byDev {
		if d != dev && slices.ContainsFunc(have, func(a netip.Addr) bool { return slices.Contains(addrs, a) }) {
			out = append(out, d)
		}
	}
	return out
}

// devices returns the devices with addresses.
func (t *tempAddrs) devices() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]string, 0, len(t.byDev))
	for dev := range t.byDev {
		out = append(out, dev)
	}
	return out
}

// noticeLearned is secevent's Learned hook: it must not block.
func (t *tempAddrs) noticeLearned(dev string, _ netip.Addr) {
	select {
	case t.kick <- dev:
	default:
	}
}

// watchTempAddrs keeps d.temps equal to the kernel's sets until ctx ends,
// programming a VM's policy again when its addresses change.
func (d *Daemon) watchTempAddrs(ctx context.Context, interval time.Duration) {
	d.syncTempAddrs(ctx, nil)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case dev := <-d.temps.kick:
			d.syncTempAddrs(ctx, []string{dev})
		case <-t.C:
			d.syncTempAddrs(ctx, nil)
		}
	}
}

// syncTempAddrs reads the sets of devs (nil: every privacy NIC's, and
// every device that had addresses) and reprograms the policies of the VMs
// whose addresses changed.
func (d *Daemon) syncTempAddrs(ctx context.Context, devs []string) {
	if devs == nil {
		all, err := d.vms.PrivacyDevices(ctx)
		if err != nil {
			d.log.Error("temporary addresses: list privacy NICs", "err", err)
			return
		}
		devs = append(all, d.temps.devices()...)
		slices.Sort(devs)
		devs = slices.Compact(devs)
	}
	for _, dev := range devs {
		d.syncTempAddrsOf(ctx, dev, true)
	}
}

// syncTempAddrsOf reads dev's set and, when its addresses changed,
// reprograms its VM's policy. An address another port held until now
// (its binding expired and this port's guest took it, first come first
// served) is first taken off that port's policy (with owners), so the
// two NICs' policies never claim one address.
func (d *Daemon) syncTempAddrsOf(ctx context.Context, dev string, owners bool) {
	bindings, err := d.fw.TempBindings(dev)
	if err != nil && !errors.Is(err, nft.ErrNotFound) {
		d.log.Error("temporary addresses: read learned set", "dev", dev, "err", err)
		return
	}
	d.temps.record(dev, bindings, time.Now())
	addrs := make([]netip.Addr, 0, len(bindings))
	for a := range bindings {
		addrs = append(addrs, a)
	}
	slices.SortFunc(addrs, netip.Addr.Compare)
	addrs = d.evictStolen(ctx, dev, addrs)
	if owners {
		for _, other := range d.temps.holders(dev, addrs) {
			d.syncTempAddrsOf(ctx, other, false)
		}
	}
	if !d.temps.set(dev, addrs) {
		return
	}
	vmID, _, nic, ok := d.resolveDevice(dev)
	if !ok {
		return
	}
	done, err := d.vms.ReprogramPolicy(ctx, vmID)
	if err != nil {
		d.log.Error("temporary addresses: program security policy", "vm_id", vmID, "nic", nic, "err", err)
		// Read it again next time.
		d.temps.set(dev, nil)
		return
	}
	if done {
		d.log.Info("temporary addresses: security policy follows the guest's", "vm_id", vmID, "nic", nic, "dev", dev, "addresses", addrs)
	}
}

// evictStolen unbinds from dev the learned temporary addresses that are
// another NIC's configured address (first come, first served learning
// binds any free-looking address of the /64; a VM's static address, or one
// a create is about to give a new VM, is not free), records a
// source_guard_violation event for the VM that claimed it, and returns
// addrs without them.
func (d *Daemon) evictStolen(ctx context.Context, dev string, addrs []netip.Addr) []netip.Addr {
	var stolen []netip.Addr
	var owners []string
	for _, a := range addrs {
		// Every pass checks every binding, also older ones: an address
		// can become a NIC's after a guest bound it (a create given it).
		refs, err := d.store.NICsWithAddress(ctx, a.String())
		if err != nil {
			d.log.Error("temporary addresses: look up owner", "address", a, "err", err)
			continue
		}
		if len(refs) > 0 {
			stolen = append(stolen, a)
			owners = append(owners, refs[0].VMID+"."+refs[0].ID)
		}
	}
	if len(stolen) == 0 {
		return addrs
	}
	vmID, tenant, nic, _ := d.resolveDevice(dev)
	if err := d.fw.EvictTemp(dev, stolen); err != nil {
		d.log.Error("temporary addresses: unbind another NIC's address", "vm_id", vmID, "dev", dev, "addresses", stolen, "err", err)
		return addrs
	}
	d.temps.unbound(dev, stolen)
	for i, a := range stolen {
		d.log.Warn("temporary addresses: a guest claimed another NIC's address; unbound", "vm_id", vmID, "nic", nic, "address", a, "owner", owners[i])
		d.events.Emit(secevent.Event{Type: secevent.TypeSourceGuardViolation, Severity: secevent.SeverityHigh, VMID: vmID, TenantID: tenant, InterfaceID: nic,
			Details: secevent.Details{Src: a.String(), Reason: "claimed " + a.String() + " by DAD, the configured address of " + owners[i] + ": unbound"}})
	}
	return slices.DeleteFunc(addrs, func(a netip.Addr) bool { return slices.Contains(stolen, a) })
}

// restoreAfterRepair is a first-hop observer: a repair rewrites a NIC's
// objects, and when their table had been deleted its learned temporary
// addresses went with it, which would cut the guest's connections from
// them until it made new ones. They are bound again for the time they had
// left, and read again.
type restoreAfterRepair struct{ d *Daemon }

func (r restoreAfterRepair) NICRemoved(string, map[network.Control]uint64) {}

func (r restoreAfterRepair) Repaired(rep nft.Repairs) {
	d := r.d
	for dev := range rep.NICs {
		left := d.temps.left(dev, time.Now())
		if len(left) == 0 {
			continue
		}
		if err := d.fw.RestoreTemp(dev, left); err != nil {
			d.log.Error("temporary addresses: restore after a repair", "dev", dev, "err", err)
			continue
		}
		d.log.Warn("temporary addresses: bindings restored after a repair", "dev", dev, "count", len(left))
		d.temps.noticeLearned(dev, netip.Addr{})
	}
}

// observers fans first-hop notifications out.
type observers []nft.Observer

func (o observers) NICRemoved(dev string, final map[network.Control]uint64) {
	for _, x := range o {
		x.NICRemoved(dev, final)
	}
}

func (o observers) Repaired(r nft.Repairs) {
	for _, x := range o {
		x.Repaired(r)
	}
}
