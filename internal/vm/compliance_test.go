package vm

import (
	"errors"
	"testing"

	"google.golang.org/protobuf/proto"

	vmv1 "github.com/metald/metald/internal/gen/vmprovisioner/v1"
)

func compliant() *vmv1.VmConfig {
	return &vmv1.VmConfig{
		SecurityProfile: &vmv1.SecurityProfile{ProfileName: "high"},
		Compliance: &vmv1.ComplianceConfig{Frameworks: []string{"PCI-DSS", "SOC2", "ISO27001"}, DataResidency: "US",
			EncryptionRequired: proto.Bool(true), AuditLogging: proto.Bool(true)},
		Network: []*vmv1.NetworkInterface{{Id: "eth0", SecurityPolicy: &vmv1.SecurityPolicy{TenantIsolationLevel: "strict", LogSecurityEvents: proto.Bool(true)}}},
	}
}

func TestCompliance(t *testing.T) {
	if err := checkCompliance(compliant(), "US"); err != nil {
		t.Fatalf("compliant config: %v", err)
	}
	for _, c := range []struct {
		name, framework, field string
		mut                    func(*vmv1.VmConfig)
		region                 string
	}{
		{"pci isolation", "PCI-DSS", "config.network[0].security_policy.tenant_isolation_level", func(c *vmv1.VmConfig) { c.Network[0].SecurityPolicy.TenantIsolationLevel = "moderate" }, "US"},
		{"pci logging", "PCI-DSS", "config.network[0].security_policy.log_security_events", func(c *vmv1.VmConfig) { c.Network[0].SecurityPolicy.LogSecurityEvents = nil }, "US"},
		{"pci encryption", "PCI-DSS", "config.compliance.encryption_required", func(c *vmv1.VmConfig) { c.Compliance.EncryptionRequired = proto.Bool(false) }, "US"},
		{"soc2 audit", "PCI-DSS", "config.compliance.audit_logging", func(c *vmv1.VmConfig) { c.Compliance.AuditLogging = nil }, "US"},
		{"soc2 only audit", "SOC2", "config.compliance.audit_logging", func(c *vmv1.VmConfig) { c.Compliance.Frameworks = []string{"SOC2"}; c.Compliance.AuditLogging = nil }, "US"},
		{"iso profile", "ISO27001", "config.security_profile.profile_name", func(c *vmv1.VmConfig) {
			c.Compliance.Frameworks = []string{"ISO27001"}
			c.SecurityProfile.ProfileName = "medium"
		}, "US"},
		{"residency", "data residency", "config.compliance.data_residency", func(c *vmv1.VmConfig) {}, "EU"},
		{"no region", "data residency", "config.compliance.data_residency", func(c *vmv1.VmConfig) {}, ""},
	} {
		cfg := compliant()
		c.mut(cfg)
		var ce *ComplianceError
		if err := checkCompliance(cfg, c.region); !errors.As(err, &ce) || ce.Framework != c.framework || ce.Field != c.field {
			t.Errorf("%s: got %v, want %s on %s", c.name, err, c.framework, c.field)
		}
	}
}
