package ipammetrics

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/metald/metald/internal/ipam"
)

func TestMetrics(t *testing.T) {
	ctx := context.Background()
	reg := prometheus.NewPedanticRegistry()
	met, err := New(reg)
	if err != nil {
		t.Fatal(err)
	}
	m, err := ipam.Open(ctx, ipam.NewMemStore(), []ipam.PoolConfig{{ID: "default", Prefixes: []string{"2600:beef::100/126"}}},
		ipam.Options{Observer: met, OrphanMinAge: -1})
	if err != nil {
		t.Fatal(err)
	}
	met.Watch(m)
	for _, vm := range []string{"a", "b", "c", "d", "e"} {
		m.Reserve(ctx, ipam.Request{VMID: vm, NICID: "eth0"})
	}
	if _, err := m.Cleanup(ctx, func(vm string) (bool, time.Time) { return vm != "a", time.Time{} }, 0); err != nil {
		t.Fatal(err)
	}
	got := gather(t, reg)
	for _, line := range []string{
		`metald_ipv6_allocation_failures_total{reason="exhausted"} 1`,
		`metald_ipv6_allocations_per_hour 4`,
		`metald_ipv6_allocations_total{pool_id="default"} 4`,
		`metald_ipv6_leaked_allocations_reclaimed_total 1`,
		`metald_ipv6_pool_allocated{pool_id="default"} 3`,
		`metald_ipv6_pool_utilization{pool_id="default"} 0.75`,
	} {
		if !strings.Contains(got, line+"\n") {
			t.Errorf("missing %s in\n%s", line, got)
		}
	}
}

// gather renders reg's metrics as "name{label="v"} value" lines.
func gather(t *testing.T, reg prometheus.Gatherer) string {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			b.WriteString(mf.GetName())
			if len(m.GetLabel()) > 0 {
				var ls []string
				for _, l := range m.GetLabel() {
					ls = append(ls, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
				}
				b.WriteString("{" + strings.Join(ls, ",") + "}")
			}
			v := m.GetCounter().GetValue() + m.GetGauge().GetValue()
			fmt.Fprintf(&b, " %g\n", v)
		}
	}
	return b.String()
}
