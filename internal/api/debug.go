package api

import (
	"encoding/json"
	"errors"
	"net/http"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	vmv1 "github.com/metald/metald/internal/gen/vmprovisioner/v1"
	"github.com/metald/metald/internal/httpjson"
	"github.com/metald/metald/internal/store"
	"github.com/metald/metald/internal/vm"
)

// CounterReader reads a port's first-hop drop counters (control → packets).
type CounterReader func(hostDev string) (map[string]uint64, error)

// snake renders proto messages with the config's snake_case names, as the
// guide's jq commands expect on the debug endpoints.
var snake = protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: false}

func rawProto(m proto.Message) json.RawMessage {
	b, err := snake.Marshal(m)
	if err != nil || len(b) == 0 {
		return json.RawMessage("{}")
	}
	return b
}

func writeJSON(w http.ResponseWriter, code int, v any) { httpjson.Write(w, code, v) }

func writeErr(w http.ResponseWriter, err error) {
	code := http.StatusInternalServerError
	if errors.Is(err, vm.ErrNotFound) {
		code = http.StatusNotFound
	}
	c := "internal"
	if code == http.StatusNotFound {
		c = "not_found"
	}
	httpjson.WriteError(w, code, c, err.Error())
}

// RegisterDebug adds the per-VM debug endpoints to mux:
//
//	GET /debug/network/vm/{vm_id}            NIC network and first-hop state
//	GET /debug/vm/{vm_id}/security-policy    effective policy and its status
//
// Both describe the VM's first NIC at top level (the guide reads
// `.ipv6.security.allowed_ra_sources` and `.ingress_rules`) and every NIC
// under "interfaces".
func (s *Server) RegisterDebug(mux *http.ServeMux, counters CounterReader) {
	mux.HandleFunc("GET /debug/network/vm/{vm_id}", func(w http.ResponseWriter, r *http.Request) {
		row, cfg, err := s.load(r)
		if err != nil {
			writeErr(w, err)
			return
		}
		var nics []map[string]any
		for i, n := range row.NICs {
			if i >= len(cfg.GetNetwork()) {
				break
			}
			nc := cfg.GetNetwork()[i]
			eff := vm.EffectiveSecurity(cfg, nc)
			v6 := proto.Clone(nc.GetIpv6()).(*vmv1.Ipv6Config)
			if v6 == nil {
				v6 = &vmv1.Ipv6Config{}
			}
			v6.Security = eff
			ipv6 := map[string]any{}
			json.Unmarshal(rawProto(v6), &ipv6)
			ipv6["canonical_address"] = n.Address
			ipv6["canonical_gateway"] = n.Gateway
			ipv6["link_local"] = n.LinkLocal
			entry := map[string]any{
				"id": n.ID, "host_device": n.HostDevice, "guest_device": n.GuestDevice, "mac_address": n.MAC,
				"bridge_name": nc.GetBridgeName(), "bridge_device": n.Bridge, "vlan_id": n.VLAN,
				"vlan_mode": vm.VLANMode(n, s.vms.Caps()), "gateway_on_bridge": n.GatewayOnBridge,
				"ipv6": ipv6, "controls": statusJSON(vm.ControlStatuses(eff, n, s.vms.Caps())),
			}
			if counters != nil {
				if c, err := counters(n.HostDevice); err == nil {
					entry["counters"] = c
				} else {
					entry["counters_error"] = err.Error()
				}
			}
			nics = append(nics, entry)
		}
		out := map[string]any{"vm_id": row.ID, "tenant_id": row.TenantID, "state": row.State, "interfaces": nics}
		if len(nics) > 0 {
			for k, v := range nics[0] {
				out[k] = v
			}
		}
		writeJSON(w, http.StatusOK, out)
	})

	mux.HandleFunc("GET /debug/vm/{vm_id}/security-policy", func(w http.ResponseWriter, r *http.Request) {
		row, cfg, err := s.load(r)
		if err != nil {
			writeErr(w, err)
			return
		}
		var nics []map[string]any
		for i, nc := range cfg.GetNetwork() {
			p := nc.GetSecurityPolicy()
			if p == nil {
				p = &vmv1.SecurityPolicy{}
			}
			entry := map[string]any{}
			json.Unmarshal(rawProto(p), &entry)
			for _, k := range []string{"ingress_rules", "egress_rules", "allowed_destinations"} {
				if entry[k] == nil {
					entry[k] = []string{}
				}
			}
			def := func(rules []string) string {
				if len(rules) == 0 {
					return "allow"
				}
				return "deny"
			}
			entry["id"] = nc.GetId()
			if i < len(row.NICs) {
				entry["host_device"] = row.NICs[i].HostDevice
			}
			entry["ingress_default"] = def(p.GetIngressRules())
			entry["egress_default"] = def(p.GetEgressRules())
			entry["security_profile"] = cfg.GetSecurityProfile().GetProfileName()
			controls := policyStatus(nc, cfg, s.vms.Caps())
			if i < len(row.NICs) {
				controls = append(controls, s.bridgeStatus(row.NICs[i].Bridge))
			}
			entry["enforcement"] = statusJSON(controls)
			if s.ruleHits != nil {
				hits, err := s.ruleHits(row.ID, nc.GetId())
				if err != nil {
					entry["rule_counters_error"] = err.Error()
				}
				if hits == nil {
					hits = []RuleHit{}
				}
				entry["rule_counters"] = hits
			}
			nics = append(nics, entry)
		}
		out := map[string]any{"vm_id": row.ID, "tenant_id": row.TenantID, "interfaces": nics, "isolated": !row.IsolatedAt.IsZero()}
		if !row.IsolatedAt.IsZero() {
			// Isolation wins over the policy: only management access passes.
			out["isolation_reason"] = row.IsolatedReason
			out["isolated_at"] = row.IsolatedAt.UTC().Format(time.RFC3339)
			mgmt := []string{}
			for _, r := range s.vms.ManagementAccess() {
				mgmt = append(mgmt, r.String())
			}
			out["management_access"] = mgmt
		}
		if len(nics) > 0 {
			for k, v := range nics[0] {
				out[k] = v
			}
		}
		writeJSON(w, http.StatusOK, out)
	})
}

// DebugQueryParams are the query parameters the debug routes of this
// package read (by mux pattern; the others read none).
var DebugQueryParams = map[string][]string{
	"GET /debug/audit": {"vm_id"},
}

// RegisterAudit adds GET /debug/audit?vm_id= (every VM when vm_id is
// absent): the persisted audit log of VMs with compliance.audit_logging.
func (s *Server) RegisterAudit(mux *http.ServeMux) {
	mux.HandleFunc("GET /debug/audit", func(w http.ResponseWriter, r *http.Request) {
		entries, err := s.vms.Audit(r.Context(), r.URL.Query().Get("vm_id"))
		if err != nil {
			writeErr(w, err)
			return
		}
		out := make([]map[string]string, 0, len(entries))
		for _, e := range entries {
			out = append(out, map[string]string{"vm_id": e.VMID, "timestamp": e.At.Format("2006-01-02T15:04:05.000Z07:00"),
				"action": e.Action, "caller": e.Caller, "detail": e.Detail})
		}
		writeJSON(w, http.StatusOK, out)
	})
}

func (s *Server) load(r *http.Request) (*store.VM, *vmv1.VmConfig, error) {
	row, err := s.vms.Get(r.Context(), r.PathValue("vm_id"))
	if err != nil {
		return nil, nil, err
	}
	cfg := &vmv1.VmConfig{}
	if err := protojson.Unmarshal(row.Config, cfg); err != nil {
		return nil, nil, err
	}
	return row, cfg, nil
}

func statusJSON(cs []*vmv1.ControlStatus) []json.RawMessage {
	out := make([]json.RawMessage, 0, len(cs))
	for _, c := range cs {
		out = append(out, rawProto(c))
	}
	return out
}

// notApplied is why limits are not in force yet: the shaping code
// (internal/network/shape) is built and tested with packets, but the daemon
// does not apply it yet. Nothing claims a protection it does not give.
const notApplied = "bandwidth and packet-rate limits are not yet applied by this daemon"

// policyStatus reports, per policy control of NIC nc, whether it is in
// force.
func policyStatus(nc *vmv1.NetworkInterface, cfg *vmv1.VmConfig, caps vm.Capabilities) []*vmv1.ControlStatus {
	p := nc.GetSecurityPolicy()
	enforced := caps.Policy
	limits := notApplied
	if caps.Limits {
		limits = ""
	}
	st := func(control string, configured bool, reason string) *vmv1.ControlStatus {
		switch {
		case !configured:
			return &vmv1.ControlStatus{Control: control, Status: "off", Scope: "port"}
		case reason == "" && enforced:
			return &vmv1.ControlStatus{Control: control, Status: "enforced", Scope: "port"}
		case reason == "":
			reason = "this daemon programs no security policies"
		}
		return &vmv1.ControlStatus{Control: control, Status: "not_enforced", Reason: reason, Scope: "port"}
	}
	return []*vmv1.ControlStatus{
		st("ingress_rules", len(p.GetIngressRules()) > 0, ""),
		st("egress_rules", len(p.GetEgressRules()) > 0, ""),
		st("allowed_destinations", len(p.GetAllowedDestinations()) > 0, ""),
		st("tenant_isolation_level", p.GetTenantIsolationLevel() != "" && p.GetTenantIsolationLevel() != "none", ""),
		st("log_security_events", p.GetLogSecurityEvents(), ""),
		st("enable_network_microsegmentation", cfg.GetSecurityProfile().GetEnableNetworkMicrosegmentation(), ""),
		st("bandwidth_limit_mbps", p.GetBandwidthLimitMbps() > 0, limits),
		st("packet_rate_limit", p.GetPacketRateLimit() > 0, limits),
		st("enable_deep_packet_inspection", p.GetEnableDeepPacketInspection(), "deep packet inspection is not implemented"),
		st("require_encrypted_traffic", cfg.GetSecurityProfile().GetRequireEncryptedTraffic(), "encrypted-traffic enforcement is not implemented"),
		st("policy_address_identity", restricts(p, cfg), addressIdentityGap(nc, cfg)),
	}
}

// restricts reports whether p (or the profile) limits the NIC's traffic at
// all, so that which packets the policy can attribute to it matters.
func restricts(p *vmv1.SecurityPolicy, cfg *vmv1.VmConfig) bool {
	iso := p.GetTenantIsolationLevel()
	return len(p.GetIngressRules()) > 0 || len(p.GetEgressRules()) > 0 || len(p.GetAllowedDestinations()) > 0 ||
		(iso != "" && iso != "none") || cfg.GetSecurityProfile().GetEnableNetworkMicrosegmentation()
}

// addressIdentityGap says why the policy cannot judge every packet of nc,
// or "" when it can. A VM's egress chain is found by the frame's source
// MAC, so everything it sends is judged; its ingress chain by the
// destination address, among the NIC's configured, link-local and
// learned temporary addresses; and other VMs' rules and isolation know it
// by its source address, which only the source guard makes its own (with
// privacy extensions, the source guard binds each temporary address from
// the guest's DAD and metald adds it to the policy: internal/daemon's
// tempAddrs).
func addressIdentityGap(nc *vmv1.NetworkInterface, cfg *vmv1.VmConfig) string {
	if !vm.EffectiveSecurity(cfg, nc).GetEnableSourceGuard() {
		return "without enable_source_guard the VM can send from any address: its egress rules still apply (found by its MAC), but other VMs' rules and tenant isolation judge it by the address it claims, and connections to an address it takes are not judged by its ingress rules"
	}
	return ""
}

// bridgeStatus reports whether the host's ip6 hooks see a bridge's traffic.
func (s *Server) bridgeStatus(bridge string) *vmv1.ControlStatus {
	st := &vmv1.ControlStatus{Control: "bridged_traffic_at_l3", Scope: "bridge", Status: "not_enforced", Reason: "unknown"}
	if s.bridgeL3 == nil {
		return st
	}
	if ok, reason := s.bridgeL3(bridge); ok {
		st.Status, st.Reason = "enforced", ""
	} else {
		st.Reason = reason
	}
	return st
}

// RuleHit is the hit count of one rule (or control) of a NIC's policy in
// the kernel.
type RuleHit struct {
	// Direction is "ingress" or "egress".
	Direction string `json:"direction"`
	// Rule is the rule as written, with its list index
	// ("ingress[1]: deny tcp from any to any port 22"), or a control
	// (default, tenant-strict, allowed-destinations, ...).
	Rule    string `json:"rule"`
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

// SetRuleCounters sets how the server reads a NIC's per-rule policy hit
// counters for GET /debug/vm/{vm_id}/security-policy.
func (s *Server) SetRuleCounters(f func(vmID, nic string) ([]RuleHit, error)) { s.ruleHits = f }

// SetBridgeL3 sets how the server learns whether the host's ip6 hooks see
// a bridge's traffic (br_netfilter).
func (s *Server) SetBridgeL3(f func(bridge string) (visible bool, reason string)) { s.bridgeL3 = f }
