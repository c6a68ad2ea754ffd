package vm

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	vmprovisionerv1 "github.com/metald/metald/internal/gen/vmprovisioner/v1"
)

// loadExample1 reads the seed's Example 1 request (hex subnet labels).
func loadExample1(t testing.TB) *vmprovisionerv1.CreateVmRequest {
	t.Helper()
	b, err := os.ReadFile("testdata/example1.json")
	if err != nil {
		t.Fatal(err)
	}
	req := &vmprovisionerv1.CreateVmRequest{}
	if err := protojson.Unmarshal(b, req); err != nil {
		t.Fatalf("unmarshal example1.json: %v", err)
	}
	return req
}

// violations runs ValidateCreate with default options and returns its
// violations, failing the test if the error has another type.
func violations(t *testing.T, req *vmprovisionerv1.CreateVmRequest, opts ValidateOptions) []FieldViolation {
	t.Helper()
	err := ValidateCreate(req, opts)
	if err == nil {
		return nil
	}
	var ve *ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("ValidateCreate returned %T (%v), want *ValidationError", err, err)
	}
	if len(ve.Violations) == 0 {
		t.Fatalf("ValidationError without violations")
	}
	return ve.Violations
}

func TestValidateCreateExample1(t *testing.T) {
	if err := ValidateCreate(loadExample1(t), ValidateOptions{}); err != nil {
		t.Fatalf("example1 should be valid: %v", err)
	}
}

type invalidCase struct {
	Name           string          `json:"name"`
	Request        json.RawMessage `json:"request"`
	Field          string          `json:"field"`
	ReasonContains string          `json:"reason_contains"`
}

func loadInvalidCases(t *testing.T) []invalidCase {
	t.Helper()
	b, err := os.ReadFile("testdata/invalid_create_requests.json")
	if err != nil {
		t.Fatal(err)
	}
	var cases []invalidCase
	if err := json.Unmarshal(b, &cases); err != nil {
		t.Fatalf("parse invalid_create_requests.json: %v", err)
	}
	if len(cases) < 40 {
		t.Fatalf("only %d invalid cases, want at least 40", len(cases))
	}
	return cases
}

// TestValidateCreateInvalidCases checks that each case in
// testdata/invalid_create_requests.json (example1 with one defect) yields
// exactly one violation, on the named field. The same file drives the API's
// end-to-end tests.
func TestValidateCreateInvalidCases(t *testing.T) {
	seen := map[string]bool{}
	for _, tc := range loadInvalidCases(t) {
		t.Run(tc.Name, func(t *testing.T) {
			if seen[tc.Name] {
				t.Fatalf("duplicate case name")
			}
			seen[tc.Name] = true
			req := &vmprovisionerv1.CreateVmRequest{}
			if err := protojson.Unmarshal(tc.Request, req); err != nil {
				t.Fatalf("request is not valid protojson: %v", err)
			}
			vs := violations(t, req, ValidateOptions{})
			if len(vs) != 1 {
				t.Fatalf("got %d violations, want exactly 1 on %s: %v", len(vs), tc.Field, vs)
			}
			if vs[0].Field != tc.Field {
				t.Errorf("field = %q, want %q (reason %q)", vs[0].Field, tc.Field, vs[0].Reason)
			}
			if !strings.Contains(vs[0].Reason, tc.ReasonContains) {
				t.Errorf("reason %q does not contain %q", vs[0].Reason, tc.ReasonContains)
			}
			if r := vs[0].Reason; r == "" || strings.ToLower(r[:1]) != r[:1] {
				t.Errorf("reason %q should start in lower case", r)
			}
		})
	}
}

// TestValidateCreateReportsAll breaks several fields at once and expects
// every violation, in field order.
func TestValidateCreateReportsAll(t *testing.T) {
	req := loadExample1(t)
	req.VmId = "Bad_ID"
	req.Config.Cpu.VcpuCount = 0
	req.Config.Boot.KernelPath = "vmlinux"
	nic := req.Config.Network[0]
	nic.VlanId = "4095"
	nic.MacAddress = "01:00:5e:00:00:01"
	nic.Ipv6.Gateway = "2600:beef:1000:2::1"
	nic.Ipv6.DnsServers = append(nic.Ipv6.DnsServers, "ff02::1")
	nic.SecurityPolicy.TenantIsolationLevel = "paranoid"
	req.Config.Network = append(req.Config.Network, proto.CloneOf(nic))
	req.Config.TenantId = "-x"
	req.Config.Compliance = &vmprovisionerv1.ComplianceConfig{Frameworks: []string{"HIPAA"}}

	var got []string
	for _, v := range violations(t, req, ValidateOptions{}) {
		got = append(got, v.Field)
	}
	want := []string{
		"vm_id",
		"config.cpu.vcpu_count",
		"config.boot.kernel_path",
		"config.network[0].vlan_id",
		"config.network[0].mac_address",
		"config.network[0].ipv6.gateway",
		"config.network[0].ipv6.dns_servers[2]",
		"config.network[0].security_policy.tenant_isolation_level",
		"config.network[1].id",
		"config.network[1].vlan_id",
		"config.network[1].mac_address",
		"config.network[1].ipv6.address",
		// The duplicate address is rejected, so its gateway is not
		// checked against it.
		"config.network[1].ipv6.dns_servers[2]",
		"config.network[1].security_policy.tenant_isolation_level",
		"config.tenant_id",
		"config.compliance.frameworks[0]",
	}
	if !slices.Equal(got, want) {
		t.Errorf("fields:\n got %q\nwant %q", got, want)
	}
	err := ValidateCreate(req, ValidateOptions{})
	if wantMsg := fmt.Sprintf(`vm_id: must be a lower-case DNS label of at most 63 characters ([a-z0-9], '-' inside), got "Bad_ID" (and %d more)`, len(want)-1); err.Error() != wantMsg {
		t.Errorf("Error() = %q, want %q", err, wantMsg)
	}
}

func TestValidationErrorString(t *testing.T) {
	one := &ValidationError{Violations: []FieldViolation{{"vm_id", "bad"}}}
	if got := one.Error(); got != "vm_id: bad" {
		t.Errorf("got %q", got)
	}
	three := &ValidationError{Violations: []FieldViolation{{"a", "x"}, {"b", "y"}, {"c", "z"}}}
	if got := three.Error(); got != "a: x (and 2 more)" {
		t.Errorf("got %q", got)
	}
}

func TestValidateCreateNilRequests(t *testing.T) {
	if vs := violations(t, nil, ValidateOptions{}); len(vs) != 1 {
		t.Errorf("nil request: %v", vs)
	}
	vs := violations(t, &vmprovisionerv1.CreateVmRequest{Config: &vmprovisionerv1.VmConfig{}}, ValidateOptions{})
	var fields []string
	for _, v := range vs {
		fields = append(fields, v.Field)
	}
	if want := []string{"config.cpu", "config.memory", "config.boot"}; !slices.Equal(fields, want) {
		t.Errorf("empty config: got %q, want %q", fields, want)
	}
}

func u32(v uint32) *uint32 { return &v }
func bptr(v bool) *bool    { return &v }

// TestValidateCreateEdges checks boundary values, one mutation of example1
// at a time. field "" means the request must be valid.
func TestValidateCreateEdges(t *testing.T) {
	type mut = func(r *vmprovisionerv1.CreateVmRequest)
	nic := func(r *vmprovisionerv1.CreateVmRequest) *vmprovisionerv1.NetworkInterface { return r.Config.Network[0] }
	tests := []struct {
		name  string
		mut   mut
		field string
	}{
		{"vm_id empty", func(r *vmprovisionerv1.CreateVmRequest) { r.VmId = "" }, ""},
		{"vm_id one char", func(r *vmprovisionerv1.CreateVmRequest) { r.VmId = "a" }, ""},
		{"vm_id 63 chars", func(r *vmprovisionerv1.CreateVmRequest) { r.VmId = strings.Repeat("a", 63) }, ""},
		{"vm_id generated form", func(r *vmprovisionerv1.CreateVmRequest) { r.VmId = "vm-abcd2345" }, ""},
		{"vm_id trailing hyphen", func(r *vmprovisionerv1.CreateVmRequest) { r.VmId = "vm-" }, "vm_id"},
		{"vm_id dot", func(r *vmprovisionerv1.CreateVmRequest) { r.VmId = "vm.1" }, "vm_id"},
		{"vcpu 1", func(r *vmprovisionerv1.CreateVmRequest) { r.Config.Cpu.VcpuCount = 1 }, ""},
		{"vcpu 64", func(r *vmprovisionerv1.CreateVmRequest) { r.Config.Cpu.VcpuCount = 64 }, ""},
		{"vcpu -1", func(r *vmprovisionerv1.CreateVmRequest) { r.Config.Cpu.VcpuCount = -1 }, "config.cpu.vcpu_count"},
		{"memory 16 MiB", func(r *vmprovisionerv1.CreateVmRequest) { r.Config.Memory.SizeBytes = 16 << 20 }, ""},
		{"memory 15 MiB", func(r *vmprovisionerv1.CreateVmRequest) { r.Config.Memory.SizeBytes = 15 << 20 }, "config.memory.size_bytes"},
		{"memory 1 TiB", func(r *vmprovisionerv1.CreateVmRequest) { r.Config.Memory.SizeBytes = 1 << 40 }, ""},
		{"memory negative", func(r *vmprovisionerv1.CreateVmRequest) { r.Config.Memory.SizeBytes = -1 << 20 }, "config.memory.size_bytes"},
		{"kernel root", func(r *vmprovisionerv1.CreateVmRequest) { r.Config.Boot.KernelPath = "/vmlinux" }, ""},
		{"kernel trailing slash", func(r *vmprovisionerv1.CreateVmRequest) { r.Config.Boot.KernelPath = "/opt/vmlinux/" }, "config.boot.kernel_path"},
		{"kernel double slash", func(r *vmprovisionerv1.CreateVmRequest) { r.Config.Boot.KernelPath = "/opt//vmlinux" }, "config.boot.kernel_path"},
		{"kernel NUL", func(r *vmprovisionerv1.CreateVmRequest) { r.Config.Boot.KernelPath = "/opt/vm\x00linux" }, "config.boot.kernel_path"},
		{"initrd absolute", func(r *vmprovisionerv1.CreateVmRequest) { r.Config.Boot.InitrdPath = "/opt/vm-assets/initrd.img" }, ""},
		{"kernel_args 4096", func(r *vmprovisionerv1.CreateVmRequest) { r.Config.Boot.KernelArgs = strings.Repeat("x", 4096) }, ""},
		{"kernel_args 4097", func(r *vmprovisionerv1.CreateVmRequest) { r.Config.Boot.KernelArgs = strings.Repeat("x", 4097) }, "config.boot.kernel_args"},
		{"kernel_args NUL", func(r *vmprovisionerv1.CreateVmRequest) { r.Config.Boot.KernelArgs = "a\x00b" }, "config.boot.kernel_args"},
		{"no storage", func(r *vmprovisionerv1.CreateVmRequest) { r.Config.Storage = nil }, ""},
		{"no NICs", func(r *vmprovisionerv1.CreateVmRequest) { r.Config.Network = nil }, ""},
		{"eight NICs", func(r *vmprovisionerv1.CreateVmRequest) {
			for i := 1; i < 8; i++ {
				n := proto.CloneOf(r.Config.Network[0])
				n.Id = fmt.Sprintf("eth%d", i)
				n.Ipv6.Address = fmt.Sprintf("2600:beef:1000:1::%x/64", 0x10+i)
				r.Config.Network = append(r.Config.Network, n)
			}
		}, ""},
		{"NIC id 15 bytes", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).Id = "eth012345678901" }, ""},
		{"NIC id with dot dash underscore", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).Id = "Eth_0.1-a" }, ""},
		{"NIC id dot", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).Id = "." }, "config.network[0].id"},
		{"NIC id colon", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).Id = "eth0:1" }, "config.network[0].id"},
		{"interface_type empty", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).InterfaceType = "" }, ""},
		{"bridge lo", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).BridgeName = "lo" }, "config.network[0].bridge_name"},
		{"vlan empty", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).VlanId = "" }, ""},
		{"vlan 1", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).VlanId = "1" }, ""},
		{"vlan 4094", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).VlanId = "4094" }, ""},
		{"vlan 0", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).VlanId = "0" }, "config.network[0].vlan_id"},
		{"vlan 4095", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).VlanId = "4095" }, "config.network[0].vlan_id"},
		{"vlan 01", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).VlanId = "01" }, "config.network[0].vlan_id"},
		{"vlan 1e3", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).VlanId = "1e3" }, "config.network[0].vlan_id"},
		{"vlan 0x10", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).VlanId = "0x10" }, "config.network[0].vlan_id"},
		{"mac locally administered", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).MacAddress = "02:00:00:00:00:01" }, ""},
		{"mac upper case", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).MacAddress = "52:54:00:AB:CD:EF" }, ""},
		{"mac 20 bytes", func(r *vmprovisionerv1.CreateVmRequest) {
			nic(r).MacAddress = "00:00:00:00:fe:80:00:00:00:00:00:00:02:00:5e:10:00:00:00:01"
		}, "config.network[0].mac_address"},
		{"mac dotted", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).MacAddress = "5254.0012.3456" }, "config.network[0].mac_address"},
		{"ipv6 absent", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).Ipv6 = nil }, ""},
		{"address empty, gateway set", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).Ipv6.Address = "" }, ""},
		{"address /128", func(r *vmprovisionerv1.CreateVmRequest) {
			nic(r).Ipv6.Address = "2600:beef:1000:1::10/128"
			nic(r).Ipv6.Gateway = "fe80::1"
		}, ""},
		{"address /128 all-zero host part is fine", func(r *vmprovisionerv1.CreateVmRequest) {
			nic(r).Ipv6.Address = "2600:beef:1000:1::/128"
			nic(r).Ipv6.Gateway = ""
		}, ""},
		{"address /127 lower half", func(r *vmprovisionerv1.CreateVmRequest) {
			nic(r).Ipv6.Address = "2600:beef:1000:1::/127"
			nic(r).Ipv6.Gateway = "2600:beef:1000:1::1"
		}, ""},
		{"address /48 gateway inside", func(r *vmprovisionerv1.CreateVmRequest) {
			nic(r).Ipv6.Address = "2600:beef:1000:1::10/48"
			nic(r).Ipv6.Gateway = "2600:beef:1000:ffff::1"
		}, ""},
		{"address ULA", func(r *vmprovisionerv1.CreateVmRequest) {
			nic(r).Ipv6.Address = "fd00:1::10/64"
			nic(r).Ipv6.Gateway = "fd00:1::1"
		}, ""},
		{"address with zone", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).Ipv6.Address = "2600:beef:1000:1::10%eth0/64" }, "config.network[0].ipv6.address"},
		{"gateway link-local outside prefix", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).Ipv6.Gateway = "fe80::1" }, ""},
		{"gateway with zone", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).Ipv6.Gateway = "fe80::1%eth0" }, "config.network[0].ipv6.gateway"},
		{"gateway loopback", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).Ipv6.Gateway = "::1" }, "config.network[0].ipv6.gateway"},
		{"gateway IPv4-mapped", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).Ipv6.Gateway = "::ffff:192.0.2.1" }, "config.network[0].ipv6.gateway"},
		{"three dns servers", func(r *vmprovisionerv1.CreateVmRequest) {
			nic(r).Ipv6.DnsServers = append(nic(r).Ipv6.DnsServers, "2606:4700:4700::1111")
		}, ""},
		{"dns IPv4", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).Ipv6.DnsServers[0] = "8.8.8.8" }, "config.network[0].ipv6.dns_servers[0]"},
		{"temp lifetime 60", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).Ipv6.TempValidLifetime = u32(60) }, ""},
		{"temp lifetime 2592000", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).Ipv6.TempValidLifetime = u32(2592000) }, ""},
		{"temp lifetime 0", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).Ipv6.TempValidLifetime = u32(0) }, "config.network[0].ipv6.temp_valid_lifetime"},
		{"temp lifetime unset", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).Ipv6.TempValidLifetime = nil }, ""},
		{"ra sources with guard unset", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).Ipv6.Security.EnableRaGuard = nil }, ""},
		{"ra guard off, no sources", func(r *vmprovisionerv1.CreateVmRequest) {
			nic(r).Ipv6.Security.EnableRaGuard = bptr(false)
			nic(r).Ipv6.Security.AllowedRaSources = nil
		}, ""},
		{"ra source link-local", func(r *vmprovisionerv1.CreateVmRequest) {
			nic(r).Ipv6.Security.AllowedRaSources = []string{"fe80::1"}
		}, ""},
		{"ra source unspecified", func(r *vmprovisionerv1.CreateVmRequest) {
			nic(r).Ipv6.Security.AllowedRaSources = []string{"::"}
		}, "config.network[0].ipv6.security.allowed_ra_sources[0]"},
		{"nd rate 0", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).Ipv6.Security.NdRateLimit = u32(0) }, ""},
		{"nd rate 1000000", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).Ipv6.Security.NdRateLimit = u32(1000000) }, ""},
		{"rules 256", func(r *vmprovisionerv1.CreateVmRequest) {
			nic(r).SecurityPolicy.EgressRules = slices.Repeat([]string{"allow tcp from any to any port 53"}, 256)
		}, ""},
		{"rule 512 bytes", func(r *vmprovisionerv1.CreateVmRequest) {
			nic(r).SecurityPolicy.IngressRules[0] = "allow " + strings.Repeat("x", 506)
		}, ""},
		{"rule non-ASCII", func(r *vmprovisionerv1.CreateVmRequest) {
			nic(r).SecurityPolicy.IngressRules[0] = "allow tcp from any to any port 80 – 443"
		}, "config.network[0].security_policy.ingress_rules[0]"},
		{"isolation moderate", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).SecurityPolicy.TenantIsolationLevel = "moderate" }, ""},
		{"isolation none", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).SecurityPolicy.TenantIsolationLevel = "none" }, ""},
		{"isolation upper case", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).SecurityPolicy.TenantIsolationLevel = "STRICT" }, "config.network[0].security_policy.tenant_isolation_level"},
		{"destination ::/0", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).SecurityPolicy.AllowedDestinations = []string{"::/0"} }, ""},
		{"bandwidth 0", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).SecurityPolicy.BandwidthLimitMbps = u32(0) }, ""},
		{"bandwidth 100000", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).SecurityPolicy.BandwidthLimitMbps = u32(100000) }, ""},
		{"packet rate 100000000", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).SecurityPolicy.PacketRateLimit = u32(100000000) }, ""},
		{"policy absent", func(r *vmprovisionerv1.CreateVmRequest) { nic(r).SecurityPolicy = nil }, ""},
		{"tenant with dot and underscore", func(r *vmprovisionerv1.CreateVmRequest) { r.Config.TenantId = "acme.corp_eu-1" }, ""},
		{"tenant 64 chars", func(r *vmprovisionerv1.CreateVmRequest) { r.Config.TenantId = strings.Repeat("t", 64) }, "config.tenant_id"},
		{"profile medium", func(r *vmprovisionerv1.CreateVmRequest) { r.Config.SecurityProfile.ProfileName = "medium" }, ""},
		{"profile empty", func(r *vmprovisionerv1.CreateVmRequest) { r.Config.SecurityProfile.ProfileName = "" }, ""},
		{"32 groups", func(r *vmprovisionerv1.CreateVmRequest) {
			r.Config.SecurityProfile.SecurityGroups = nil
			for i := range 32 {
				r.Config.SecurityProfile.SecurityGroups = append(r.Config.SecurityProfile.SecurityGroups, fmt.Sprintf("g%d", i))
			}
		}, ""},
		{"all frameworks", func(r *vmprovisionerv1.CreateVmRequest) {
			r.Config.Compliance = &vmprovisionerv1.ComplianceConfig{Frameworks: []string{"PCI-DSS", "SOC2", "ISO27001"}, DataResidency: "US"}
		}, ""},
		{"metadata at limits", func(r *vmprovisionerv1.CreateVmRequest) {
			r.Config.Metadata = map[string]string{strings.Repeat("k", 128): strings.Repeat("v", 4096)}
			for i := range 63 {
				r.Config.Metadata[fmt.Sprint(i)] = ""
			}
		}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := loadExample1(t)
			tt.mut(req)
			vs := violations(t, req, ValidateOptions{})
			if tt.field == "" {
				if len(vs) != 0 {
					t.Fatalf("want valid, got %v", vs)
				}
				return
			}
			if len(vs) != 1 || vs[0].Field != tt.field {
				t.Fatalf("want one violation on %s, got %v", tt.field, vs)
			}
		})
	}
}

// symbolicParsers stands in for the IPAM parser that accepts subnet names
// in the fourth group (2600:BEEF:1000:web::10/64); it maps web to 1 and
// mgmt to 2, and records every string it is given.
type symbolicParsers struct{ seen []string }

func (s *symbolicParsers) replace(in string) string {
	s.seen = append(s.seen, in)
	return strings.NewReplacer(":web:", ":1:", ":mgmt:", ":2:").Replace(in)
}

func (s *symbolicParsers) options() ValidateOptions {
	return ValidateOptions{
		ParsePrefix: func(in string) (netip.Prefix, error) { return netip.ParsePrefix(s.replace(in)) },
		ParseAddr:   func(in string) (netip.Addr, error) { return netip.ParseAddr(s.replace(in)) },
	}
}

// TestValidateCreateHooks checks that every address goes through the
// parsing hooks, using the seed's original Example 1 with symbolic names.
func TestValidateCreateHooks(t *testing.T) {
	req := loadExample1(t)
	nic := req.Config.Network[0]
	nic.Ipv6.Address = "2600:BEEF:1000:web::10/64"
	nic.Ipv6.Gateway = "2600:BEEF:1000:web::1"
	nic.Ipv6.Security.AllowedRaSources = []string{"2600:BEEF:1000:web::1"}
	nic.SecurityPolicy.AllowedDestinations[0] = "2600:BEEF:1000:web::/64"

	if vs := violations(t, req, ValidateOptions{}); len(vs) != 4 {
		t.Errorf("default parsers: want 4 violations for symbolic names, got %v", vs)
	}

	p := &symbolicParsers{}
	if err := ValidateCreate(req, p.options()); err != nil {
		t.Fatalf("symbolic parsers: %v", err)
	}
	want := []string{
		"2600:BEEF:1000:web::10/64", "2600:BEEF:1000:web::1",
		"2001:4860:4860::8888", "2001:4860:4860::8844",
		"2600:BEEF:1000:web::1",
		"2600:BEEF:1000:web::/64", "2001:4860:4860::/48",
	}
	if !slices.Equal(p.seen, want) {
		t.Errorf("hooks saw %q, want %q", p.seen, want)
	}

	var rules []string
	opts := p.options()
	opts.ParseRule = func(r string) error {
		rules = append(rules, r)
		if strings.HasPrefix(r, "deny") {
			return errors.New("deny rules are not supported")
		}
		return nil
	}
	vs := violations(t, req, opts)
	if len(rules) != 8 {
		t.Errorf("ParseRule saw %d rules, want 8", len(rules))
	}
	wantFields := []string{
		"config.network[0].security_policy.ingress_rules[3]",
		"config.network[0].security_policy.egress_rules[3]",
	}
	var got []string
	for _, v := range vs {
		got = append(got, v.Field)
	}
	if !slices.Equal(got, wantFields) {
		t.Errorf("got %q, want %q", got, wantFields)
	}
	if !strings.Contains(vs[0].Reason, "deny rules are not supported") || !strings.Contains(vs[0].Reason, `"deny all from any to any"`) {
		t.Errorf("reason %q should quote the rule and the parser's error", vs[0].Reason)
	}
}

func FuzzValidateCreate(f *testing.F) {
	b, err := os.ReadFile("testdata/example1.json")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add([]byte(`{"config":{}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		req := &vmprovisionerv1.CreateVmRequest{}
		if protojson.Unmarshal(data, req) != nil {
			return
		}
		err := ValidateCreate(req, ValidateOptions{})
		var ve *ValidationError
		if err != nil && (!errors.As(err, &ve) || len(ve.Violations) == 0) {
			t.Fatalf("bad error %v", err)
		}
	})
}
