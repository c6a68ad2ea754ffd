package api

import (
	"errors"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	vmv1 "github.com/metald/metald/internal/gen/vmprovisioner/v1"
)

// jsonCodec is Connect's JSON codec with two differences: it never drops
// unknown fields (the compat layer has already rejected them with their
// path), and a ListVms answer always carries "vms" (an empty list, not an
// absent field), so `jq -r '.vms[].vmId'` works on an empty host.
type jsonCodec struct{ name string }

func (c jsonCodec) Name() string { return c.name }

func (c jsonCodec) Marshal(m any) ([]byte, error) {
	pm, ok := m.(proto.Message)
	if !ok {
		return nil, errors.New("json codec: not a proto message")
	}
	if l, ok := pm.(*vmv1.ListVmsResponse); ok && len(l.GetVms()) == 0 {
		return []byte(`{"vms":[]}`), nil
	}
	return protojson.Marshal(pm)
}

func (c jsonCodec) Unmarshal(b []byte, m any) error {
	pm, ok := m.(proto.Message)
	if !ok {
		return errors.New("json codec: not a proto message")
	}
	return protojson.Unmarshal(b, pm)
}
