// Package ipammetrics owns the Prometheus metrics of IPv6 address
// management: a constructed struct registered on a Registerer passed in (no
// package globals) that implements ipam.Observer for counters and reads
// pool usage from the Manager at scrape time for gauges.
//
// Metrics:
//
//	metald_ipv6_pool_utilization{pool_id}            gauge, allocated ÷ min(assignable, max_allocations), 0..1
//	metald_ipv6_pool_allocated{pool_id}              gauge, addresses allocated
//	metald_ipv6_allocations_per_hour                 gauge, allocations made in the trailing hour
//	metald_ipv6_allocations_total{pool_id}           counter, allocations made since start
//	metald_ipv6_allocation_failures_total{reason}    counter, failed reservations by ipam.FailureReason
//	metald_ipv6_leaked_allocations_reclaimed_total   counter, allocations released by leak collection
package ipammetrics

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/metald/metald/internal/ipam"
)

// Source supplies pool usage at scrape time (*ipam.Manager implements it).
type Source interface {
	Stats() ipam.Stats
}

// Metrics holds the IPAM metrics. Construct with New, pass it as
// ipam.Options.Observer, then call Watch with the Manager.
type Metrics struct {
	allocations *prometheus.CounterVec
	failures    *prometheus.CounterVec
	reclaimed   prometheus.Counter

	utilization *prometheus.Desc
	allocated   *prometheus.Desc
	perHour     *prometheus.Desc

	mu  sync.Mutex
	src Source
}

var _ ipam.Observer = (*Metrics)(nil)

// New creates the metrics and registers them on reg.
func New(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		allocations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "metald_ipv6_allocations_total",
			Help: "IPv6 addresses allocated since start, by pool.",
		}, []string{"pool_id"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "metald_ipv6_allocation_failures_total",
			Help: "Failed IPv6 address reservations, by reason (exhausted, quota, rate_limited, permission_denied, conflict, not_in_pool, invalid, internal).",
		}, []string{"reason"}),
		reclaimed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "metald_ipv6_leaked_allocations_reclaimed_total",
			Help: "Leaked IPv6 allocations (VM gone or TERMINATED past the grace period) released.",
		}),
		utilization: prometheus.NewDesc("metald_ipv6_pool_utilization",
			"Allocated addresses divided by min(assignable addresses, max_allocations), 0..1.", []string{"pool_id"}, nil),
		allocated: prometheus.NewDesc("metald_ipv6_pool_allocated",
			"IPv6 addresses currently allocated, by pool.", []string{"pool_id"}, nil),
		perHour: prometheus.NewDesc("metald_ipv6_allocations_per_hour",
			"IPv6 allocations made in the trailing hour.", nil, nil),
	}
	for _, c := range []prometheus.Collector{m.allocations, m.failures, m.reclaimed, (*gauges)(m)} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// Watch sets the source of the gauges.
func (m *Metrics) Watch(src Source) {
	m.mu.Lock()
	m.src = src
	m.mu.Unlock()
}

// Allocated implements ipam.Observer.
func (m *Metrics) Allocated(poolID string, n int) {
	m.allocations.WithLabelValues(poolID).Add(float64(n))
}

// AllocationFailed implements ipam.Observer.
func (m *Metrics) AllocationFailed(reason string) { m.failures.WithLabelValues(reason).Inc() }

// Reclaimed implements ipam.Observer.
func (m *Metrics) Reclaimed(n int) { m.reclaimed.Add(float64(n)) }

// gauges collects the pool gauges from the source at scrape time.
type gauges Metrics

func (g *gauges) Describe(ch chan<- *prometheus.Desc) {
	ch <- g.utilization
	ch <- g.allocated
	ch <- g.perHour
}

func (g *gauges) Collect(ch chan<- prometheus.Metric) {
	g.mu.Lock()
	src := g.src
	g.mu.Unlock()
	if src == nil {
		return
	}
	st := src.Stats()
	for _, p := range st.Pools {
		ch <- prometheus.MustNewConstMetric(g.utilization, prometheus.GaugeValue, p.Utilization, p.ID)
		ch <- prometheus.MustNewConstMetric(g.allocated, prometheus.GaugeValue, float64(p.Allocated), p.ID)
	}
	ch <- prometheus.MustNewConstMetric(g.perHour, prometheus.GaugeValue, float64(st.AllocationsLastHour))
}
