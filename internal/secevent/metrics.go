package secevent

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metric names this package exports.
const (
	MetricEventsTotal    = "metald_network_security_events_total"
	MetricEventsDropped  = "metald_security_events_dropped_total"
	MetricProcessingTime = "metald_ipv6_security_processing_time"
	MetricLogRecords     = "metald_security_log_records_total"
	MetricNFLOGOverruns  = "metald_security_nflog_overruns_total"
	MetricPendingEvents  = "metald_security_events_pending"
	MetricTransactions   = "metald_security_event_store_transactions_total"
	MetricPolicyCache    = "metald_security_policy_cache_total"
)

// Processing stages observed in MetricProcessingTime.
const (
	StageEvent = "event" // handling a batch of events: store, security.log, metrics
	StageRules = "rules" // programming kernel rules (observed by the firewall owner)
)

// Metrics are the security-event metrics. Construct with NewMetrics; a nil
// *Metrics is valid and records nothing.
type Metrics struct {
	events     *prometheus.CounterVec
	dropped    prometheus.Counter
	processing *prometheus.HistogramVec
	records    prometheus.Counter
	overruns   prometheus.Counter
	pending    prometheus.Gauge
	txns       prometheus.Counter
	cache      *prometheus.CounterVec
}

// NewMetrics creates the metrics and registers them on reg (nil: not
// registered, useful in tests).
//
//   - metald_network_security_events_total{severity,tenant_id}: events
//     recorded (an aggregated event counts once; its packets are in
//     details.packet_count; exact packet counts are the nftables counters).
//   - metald_security_events_dropped_total: events lost to back-pressure
//     (full queue or aggregation table).
//   - metald_ipv6_security_processing_time{stage}: histogram in seconds of
//     event handling (stage="event") and rule programming (stage="rules",
//     fed through ObserveProcessing by the firewall owner).
//   - metald_security_log_records_total: NFLOG records read.
//   - metald_security_nflog_overruns_total: times the kernel reported that
//     log records were lost because the reader's socket buffer was full.
//   - metald_security_events_pending: events queued for writing.
//   - metald_security_event_store_transactions_total: store transactions
//     that wrote events (one per event, or one per flush window with
//     batch_processing).
//   - metald_security_policy_cache_total{table,result}: with
//     cache_policies, kernel programming requests whose compiled plan
//     equalled the one last programmed (result="hit": nothing sent to the
//     kernel) or not ("miss"); table is "first_hop" or "policy".
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: MetricEventsTotal, Help: "Security events recorded, by severity and tenant.",
		}, []string{"severity", "tenant_id"}),
		dropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: MetricEventsDropped, Help: "Security events dropped by back-pressure.",
		}),
		processing: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    MetricProcessingTime,
			Help:    "Time in seconds spent in IPv6 security processing (event handling, rule programming).",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}, []string{"stage"}),
		records: prometheus.NewCounter(prometheus.CounterOpts{
			Name: MetricLogRecords, Help: "NFLOG records read by the security event reader.",
		}),
		overruns: prometheus.NewCounter(prometheus.CounterOpts{
			Name: MetricNFLOGOverruns, Help: "NFLOG socket overruns (kernel dropped log records).",
		}),
		pending: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: MetricPendingEvents, Help: "Security events queued for writing.",
		}),
		txns: prometheus.NewCounter(prometheus.CounterOpts{
			Name: MetricTransactions, Help: "Store transactions that wrote security events.",
		}),
		cache: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: MetricPolicyCache, Help: "Rule programming requests checked against the policy cache (cache_policies), by table and result.",
		}, []string{"table", "result"}),
	}
	if reg != nil {
		reg.MustRegister(m.events, m.dropped, m.processing, m.records, m.overruns, m.pending, m.txns, m.cache)
	}
	return m
}

// ObserveProcessing records d under stage (StageRules for rule
// programming).
func (m *Metrics) ObserveProcessing(stage string, d time.Duration) {
	if m == nil {
		return
	}
	m.processing.WithLabelValues(stage).Observe(d.Seconds())
}

// ForgetTenant removes tenant's series (its last VM is gone: the tenant
// label comes from API callers, and series kept for every tenant ever
// seen would grow without bound).
func (m *Metrics) ForgetTenant(tenant string) {
	if m == nil {
		return
	}
	m.events.DeletePartialMatch(prometheus.Labels{"tenant_id": tenant})
}

func (m *Metrics) event(e *Event) {
	if m == nil {
		return
	}
	m.events.WithLabelValues(string(e.Severity), e.TenantID).Inc()
}

func (m *Metrics) drop(n int) {
	if m == nil || n <= 0 {
		return
	}
	m.dropped.Add(float64(n))
}

func (m *Metrics) record() {
	if m != nil {
		m.records.Inc()
	}
}

func (m *Metrics) overrun() {
	if m != nil {
		m.overruns.Inc()
	}
}

func (m *Metrics) setPending(n int) {
	if m != nil {
		m.pending.Set(float64(n))
	}
}

func (m *Metrics) transaction() {
	if m != nil {
		m.txns.Inc()
	}
}

// PolicyCache counts one cache_policies look-up for table ("first_hop" or
// "policy"): hit when the programming was skipped.
func (m *Metrics) PolicyCache(table string, hit bool) {
	if m == nil {
		return
	}
	r := "miss"
	if hit {
		r = "hit"
	}
	m.cache.WithLabelValues(table, r).Inc()
}
