// Package httpjson owns the JSON conventions of metald's operator
// endpoints: indented JSON answers, errors as {"code", "message"} (the
// shape of Connect errors), and strict request bodies read as JSON whatever
// their Content-Type (the guide's `curl -d` sends a form type), with
// unknown fields rejected by name.
package httpjson

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
)

// MaxBody bounds a request body.
const MaxBody = 1 << 20

// Write answers with v as indented JSON.
func Write(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// Error is the body of an error answer.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// WriteError answers with {"code": code, "message": msg}.
func WriteError(w http.ResponseWriter, status int, code, msg string) {
	Write(w, status, Error{Code: code, Message: msg})
}

// ErrEmpty reports an empty body where one was required.
var ErrEmpty = errors.New("empty body; send a JSON object")

// Decode reads one JSON object from the body into v whatever the
// Content-Type. Unknown fields, mistyped values, trailing data and bodies
// over MaxBody are errors that say what is wrong; an empty body leaves v
// as is when allowEmpty, else it is ErrEmpty.
func Decode(r *http.Request, v any, allowEmpty bool) error {
	body, err := io.ReadAll(io.LimitReader(r.Body, MaxBody+1))
	if err != nil {
		return fmt.Errorf("read body: %w", err)
	}
	if len(body) > MaxBody {
		return fmt.Errorf("body larger than %d bytes", MaxBody)
	}
	if len(bytes.TrimSpace(body)) == 0 {
		if allowEmpty {
			return nil
		}
		return ErrEmpty
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var te *json.UnmarshalTypeError
		switch {
		case errors.As(err, &te) && te.Field != "":
			return fmt.Errorf("field %q: want %s, got JSON %s", te.Field, te.Type, te.Value)
		case strings.HasPrefix(err.Error(), "json: unknown field "):
			return fmt.Errorf("unknown field %s", strings.TrimPrefix(err.Error(), "json: unknown field "))
		}
		return fmt.Errorf("invalid JSON: %s", strings.TrimPrefix(err.Error(), "json: "))
	}
	if dec.More() {
		return errors.New("invalid JSON: data after the object")
	}
	return nil
}
