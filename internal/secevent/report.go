package secevent

import (
	"context"
	"slices"
	"strings"
	"time"
)

// Report summarises the events of a period.
type Report struct {
	StartTime    Timestamp      `json:"start_time"`
	EndTime      Timestamp      `json:"end_time"`
	GeneratedAt  Timestamp      `json:"generated_at"`
	TotalEvents  int            `json:"total_events"`
	TotalPackets int64          `json:"total_packets"`
	Violations   int            `json:"violations"`
	ByType       map[string]int `json:"by_type"`
	BySeverity   map[string]int `json:"by_severity"`
	ByVM         []VMTotal      `json:"by_vm"`
	ByTenant     []TenantTotal  `json:"by_tenant"`
	TopSources   []SourceTotal  `json:"top_sources"`
	Timeline     []HourTotal    `json:"timeline"`
	// Truncated is set when the period held more events than the report
	// reads (ReportMaxEvents); totals then cover the newest ones.
	Truncated bool `json:"truncated"`
}

// VMTotal, TenantTotal, SourceTotal and HourTotal are report rows.
type (
	VMTotal struct {
		VMID     string `json:"vm_id"`
		TenantID string `json:"tenant_id"`
		Events   int    `json:"events"`
		Packets  int64  `json:"packets"`
	}
	TenantTotal struct {
		TenantID string `json:"tenant_id"`
		Events   int    `json:"events"`
		Packets  int64  `json:"packets"`
	}
	SourceTotal struct {
		Src     string   `json:"src"`
		Events  int      `json:"events"`
		Packets int64    `json:"packets"`
		VMs     []string `json:"vm_ids"`
	}
	HourTotal struct {
		Hour    Timestamp `json:"hour"`
		Events  int       `json:"events"`
		Packets int64     `json:"packets"`
	}
)

// Report limits.
const (
	ReportMaxEvents  = 200000
	ReportTopSources = 20
	maxTimelineHours = 31 * 24
)

// Report builds the report for [start, end].
func (s *Service) Report(ctx context.Context, start, end time.Time) (Report, error) {
	if end.Before(start) {
		return Report{}, invalidf("end_time before start_time")
	}
	events, err := s.opts.Store.QueryEvents(ctx, Filter{Since: start, Until: end, Limit: ReportMaxEvents + 1})
	if err != nil {
		return Report{}, err
	}
	r := BuildReport(events, start, end)
	if len(events) > ReportMaxEvents {
		r = BuildReport(events[:ReportMaxEvents], start, end)
		r.Truncated = true
	}
	r.GeneratedAt = TS(s.now())
	return r, nil
}

// BuildReport summarises events (pure).
func BuildReport(events []Event, start, end time.Time) Report {
	r := Report{StartTime: TS(start), EndTime: TS(end), ByType: map[string]int{}, BySeverity: map[string]int{},
		ByVM: []VMTotal{}, ByTenant: []TenantTotal{}, TopSources: []SourceTotal{}, Timeline: []HourTotal{}}
	for _, sev := range Severities {
		r.BySeverity[string(sev)] = 0
	}
	vms := map[string]*VMTotal{}
	tenants := map[string]*TenantTotal{}
	srcs := map[string]*SourceTotal{}
	hours := map[int64]*HourTotal{}
	for i := range events {
		e := &events[i]
		pk := max(e.Details.PacketCount, 1)
		r.TotalEvents++
		r.TotalPackets += pk
		if e.Type.Violation() {
			r.Violations++
		}
		r.ByType[string(e.Type)]++
		r.BySeverity[string(e.Severity)]++
		v := vms[e.VMID]
		if v == nil {
			v = &VMTotal{VMID: e.VMID, TenantID: e.TenantID}
			vms[e.VMID] = v
		}
		v.Events++
		v.Packets += pk
		t := tenants[e.TenantID]
		if t == nil {
			t = &TenantTotal{TenantID: e.TenantID}
			tenants[e.TenantID] = t
		}
		t.Events++
		t.Packets += pk
		if src := e.Details.Src; src != "" {
			so := srcs[src]
			if so == nil {
				so = &SourceTotal{Src: src, VMs: []string{}}
				srcs[src] = so
			}
			so.Events++
			so.Packets += pk
			if e.VMID != "" && !slices.Contains(so.VMs, e.VMID) && len(so.VMs) < 16 {
				so.VMs = append(so.VMs, e.VMID)
			}
		}
		h := e.Timestamp.Truncate(time.Hour).Unix()
		ht := hours[h]
		if ht == nil {
			ht = &HourTotal{Hour: TS(time.Unix(h, 0))}
			hours[h] = ht
		}
		ht.Events++
		ht.Packets += pk
	}
	for _, v := range vms {
		r.ByVM = append(r.ByVM, *v)
	}
	slices.SortFunc(r.ByVM, func(a, b VMTotal) int {
		if a.Events != b.Events {
			return b.Events - a.Events
		}
		return strings.Compare(a.VMID, b.VMID)
	})
	for _, t := range tenants {
		r.ByTenant = append(r.ByTenant, *t)
	}
	slices.SortFunc(r.ByTenant, func(a, b TenantTotal) int {
		if a.Events != b.Events {
			return b.Events - a.Events
		}
		return strings.Compare(a.TenantID, b.TenantID)
	})
	for _, so := range srcs {
		r.TopSources = append(r.TopSources, *so)
	}
	slices.SortFunc(r.TopSources, func(a, b SourceTotal) int {
		if a.Packets != b.Packets {
			if a.Packets > b.Packets {
				return -1
			}
			return 1
		}
		return strings.Compare(a.Src, b.Src)
	})
	if len(r.TopSources) > ReportTopSources {
		r.TopSources = r.TopSources[:ReportTopSources]
	}
	// Hourly timeline: every hour of the period (zeros included) when it is
	// at most a month long, else only the hours with events.
	first, last := start.UTC().Truncate(time.Hour), end.UTC().Truncate(time.Hour)
	if !start.IsZero() && !end.IsZero() && last.Sub(first) <= maxTimelineHours*time.Hour {
		for h := first; !h.After(last); h = h.Add(time.Hour) {
			if ht := hours[h.Unix()]; ht != nil {
				r.Timeline = append(r.Timeline, *ht)
			} else {
				r.Timeline = append(r.Timeline, HourTotal{Hour: TS(h)})
			}
		}
	} else {
		for _, ht := range hours {
			r.Timeline = append(r.Timeline, *ht)
		}
		slices.SortFunc(r.Timeline, func(a, b HourTotal) int { return a.Hour.Compare(b.Hour.Time) })
	}
	return r
}
