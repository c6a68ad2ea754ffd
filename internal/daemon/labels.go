package daemon

import (
	"context"
	"sync"
	"time"

	"github.com/metald/metald/internal/network/fhmetrics"
)

// labelCache maps host devices to their VM and tenant for metric labels,
// rebuilt from the store at most once a second (a scrape asks per device).
type labelCache struct {
	mu    sync.Mutex
	at    time.Time
	byDev map[string]fhmetrics.Labels
	nicOf map[string]string
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
	if _, ok := c.byDev[dev]; !ok && time.Since(c.at) > 100*time.Millisecond {
		c.at = time.Time{} // a device we do not know yet: a new VM
	}
	if time.Since(c.at) > time.Second {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if vms, err := d.store.ListVMs(ctx); err == nil {
			c.byDev = make(map[string]fhmetrics.Labels, len(vms))
			c.nicOf = make(map[string]string, len(vms))
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
