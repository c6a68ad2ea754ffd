package secevent

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"
)

// EventType names what happened.
type EventType string

// Event types. Violations (see EventType.Violation) carry the IPv6_VIOLATION
// marker in security.log.
const (
	TypeRAGuardBlock               EventType = "ra_guard_block"
	TypeSourceGuardViolation       EventType = "source_guard_violation"
	TypeExtensionHeaderBlock       EventType = "extension_header_block"
	TypeNDRateLimitExceeded        EventType = "nd_rate_limit_exceeded"
	TypeICMPv6RateLimitExceeded    EventType = "icmpv6_rate_limit_exceeded"
	TypeRARateLimitExceeded        EventType = "ra_rate_limit_exceeded"
	TypeMulticastRateLimitExceeded EventType = "multicast_rate_limit_exceeded"
	TypePolicyDeny                 EventType = "policy_deny"
	TypeBlockedSource              EventType = "blocked_source"
	TypeTenantIsolationBlock       EventType = "tenant_isolation_block"
	TypeL2Violation                EventType = "l2_violation"
	TypeSecurityDrop               EventType = "security_drop"
	// Not violations: emitted by metald itself or by monitoring.
	TypeVMIsolated            EventType = "vm_isolated"
	TypeVMReleased            EventType = "vm_released"
	TypeFirewallDriftRepaired EventType = "firewall_drift_repaired"
	TypeMonitoredPacket       EventType = "monitored_packet"
	// TypePolicyAllowSample is a sample (at most 10 packets/s per rule) of
	// the packets a VM's security policy allowed, recorded only while the
	// VM's tenant is under enhanced monitoring.
	TypePolicyAllowSample EventType = "policy_allow_sample"
)

// Types lists every event type, violations first.
var Types = []EventType{TypeRAGuardBlock, TypeSourceGuardViolation, TypeExtensionHeaderBlock, TypeNDRateLimitExceeded,
	TypeICMPv6RateLimitExceeded, TypeRARateLimitExceeded, TypeMulticastRateLimitExceeded, TypePolicyDeny,
	TypeBlockedSource, TypeTenantIsolationBlock, TypeL2Violation, TypeSecurityDrop,
	TypeVMIsolated, TypeVMReleased, TypeFirewallDriftRepaired, TypeMonitoredPacket, TypePolicyAllowSample}

// Valid reports whether t is one of Types.
func (t EventType) Valid() bool { return slices.Contains(Types, t) }

// Violation reports whether events of this type are IPv6 security
// violations (a packet dropped for a security reason).
func (t EventType) Violation() bool {
	switch t {
	case TypeVMIsolated, TypeVMReleased, TypeFirewallDriftRepaired, TypeMonitoredPacket, TypePolicyAllowSample:
		return false
	}
	return t != ""
}

// Severity is low, medium, high or critical.
type Severity string

// Severities, lowest first.
const (
	SeverityLow      Severity = "low"
	SeverityMedium   Severity = "medium"
	SeverityHigh     Severity = "high"
	SeverityCritical Severity = "critical"
)

// Severities lists every severity, lowest first.
var Severities = []Severity{SeverityLow, SeverityMedium, SeverityHigh, SeverityCritical}

// Valid reports whether s is one of the four severities.
func (s Severity) Valid() bool {
	switch s {
	case SeverityLow, SeverityMedium, SeverityHigh, SeverityCritical:
		return true
	}
	return false
}

// ViolationMarker is the marker violation lines carry in security.log.
const ViolationMarker = "IPv6_VIOLATION"

// TimeFormat is the fixed-width RFC 3339 UTC form of every time in events
// (millisecond precision), so timestamps also compare correctly as strings
// (jq '.timestamp > "..."').
const TimeFormat = "2006-01-02T15:04:05.000Z"

// Timestamp is a time that marshals in TimeFormat.
type Timestamp struct{ time.Time }

// TS wraps t, truncated to milliseconds in UTC.
func TS(t time.Time) Timestamp {
	if t.IsZero() {
		return Timestamp{}
	}
	return Timestamp{t.UTC().Truncate(time.Millisecond)}
}

// String returns the TimeFormat form ("" for the zero time).
func (t Timestamp) String() string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(TimeFormat)
}

// MarshalJSON implements json.Marshaler.
func (t Timestamp) MarshalJSON() ([]byte, error) {
	if t.IsZero() {
		return []byte("null"), nil
	}
	return []byte(`"` + t.String() + `"`), nil
}

// UnmarshalJSON implements json.Unmarshaler; it accepts any RFC 3339 time.
func (t *Timestamp) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	if s == "" {
		*t = Timestamp{}
		return nil
	}
	v, err := ParseTime(s)
	if err != nil {
		return err
	}
	*t = TS(v)
	return nil
}

// ParseTime parses an operator-supplied time: RFC 3339 with or without
// fractional seconds (`date -Is` output), a '+' that URL decoding turned into
// a space, a bare date, or Unix seconds.
func ParseTime(s string) (time.Time, error) {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, ' '); i > 0 && strings.Contains(s[:i], "T") {
		s = s[:i] + "+" + s[i+1:]
	}
	for _, layout := range []string{time.RFC3339Nano, "2006-01-02T15:04:05Z0700", "2006-01-02T15:04:05", "2006-01-02"} {
		if t, err := time.Parse(layout, s); err == nil {
			return clampTime(t), nil
		}
	}
	var n int64
	if _, err := fmt.Sscanf(s, "%d", &n); err == nil && fmt.Sprint(n) == s {
		return clampTime(time.Unix(n, 0)), nil
	}
	return time.Time{}, fmt.Errorf("parse time %q: want RFC 3339 (e.g. 2024-05-01T10:00:00Z)", s)
}

// Event times are stored as Unix nanoseconds: a bound outside what they
// hold (years 1678-2262) is taken as the nearest one they do, so "until
// 3000-01-01" means "until the end", not an overflowed date in 1677.
var (
	minTime = time.Unix(0, math.MinInt64).UTC()
	maxTime = time.Unix(0, math.MaxInt64).UTC()
)

func clampTime(t time.Time) time.Time {
	switch {
	case t.Before(minTime):
		return minTime
	case t.After(maxTime):
		return maxTime
	}
	return t.UTC()
}

// Details are the type-specific facts of an event. Packet events fill the
// packet fields; aggregated events carry PacketCount, FirstSeen, LastSeen.
type Details struct {
	Src         string    `json:"src,omitempty"`
	Dst         string    `json:"dst,omitempty"`
	SrcMAC      string    `json:"src_mac,omitempty"`
	Protocol    string    `json:"protocol,omitempty"`
	ICMPv6Type  *int      `json:"icmpv6_type,omitempty"`
	ICMPv6Code  *int      `json:"icmpv6_code,omitempty"`
	SrcPort     int       `json:"src_port,omitempty"`
	DstPort     int       `json:"dst_port,omitempty"`
	Header      string    `json:"header,omitempty"`
	Headers     []string  `json:"headers,omitempty"`
	EtherType   string    `json:"ether_type,omitempty"`
	Rule        string    `json:"rule,omitempty"`
	HostDevice  string    `json:"host_device,omitempty"`
	PacketCount int64     `json:"packet_count,omitempty"`
	FirstSeen   Timestamp `json:"first_seen,omitzero"`
	LastSeen    Timestamp `json:"last_seen,omitzero"`
	// SourcesFolded is set on the catch-all event that folds the sources
	// of one VM and type beyond Config.MaxSourcesPerKey (spoofing floods);
	// Src is then "*".
	SourcesFolded bool   `json:"sources_folded,omitempty"`
	Reason        string `json:"reason,omitempty"`
	// Extra carries anything else an emitter wants to record.
	Extra map[string]string `json:"extra,omitempty"`
}

// Event is one security event.
type Event struct {
	ID          string    `json:"id"`
	Timestamp   Timestamp `json:"timestamp"`
	Type        EventType `json:"event_type"`
	Severity    Severity  `json:"severity"`
	VMID        string    `json:"vm_id"`
	TenantID    string    `json:"tenant_id"`
	InterfaceID string    `json:"interface_id"`
	Details     Details   `json:"details"`
}

// NewID returns a unique event id: "evt-" and 24 hex digits, time-ordered.
func NewID(now time.Time) string {
	var b [12]byte
	ns := uint64(now.UnixNano())
	for i := 7; i >= 0; i-- {
		b[i] = byte(ns)
		ns >>= 8
	}
	rand.Read(b[8:])
	return "evt-" + hex.EncodeToString(b[:])
}
