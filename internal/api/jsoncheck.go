package api

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
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
	if v == nil {
		return &FieldError{Field: "(body)", Reason: "must be an object, got null"}
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
	seen := map[protoreflect.FieldNumber]string{}
	for k, val := range obj {
		fd := fields.ByJSONName(k)
		if fd == nil {
			fd = fields.ByTextName(k)
		}
		if fd == nil {
			return &FieldError{Field: join(path, k), Reason: "unknown field"}
		}
		if other, dup := seen[fd.Number()]; dup {
			return &FieldError{Field: join(path, string(fd.Name())), Reason: fmt.Sprintf("given twice (as %q and %q)", min(other, k), max(other, k))}
		}
		seen[fd.Number()] = k
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
		var text string
		switch x := v.(type) {
		case json.Number:
			text = string(x)
		case string:
			text = x
		default:
			want = "a number"
		}
		if want == "" {
			if r := numberRange(fd.Kind()); r != "" {
				if !inRange(text, fd.Kind()) {
					return &FieldError{Field: path, Reason: "must be " + r + ", got " + text}
				}
			} else if _, err := strconv.ParseFloat(text, 64); err != nil && text != "NaN" && text != "Infinity" && text != "-Infinity" {
				want = "a number"
			}
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

// numberRange describes the values an integer kind takes; "" for floats.
func numberRange(k protoreflect.Kind) string {
	switch k {
	case protoreflect.Int32Kind, protoreflect.Sint32Kind, protoreflect.Sfixed32Kind:
		return "an integer from -2147483648 to 2147483647"
	case protoreflect.Uint32Kind, protoreflect.Fixed32Kind:
		return "an integer from 0 to 4294967295"
	case protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind:
		return "an integer from -9223372036854775808 to 9223372036854775807"
	case protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
		return "an integer from 0 to 18446744073709551615"
	}
	return ""
}

// inRange reports whether text is an integer of kind k's range, written
// as protojson accepts it (an exponent is fine when the value is whole).
func inRange(text string, k protoreflect.Kind) bool {
	bits := 32
	switch k {
	case protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind, protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
		bits = 64
	}
	unsigned := k == protoreflect.Uint32Kind || k == protoreflect.Fixed32Kind || k == protoreflect.Uint64Kind || k == protoreflect.Fixed64Kind
	if unsigned {
		if _, err := strconv.ParseUint(text, 10, bits); err == nil {
			return true
		}
	} else if _, err := strconv.ParseInt(text, 10, bits); err == nil {
		return true
	}
	// 1e3 and 5.0 are whole numbers protojson takes.
	f, err := strconv.ParseFloat(text, 64)
	if err != nil || f != math.Trunc(f) {
		return false
	}
	switch {
	case unsigned && bits == 32:
		return f >= 0 && f <= 4294967295
	case unsigned:
		return f >= 0 && f < 18446744073709551616
	case bits == 32:
		return f >= -2147483648 && f <= 2147483647
	}
	return f >= -9223372036854775808 && f < 9223372036854775808
}
