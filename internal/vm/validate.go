package vm

// This file holds CreateVm request validation: pure checks of a request's
// shape and values, done before any resource is reserved. Checks that need
// state (is the address free, does the bridge exist) happen later, in the
// manager.

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	vmprovisionerv1 "github.com/metald/metald/internal/gen/vmprovisioner/v1"
	"github.com/metald/metald/internal/ipam"
)

// Limits enforced by ValidateCreate.
const (
	limMaxVCPUs             = 64
	limMinMemoryBytes       = 16 << 20 // 16 MiB
	limMemoryAlignBytes     = 1 << 20  // 1 MiB
	limMaxMemoryBytes       = 1 << 40  // 1 TiB
	limMaxKernelArgsBytes   = 4096
	limMaxNICs              = 8
	limMaxIfnameLen         = 15 // IFNAMSIZ - 1
	limMaxVLAN              = 4094
	limMaxDNSServers        = 3
	limMinTempValidLifetime = 60      // seconds
	limMaxTempValidLifetime = 2592000 // 30 days, in seconds
	limMaxSecurityRate      = 1_000_000
	limMaxRulesPerDirection = 256
	limMaxRuleBytes         = 512
	limMaxDestinations      = 256
	limMaxBandwidthMbps     = 100_000
	limMaxPacketRate        = 100_000_000
	limMaxSecurityGroups    = 32
	limMaxMetadataKeys      = 64
	limMaxMetadataKeyBytes  = 128
	limMaxMetadataValBytes  = 4096
)

var (
	// dnsLabelRE is an RFC 1123 label in lower case: vm_id and storage ids.
	dnsLabelRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	// tenantNameRE is a tenant id or security group name: a DNS label that
	// may also contain '.' and '_' inside (the pools' tenant_ids have the
	// same form).
	tenantNameRE = ipam.TenantIDPattern
)

// FieldViolation is one problem with one field of a request.
type FieldViolation struct {
	// Field is the path of the offending field, spelled with the API's JSON
	// (snake_case) names and zero-based indexes, e.g.
	// "config.network[0].ipv6.address". Map entries are written
	// config.metadata["key"].
	Field string
	// Reason says what is wrong, in lower case, quoting the bad value.
	Reason string
}

// ValidationError reports every problem ValidateCreate found in a request,
// in the order of the request's fields. The API layer maps it to
// InvalidArgument.
type ValidationError struct {
	Violations []FieldViolation
}

// Error returns "<field>: <reason>" of the first violation, followed by
// "(and N more)" when there are others.
func (e *ValidationError) Error() string {
	if len(e.Violations) == 0 {
		return "invalid request"
	}
	v := e.Violations[0]
	s := v.Field + ": " + v.Reason
	if n := len(e.Violations) - 1; n > 0 {
		s += fmt.Sprintf(" (and %d more)", n)
	}
	return s
}

// ValidateOptions holds the parsers ValidateCreate uses for addresses and
// firewall rules. Every address in a request is parsed through these hooks
// and never directly, so that a caller can accept more notations (such as
// symbolic subnet names) than plain netip. A nil hook gets its default.
type ValidateOptions struct {
	// ParsePrefix parses an address with a prefix length
	// (ipv6.address, security_policy.allowed_destinations).
	// Default: netip.ParsePrefix.
	ParsePrefix func(string) (netip.Prefix, error)
	// ParseAddr parses a bare address (ipv6.gateway, ipv6.dns_servers,
	// ipv6.security.allowed_ra_sources). Default: netip.ParseAddr.
	ParseAddr func(string) (netip.Addr, error)
	// ParseRule checks one firewall rule (security_policy.ingress_rules and
	// egress_rules). Default: the rule is non-empty, at most 512 bytes and
	// printable ASCII.
	ParseRule func(string) error
}

func (o ValidateOptions) withDefaults() ValidateOptions {
	if o.ParsePrefix == nil {
		o.ParsePrefix = netip.ParsePrefix
	}
	if o.ParseAddr == nil {
		o.ParseAddr = netip.ParseAddr
	}
	if o.ParseRule == nil {
		o.ParseRule = checkRuleText
	}
	return o
}

// checkRuleText is the default ParseRule: it checks only the rule's size and
// alphabet, not its grammar.
func checkRuleText(s string) error {
	if s == "" {
		return fmt.Errorf("rule is empty")
	}
	if len(s) > limMaxRuleBytes {
		return fmt.Errorf("rule is %d bytes, longer than %d", len(s), limMaxRuleBytes)
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c > 0x7e {
			return fmt.Errorf("rule has non-printable or non-ASCII byte %#02x at offset %d", c, i)
		}
	}
	return nil
}

// ValidID reports whether id has the form of a VM id (CreateVm refuses
// any other, so no VM has one).
func ValidID(id string) bool { return dnsLabelRE.MatchString(id) }

// ValidateCreate checks a CreateVm request without side effects. It returns
// nil or a *ValidationError listing every violation, in field order. Checks
// that depend on a field that is itself invalid are skipped, so one mistake
// yields one violation.
//
// The rules, by field (ifname means a Linux interface name: 1..15 bytes of
// [A-Za-z0-9_.-], not "." or "..", not "lo"):
//
//	vm_id                  "" (metald generates one) or a lower-case DNS
//	                       label [a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?
//	config                 required
//	config.cpu             required; vcpu_count 1..64
//	config.memory          required; size_bytes 16 MiB..1 TiB, a multiple
//	                       of 1 MiB
//	config.boot            required; kernel_path required; kernel_path and
//	                       initrd_path absolute, clean (filepath.Clean
//	                       leaves them unchanged), no NUL or line break;
//	                       kernel_args at most 4096 bytes, no NUL or line
//	                       break
//	config.storage[i]      path required, same form as kernel_path, unique;
//	                       id optional, a lower-case DNS label, unique; at
//	                       most one is_root_device
//	config.network         0..8 NICs (zero NICs: the VM has no network)
//	  [i].id               required ifname, unique
//	  [i].interface_type   "" or "virtio-net"
//	  [i].bridge_name      required ifname
//	  [i].vlan_id          "" (untagged) or decimal 1..4094, no sign or
//	                       leading zeros
//	  [i].mac_address      "" (generated) or six colon-separated hex octets;
//	                       unicast, not all zeros, unique across NICs
//	  [i].ipv6.address     optional (IPAM assigns one); via ParsePrefix: an
//	                       IPv6 address with prefix length 1..128; not
//	                       unspecified, loopback, multicast, link-local or
//	                       IPv4-mapped; not the subnet-router anycast
//	                       address (host bits all zero, lengths 1..126);
//	                       unique across NICs
//	  [i].ipv6.gateway     optional; via ParseAddr: IPv6, not unspecified,
//	                       loopback, multicast or IPv4-mapped, no zone;
//	                       unless link-local it lies inside the address's
//	                       prefix and differs from the address
//	  [i].ipv6.dns_servers at most 3; each via ParseAddr: IPv6, not
//	                       unspecified, multicast or IPv4-mapped, no zone,
//	                       no duplicates
//	  [i].ipv6.temp_valid_lifetime
//	                       when set, 60..2592000 seconds
//	  [i].ipv6.security    allowed_ra_sources: each via ParseAddr, same
//	                       rules as dns_servers; must be empty when
//	                       enable_ra_guard is explicitly false.
//	                       nd_rate_limit, icmpv6_rate_limit, ra_rate_limit,
//	                       multicast_rate_limit: at most 1000000
//	  [i].security_policy  ingress_rules, egress_rules: at most 256 each,
//	                       each via ParseRule; tenant_isolation_level "",
//	                       "strict", "moderate" or "none";
//	                       allowed_destinations: at most 256, each via
//	                       ParsePrefix, IPv6, no host bits set;
//	                       bandwidth_limit_mbps at most 100000;
//	                       packet_rate_limit at most 100000000
//	config.tenant_id       "" or [a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?
//	config.security_profile
//	                       profile_name "", "high", "medium" or "low";
//	                       security_groups at most 32, each like
//	                       tenant_id, unique
//	config.compliance      frameworks each exactly "PCI-DSS", "SOC2" or
//	                       "ISO27001", unique; data_residency "" or two
//	                       upper-case letters
//	config.metadata        at most 64 entries; keys 1..128 bytes; values
//	                       at most 4096 bytes
func ValidateCreate(req *vmprovisionerv1.CreateVmRequest, opts ValidateOptions) error {
	v := &createValidator{opts: opts.withDefaults()}
	if req == nil {
		v.add("", "request is required")
		return v.result()
	}
	if id := req.GetVmId(); id != "" && !dnsLabelRE.MatchString(id) {
		v.add("vm_id", "must be a lower-case DNS label of at most 63 characters ([a-z0-9], '-' inside), got %q", id)
	}
	if req.GetConfig() == nil {
		v.add("config", "is required")
		return v.result()
	}
	v.config("config", req.GetConfig())
	return v.result()
}

// createValidator collects violations.
type createValidator struct {
	opts ValidateOptions
	vs   []FieldViolation
}

func (v *createValidator) add(field, format string, args ...any) {
	v.vs = append(v.vs, FieldViolation{Field: field, Reason: fmt.Sprintf(format, args...)})
}

func (v *createValidator) result() error {
	if len(v.vs) == 0 {
		return nil
	}
	return &ValidationError{Violations: v.vs}
}

func idx(field string, i int) string { return field + "[" + strconv.Itoa(i) + "]" }

func (v *createValidator) config(f string, c *vmprovisionerv1.VmConfig) {
	if c.GetCpu() == nil {
		v.add(f+".cpu", "is required")
	} else if n := c.GetCpu().GetVcpuCount(); n < 1 || n > limMaxVCPUs {
		v.add(f+".cpu.vcpu_count", "must be between 1 and %d, got %d", limMaxVCPUs, n)
	}

	if c.GetMemory() == nil {
		v.add(f+".memory", "is required")
	} else {
		n := c.GetMemory().GetSizeBytes()
		switch {
		case n < limMinMemoryBytes:
			v.add(f+".memory.size_bytes", "must be at least 16 MiB (%d), got %d", limMinMemoryBytes, n)
		case n > limMaxMemoryBytes:
			v.add(f+".memory.size_bytes", "must be at most 1 TiB (%d), got %d", int64(limMaxMemoryBytes), n)
		case n%limMemoryAlignBytes != 0:
			v.add(f+".memory.size_bytes", "must be a multiple of 1 MiB (%d), got %d", limMemoryAlignBytes, n)
		}
	}

	v.boot(f+".boot", c.GetBoot())
	v.storage(f+".storage", c.GetStorage())
	v.network(f+".network", c.GetNetwork())

	if t := c.GetTenantId(); t != "" && !tenantNameRE.MatchString(t) {
		v.add(f+".tenant_id", "must be 1..63 characters of [a-z0-9._-] starting and ending with [a-z0-9], got %q", t)
	}
	v.securityProfile(f+".security_profile", c.GetSecurityProfile())
	v.compliance(f+".compliance", c.GetCompliance())
	v.metadata(f+".metadata", c.GetMetadata())
}

// hostPath checks a host file path that metald hands to a backend.
func (v *createValidator) hostPath(f, p string, required bool) {
	switch {
	case p == "":
		if required {
			v.add(f, "is required")
		}
	case strings.ContainsAny(p, "\x00\n\r"):
		v.add(f, "must not contain NUL or line breaks, got %q", p)
	case !filepath.IsAbs(p):
		v.add(f, "must be an absolute path, got %q", p)
	case filepath.Clean(p) != p:
		v.add(f, "must be a clean path (%q), got %q", filepath.Clean(p), p)
	}
}

func (v *createValidator) boot(f string, b *vmprovisionerv1.BootConfig) {
	if b == nil {
		v.add(f, "is required")
		return
	}
	v.hostPath(f+".kernel_path", b.GetKernelPath(), true)
	v.hostPath(f+".initrd_path", b.GetInitrdPath(), false)
	switch a := b.GetKernelArgs(); {
	case len(a) > limMaxKernelArgsBytes:
		v.add(f+".kernel_args", "is %d bytes, longer than %d", len(a), limMaxKernelArgsBytes)
	case strings.ContainsAny(a, "\x00\n\r"):
		v.add(f+".kernel_args", "must not contain NUL or line breaks, got %q", a)
	}
}

func (v *createValidator) storage(f string, disks []*vmprovisionerv1.StorageDevice) {
	ids := map[string]int{}
	paths := map[string]int{}
	root := -1
	for i, d := range disks {
		df := idx(f, i)
		if d.GetId() != "" {
			if !dnsLabelRE.MatchString(d.GetId()) {
				v.add(df+".id", "must be a lower-case DNS label of at most 63 characters, got %q", d.GetId())
			} else if j, dup := ids[d.GetId()]; dup {
				v.add(df+".id", "duplicate id %q (also %s)", d.GetId(), idx(f, j))
			} else {
				ids[d.GetId()] = i
			}
		}
		before := len(v.vs)
		v.hostPath(df+".path", d.GetPath(), true)
		if len(v.vs) == before {
			if j, dup := paths[d.GetPath()]; dup {
				v.add(df+".path", "duplicate path %q (also %s)", d.GetPath(), idx(f, j))
			} else {
				paths[d.GetPath()] = i
			}
		}
		if d.GetIsRootDevice() {
			if root >= 0 {
				v.add(df+".is_root_device", "only one device may be the root device; %s already is", idx(f, root))
			} else {
				root = i
			}
		}
	}
}

// ifnameProblem says why s is not an acceptable Linux interface name, or
// returns "".
func ifnameProblem(s string) string {
	switch {
	case s == "":
		return "is required"
	case len(s) > limMaxIfnameLen:
		return fmt.Sprintf("must be a Linux interface name of at most %d bytes, got %q (%d bytes)", limMaxIfnameLen, s, len(s))
	case s == "." || s == "..":
		return fmt.Sprintf("must not be %q", s)
	case s == "lo":
		return `must not be the loopback interface "lo"`
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '.' || c == '-') {
			return fmt.Sprintf("must contain only [A-Za-z0-9_.-], got %q", s)
		}
	}
	return ""
}

// bridgeNameProblem says why s is not an acceptable bridge name, or "".
// Bridge names are logical: a name longer than the kernel's 15-byte limit
// (the guide's "br-financial-backup") is given a stable short device name
// (see BridgeDevice), so they may be up to 64 bytes.
func bridgeNameProblem(s string) string {
	if len(s) > limMaxBridgeNameLen {
		return fmt.Sprintf("must be at most %d bytes, got %q (%d bytes)", limMaxBridgeNameLen, s, len(s))
	}
	if len(s) > limMaxIfnameLen {
		// Check the alphabet as for a short name.
		return ifnameProblem(s[:limMaxIfnameLen] + strings.Map(func(r rune) rune {
			if r == '_' || r == '.' || r == '-' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' {
				return -1
			}
			return r
		}, s[limMaxIfnameLen:]))
	}
	return ifnameProblem(s)
}

// limMaxBridgeNameLen bounds logical bridge names.
const limMaxBridgeNameLen = 64

// parseVLAN parses a VLAN id: decimal 1..4094 without sign or leading zeros.
func parseVLAN(s string) (int, bool) {
	if s == "" || len(s) > 4 || s[0] == '0' {
		return 0, false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > limMaxVLAN {
		return 0, false
	}
	return n, true
}

// parseMAC parses exactly six colon-separated two-digit hex octets.
func parseMAC(s string) ([6]byte, bool) {
	var mac [6]byte
	if len(s) != 17 {
		return mac, false
	}
	for i := range 6 {
		if i > 0 && s[3*i-1] != ':' {
			return mac, false
		}
		n, err := strconv.ParseUint(s[3*i:3*i+2], 16, 8)
		if err != nil {
			return mac, false
		}
		mac[i] = byte(n)
	}
	return mac, true
}

// nicRefs remembers values that must be unique across NICs.
type nicRefs struct {
	ids   map[string]int
	macs  map[[6]byte]int
	addrs map[netip.Addr]int
}

func (v *createValidator) network(f string, nics []*vmprovisionerv1.NetworkInterface) {
	if len(nics) > limMaxNICs {
		v.add(f, "has %d interfaces; at most %d are allowed", len(nics), limMaxNICs)
	}
	refs := nicRefs{ids: map[string]int{}, macs: map[[6]byte]int{}, addrs: map[netip.Addr]int{}}
	for i, n := range nics {
		v.nic(f, i, n, &refs)
	}
}

func (v *createValidator) nic(list string, i int, n *vmprovisionerv1.NetworkInterface, refs *nicRefs) {
	f := idx(list, i)
	if p := ifnameProblem(n.GetId()); p != "" {
		v.add(f+".id", "%s", p)
	} else if j, dup := refs.ids[n.GetId()]; dup {
		v.add(f+".id", "duplicate id %q (also %s.id)", n.GetId(), idx(list, j))
	} else {
		refs.ids[n.GetId()] = i
	}
	if t := n.GetInterfaceType(); t != "" && t != "virtio-net" {
		v.add(f+".interface_type", `must be "virtio-net" or empty, got %q`, t)
	}
	if p := bridgeNameProblem(n.GetBridgeName()); p != "" {
		v.add(f+".bridge_name", "%s", p)
	}
	if s := n.GetVlanId(); s != "" {
		if _, ok := parseVLAN(s); !ok {
			v.add(f+".vlan_id", "must be a decimal number 1..4094 without sign or leading zeros, got %q", s)
		}
	}
	if s := n.GetMacAddress(); s != "" {
		mac, ok := parseMAC(s)
		switch {
		case !ok:
			v.add(f+".mac_address", "must be six colon-separated hex octets like 52:54:00:12:34:56, got %q", s)
		case mac[0]&1 != 0:
			v.add(f+".mac_address", "must be a unicast address (group bit set in %q)", s)
		case mac == [6]byte{}:
			v.add(f+".mac_address", "must not be all zeros, got %q", s)
		default:
			if j, dup := refs.macs[mac]; dup {
				v.add(f+".mac_address", "duplicate MAC %q (also %s.mac_address)", s, idx(list, j))
			} else {
				refs.macs[mac] = i
			}
		}
	}
	if n.GetIpv6() != nil {
		v.ipv6(list, f+".ipv6", n.GetIpv6(), i, refs)
	}
	if n.GetSecurityPolicy() != nil {
		v.securityPolicy(f+".security_policy", n.GetSecurityPolicy())
	}
}

// ipv6Problem says why a is not usable as an IPv6 unicast address in this
// API, or returns "". Link-local addresses are the caller's business.
func ipv6Problem(a netip.Addr) string {
	switch {
	case a.Is4():
		return "is an IPv4 address; an IPv6 address is required"
	case a.Is4In6():
		return "is an IPv4-mapped address; a native IPv6 address is required"
	case a.Zone() != "":
		return "must not carry a zone (%" + a.Zone() + ")"
	case a.IsUnspecified():
		return "is the unspecified address"
	case a.IsMulticast():
		return "is a multicast address"
	}
	return ""
}

func (v *createValidator) ipv6(list, f string, c *vmprovisionerv1.Ipv6Config, nicIdx int, refs *nicRefs) {
	var addr netip.Prefix // valid only when the address is set and acceptable
	if s := c.GetAddress(); s != "" {
		p, err := v.opts.ParsePrefix(s)
		if err != nil {
			v.add(f+".address", "must be an IPv6 address with prefix length like 2001:db8::10/64, got %q: %v", s, err)
		} else if prob := ipv6Problem(p.Addr()); prob != "" {
			v.add(f+".address", "%q %s", s, prob)
		} else {
			a := p.Addr()
			switch {
			case a.IsLoopback():
				v.add(f+".address", "%q is the loopback address", s)
			case a.IsLinkLocalUnicast():
				v.add(f+".address", "%q is a link-local address; the guest configures its own", s)
			case p.Bits() < 1:
				v.add(f+".address", "%q must have a prefix length of 1..128", s)
			case p.Bits() < 127 && a == p.Masked().Addr():
				v.add(f+".address", "%q is the subnet-router anycast address of %s (all host bits zero); use a host address", s, p.Masked())
			default:
				if j, dup := refs.addrs[a]; dup {
					v.add(f+".address", "duplicate address %q (also %s.ipv6.address)", s, idx(list, j))
				} else {
					refs.addrs[a] = nicIdx
					addr = p
				}
			}
		}
	}

	if s := c.GetGateway(); s != "" {
		gw, err := v.opts.ParseAddr(s)
		if err != nil {
			v.add(f+".gateway", "must be an IPv6 address without prefix length, got %q: %v", s, err)
		} else if prob := ipv6Problem(gw); prob != "" {
			v.add(f+".gateway", "%q %s", s, prob)
		} else if gw.IsLoopback() {
			v.add(f+".gateway", "%q is the loopback address", s)
		} else if addr.IsValid() && !gw.IsLinkLocalUnicast() {
			if !addr.Contains(gw) {
				v.add(f+".gateway", "%q is outside the address's prefix %s", s, addr.Masked())
			} else if gw == addr.Addr() {
				v.add(f+".gateway", "%q must differ from the VM's own address", s)
			}
		}
	}

	dns := c.GetDnsServers()
	if len(dns) > limMaxDNSServers {
		v.add(f+".dns_servers", "has %d servers; at most %d are allowed", len(dns), limMaxDNSServers)
	}
	v.addrList(f+".dns_servers", dns)

	if t := c.TempValidLifetime; t != nil && (*t < limMinTempValidLifetime || *t > limMaxTempValidLifetime) {
		v.add(f+".temp_valid_lifetime", "must be between %d and %d seconds, got %d", limMinTempValidLifetime, limMaxTempValidLifetime, *t)
	}

	if sec := c.GetSecurity(); sec != nil {
		sf := f + ".security"
		srcs := sec.GetAllowedRaSources()
		if len(srcs) > 0 && sec.EnableRaGuard != nil && !*sec.EnableRaGuard {
			v.add(sf+".allowed_ra_sources", "must be empty when enable_ra_guard is false (got %d sources)", len(srcs))
		}
		v.addrList(sf+".allowed_ra_sources", srcs)
		for _, r := range []struct {
			name string
			val  *uint32
		}{
			{"nd_rate_limit", sec.NdRateLimit},
			{"icmpv6_rate_limit", sec.Icmpv6RateLimit},
			{"ra_rate_limit", sec.RaRateLimit},
			{"multicast_rate_limit", sec.MulticastRateLimit},
		} {
			if r.val != nil && *r.val > limMaxSecurityRate {
				v.add(sf+"."+r.name, "must be at most %d packets per second, got %d", limMaxSecurityRate, *r.val)
			}
		}
	}
}

// addrList checks a list of bare IPv6 addresses (DNS servers, RA sources):
// each parses, is not unspecified, multicast, IPv4 or zoned, and appears
// once.
func (v *createValidator) addrList(f string, list []string) {
	seen := map[netip.Addr]int{}
	for i, s := range list {
		ef := idx(f, i)
		a, err := v.opts.ParseAddr(s)
		if err != nil {
			v.add(ef, "must be an IPv6 address, got %q: %v", s, err)
			continue
		}
		if prob := ipv6Problem(a); prob != "" {
			v.add(ef, "%q %s", s, prob)
			continue
		}
		if j, dup := seen[a]; dup {
			v.add(ef, "duplicate address %q (also %s)", s, idx(f, j))
			continue
		}
		seen[a] = i
	}
}

func (v *createValidator) rules(f string, rules []string) {
	if len(rules) > limMaxRulesPerDirection {
		v.add(f, "has %d rules; at most %d are allowed", len(rules), limMaxRulesPerDirection)
	}
	for i, r := range rules {
		// Size and alphabet first, whatever the grammar hook: a rule must
		// never be long or contain control bytes, even if a parser would
		// skip them.
		err := checkRuleText(r)
		if err == nil {
			err = v.opts.ParseRule(r)
		}
		if err != nil {
			v.add(idx(f, i), "invalid rule %q: %v", r, err)
		}
	}
}

func (v *createValidator) securityPolicy(f string, p *vmprovisionerv1.SecurityPolicy) {
	v.rules(f+".ingress_rules", p.GetIngressRules())
	v.rules(f+".egress_rules", p.GetEgressRules())
	if b := p.BandwidthLimitMbps; b != nil && *b > limMaxBandwidthMbps {
		v.add(f+".bandwidth_limit_mbps", "must be at most %d, got %d", limMaxBandwidthMbps, *b)
	}
	if r := p.PacketRateLimit; r != nil && *r > limMaxPacketRate {
		v.add(f+".packet_rate_limit", "must be at most %d packets per second, got %d", limMaxPacketRate, *r)
	}
	switch l := p.GetTenantIsolationLevel(); l {
	case "", "strict", "moderate", "none":
	default:
		v.add(f+".tenant_isolation_level", `must be "strict", "moderate", "none" or empty, got %q`, l)
	}
	dests := p.GetAllowedDestinations()
	if len(dests) > limMaxDestinations {
		v.add(f+".allowed_destinations", "has %d prefixes; at most %d are allowed", len(dests), limMaxDestinations)
	}
	for i, s := range dests {
		ef := idx(f+".allowed_destinations", i)
		pfx, err := v.opts.ParsePrefix(s)
		switch {
		case err != nil:
			v.add(ef, "must be an IPv6 prefix like 2001:db8::/48, got %q: %v", s, err)
		case pfx.Addr().Is4() || pfx.Addr().Is4In6():
			v.add(ef, "must be an IPv6 prefix, got %q", s)
		case pfx.Addr().Zone() != "":
			v.add(ef, "must not carry a zone, got %q", s)
		case pfx.Masked() != pfx:
			v.add(ef, "%q has host bits set; did you mean %s?", s, pfx.Masked())
		}
	}
}

func (v *createValidator) securityProfile(f string, p *vmprovisionerv1.SecurityProfile) {
	if p == nil {
		return
	}
	switch n := p.GetProfileName(); n {
	case "", "high", "medium", "low":
	default:
		v.add(f+".profile_name", `must be "high", "medium", "low" or empty, got %q`, n)
	}
	groups := p.GetSecurityGroups()
	if len(groups) > limMaxSecurityGroups {
		v.add(f+".security_groups", "has %d groups; at most %d are allowed", len(groups), limMaxSecurityGroups)
	}
	seen := map[string]int{}
	for i, g := range groups {
		ef := idx(f+".security_groups", i)
		if !tenantNameRE.MatchString(g) {
			v.add(ef, "must be 1..63 characters of [a-z0-9._-] starting and ending with [a-z0-9], got %q", g)
		} else if j, dup := seen[g]; dup {
			v.add(ef, "duplicate group %q (also %s)", g, idx(f+".security_groups", j))
		} else {
			seen[g] = i
		}
	}
}

func (v *createValidator) compliance(f string, c *vmprovisionerv1.ComplianceConfig) {
	if c == nil {
		return
	}
	seen := map[string]int{}
	for i, fw := range c.GetFrameworks() {
		ef := idx(f+".frameworks", i)
		switch fw {
		case "PCI-DSS", "SOC2", "ISO27001":
			if j, dup := seen[fw]; dup {
				v.add(ef, "duplicate framework %q (also %s)", fw, idx(f+".frameworks", j))
			} else {
				seen[fw] = i
			}
		default:
			v.add(ef, `unknown framework %q; must be one of "PCI-DSS", "SOC2", "ISO27001"`, fw)
		}
	}
	if r := c.GetDataResidency(); r != "" {
		if len(r) != 2 || r[0] < 'A' || r[0] > 'Z' || r[1] < 'A' || r[1] > 'Z' {
			v.add(f+".data_residency", "must be a two-letter upper-case region code like \"US\", got %q", r)
		}
	}
}

func (v *createValidator) metadata(f string, md map[string]string) {
	if len(md) > limMaxMetadataKeys {
		v.add(f, "has %d entries; at most %d are allowed", len(md), limMaxMetadataKeys)
	}
	keys := make([]string, 0, len(md))
	for k := range md {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		ef := f + "[" + strconv.Quote(k) + "]"
		switch {
		case k == "":
			v.add(ef, "key must not be empty")
		case len(k) > limMaxMetadataKeyBytes:
			v.add(ef, "key is %d bytes, longer than %d", len(k), limMaxMetadataKeyBytes)
		}
		if n := len(md[k]); n > limMaxMetadataValBytes {
			v.add(ef, "value is %d bytes, longer than %d", n, limMaxMetadataValBytes)
		}
	}
}
