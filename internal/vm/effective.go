package vm

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"google.golang.org/protobuf/proto"

	vmv1 "github.com/metald/metald/internal/gen/vmprovisioner/v1"
)

// Security profile defaults. A NIC's ipv6.security fields that the config
// leaves unset take these values; fields it sets win, except that under
// "high" a control may not be switched off: no guard set to false, no rate
// limit set to 0 (see checkProfile).
//
//	control                    high   medium  low   (none)
//	enable_ra_guard            on     on      on    off
//	enable_source_guard        on     on      off   off
//	strict_source_validation   on     off     off   off
//	block_hop_by_hop           on     off     off   off
//	block_routing_header       on     on      off   off
//	block_fragment_header      on     off     off   off
//	block_destination_options  on     off     off   off
//	enable_mld_snooping        on     on      off   off
//	nd_rate_limit (pps)        100    500     0     0
//	icmpv6_rate_limit (pps)    100    1000    0     0
//	ra_rate_limit (pps)        10     50      0     0
//	multicast_rate_limit (pps) 50     500     0     0
var profiles = map[string]*vmv1.Ipv6Security{
	"high": {
		EnableRaGuard: proto.Bool(true), EnableSourceGuard: proto.Bool(true), StrictSourceValidation: proto.Bool(true),
		BlockHopByHop: proto.Bool(true), BlockRoutingHeader: proto.Bool(true), BlockFragmentHeader: proto.Bool(true),
		BlockDestinationOptions: proto.Bool(true), EnableMldSnooping: proto.Bool(true),
		NdRateLimit: proto.Uint32(100), Icmpv6RateLimit: proto.Uint32(100), RaRateLimit: proto.Uint32(10), MulticastRateLimit: proto.Uint32(50),
	},
	"medium": {
		EnableRaGuard: proto.Bool(true), EnableSourceGuard: proto.Bool(true), StrictSourceValidation: proto.Bool(false),
		BlockHopByHop: proto.Bool(false), BlockRoutingHeader: proto.Bool(true), BlockFragmentHeader: proto.Bool(false),
		BlockDestinationOptions: proto.Bool(false), EnableMldSnooping: proto.Bool(true),
		NdRateLimit: proto.Uint32(500), Icmpv6RateLimit: proto.Uint32(1000), RaRateLimit: proto.Uint32(50), MulticastRateLimit: proto.Uint32(500),
	},
	"low": {
		EnableRaGuard: proto.Bool(true), EnableSourceGuard: proto.Bool(false), StrictSourceValidation: proto.Bool(false),
		BlockHopByHop: proto.Bool(false), BlockRoutingHeader: proto.Bool(false), BlockFragmentHeader: proto.Bool(false),
		BlockDestinationOptions: proto.Bool(false), EnableMldSnooping: proto.Bool(false),
		NdRateLimit: proto.Uint32(0), Icmpv6RateLimit: proto.Uint32(0), RaRateLimit: proto.Uint32(0), MulticastRateLimit: proto.Uint32(0),
	},
	"": {
		EnableRaGuard: proto.Bool(false), EnableSourceGuard: proto.Bool(false), StrictSourceValidation: proto.Bool(false),
		BlockHopByHop: proto.Bool(false), BlockRoutingHeader: proto.Bool(false), BlockFragmentHeader: proto.Bool(false),
		BlockDestinationOptions: proto.Bool(false), EnableMldSnooping: proto.Bool(false),
		NdRateLimit: proto.Uint32(0), Icmpv6RateLimit: proto.Uint32(0), RaRateLimit: proto.Uint32(0), MulticastRateLimit: proto.Uint32(0),
	},
}

// EffectiveSecurity returns a NIC's ipv6.security block with every unset
// field filled from the VM's security profile. The result has every field
// set.
func EffectiveSecurity(cfg *vmv1.VmConfig, nic *vmv1.NetworkInterface) *vmv1.Ipv6Security {
	out := proto.Clone(profiles[cfg.GetSecurityProfile().GetProfileName()]).(*vmv1.Ipv6Security)
	given := nic.GetIpv6().GetSecurity()
	if given == nil {
		return out
	}
	proto.Merge(out, given) // set fields of given win; lists append
	out.AllowedRaSources = append([]string(nil), given.GetAllowedRaSources()...)
	return out
}

// weakening lists the controls a "high" profile may not turn off: a
// guard set to false, or a rate limit set to 0 (no limit).
var weakening = []struct {
	field string
	off   func(*vmv1.Ipv6Security) bool // set, and set to off
}{
	{"enable_ra_guard", func(s *vmv1.Ipv6Security) bool { return isFalse(s.EnableRaGuard) }},
	{"enable_source_guard", func(s *vmv1.Ipv6Security) bool { return isFalse(s.EnableSourceGuard) }},
	{"strict_source_validation", func(s *vmv1.Ipv6Security) bool { return isFalse(s.StrictSourceValidation) }},
	{"block_hop_by_hop", func(s *vmv1.Ipv6Security) bool { return isFalse(s.BlockHopByHop) }},
	{"block_routing_header", func(s *vmv1.Ipv6Security) bool { return isFalse(s.BlockRoutingHeader) }},
	{"block_fragment_header", func(s *vmv1.Ipv6Security) bool { return isFalse(s.BlockFragmentHeader) }},
	{"block_destination_options", func(s *vmv1.Ipv6Security) bool { return isFalse(s.BlockDestinationOptions) }},
	{"enable_mld_snooping", func(s *vmv1.Ipv6Security) bool { return isFalse(s.EnableMldSnooping) }},
	{"nd_rate_limit", func(s *vmv1.Ipv6Security) bool { return isZero(s.NdRateLimit) }},
	{"icmpv6_rate_limit", func(s *vmv1.Ipv6Security) bool { return isZero(s.Icmpv6RateLimit) }},
	{"ra_rate_limit", func(s *vmv1.Ipv6Security) bool { return isZero(s.RaRateLimit) }},
	{"multicast_rate_limit", func(s *vmv1.Ipv6Security) bool { return isZero(s.MulticastRateLimit) }},
}

func isFalse(b *bool) bool  { return b != nil && !*b }
func isZero(v *uint32) bool { return v != nil && *v == 0 }

// checkProfile rejects explicit weakening of first-hop controls under the
// "high" profile.
func checkProfile(cfg *vmv1.VmConfig) error {
	if cfg.GetSecurityProfile().GetProfileName() != "high" {
		return nil
	}
	var ve ValidationError
	for i, n := range cfg.GetNetwork() {
		sec := n.GetIpv6().GetSecurity()
		if sec == nil {
			continue
		}
		for _, w := range weakening {
			if !w.off(sec) {
				continue
			}
			reason := `must not be false under security profile "high" (config.security_profile.profile_name)`
			if strings.HasSuffix(w.field, "_rate_limit") {
				reason = `must not be 0 (no limit) under security profile "high" (config.security_profile.profile_name)`
			}
			ve.Violations = append(ve.Violations, FieldViolation{
				Field:  fmt.Sprintf("config.network[%d].ipv6.security.%s", i, w.field),
				Reason: reason,
			})
		}
	}
	if len(ve.Violations) > 0 {
		return &ve
	}
	return nil
}

// validateWithProfile validates a config and its profile together: a
// control the profile forbids switching off is named first, before what
// switching it off implies elsewhere (enable_ra_guard: false under "high"
// is reported as such, not as allowed_ra_sources having to be empty).
func validateWithProfile(req *vmv1.CreateVmRequest, opts ValidateOptions) error {
	perr := checkProfile(req.GetConfig())
	verr := ValidateCreate(req, opts)
	var pv, vv *ValidationError
	switch {
	case perr == nil:
		return verr
	case verr == nil || !errors.As(perr, &pv) || !errors.As(verr, &vv):
		return perr
	}
	return &ValidationError{Violations: append(slices.Clone(pv.Violations), vv.Violations...)}
}
