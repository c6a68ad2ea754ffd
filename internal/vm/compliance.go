package vm

import (
	"fmt"

	"connectrpc.com/connect"

	vmv1 "github.com/metald/metald/internal/gen/vmprovisioner/v1"
)

// ComplianceError reports a config that does not meet a compliance
// framework it claims (or a data-residency region this host is not in).
type ComplianceError struct {
	Framework string
	Field     string
	Reason    string
}

func (e *ComplianceError) Error() string {
	return fmt.Sprintf("%s: %s requires %s", e.Field, e.Framework, e.Reason)
}

// ConnectCode maps compliance failures to failed_precondition.
func (e *ComplianceError) ConnectCode() connect.Code { return connect.CodeFailedPrecondition }

// Compliance requirements, checked at CreateVm and on every update:
//
//	PCI-DSS   every NIC: tenant_isolation_level "strict" and
//	          log_security_events true; compliance.encryption_required true;
//	          compliance.audit_logging true
//	SOC2      compliance.audit_logging true; every NIC: log_security_events
//	          true
//	ISO27001  security_profile.profile_name "high"; every NIC: RA guard and
//	          source guard in force (after profile defaults)
//	data_residency  must equal the host's configured region
func checkCompliance(cfg *vmv1.VmConfig, region string) error {
	c := cfg.GetCompliance()
	if c == nil {
		return nil
	}
	for _, fw := range c.GetFrameworks() {
		fail := func(field, reason string) error {
			return &ComplianceError{Framework: fw, Field: field, Reason: reason}
		}
		switch fw {
		case "PCI-DSS":
			for i, n := range cfg.GetNetwork() {
				f := fmt.Sprintf("config.network[%d].security_policy", i)
				if n.GetSecurityPolicy().GetTenantIsolationLevel() != "strict" {
					return fail(f+".tenant_isolation_level", `tenant_isolation_level "strict"`)
				}
				if !n.GetSecurityPolicy().GetLogSecurityEvents() {
					return fail(f+".log_security_events", "log_security_events true")
				}
			}
			if !c.GetEncryptionRequired() {
				return fail("config.compliance.encryption_required", "encryption_required true")
			}
			if !c.GetAuditLogging() {
				return fail("config.compliance.audit_logging", "audit_logging true")
			}
		case "SOC2":
			if !c.GetAuditLogging() {
				return fail("config.compliance.audit_logging", "audit_logging true")
			}
			for i, n := range cfg.GetNetwork() {
				if !n.GetSecurityPolicy().GetLogSecurityEvents() {
					return fail(fmt.Sprintf("config.network[%d].security_policy.log_security_events", i), "log_security_events true")
				}
			}
		case "ISO27001":
			if cfg.GetSecurityProfile().GetProfileName() != "high" {
				return fail("config.security_profile.profile_name", `security profile "high"`)
			}
			for i, n := range cfg.GetNetwork() {
				eff := EffectiveSecurity(cfg, n)
				if !eff.GetEnableRaGuard() || !eff.GetEnableSourceGuard() {
					return fail(fmt.Sprintf("config.network[%d].ipv6.security", i), "RA guard and source guard enabled")
				}
			}
		}
	}
	if r := c.GetDataResidency(); r != "" && r != region {
		host := region
		if host == "" {
			host = "not configured"
		}
		return &ComplianceError{Framework: "data residency", Field: "config.compliance.data_residency",
			Reason: fmt.Sprintf("the host's region to be %q (this host's region: %s)", r, host)}
	}
	return nil
}
