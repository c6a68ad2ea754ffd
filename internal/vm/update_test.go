package vm

import (
	"errors"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	vmv1 "github.com/metald/metald/internal/gen/vmprovisioner/v1"
)

// clear_fields resets lists to empty and fields to unset, at any depth,
// refuses unknown names, paths through non-messages, fields the patch sets
// too and fixed fields, and names each bad entry by its index.
func TestClearFields(t *testing.T) {
	cur := &vmv1.Ipv6Config{
		Address:    "2001:db8::10/64",
		DnsServers: []string{"2001:db8::53"},
		Security: &vmv1.Ipv6Security{
			EnableRaGuard: proto.Bool(true), AllowedRaSources: []string{"fe80::1"}, NdRateLimit: proto.Uint32(5),
		},
	}
	fixed := map[string]string{"address": "boot only", "temp_valid_lifetime": "boot only"}

	got := proto.Clone(cur).(*vmv1.Ipv6Config)
	patch := &vmv1.Ipv6Config{Security: &vmv1.Ipv6Security{EnableRaGuard: proto.Bool(false)}}
	if err := clearFields(got.ProtoReflect(), patch.ProtoReflect(), []string{"dns_servers", "security.allowed_ra_sources", "security.nd_rate_limit"}, fixed); err != nil {
		t.Fatal(err)
	}
	want := &vmv1.Ipv6Config{Address: cur.Address, Security: &vmv1.Ipv6Security{EnableRaGuard: proto.Bool(true)}}
	if !proto.Equal(got, want) {
		t.Fatalf("after clearing: %v, want %v", got, want)
	}

	// GetVm's spelling (JSON names) works as well.
	got = proto.Clone(cur).(*vmv1.Ipv6Config)
	if err := clearFields(got.ProtoReflect(), (&vmv1.Ipv6Config{}).ProtoReflect(), []string{"dnsServers", "security.allowedRaSources"}, fixed); err != nil || got.DnsServers != nil || got.Security.AllowedRaSources != nil {
		t.Fatalf("JSON names: %v %v", err, got)
	}

	// A whole block; a path into a block the config does not have.
	got = proto.Clone(cur).(*vmv1.Ipv6Config)
	if err := clearFields(got.ProtoReflect(), (&vmv1.Ipv6Config{}).ProtoReflect(), []string{"security"}, fixed); err != nil || got.Security != nil {
		t.Fatalf("clear security: %v %v", err, got)
	}
	if err := clearFields(got.ProtoReflect(), (&vmv1.Ipv6Config{}).ProtoReflect(), []string{"security.enable_ra_guard"}, fixed); err != nil || got.GetSecurity().EnableRaGuard != nil {
		t.Fatalf("clear under an absent block: %v %v", err, got)
	}

	for _, c := range []struct {
		paths []string
		field string
		why   string
	}{
		{[]string{"dns_servers", "dns_server"}, "clear_fields[1]", `Ipv6Config has no field "dns_server"`},
		{[]string{"security.enable_ra_guard"}, "clear_fields[0]", "clear it or set it, not both"},
		{[]string{"dns_servers.x"}, "clear_fields[0]", `"dns_servers.x": dns_servers is not a message`},
		{[]string{"address"}, "clear_fields[0]", "boot only"},
		{[]string{"dns_servers", "tempValidLifetime"}, "clear_fields[1]", "boot only"},
		{[]string{""}, "clear_fields[0]", `Ipv6Config has no field ""`},
		{[]string{"dns_servers", "dnsServers"}, "clear_fields[1]", `"dnsServers" is named twice (also clear_fields[0])`},
		{[]string{"security.nd_rate_limit", "security.ndRateLimit"}, "clear_fields[1]", "named twice"},
	} {
		got := proto.Clone(cur).(*vmv1.Ipv6Config)
		err := clearFields(got.ProtoReflect(), patch.ProtoReflect(), c.paths, fixed)
		var ve *ValidationError
		if !errors.As(err, &ve) || len(ve.Violations) != 1 || ve.Violations[0].Field != c.field || !strings.Contains(ve.Violations[0].Reason, c.why) {
			t.Errorf("%v: %v, want %s: %s", c.paths, err, c.field, c.why)
		}
	}
}

// Under "high" no control may be switched off: a guard set to false or a
// rate limit set to 0 is refused by name; stricter settings and other
// profiles pass.
func TestCheckProfileWeakening(t *testing.T) {
	cfg := func(profile string, sec *vmv1.Ipv6Security) *vmv1.VmConfig {
		return &vmv1.VmConfig{
			SecurityProfile: &vmv1.SecurityProfile{ProfileName: profile},
			Network:         []*vmv1.NetworkInterface{{Id: "eth0"}, {Id: "eth1", Ipv6: &vmv1.Ipv6Config{Security: sec}}},
		}
	}
	off := &vmv1.Ipv6Security{
		EnableMldSnooping: proto.Bool(false), NdRateLimit: proto.Uint32(0), Icmpv6RateLimit: proto.Uint32(0),
		RaRateLimit: proto.Uint32(0), MulticastRateLimit: proto.Uint32(0), BlockHopByHop: proto.Bool(false),
	}
	err := checkProfile(cfg("high", off))
	var ve *ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("weakening under high accepted: %v", err)
	}
	got := map[string]string{}
	for _, v := range ve.Violations {
		got[v.Field] = v.Reason
	}
	for _, f := range []string{"enable_mld_snooping", "block_hop_by_hop", "nd_rate_limit", "icmpv6_rate_limit", "ra_rate_limit", "multicast_rate_limit"} {
		reason, ok := got["config.network[1].ipv6.security."+f]
		if !ok || !strings.Contains(reason, `profile "high"`) {
			t.Errorf("%s: %q", f, reason)
		}
		if strings.HasSuffix(f, "_rate_limit") && !strings.Contains(reason, "must not be 0") {
			t.Errorf("%s: %q", f, reason)
		}
	}
	if len(got) != 6 {
		t.Errorf("violations %v", got)
	}
	stricter := &vmv1.Ipv6Security{NdRateLimit: proto.Uint32(10), EnableMldSnooping: proto.Bool(true), BlockHopByHop: proto.Bool(true)}
	for _, c := range []*vmv1.VmConfig{cfg("high", stricter), cfg("medium", off), cfg("", off)} {
		if err := checkProfile(c); err != nil {
			t.Errorf("%v: %v", c.GetSecurityProfile(), err)
		}
	}
}

// A patch that sets nothing (no field, or only empty messages: what a
// request sending [] to empty a list arrives as) is empty; any set field,
// at any depth, is not.
func TestEmptyPatch(t *testing.T) {
	for _, c := range []struct {
		m     proto.Message
		empty bool
	}{
		{&vmv1.SecurityPolicy{}, true},
		{&vmv1.SecurityPolicy{IngressRules: []string{}}, true},
		{&vmv1.Ipv6Config{Security: &vmv1.Ipv6Security{}}, true},
		{&vmv1.SecurityPolicy{LogSecurityEvents: proto.Bool(false)}, false},
		{&vmv1.SecurityPolicy{EgressRules: []string{"deny all from any to any"}}, false},
		{&vmv1.Ipv6Config{Security: &vmv1.Ipv6Security{NdRateLimit: proto.Uint32(0)}}, false},
		{&vmv1.Ipv6Config{DnsServers: []string{"2001:db8::53"}, Security: &vmv1.Ipv6Security{}}, false},
	} {
		if got := emptyPatch(c.m.ProtoReflect()); got != c.empty {
			t.Errorf("%v: empty %v, want %v", c.m, got, c.empty)
		}
	}
}

// Under "high", switching RA guard off while RA sources are listed is
// reported as the profile's refusal first, then what it implies.
func TestValidateWithProfileOrder(t *testing.T) {
	req := loadExample1(t)
	sec := req.Config.Network[0].Ipv6.Security
	if req.Config.GetSecurityProfile().GetProfileName() != "high" || len(sec.GetAllowedRaSources()) == 0 {
		t.Fatal("Example 1 is expected to be high with RA sources")
	}
	sec.EnableRaGuard = proto.Bool(false)
	err := validateWithProfile(req, ValidateOptions{})
	var ve *ValidationError
	if !errors.As(err, &ve) || len(ve.Violations) != 2 ||
		ve.Violations[0].Field != "config.network[0].ipv6.security.enable_ra_guard" || !strings.Contains(ve.Violations[0].Reason, `profile "high"`) ||
		ve.Violations[1].Field != "config.network[0].ipv6.security.allowed_ra_sources" {
		t.Fatalf("%v", err)
	}
	if err := validateWithProfile(loadExample1(t), ValidateOptions{}); err != nil {
		t.Fatalf("Example 1: %v", err)
	}
}
