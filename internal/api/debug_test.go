package api

import (
	"strings"
	"testing"

	vmv1 "github.com/metald/metald/internal/gen/vmprovisioner/v1"
	"github.com/metald/metald/internal/vm"
	"google.golang.org/protobuf/proto"
)

// TestPolicyAddressIdentity: GetVm says when the policy cannot judge
// every packet of a NIC (its ingress maps know the configured, link-local
// and learned temporary addresses; other VMs know it by its source
// address): without the source guard, with or without privacy extensions;
// it says enforced with the source guard on (temporary addresses are
// bound by it and learned by the policy), and off when nothing is
// restricted.
func TestPolicyAddressIdentity(t *testing.T) {
	restricted := &vmv1.SecurityPolicy{EgressRules: []string{"deny all from any to any"}}
	cases := []struct {
		name    string
		profile string
		ipv6    *vmv1.Ipv6Config
		policy  *vmv1.SecurityPolicy
		status  string
		reason  string
	}{
		{"high profile", "high", &vmv1.Ipv6Config{}, restricted, "enforced", ""},
		{"source guard set", "", &vmv1.Ipv6Config{Security: &vmv1.Ipv6Security{EnableSourceGuard: proto.Bool(true)}}, restricted, "enforced", ""},
		{"privacy extensions", "high", &vmv1.Ipv6Config{EnablePrivacyExtensions: proto.Bool(true)}, restricted, "enforced", ""},
		{"privacy, no source guard", "low", &vmv1.Ipv6Config{EnablePrivacyExtensions: proto.Bool(true)}, restricted, "not_enforced", "without enable_source_guard"},
		{"no source guard", "low", &vmv1.Ipv6Config{}, restricted, "not_enforced", "without enable_source_guard"},
		{"isolation only", "", &vmv1.Ipv6Config{}, &vmv1.SecurityPolicy{TenantIsolationLevel: "strict"}, "not_enforced", "without enable_source_guard"},
		{"open policy", "", &vmv1.Ipv6Config{}, &vmv1.SecurityPolicy{TenantIsolationLevel: "none"}, "off", ""},
	}
	for _, tc := range cases {
		nc := &vmv1.NetworkInterface{Id: "eth0", Ipv6: tc.ipv6, SecurityPolicy: tc.policy}
		cfg := &vmv1.VmConfig{Network: []*vmv1.NetworkInterface{nc}, SecurityProfile: &vmv1.SecurityProfile{ProfileName: tc.profile}}
		var got *vmv1.ControlStatus
		for _, c := range policyStatus(nc, cfg, vm.Capabilities{Policy: true}) {
			if c.GetControl() == "policy_address_identity" {
				got = c
			}
		}
		if got == nil {
			t.Fatalf("%s: no policy_address_identity status", tc.name)
		}
		if got.GetStatus() != tc.status || !strings.Contains(got.GetReason(), tc.reason) {
			t.Errorf("%s: %s %q, want %s with %q", tc.name, got.GetStatus(), got.GetReason(), tc.status, tc.reason)
		}
	}
}
