package daemon

import (
	"fmt"
	"net/http"
	"slices"
	"strings"

	"github.com/metald/metald/internal/httpjson"
)

// debugQueryParams lists the query parameters each debug endpoint reads.
// Any other is refused: a filter an endpoint does not have would otherwise
// be ignored in silence (`/debug/ipv6/allocations?vm_id=x` listing every
// VM's allocations as if filtered).
var debugQueryParams = map[string][]string{
	"GET /debug/security/events":           {"vm_id", "tenant_id", "event_type", "severity", "since", "until", "limit", "order"},
	"GET /debug/security/report":           {"start_time", "end_time"},
	"POST /debug/security/report":          {"start_time", "end_time"},
	"POST /debug/ipv6/cleanup-allocations": {"dry_run"},
	"GET /debug/audit":                     {"vm_id"},
}

// debugGuard serves the API port's mux, and for /debug/ paths refuses
// unknown query parameters (debugQueryParams) and answers a path or method
// the mux does not serve in the JSON error shape of every other answer
// instead of net/http's plain text.
type debugGuard struct{ mux *http.ServeMux }

func (g debugGuard) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !strings.HasPrefix(r.URL.Path, "/debug/") {
		g.mux.ServeHTTP(w, r)
		return
	}
	if _, pattern := g.mux.Handler(r); pattern != "" {
		allowed := debugQueryParams[pattern]
		for k := range r.URL.Query() {
			if !slices.Contains(allowed, k) {
				known := "none"
				if len(allowed) > 0 {
					known = strings.Join(allowed, ", ")
				}
				httpjson.WriteError(w, http.StatusBadRequest, "invalid_argument",
					fmt.Sprintf("unknown query parameter %q for %s (known: %s)", k, pattern, known))
				return
			}
		}
	}
	g.mux.ServeHTTP(&jsonMuxErrors{ResponseWriter: w}, r)
}

// jsonMuxErrors turns net/http's plain-text 404 and 405 into JSON errors.
type jsonMuxErrors struct {
	http.ResponseWriter
	replaced bool
}

func (j *jsonMuxErrors) WriteHeader(code int) {
	if (code == http.StatusNotFound || code == http.StatusMethodNotAllowed) && strings.HasPrefix(j.Header().Get("Content-Type"), "text/plain") {
		j.replaced = true
		j.Header().Del("X-Content-Type-Options")
		if code == http.StatusNotFound {
			httpjson.WriteError(j.ResponseWriter, code, "not_found", "no such endpoint")
		} else {
			httpjson.WriteError(j.ResponseWriter, code, "unimplemented", "method not allowed; allowed: "+j.Header().Get("Allow"))
		}
		return
	}
	j.ResponseWriter.WriteHeader(code)
}

func (j *jsonMuxErrors) Write(b []byte) (int, error) {
	if j.replaced {
		return len(b), nil
	}
	return j.ResponseWriter.Write(b)
}
