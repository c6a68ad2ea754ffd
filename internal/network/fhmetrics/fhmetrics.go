// Package fhmetrics owns the Prometheus metrics of IPv6 first-hop security:
// a constructed collector, registered on a Registerer passed in (no package
// globals), that reads the nft table's named counters at scrape time, so
// every value is exact (never derived from logs or sampled).
//
// Metrics (labels: tenant_id, plus vm_id when Options.PerVMLabels is on):
//
//	metald_ipv6_ra_guard_blocks_total                   ra_guard
//	metald_ipv6_source_guard_violations_total           source_guard + mac_spoof + nd_strict
//	metald_ipv6_extension_header_blocks_total{header}   hop_by_hop=ext_hbh, routing=ext_routing,
//	                                                    fragment=ext_fragment, destination_options=ext_dstopts
//	metald_ipv6_nd_rate_limit_exceeded_total            nd_rate
//	metald_ipv6_rate_limit_exceeded_total{kind}         nd=nd_rate, icmpv6=icmpv6_rate, ra=ra_rate,
//	                                                    multicast=multicast_rate
//	metald_ipv6_first_hop_drops_total{control}          every control counter as is (the complete,
//	                                                    unaggregated view: l2_violation, header_chain
//	                                                    and vlan appear only here)
//	metald_firewall_repairs_total{kind}                 drift repaired by nft.Reconcile
//	                                                    (kind: table, base, nic, removed); no tenant label
//
// Source guard violations are every frame refused because it claimed an
// identity the port does not own: an unbound IPv6 source or NA target
// (source_guard, including privacy addresses held by another port), a
// foreign source MAC (mac_spoof), or a foreign MAC in an ND link-layer
// option (nd_strict). l2_violation (tags, non-IPv6 ethertypes) and
// header_chain (RFC 7112) are protocol violations, not identity claims.
//
// # Totals never go backwards
//
// The kernel counters of a NIC vanish when it is removed (or reset when its
// counter objects are recreated). The collector keeps, per label set, an
// accumulated offset:
//
//   - Removal through the Firewall: the Firewall reports the NIC's final
//     counter values, read in the removal operation (nft.Observer
//     NICRemoved), and they are added to the offset. Exact up to the
//     packets of one netlink round trip.
//   - A NIC vanishing otherwise (operator deleted the table) or a counter
//     going down (recreated objects): the values seen at the previous
//     scrape are added to the offset; packets between that scrape and the
//     loss are not counted.
//
// Labels of a host device come from the caller's LabelFunc and are
// remembered, so a NIC removed after its VM was forgotten keeps its labels.
package fhmetrics

import (
	"sort"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/metald/metald/internal/network"
	"github.com/metald/metald/internal/network/nft"
)

// Source reads every NIC's counters (*nft.Firewall implements it).
type Source interface {
	AllCounters() (map[string]map[network.Control]uint64, error)
}

// Labels identify the owner of a host device.
type Labels struct {
	TenantID string
	VMID     string
}

// LabelFunc maps a host device to its owner; ok is false for unknown
// devices (their counters are reported with empty labels).
type LabelFunc func(hostDev string) (l Labels, ok bool)

// Options configure a Collector.
type Options struct {
	// PerVMLabels adds the vm_id label (metrics.per_vm_labels).
	PerVMLabels bool
	// Labels maps host devices to owners; required.
	Labels LabelFunc
}

type metricSpec struct {
	desc  *prometheus.Desc
	value string // extra label value ("" for none)
	ctls  []network.Control
}

// Collector exports the first-hop security metrics. It implements
// prometheus.Collector and nft.Observer; install it with
// Firewall.SetObserver so removals and repairs are accounted.
type Collector struct {
	src     Source
	opts    Options
	specs   []metricSpec
	repairs *prometheus.CounterVec

	mu     sync.Mutex
	last   map[string]devState                   // dev -> values at last scrape
	offset map[Labels]map[network.Control]uint64 // folded counts of vanished counters
	folded map[string]map[network.Control]uint64 // dev -> values folded by vanish detection, awaiting NICRemoved
}

type devState struct {
	labels Labels
	values map[network.Control]uint64
}

var _ nft.Observer = (*Collector)(nil)

// New creates the collector over src and registers it on reg.
func New(reg prometheus.Registerer, src Source, opts Options) (*Collector, error) {
	if opts.Labels == nil {
		opts.Labels = func(string) (Labels, bool) { return Labels{}, false }
	}
	labels := []string{"tenant_id"}
	if opts.PerVMLabels {
		labels = append(labels, "vm_id")
	}
	d := func(name, help string, extra ...string) *prometheus.Desc {
		return prometheus.NewDesc(name, help, append(append([]string{}, extra...), labels...), nil)
	}
	ra := d("metald_ipv6_ra_guard_blocks_total", "Router advertisements, redirects, DHCPv6 server messages and fragmented ND dropped by RA guard.")
	sg := d("metald_ipv6_source_guard_violations_total", "Frames dropped for a source address, NA target, source MAC or ND link-layer option the port does not own.")
	eh := d("metald_ipv6_extension_header_blocks_total", "Packets dropped for carrying a blocked IPv6 extension header.", "header")
	nd := d("metald_ipv6_nd_rate_limit_exceeded_total", "Neighbour solicitations/advertisements from VMs dropped over nd_rate_limit.")
	rl := d("metald_ipv6_rate_limit_exceeded_total", "Packets dropped over a per-port rate limit, by kind.", "kind")
	all := d("metald_ipv6_first_hop_drops_total", "Frames dropped by each first-hop security control counter.", "control")
	c := &Collector{src: src, opts: opts,
		last: map[string]devState{}, offset: map[Labels]map[network.Control]uint64{}, folded: map[string]map[network.Control]uint64{},
		repairs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "metald_firewall_repairs_total",
			Help: "Firewall drift repaired by reconciliation, by kind (first-hop table, base, nic, removed; policy: the security policy tables rebuilt).",
		}, []string{"kind"}),
	}
	c.specs = []metricSpec{
		{desc: ra, ctls: []network.Control{network.CtlRAGuard}},
		{desc: sg, ctls: []network.Control{network.CtlSourceGuard, network.CtlMACSpoof, network.CtlNDStrict}},
		{desc: eh, value: "hop_by_hop", ctls: []network.Control{network.CtlExtHopByHop}},
		{desc: eh, value: "routing", ctls: []network.Control{network.CtlExtRouting}},
		{desc: eh, value: "fragment", ctls: []network.Control{network.CtlExtFragment}},
		{desc: eh, value: "destination_options", ctls: []network.Control{network.CtlExtDestOpts}},
		{desc: nd, ctls: []network.Control{network.CtlNDRate}},
		{desc: rl, value: "nd", ctls: []network.Control{network.CtlNDRate}},
		{desc: rl, value: "icmpv6", ctls: []network.Control{network.CtlICMPv6Rate}},
		{desc: rl, value: "ra", ctls: []network.Control{network.CtlRARate}},
		{desc: rl, value: "multicast", ctls: []network.Control{network.CtlMulticastRate}},
	}
	for _, ctl := range network.AllControls {
		c.specs = append(c.specs, metricSpec{desc: all, value: string(ctl), ctls: []network.Control{ctl}})
	}
	for _, k := range []string{"table", "base", "nic", "removed", "policy"} {
		c.repairs.WithLabelValues(k)
	}
	for _, col := range []prometheus.Collector{c, c.repairs} {
		if err := reg.Register(col); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	seen := map[*prometheus.Desc]bool{}
	for _, s := range c.specs {
		if !seen[s.desc] {
			seen[s.desc] = true
			ch <- s.desc
		}
	}
}

func (c *Collector) labelsOf(dev string) Labels {
	l, ok := c.opts.Labels(dev)
	if !ok {
		if st, ok := c.last[dev]; ok {
			return st.labels
		}
		return Labels{}
	}
	if !c.opts.PerVMLabels {
		l.VMID = ""
	}
	return l
}

func (c *Collector) fold(l Labels, v map[network.Control]uint64) {
	o := c.offset[l]
	if o == nil {
		o = map[network.Control]uint64{}
		c.offset[l] = o
	}
	for k, n := range v {
		o[k] += n
	}
}

// Collect implements prometheus.Collector: one dump of the table's
// counters per scrape.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now, err := c.src.AllCounters()
	if err != nil {
		for _, s := range c.specs {
			ch <- prometheus.NewInvalidMetric(s.desc, err)
			break
		}
		return
	}
	totals := map[Labels]map[network.Control]uint64{}
	add := func(l Labels, v map[network.Control]uint64) {
		t := totals[l]
		if t == nil {
			t = map[network.Control]uint64{}
			totals[l] = t
		}
		for k, n := range v {
			t[k] += n
		}
	}
	for dev, prev := range c.last {
		if _, ok := now[dev]; !ok {
			c.fold(prev.labels, prev.values)
			c.folded[dev] = prev.values
			delete(c.last, dev)
		}
	}
	for dev, v := range now {
		delete(c.folded, dev) // it is back (recreated): a later removal reports a new counter
		l := c.labelsOf(dev)
		if prev, ok := c.last[dev]; ok {
			reset := prev.labels != l
			for k, n := range prev.values {
				if v[k] < n {
					reset = true
				}
			}
			if reset {
				c.fold(prev.labels, prev.values)
			}
		}
		c.last[dev] = devState{labels: l, values: v}
		add(l, v)
	}
	for l, v := range c.offset {
		add(l, v)
	}
	keys := make([]Labels, 0, len(totals))
	for l := range totals {
		keys = append(keys, l)
	}
	sort.Slice(keys, func(i, j int) bool {
		return keys[i].TenantID+"\x00"+keys[i].VMID < keys[j].TenantID+"\x00"+keys[j].VMID
	})
	for _, l := range keys {
		lv := []string{l.TenantID}
		if c.opts.PerVMLabels {
			lv = append(lv, l.VMID)
		}
		for _, s := range c.specs {
			var sum uint64
			for _, ctl := range s.ctls {
				sum += totals[l][ctl]
			}
			vals := lv
			if s.value != "" {
				vals = append([]string{s.value}, lv...)
			}
			ch <- prometheus.MustNewConstMetric(s.desc, prometheus.CounterValue, float64(sum), vals...)
		}
	}
}

// ForgetTenant drops the counts kept for tenant's removed NICs (its last
// VM is gone), so that its series end instead of staying for good: the
// tenant label comes from API callers. A NIC of the tenant still in the
// table keeps its own series.
func (c *Collector) ForgetTenant(tenant string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for l := range c.offset {
		if l.TenantID == tenant {
			delete(c.offset, l)
		}
	}
}

// NICRemoved implements nft.Observer: the final counter values of a
// removed NIC join its labels' offset.
func (c *Collector) NICRemoved(hostDev string, final map[network.Control]uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	l := c.labelsOf(hostDev)
	if prev, ok := c.last[hostDev]; ok {
		l = prev.labels
		delete(c.last, hostDev)
	}
	// A scrape that already saw the NIC gone folded its previous values;
	// add only what it missed.
	already := c.folded[hostDev]
	delete(c.folded, hostDev)
	rest := map[network.Control]uint64{}
	for k, n := range final {
		if n >= already[k] {
			rest[k] = n - already[k]
		}
	}
	c.fold(l, rest)
}

// Repaired implements nft.Observer: counts repairs by kind.
func (c *Collector) Repaired(r nft.Repairs) {
	for k, n := range r.Kinds() {
		c.repairs.WithLabelValues(k).Add(float64(n))
	}
}

// CountRepair counts one repair of kind (see metald_firewall_repairs_total).
func (c *Collector) CountRepair(kind string) { c.repairs.WithLabelValues(kind).Inc() }

// String names the label set, for logs.
func (l Labels) String() string {
	return strings.TrimSuffix("tenant="+l.TenantID+" vm="+l.VMID, " vm=")
}
