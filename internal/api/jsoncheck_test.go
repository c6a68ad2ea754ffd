package api

import (
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	vmv1 "github.com/metald/metald/internal/gen/vmprovisioner/v1"
)

func TestCheckJSON(t *testing.T) {
	md := (&vmv1.CreateVmRequest{}).ProtoReflect().Descriptor()
	net := func(sec string) string {
		return `{"vm_id":"a","config":{"network":[{"id":"eth0","ipv6":{"security":{` + sec + `}}}]}}`
	}
	for _, c := range []struct{ body, field, reason string }{
		{`null`, "(body)", "must be an object, got null"},
		{`{"vm_id":"a","vmId":"b"}`, "vm_id", `given twice (as "vmId" and "vm_id")`},
		{net(`"nd_rate_limit":-5`), "config.network[0].ipv6.security.nd_rate_limit", "must be an integer from 0 to 4294967295, got -5"},
		{net(`"nd_rate_limit":"4294967296"`), "config.network[0].ipv6.security.nd_rate_limit", "must be an integer from 0 to 4294967295, got 4294967296"},
		{net(`"nd_rate_limit":1.5`), "config.network[0].ipv6.security.nd_rate_limit", "must be an integer from 0 to 4294967295, got 1.5"},
		{`{"config":{"cpu":{"vcpu_count":99999999999}}}`, "config.cpu.vcpu_count", "must be an integer from -2147483648 to 2147483647, got 99999999999"},
		{`{"config":{"memory":{"size_bytes":1e30}}}`, "config.memory.size_bytes", "must be an integer from -9223372036854775808 to 9223372036854775807, got 1e30"},
		{`{"config":{"cpu":{"vcpu_count":"two"}}}`, "config.cpu.vcpu_count", "must be an integer from -2147483648 to 2147483647, got two"},
		{`{"config":{"cpu":{"vcpu_count":true}}}`, "config.cpu.vcpu_count", "must be a number, got boolean"},
	} {
		err := checkJSON([]byte(c.body), md)
		fe, ok := err.(*FieldError)
		if !ok || fe.Field != c.field || fe.Reason != c.reason {
			t.Errorf("%s: %v, want %s: %s", c.body, err, c.field, c.reason)
		}
	}
	// What protojson takes stays accepted: whole numbers with an exponent
	// or quoted, and null for "not set".
	for _, ok := range []string{
		`{"config":{"cpu":{"vcpu_count":2},"memory":{"size_bytes":1e9}}}`,
		`{"config":{"cpu":{"vcpu_count":"2"},"memory":{"size_bytes":"134217728"}}}`,
		net(`"nd_rate_limit":4294967295,"ra_rate_limit":null`),
	} {
		if err := checkJSON([]byte(ok), md); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
}

func TestProtoCodecRefusesUnknownFields(t *testing.T) {
	req := &vmv1.CreateVmRequest{VmId: "a", Config: &vmv1.VmConfig{Network: []*vmv1.NetworkInterface{{Id: "eth0", Ipv6: &vmv1.Ipv6Config{}}}}}
	good, err := proto.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	var got vmv1.CreateVmRequest
	if err := (protoCodec{}).Unmarshal(good, &got); err != nil || got.GetVmId() != "a" {
		t.Fatalf("known fields: %v", err)
	}
	// Field 99 inside config.network[0].ipv6.
	ipv6 := req.GetConfig().GetNetwork()[0].GetIpv6().ProtoReflect()
	ipv6.SetUnknown(protowire.AppendVarint(protowire.AppendTag(nil, 99, protowire.VarintType), 1))
	bad, err := proto.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	err = (protoCodec{}).Unmarshal(bad, &vmv1.CreateVmRequest{})
	if fe, ok := err.(*FieldError); !ok || fe.Field != "config.network[0].ipv6.#99" || fe.Reason != "unknown field number" {
		t.Fatalf("unknown field: %v", err)
	}
}
