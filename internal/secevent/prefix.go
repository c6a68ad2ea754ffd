package secevent

import (
	"errors"
	"fmt"
	"strings"
)

// PrefixTag starts every log prefix metald's rules use.
const PrefixTag = "metald"

// DefaultGroup is the NFLOG group metald's rules log to unless configured
// otherwise.
const DefaultGroup uint16 = 6420

// MaxPrefixLen is the longest prefix nftables accepts for `log prefix`
// (NF_LOG_PREFIXLEN 128 in newer kernels, but nfnetlink_log and older
// userspace truncate at 64 bytes including the NUL): prefixes are kept to 63.
const MaxPrefixLen = 63

// maxDevLen is IFNAMSIZ-1.
const maxDevLen = 15

// ErrBadPrefix reports a log prefix that is not metald's.
var ErrBadPrefix = errors.New("not a metald log prefix")

// Prefix returns the log prefix for a drop by control on host device dev:
// "metald:<dev>:<control>". An empty dev ("metald::<control>") means the rule
// is not per-device (e.g. a global blocked-source set); the reader then
// attributes the packet by its input port. It panics on a device name longer
// than 15 bytes or on names containing ':' or whitespace, which are
// programming errors in the rule builder.
func Prefix(dev, control string) string {
	if err := checkPrefixParts(dev, control); err != nil {
		panic("secevent.Prefix: " + err.Error())
	}
	return PrefixTag + ":" + dev + ":" + control
}

func checkPrefixParts(dev, control string) error {
	if len(dev) > maxDevLen {
		return fmt.Errorf("device %q longer than %d bytes", dev, maxDevLen)
	}
	if control == "" {
		return errors.New("empty control")
	}
	if strings.ContainsAny(dev, ": \t\n\x00\"") || strings.ContainsAny(control, ": \t\n\x00\"") {
		return fmt.Errorf("device %q or control %q contains a separator", dev, control)
	}
	if n := len(PrefixTag) + 2 + len(dev) + len(control); n > MaxPrefixLen {
		return fmt.Errorf("prefix for %q/%q is %d bytes, limit %d", dev, control, n, MaxPrefixLen)
	}
	return nil
}

// ParsePrefix splits a prefix made by Prefix. Trailing spaces and NULs (some
// tools pad prefixes) are ignored.
func ParsePrefix(p string) (dev, control string, err error) {
	p = strings.TrimRight(p, " \x00")
	rest, ok := strings.CutPrefix(p, PrefixTag+":")
	if !ok {
		return "", "", fmt.Errorf("%q: %w", p, ErrBadPrefix)
	}
	dev, control, ok = strings.Cut(rest, ":")
	if !ok {
		return "", "", fmt.Errorf("%q: %w", p, ErrBadPrefix)
	}
	if err := checkPrefixParts(dev, control); err != nil {
		return "", "", fmt.Errorf("%q: %w: %v", p, ErrBadPrefix, err)
	}
	return dev, control, nil
}

// Classification is what a control's drops mean.
type Classification struct {
	Type     EventType
	Severity Severity
	// Header names the extension header for extension_header_block.
	Header string
}

// Controls named in log prefixes. The first-hop ones equal
// network.Control values; the rest belong to policy and tenant rules.
const (
	CtlRAGuard         = "ra_guard"
	CtlSourceGuard     = "source_guard"
	CtlMACSpoof        = "mac_spoof"
	CtlNDStrict        = "nd_strict"
	CtlL2Violation     = "l2_violation"
	CtlHeaderChain     = "header_chain"
	CtlExtHopByHop     = "ext_hbh"
	CtlExtRouting      = "ext_routing"
	CtlExtFragment     = "ext_fragment"
	CtlExtDestOpts     = "ext_dstopts"
	CtlNDRate          = "nd_rate"
	CtlICMPv6Rate      = "icmpv6_rate"
	CtlRARate          = "ra_rate"
	CtlMulticastRate   = "multicast_rate"
	CtlPolicyDeny      = "policy_deny"
	CtlBlockedSource   = "blocked_source"
	CtlTenantIsolation = "tenant_isolation"
	// CtlMonitor marks packets logged (not dropped) while a tenant is under
	// enhanced monitoring.
	CtlMonitor = "monitor"
	// CtlAllowSample marks the sample of packets a VM's security policy
	// allowed, logged while its tenant is under enhanced monitoring.
	CtlAllowSample = "allow_sample"
)

// RuleSep separates a control from the policy rule that made the
// decision in a log prefix: "metald:<dev>:policy_deny/egress_rules[2]".
// The part after it becomes details.rule.
const RuleSep = "/"

// Control joins a control and the rule reference ("" for none) into the
// control part of a prefix.
func Control(control, rule string) string {
	if rule == "" {
		return control
	}
	return control + RuleSep + rule
}

// SplitControl splits the control part of a prefix into the control and
// the rule reference ("" when there is none).
func SplitControl(c string) (control, rule string) {
	control, rule, _ = strings.Cut(c, RuleSep)
	return control, rule
}

var classes = map[string]Classification{
	CtlRAGuard:         {TypeRAGuardBlock, SeverityHigh, ""},
	CtlSourceGuard:     {TypeSourceGuardViolation, SeverityHigh, ""},
	CtlMACSpoof:        {TypeSourceGuardViolation, SeverityHigh, ""},
	CtlNDStrict:        {TypeSourceGuardViolation, SeverityHigh, ""},
	CtlL2Violation:     {TypeL2Violation, SeverityMedium, ""},
	CtlHeaderChain:     {TypeExtensionHeaderBlock, SeverityMedium, "incomplete_chain"},
	CtlExtHopByHop:     {TypeExtensionHeaderBlock, SeverityMedium, "hop_by_hop"},
	CtlExtRouting:      {TypeExtensionHeaderBlock, SeverityMedium, "routing"},
	CtlExtFragment:     {TypeExtensionHeaderBlock, SeverityMedium, "fragment"},
	CtlExtDestOpts:     {TypeExtensionHeaderBlock, SeverityMedium, "destination_options"},
	CtlNDRate:          {TypeNDRateLimitExceeded, SeverityMedium, ""},
	CtlICMPv6Rate:      {TypeICMPv6RateLimitExceeded, SeverityMedium, ""},
	CtlRARate:          {TypeRARateLimitExceeded, SeverityMedium, ""},
	CtlMulticastRate:   {TypeMulticastRateLimitExceeded, SeverityMedium, ""},
	CtlPolicyDeny:      {TypePolicyDeny, SeverityLow, ""},
	CtlBlockedSource:   {TypeBlockedSource, SeverityHigh, ""},
	CtlTenantIsolation: {TypeTenantIsolationBlock, SeverityMedium, ""},
	CtlMonitor:         {TypeMonitoredPacket, SeverityLow, ""},
	CtlAllowSample:     {TypePolicyAllowSample, SeverityLow, ""},
}

// Classify maps a control to its event type and severity. Unknown controls
// (a rule newer than this reader) become security_drop/low so nothing is
// silently lost; ok reports whether the control was known.
func Classify(control string) (c Classification, ok bool) {
	control, _ = SplitControl(control)
	c, ok = classes[control]
	if !ok {
		return Classification{Type: TypeSecurityDrop, Severity: SeverityLow}, false
	}
	if c.Header == "" && strings.HasPrefix(control, "ext_") {
		c.Header = strings.TrimPrefix(control, "ext_")
	}
	return c, true
}
