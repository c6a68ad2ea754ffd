package secpolicy

import (
	"fmt"
	"strings"

	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Security events from this table (internal/secevent parses them).
//
// When NICPolicy.EventLogGroup is set, every counted verdict rule of a NIC
// chain that drops is preceded by a rule with the same match that logs a
// kernel-rate-limited sample of the packets to that NFLOG group and falls
// through to the counted rule, so exact counts stay the counters' and the
// kernel log (LogPrefixDeny, for rules that say `log`) is unchanged. The
// prefix is "metald:<host device>:<control>/<rule>" with
//
//	control           rule                                    drop by
//	policy_deny       ingress_rules[i], egress_rules[i]       a deny rule (strict chain included)
//	policy_deny       management_ingress[i], ...              a quarantine management deny rule
//	policy_deny       ingress_default, egress_default         the default verdict
//	policy_deny       ingress_isolated, egress_isolated       quarantine
//	policy_deny       allowed_destinations                    allowed_destinations (egress)
//	policy_deny       <dir>_microsegmentation                 microsegmentation
//	tenant_isolation  <dir>_strict, <dir>_moderate            tenant isolation
//
// The sample is at most EventLogRate packets/s per rule; with
// NICPolicy.Monitor (enhanced monitoring) at most MonitorLogRate, i.e.
// every drop short of a flood, and each counted allow rule is preceded by
// a rule logging at most AllowSampleRate packets/s with control
// allow_sample. The base chains log drops by blocked_sources to
// EventLogGroup with "metald::blocked_source" (no device: the reader
// attributes the packet by its bridge ports).

// EventLogGroup is the NFLOG group of the base chains' blocked-source
// samples: metald's security event group (secevent.DefaultGroup).
const EventLogGroup uint16 = 6420

// Kernel rate limits of the event log rules, packets per second per rule.
const (
	EventLogRate    = 10
	eventLogBurst   = 20
	MonitorLogRate  = 1000
	monitorLogBurst = 100
	AllowSampleRate = 10
	allowLogBurst   = 10
)

// Controls in event log prefixes.
const (
	evPolicyDeny      = "policy_deny"
	evTenantIsolation = "tenant_isolation"
	evBlockedSource   = "blocked_source"
	evRAGuard         = "ra_guard"
	evAllowSample     = "allow_sample"
)

// maxEventPrefix is the longest log prefix (secevent.MaxPrefixLen).
const maxEventPrefix = 63

// EventLogPrefix is the NFLOG prefix of a decision by rule on host device
// dev: "metald:<dev>:<control>/<rule>" (rule shortened to fit 63 bytes).
func EventLogPrefix(dev, control, rule string) string {
	s := "metald:" + dev + ":" + control
	if rule != "" {
		s += "/" + rule
	}
	if len(s) > maxEventPrefix {
		s = s[:maxEventPrefix]
	}
	return s
}

func nflogExpr(group uint16, prefix string) expr.Any {
	return &expr.Log{Key: 1<<unix.NFTA_LOG_GROUP | 1<<unix.NFTA_LOG_PREFIX, Group: group, Data: []byte(prefix)}
}

func pktLimit(rate, burst uint32) expr.Any {
	return &expr.Limit{Type: expr.LimitTypePkts, Rate: uint64(rate), Unit: expr.LimitTimeSecond, Burst: burst}
}

// eventRef classifies a NIC chain rule by its comment: the event control
// and rule reference, or ok=false for rules that are not decisions.
func eventRef(comment, dir string, allow bool) (control, rule string, ok bool) {
	dn := "egress"
	if dir == dirIn {
		dn = "ingress"
	}
	control = evPolicyDeny
	if allow {
		control = evAllowSample
	}
	if list, rest, found := strings.Cut(comment, "["); found {
		idx, _, _ := strings.Cut(rest, "]")
		switch list {
		case "ingress", "egress":
			return control, fmt.Sprintf("%s_rules[%s]", list, idx), true
		case "management_ingress", "management_egress":
			return control, fmt.Sprintf("%s[%s]", list, idx), true
		}
		return "", "", false
	}
	switch comment {
	case ctlDefault:
		return control, dn + "_default", true
	case ctlIsolated:
		return control, dn + "_isolated", true
	case ctlAllowedDst:
		return control, "allowed_destinations", true
	case ctlMicroseg:
		return control, dn + "_microsegmentation", true
	case ctlStrict:
		if allow {
			return control, dn + "_strict", true
		}
		return evTenantIsolation, dn + "_strict", true
	case ctlModerate:
		if allow {
			return control, dn + "_moderate", true
		}
		return evTenantIsolation, dn + "_moderate", true
	}
	return "", "", false
}

// decision reports whether a rule is a counted verdict and whether it
// allows: `<match> counter <verdict>`.
func decision(r nrule) (match []expr.Any, allow, ok bool) {
	n := len(r.exprs)
	if n < 2 || len(r.anons) > 0 {
		return nil, false, false
	}
	if _, isCounter := r.exprs[n-2].(*expr.Counter); !isCounter {
		return nil, false, false
	}
	v, isVerdict := r.exprs[n-1].(*expr.Verdict)
	if !isVerdict {
		return nil, false, false
	}
	switch {
	case v.Kind == expr.VerdictDrop, v.Kind == expr.VerdictGoto && v.Chain == chainLogDeny:
		return r.exprs[:n-2], false, true
	case v.Kind == expr.VerdictReturn, v.Kind == expr.VerdictGoto && v.Chain == chainLogAllow:
		return r.exprs[:n-2], true, true
	}
	return nil, false, false
}

// withEventLogs adds the NFLOG sample rules (see above) to a NIC's chains
// of one direction.
func withEventLogs(p *NICPolicy, dir string, c nicChains) nicChains {
	if p.EventLogGroup == 0 {
		return c
	}
	c.main.rules = eventLogRules(p, dir, c.main.rules)
	for i := range c.helpers {
		c.helpers[i].rules = eventLogRules(p, dir, c.helpers[i].rules)
	}
	return c
}

func eventLogRules(p *NICPolicy, dir string, rules []nrule) []nrule {
	out := make([]nrule, 0, len(rules)*2)
	for _, r := range rules {
		match, allow, ok := decision(r)
		if ok && (!allow || (p.Monitor && p.SampleAllowed)) {
			if ctl, ref, ok := eventRef(r.comment, dir, allow); ok {
				rate, burst := uint32(EventLogRate), uint32(eventLogBurst)
				switch {
				case allow:
					rate, burst = AllowSampleRate, allowLogBurst
				case p.Monitor:
					rate, burst = MonitorLogRate, monitorLogBurst
				}
				exprs := make([]expr.Any, 0, len(match)+2)
				exprs = append(exprs, match...)
				exprs = append(exprs, pktLimit(rate, burst), nflogExpr(p.EventLogGroup, EventLogPrefix(p.HostDevice, ctl, ref)))
				out = append(out, nrule{exprs: exprs, comment: r.comment + " event log"})
			}
		}
		out = append(out, r)
	}
	return out
}

// blockedSourceLog is the sample rule before the blocked-source drop
// (chain blocked, reached from the forward chain for a source or
// destination in blocked_sources): rate-limited, logged to EventLogGroup.
// Both directions share the one rate limit.
func raFromVMLog() nrule {
	exprs := []expr.Any{pktLimit(EventLogRate, eventLogBurst), nflogExpr(EventLogGroup, EventLogPrefix("", evRAGuard, ""))}
	return nrule{exprs: exprs, comment: "ra from vm event log"}
}

func blockedSourceLog() nrule {
	exprs := []expr.Any{pktLimit(EventLogRate, eventLogBurst), nflogExpr(EventLogGroup, EventLogPrefix("", evBlockedSource, ""))}
	return nrule{exprs: exprs, comment: "blocked source event log"}
}
