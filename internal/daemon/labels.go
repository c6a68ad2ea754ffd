package daemon

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/metald/metald/internal/network/fhmetrics"
	"github.com/metald/metald/internal/store"
)

// labelCache maps host devices to their VM and tenant for metric labels,
// rebuilt from the store at most once a second (a scrape asks per device).
type labelCache struct {
	mu    sync.Mutex
	at    time.Time
	byDev map[string]fhmetrics.Labels
	nicOf map[string]string
	// unknown are devices looked up and not found since the last full
	// read (NFLOG records name host ports too): not asked again until it.
	unknown map[string]bool
}

func (d *Daemon) deviceLabels(dev string) (fhmetrics.Labels, bool) {
	l, _, ok := d.device(dev)
	return l, ok
}

// resolveDevice attributes a logged packet to its VM, tenant and NIC.
func (d *Daemon) resolveDevice(dev string) (vmID, tenantID, nicID string, ok bool) {
	l, nic, ok := d.device(dev)
	return l.VMID, l.TenantID, nic, ok
}

func (d *Daemon) device(dev string) (fhmetrics.Labels, string, bool) {
	c := &d.labels
	c.mu.Lock()
	defer c.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	looked := false
	if _, ok := c.byDev[dev]; !ok && c.byDev != nil && !c.unknown[dev] {
		// A device not seen yet (a new VM): look it alone up rather than
		// read every VM (a NIC's removal after its VM's quick create and
		// delete would otherwise cost a full read, growing with the host).
		looked = true
		ref, err := d.store.NICByHostDevice(ctx, dev)
		var vm *store.VM
		if err == nil {
			vm, err = d.store.GetVM(ctx, ref.VMID)
		}
		switch {
		case err == nil:
			c.byDev[dev] = fhmetrics.Labels{TenantID: vm.TenantID, VMID: vm.ID}
			c.nicOf[dev] = ref.ID
		case errors.Is(err, store.ErrNotFound):
			c.unknown[dev] = true
		}
	}
	if !looked && time.Since(c.at) > time.Second {
		if vms, err := d.store.ListVMs(ctx); err == nil {
			c.byDev = make(map[string]fhmetrics.Labels, len(vms))
			c.nicOf = make(map[string]string, len(vms))
			c.unknown = map[string]bool{}
			for _, vm := range vms {
				for _, n := range vm.NICs {
					c.byDev[n.HostDevice] = fhmetrics.Labels{TenantID: vm.TenantID, VMID: vm.ID}
					c.nicOf[n.HostDevice] = n.ID
				}
			}
			c.at = time.Now()
		}
	}
	l, ok := c.byDev[dev]
	return l, c.nicOf[dev], ok
}
