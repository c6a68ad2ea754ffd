package secpolicy

import (
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"net/netip"
	"strings"

	"github.com/metald/metald/internal/policy"
)

// Table and object names in the kernel.
const (
	// TableName is the main table: blocked_sources and the shared base
	// chain rules. The NIC chains live in the shard tables (ShardTable).
	TableName = "metald_security"
	// ShardTablePrefix + "0" .. "7" are the shard tables.
	ShardTablePrefix = "metald_security_"
	// Shards is the number of shard tables.
	Shards = 8

	BlockedSources = "blocked_sources"
	// EgressMap is the former layouts' egress dispatch by source address,
	// deleted where found.
	EgressMap = "egress_by_src"
	// EgressMACMap is the egress dispatch: a VM's packets are attributed
	// by their source MAC (the first-hop table drops a VM port's frames
	// from any other MAC), whatever address they carry.
	EgressMACMap = "egress_by_mac"
	IngressMap   = "ingress_by_dst"
	VMAddrsSet   = "vm_addrs"

	ChainForward = "forward"
	ChainInput   = "input"
	ChainOutput  = "output"

	// ChainNewPostrouting and ChainNewInput are the shard tables' base
	// chains (type nat: they see the first packet of each connection).
	ChainNewPostrouting = "new_postrouting"
	ChainNewInput       = "new_input"

	// LogPrefixDeny is the kernel log prefix of denied packets.
	LogPrefixDeny = "metald-ipv6-deny "
	// LogPrefixAllow is the kernel log prefix of allowed packets of a rule
	// that says `log`.
	LogPrefixAllow = "metald-ipv6-allow "
)

// Isolation is a tenant isolation level.
type Isolation string

// Tenant isolation levels. The zero value means IsolationNone.
const (
	// IsolationStrict: the VM exchanges traffic with VMs of its own
	// tenant, its gateways and its allowed destinations; any other peer
	// (another tenant's VM, a host beyond the gateway) only through an
	// allow rule that names the peer by prefix or sg: (`any` does not).
	IsolationStrict Isolation = "strict"
	// IsolationModerate: traffic with a local VM of another tenant passes
	// only where an explicit allow rule matches on each side (a default
	// allow from an empty list does not count).
	IsolationModerate Isolation = "moderate"
	// IsolationNone: no tenant restriction.
	IsolationNone Isolation = "none"
)

// ErrNotFound reports a NIC that has no state in the table.
var ErrNotFound = errors.New("nic has no security policy")

// ErrInvalid reports a NICPolicy that cannot be enforced.
var ErrInvalid = errors.New("invalid nic policy")

// NICPolicy is the desired enforcement for one VM NIC. Rules must be
// resolved (policy.Resolve): symbolic prefixes filled in. sg: endpoints
// refer to the named set sg-<group>; its members are the addresses of every
// NIC whose SecurityGroups lists the group plus the explicit members given to
// SetGroupMembers (the rule's resolved Members are not used: membership is
// set state, not rule state).
type NICPolicy struct {
	VMID, NIC string
	Tenant    string
	// HostDevice is the host side of the NIC (informational; dispatch is
	// by address).
	HostDevice string
	// Bridge is the bridge the NIC is attached to (for microsegmentation).
	Bridge string
	// Addrs are every IPv6 address of the VM on this NIC, link-local included.
	Addrs []netip.Addr
	// MAC is the NIC's MAC address: its egress chain is found by the
	// packet's source MAC.
	MAC net.HardwareAddr
	// Gateways are the NIC's gateway addresses (global and link-local).
	Gateways []netip.Addr

	Ingress, Egress []policy.Rule
	// IngressDefault and EgressDefault override the default verdict when
	// no rule matches; zero means deny for a non-empty list, allow for an
	// empty one.
	IngressDefault, EgressDefault policy.Action

	TenantIsolation     Isolation
	AllowedDestinations []netip.Prefix
	Microsegmentation   bool
	SecurityGroups      []string
	LogSecurityEvents   bool

	// Isolated quarantines the NIC: everything is dropped except what
	// ManagementIngress / ManagementEgress allow. Isolation wins over the
	// policy.
	Isolated                            bool
	ManagementIngress, ManagementEgress []policy.Rule

	// EventLogGroup, when not 0, makes every counted drop also log a
	// kernel-rate-limited sample to this NFLOG group, attributed to the
	// NIC (HostDevice) and the rule (see eventlog.go).
	EventLogGroup uint16
	// Monitor (enhanced monitoring of the tenant, with EventLogGroup):
	// drops are logged up to MonitorLogRate per rule instead of
	// EventLogRate.
	Monitor bool
	// SampleAllowed (with Monitor; a DEBUG session): a sample of allowed
	// packets (AllowSampleRate per rule) is logged too.
	SampleAllowed bool
}

// Key identifies a NIC: "<vm>.<nic>" with both parts sanitised.
func Key(vmID, nic string) string { return sanitize(vmID) + "." + sanitize(nic) }

func sanitize(s string) string {
	var b strings.Builder
	for i := 0; i < len(s) && b.Len() < 64; i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' {
			b.WriteByte(c)
		} else {
			b.WriteByte('_')
		}
	}
	return b.String()
}

func (p *NICPolicy) key() string { return Key(p.VMID, p.NIC) }

// ShardTable returns the name of shard table i.
func ShardTable(i int) string { return fmt.Sprintf("%s%d", ShardTablePrefix, i) }

// Shard returns the shard of NIC key k (see Key): FNV-1a of the key
// modulo Shards.
func Shard(k string) int {
	h := fnv.New32a()
	h.Write([]byte(k))
	return int(h.Sum32() % Shards)
}

// NICTable returns the name of the table that holds a NIC's chains.
func NICTable(vmID, nic string) string { return ShardTable(Shard(Key(vmID, nic))) }

// Tables returns the names of every policy table: the main table first,
// then the shards.
func Tables() []string {
	out := []string{TableName}
	for i := range Shards {
		out = append(out, ShardTable(i))
	}
	return out
}

// shardIndex returns i for the name of shard table i.
func shardIndex(table string) (int, bool) {
	rest, ok := strings.CutPrefix(table, ShardTablePrefix)
	if !ok {
		return 0, false
	}
	for i := range Shards {
		if rest == fmt.Sprint(i) {
			return i, true
		}
	}
	return 0, false
}

func chainName(key, dir string, gen uint64) string {
	return fmt.Sprintf("vm-%s-%s-g%d", key, dir, gen)
}

// parseChainName splits "vm-<key>-<dir>-g<gen>".
func parseChainName(name string) (key, dir string, gen uint64, ok bool) {
	rest, ok := strings.CutPrefix(name, "vm-")
	if !ok {
		return "", "", 0, false
	}
	i := strings.LastIndex(rest, "-g")
	if i < 0 {
		return "", "", 0, false
	}
	if _, err := fmt.Sscanf(rest[i+2:], "%d", &gen); err != nil {
		return "", "", 0, false
	}
	rest = rest[:i]
	for _, d := range []string{dirIn, dirOut} {
		if k, ok := strings.CutSuffix(rest, "-"+d); ok {
			return k, d, gen, true
		}
	}
	return "", "", 0, false
}

const (
	dirIn  = "in"
	dirOut = "out"
)

func tenantSet(t string) string { return "tenant-" + sanitize(t) }
func bridgeSet(b string) string { return "bridge-" + sanitize(b) }
func groupSet(g string) string  { return "sg-" + sanitize(g) }

// Validate checks what enforcement needs.
func (p *NICPolicy) Validate() error {
	if p.VMID == "" || p.NIC == "" {
		return fmt.Errorf("%w: vm id and nic are required", ErrInvalid)
	}
	if len(p.Addrs) == 0 {
		return fmt.Errorf("%w: %s: no addresses", ErrInvalid, p.key())
	}
	if len(p.MAC) != 6 {
		return fmt.Errorf("%w: %s: MAC %q is not a 6-byte MAC address", ErrInvalid, p.key(), p.MAC)
	}
	for _, a := range p.Addrs {
		if !a.Is6() || a.Is4In6() {
			return fmt.Errorf("%w: %s: address %s is not IPv6", ErrInvalid, p.key(), a)
		}
	}
	for _, a := range p.Gateways {
		if !a.Is6() {
			return fmt.Errorf("%w: %s: gateway %s is not IPv6", ErrInvalid, p.key(), a)
		}
	}
	for _, pf := range p.AllowedDestinations {
		if !pf.IsValid() || !pf.Addr().Is6() {
			return fmt.Errorf("%w: %s: allowed destination %s is not an IPv6 prefix", ErrInvalid, p.key(), pf)
		}
	}
	switch p.TenantIsolation {
	case "", IsolationNone, IsolationModerate, IsolationStrict:
	default:
		return fmt.Errorf("%w: %s: tenant isolation %q", ErrInvalid, p.key(), p.TenantIsolation)
	}
	if (p.TenantIsolation == IsolationStrict || p.TenantIsolation == IsolationModerate || p.Microsegmentation) && p.Tenant == "" {
		return fmt.Errorf("%w: %s: tenant isolation needs a tenant", ErrInvalid, p.key())
	}
	if p.Microsegmentation && p.Bridge == "" {
		return fmt.Errorf("%w: %s: microsegmentation needs a bridge", ErrInvalid, p.key())
	}
	for _, l := range []struct {
		name  string
		rules []policy.Rule
	}{{"ingress", p.Ingress}, {"egress", p.Egress}, {"management ingress", p.ManagementIngress}, {"management egress", p.ManagementEgress}} {
		for i, r := range l.rules {
			if r.Action != policy.ActionAllow && r.Action != policy.ActionDeny {
				return fmt.Errorf("%w: %s: %s rule %d: invalid action", ErrInvalid, p.key(), l.name, i)
			}
			for _, e := range []policy.Endpoint{r.Src, r.Dst} {
				if e.Kind == policy.EndpointPrefix && !e.Prefix.IsValid() {
					return fmt.Errorf("%w: %s: %s rule %d: unresolved endpoint %s", ErrInvalid, p.key(), l.name, i, e.Text)
				}
				if e.Kind == policy.EndpointPrefix && !e.Prefix.Addr().Is6() {
					return fmt.Errorf("%w: %s: %s rule %d: endpoint %s is not IPv6", ErrInvalid, p.key(), l.name, i, e.Prefix)
				}
				if e.Kind == policy.EndpointInvalid {
					return fmt.Errorf("%w: %s: %s rule %d: invalid endpoint", ErrInvalid, p.key(), l.name, i)
				}
			}
		}
	}
	return nil
}

func defaultAction(rules []policy.Rule, override policy.Action) policy.Action {
	if override != 0 {
		return override
	}
	if len(rules) == 0 {
		return policy.ActionAllow
	}
	return policy.ActionDeny
}
