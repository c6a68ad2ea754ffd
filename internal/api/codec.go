package api

import (
	"errors"
	"fmt"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

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

// Unmarshal checks the body first (checkJSON), so that the forms that do
// not pass the compat layer (Connect GET, gRPC and gRPC-Web with JSON)
// name a bad field by its path too.
func (c jsonCodec) Unmarshal(b []byte, m any) error {
	pm, ok := m.(proto.Message)
	if !ok {
		return errors.New("json codec: not a proto message")
	}
	if err := checkJSON(b, pm.ProtoReflect().Descriptor()); err != nil {
		return err
	}
	return protojson.Unmarshal(b, pm)
}

// protoCodec is Connect's binary codec, except that a message carrying a
// field this API does not know (a typo'd field number, a newer client's
// field) is refused with its path instead of being ignored.
type protoCodec struct{}

func (protoCodec) Name() string { return "proto" }

func (protoCodec) Marshal(m any) ([]byte, error) {
	pm, ok := m.(proto.Message)
	if !ok {
		return nil, errors.New("proto codec: not a proto message")
	}
	return proto.Marshal(pm)
}

func (protoCodec) Unmarshal(b []byte, m any) error {
	pm, ok := m.(proto.Message)
	if !ok {
		return errors.New("proto codec: not a proto message")
	}
	if err := proto.Unmarshal(b, pm); err != nil {
		return err
	}
	return unknownFields(pm.ProtoReflect(), "")
}

// unknownFields reports the first field number m (or a message inside it)
// carries that its descriptor does not define.
func unknownFields(m protoreflect.Message, path string) error {
	if raw := m.GetUnknown(); len(raw) > 0 {
		num, _, n := protowire.ConsumeTag(raw)
		if n < 0 {
			return &FieldError{Field: orBody(path), Reason: "malformed unknown field"}
		}
		return &FieldError{Field: join(path, fmt.Sprintf("#%d", num)), Reason: "unknown field number"}
	}
	var err error
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		name := join(path, string(fd.Name()))
		switch {
		case fd.IsMap():
			if fd.MapValue().Message() == nil {
				return true
			}
			v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
				err = unknownFields(mv.Message(), fmt.Sprintf("%s[%q]", name, k.String()))
				return err == nil
			})
		case fd.IsList() && fd.Message() != nil:
			l := v.List()
			for i := 0; i < l.Len() && err == nil; i++ {
				err = unknownFields(l.Get(i).Message(), fmt.Sprintf("%s[%d]", name, i))
			}
		case fd.Message() != nil && !fd.IsList():
			err = unknownFields(v.Message(), name)
		}
		return err == nil
	})
	return err
}

func orBody(path string) string {
	if path == "" {
		return "(body)"
	}
	return path
}
