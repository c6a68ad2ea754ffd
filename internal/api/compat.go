package api

import (
	"bytes"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
)

// maxBody bounds a request body.
const maxBody = 4 << 20

// compat makes the procedure paths answer the way the seed's operators call
// them: `curl -d '{json}'` (form content type), `curl -X PUT`, and a bare GET
// with no body all behave like a JSON POST. Connect's own GET form
// (?message=...&encoding=json) and every binary or gRPC request pass
// untouched. JSON bodies are checked for unknown or mistyped fields first so
// the error names the full field path.
type compat struct {
	next   http.Handler
	prefix string
	inputs map[string]protoreflect.MessageDescriptor // procedure → request type
	// readOnly are the procedures without side effects, the only ones
	// Connect serves by GET.
	readOnly map[string]bool
	errorsW  *connect.ErrorWriter
}

func newCompat(next http.Handler, sd protoreflect.ServiceDescriptor) *compat {
	c := &compat{next: next, prefix: "/" + string(sd.FullName()) + "/", inputs: map[string]protoreflect.MessageDescriptor{},
		readOnly: map[string]bool{}, errorsW: connect.NewErrorWriter()}
	ms := sd.Methods()
	for i := 0; i < ms.Len(); i++ {
		path := c.prefix + string(ms.Get(i).Name())
		c.inputs[path] = ms.Get(i).Input()
		opts, _ := ms.Get(i).Options().(*descriptorpb.MethodOptions)
		c.readOnly[path] = opts.GetIdempotencyLevel() == descriptorpb.MethodOptions_NO_SIDE_EFFECTS
	}
	return c
}

func mediaType(r *http.Request) string {
	mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil {
		return ""
	}
	return mt
}

// native reports content types Connect and gRPC handle themselves.
func native(mt string) bool {
	return mt == "application/proto" || strings.HasPrefix(mt, "application/grpc") || strings.HasPrefix(mt, "application/connect+")
}

func (c *compat) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	in, ok := c.inputs[r.URL.Path]
	if !ok {
		if name, under := strings.CutPrefix(r.URL.Path, c.prefix); under {
			// A mistyped procedure: say so in the JSON error shape (the
			// mux would answer a plain-text 404).
			writeJSONError(w, http.StatusNotFound, fmt.Sprintf("no procedure %q in %s", name, strings.Trim(c.prefix, "/")))
			return
		}
		c.next.ServeHTTP(w, r)
		return
	}
	mt := mediaType(r)
	switch {
	case r.Method == http.MethodGet && r.URL.Query().Has("message"):
		if !c.readOnly[r.URL.Path] {
			// Connect answers 405 with an empty body; say why, in the error
			// shape every other failure has.
			w.Header().Set("Allow", "POST, PUT")
			writeJSONError(w, http.StatusMethodNotAllowed,
				strings.TrimPrefix(r.URL.Path, c.prefix)+" changes state: Connect's GET form is only for GetVm and ListVms; use POST or PUT")
			return
		}
		c.next.ServeHTTP(w, r) // Connect GET
		return
	case r.Method == http.MethodGet:
		r.Method = http.MethodPost
		r.Body = io.NopCloser(strings.NewReader("{}"))
		r.ContentLength = 2
		r.Header.Set("Content-Type", "application/json")
		mt = "application/json"
	case r.Method == http.MethodPut:
		r.Method = http.MethodPost
	}
	if r.Method != http.MethodPost || native(mt) {
		c.next.ServeHTTP(w, r)
		return
	}
	// Anything else that reaches a procedure by POST is JSON (curl's default
	// form content type included).
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil {
		c.errorsW.Write(w, r, connect.NewError(connect.CodeInvalidArgument, err))
		return
	}
	if len(body) > maxBody {
		c.errorsW.Write(w, r, connect.NewError(connect.CodeResourceExhausted, errBodyTooLarge))
		return
	}
	if len(bytes.TrimSpace(body)) == 0 {
		body = []byte("{}")
	}
	r.Header.Set("Content-Type", "application/json")
	if mt != "application/json" {
		// Connect insists on its own content types; the body is JSON.
		r.Header.Del("Content-Encoding")
	}
	if err := checkJSON(body, in); err != nil {
		fe := err.(*FieldError)
		c.errorsW.Write(w, r, fieldError(fe.Field, fe.Reason))
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	c.next.ServeHTTP(w, r)
}

// writeJSONError answers what Connect's own handlers answer without a body
// (an unknown procedure, a GET it does not serve) in the error shape of
// every other failure, code unimplemented.
func writeJSONError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	fmt.Fprintf(w, `{"code":"unimplemented","message":%q}`+"\n", msg)
}
