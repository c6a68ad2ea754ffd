package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Load reads the configuration file at path over Default and returns the
// result without validating it (see Validate). An empty path returns
// Default. The format follows the extension: .yaml or .yml for YAML, .json
// for JSON; other extensions are an error.
//
// Keys absent from the file, or present with a null value, keep their
// defaults. A list value replaces the default list. Errors name the file,
// the line and the key path:
//
//	config file metald.yaml: line 3: unknown key "netns.guest_comand"
//	config file metald.yaml: line 9: vm.shutdown_timeout: invalid duration "10": time: missing unit in duration "10"
//
// YAML anchors and aliases are resolved; merge keys ("<<") are not
// supported and are reported as unknown keys.
func Load(path string) (*Config, error) {
	cfg := Default()
	if path == "" {
		return cfg, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config file: %w", err)
	}
	if err := decode(data, filepath.Ext(path), cfg); err != nil {
		return nil, fmt.Errorf("config file %s: %w", path, err)
	}
	return cfg, nil
}

// decode parses data in the format named by ext over cfg.
func decode(data []byte, ext string, cfg *Config) error {
	switch strings.ToLower(ext) {
	case ".yaml", ".yml":
	case ".json":
		// JSON is YAML, but YAML is not JSON: insist on the format the
		// name promises, then read it with the YAML parser for line
		// numbers and identical strictness.
		if len(bytes.TrimSpace(data)) > 0 && !json.Valid(data) {
			var v any
			err := json.Unmarshal(data, &v)
			return fmt.Errorf("invalid JSON: %w", err)
		}
	default:
		return fmt.Errorf("unsupported format %q; use .yaml, .yml or .json", ext)
	}

	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil // empty file: all defaults
		}
		return err
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		if err != nil {
			return err
		}
		return fmt.Errorf("line %d: more than one YAML document", extra.Line)
	}
	root := &doc
	if root.Kind == yaml.DocumentNode {
		if len(root.Content) == 0 {
			return nil // comments only
		}
		root = root.Content[0]
	}
	return decodeNode(root, reflect.ValueOf(cfg).Elem(), "")
}

var (
	durationType = reflect.TypeFor[Duration]()
	stringsType  = reflect.TypeFor[[]string]()
)

// decodeNode stores n into v, which is Config or one of its fields, and
// checks keys and types on the way. key is v's dotted key path ("" for the
// root).
//
// This walk is used instead of yaml.Decoder.KnownFields(true) because that
// reports unknown keys without their path, type errors without their key,
// and nothing about duplicate keys in a node tree.
func decodeNode(n *yaml.Node, v reflect.Value, key string) error {
	for n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null" {
		return nil // keep the default
	}
	t := v.Type()
	switch {
	case t == durationType:
		s, err := scalarString(n, key, "a duration string such as \"10s\"")
		if err != nil {
			return err
		}
		d, err := time.ParseDuration(s)
		if err != nil {
			return fmt.Errorf("line %d: %s: invalid duration %q: %v", n.Line, key, s, err)
		}
		v.Set(reflect.ValueOf(Duration(d)))
		return nil

	case t == stringsType:
		if n.Kind != yaml.SequenceNode {
			return fmt.Errorf("line %d: %s: want a list of strings, got %s", n.Line, key, describe(n))
		}
		list := make([]string, 0, len(n.Content))
		for i, item := range n.Content {
			for item.Kind == yaml.AliasNode {
				item = item.Alias
			}
			s, err := scalarString(item, fmt.Sprintf("%s[%d]", key, i), "a string")
			if err != nil {
				return err
			}
			list = append(list, s)
		}
		v.Set(reflect.ValueOf(list))
		return nil

	case t.Kind() == reflect.String:
		s, err := scalarString(n, key, "a string")
		if err != nil {
			return err
		}
		v.SetString(s)
		return nil

	case t.Kind() == reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			return fmt.Errorf("line %d: %s: want a list, got %s", n.Line, key, describe(n))
		}
		if len(n.Content) == 0 {
			v.Set(reflect.Zero(t)) // an empty list is no list
			return nil
		}
		list := reflect.MakeSlice(t, len(n.Content), len(n.Content))
		for i, item := range n.Content {
			if err := decodeNode(item, list.Index(i), fmt.Sprintf("%s[%d]", key, i)); err != nil {
				return err
			}
		}
		v.Set(list)
		return nil

	case t.Kind() >= reflect.Int && t.Kind() <= reflect.Int64:
		if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!int" {
			return fmt.Errorf("line %d: %s: want an integer, got %s", n.Line, key, describe(n))
		}
		var i int64
		if err := n.Decode(&i); err != nil {
			return fmt.Errorf("line %d: %s: %v", n.Line, key, err)
		}
		if v.OverflowInt(i) {
			return fmt.Errorf("line %d: %s: %d is out of range", n.Line, key, i)
		}
		v.SetInt(i)
		return nil

	case t.Kind() == reflect.Bool:
		if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!bool" {
			return fmt.Errorf("line %d: %s: want true or false, got %s", n.Line, key, describe(n))
		}
		var b bool
		if err := n.Decode(&b); err != nil {
			return fmt.Errorf("line %d: %s: %v", n.Line, key, err)
		}
		v.SetBool(b)
		return nil

	case t.Kind() == reflect.Struct:
		if n.Kind != yaml.MappingNode {
			what := "the configuration"
			if key != "" {
				what = key
			}
			return fmt.Errorf("line %d: %s: want a mapping of keys, got %s", n.Line, what, describe(n))
		}
		seen := map[string]int{}
		for i := 0; i+1 < len(n.Content); i += 2 {
			kn, vn := n.Content[i], n.Content[i+1]
			if kn.Kind != yaml.ScalarNode || kn.ShortTag() != "!!str" {
				return fmt.Errorf("line %d: keys must be strings, got %s", kn.Line, describe(kn))
			}
			path := kn.Value
			if key != "" {
				path = key + "." + kn.Value
			}
			if line, dup := seen[kn.Value]; dup {
				return fmt.Errorf("line %d: duplicate key %q (first at line %d)", kn.Line, path, line)
			}
			seen[kn.Value] = kn.Line
			f, ok := fieldByTag(t, kn.Value)
			if !ok {
				return fmt.Errorf("line %d: unknown key %q", kn.Line, path)
			}
			if err := decodeNode(vn, v.FieldByIndex(f.Index), path); err != nil {
				return err
			}
		}
		return nil
	}
	// Config holds no other kinds; a new field of another type needs a
	// case above.
	panic(fmt.Sprintf("config: key %s has unsupported type %s", key, t))
}

// scalarString returns the value of a string scalar, or an error saying
// what was wanted.
func scalarString(n *yaml.Node, key, want string) (string, error) {
	if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!str" {
		hint := ""
		if n.Kind == yaml.ScalarNode && want == "a string" {
			hint = " (quote it to make it a string)"
		}
		return "", fmt.Errorf("line %d: %s: want %s, got %s%s", n.Line, key, want, describe(n), hint)
	}
	return n.Value, nil
}

// describe names what a node holds, for error messages.
func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		switch n.ShortTag() {
		case "!!str":
			return fmt.Sprintf("string %q", n.Value)
		case "!!int":
			return "number " + n.Value
		case "!!float":
			return "number " + n.Value
		case "!!bool":
			return "boolean " + n.Value
		default:
			return fmt.Sprintf("%s %q", n.ShortTag(), n.Value)
		}
	}
	return "an unsupported YAML node"
}

// fieldByTag finds the field of struct type t whose yaml tag is name.
func fieldByTag(t reflect.Type, name string) (reflect.StructField, bool) {
	for i := range t.NumField() {
		f := t.Field(i)
		if tag, _, _ := strings.Cut(f.Tag.Get("yaml"), ","); tag == name && f.IsExported() {
			return f, true
		}
	}
	return reflect.StructField{}, false
}
