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
}

func (d *Daemon) deviceLabels(dev string) (fhmetrics.Labels, bool) {
	c := &d.labels
	c.mu.Lock()
	defer c.mu.Unlock()
	if time.Since(c.at) > time.Second {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if vms, err := d.store.ListVMs(ctx); err == nil {
			c.byDev = make(map[string]fhmetrics.Labels, len(vms))
			for _, vm := range vms {
				for _, n := range vm.NICs {
					c.byDev[n.HostDevice] = fhmetrics.Labels{TenantID: vm.TenantID, VMID: vm.ID}
				}
			}
			c.at = time.Now()
		}
	}
	l, ok := c.byDev[dev]
	return l, ok
}
