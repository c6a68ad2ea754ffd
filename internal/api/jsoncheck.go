package api

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strconv"

	"google.golang.org/protobuf/reflect/protoreflect"
)

// FieldError is a request field that cannot be accepted, named by its path
// in snake_case (config.network[0].ipv6.securty).
type FieldError struct {
	Field  string
	Reason string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Reason }

// checkJSON walks a JSON request body against the message descriptor and
// reports the first unknown field or mistyped value with its full path.
// protojson would reject these too, but without saying where: a typo in a
// security setting must be named, never ignored.
func checkJSON(data []byte, md protoreflect.MessageDescriptor) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return &FieldError{Field: "(body)", Reason: "invalid JSON: " + err.Error()}
	}
	if _, err := dec.Token(); err != io.EOF {
		return &FieldError{Field: "(body)", Reason: "invalid JSON: data after the top-level value"}
	}
	return walkMessage(v, md, "")
}

func join(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}

func jsonKind(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case bool:
		return "boolean"
	case json.Number:
		return "number"
	case string:
		return "string"
	case []any:
		return "array"
	case map[string]any:
		return "object"
	}
	return fmt.Sprintf("%T", v)
}

func walkMessage(v any, md protoreflect.MessageDescriptor, path string) error {
	if isWellKnown(md) {
		return nil // protojson validates their special forms
	}
	obj, ok := v.(map[string]any)
	if !ok {
		if v == nil {
			return nil
		}
		name := path
		if name == "" {
			name = "(body)"
		}
		return &FieldError{Field: name, Reason: "must be an object, got " + jsonKind(v)}
	}
	fields := md.Fields()
	for k, val := range obj {
		fd := fields.ByJSONName(k)
		if fd == nil {
			fd = fields.ByTextName(k)
		}
		if fd == nil {
			return &FieldError{Field: join(path, k), Reason: "unknown field"}
		}
		if err := walkField(val, fd, join(path, string(fd.Name()))); err != nil {
			return err
		}
	}
	return nil
}

func walkField(v any, fd protoreflect.FieldDescriptor, path string) error {
	if v == nil {
		return nil // null means "not set" in protojson
	}
	switch {
	case fd.IsMap():
		obj, ok := v.(map[string]any)
		if !ok {
			return &FieldError{Field: path, Reason: "must be an object, got " + jsonKind(v)}
		}
		for k, val := range obj {
			if err := walkScalarOrMessage(val, fd.MapValue(), path+"["+strconv.Quote(k)+"]"); err != nil {
				return err
			}
		}
		return nil
	case fd.IsList():
		arr, ok := v.([]any)
		if !ok {
			return &FieldError{Field: path, Reason: "must be an array, got " + jsonKind(v)}
		}
		for i, val := range arr {
			if err := walkScalarOrMessage(val, fd, fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
		return nil
	}
	return walkScalarOrMessage(v, fd, path)
}

func walkScalarOrMessage(v any, fd protoreflect.FieldDescriptor, path string) error {
	want := ""
	switch fd.Kind() {
	case protoreflect.MessageKind, protoreflect.GroupKind:
		return walkMessage(v, fd.Message(), path)
	case protoreflect.StringKind, protoreflect.BytesKind:
		if _, ok := v.(string); !ok {
			want = "a string"
		}
	case protoreflect.BoolKind:
		if _, ok := v.(bool); !ok {
			want = "true or false"
		}
	case protoreflect.EnumKind:
		switch v.(type) {
		case string, json.Number:
		default:
			want = "an enum name or number"
		}
	default: // numbers: protojson also accepts them quoted
		switch x := v.(type) {
		case json.Number:
		case string:
			if _, err := strconv.ParseFloat(x, 64); err != nil {
				want = "a number"
			}
		default:
			want = "a number"
		}
	}
	if want != "" {
		return &FieldError{Field: path, Reason: "must be " + want + ", got " + jsonKind(v)}
	}
	return nil
}

func isWellKnown(md protoreflect.MessageDescriptor) bool {
	return md.ParentFile() != nil && md.ParentFile().Package() == "google.protobuf"
}
