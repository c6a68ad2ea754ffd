package daemon

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/metald/metald/internal/store"
)

// vmCollector exports metald_vms{state}, read from the store at scrape time
// so it is exact and has no state of its own.
type vmCollector struct {
	store store.Store
	desc  *prometheus.Desc
}

func newVMCollector(s store.Store) *vmCollector {
	return &vmCollector{store: s, desc: prometheus.NewDesc("metald_vms", "Number of VMs by lifecycle state.", []string{"state"}, nil)}
}

func (c *vmCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *vmCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	counts, err := c.store.CountVMsByState(ctx)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(c.desc, err)
		return
	}
	for _, st := range []string{store.StateCreated, store.StateRunning, store.StatePaused, store.StateShutdown, store.StateTerminated} {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(counts[st]), st)
	}
}
