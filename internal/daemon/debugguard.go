package daemon

import (
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"

	"github.com/metald/metald/internal/api"
	"github.com/metald/metald/internal/httpjson"
	"github.com/metald/metald/internal/ipam/ipamhttp"
	"github.com/metald/metald/internal/secevent/eventhttp"
)

// debugQueryParams are the query parameters each debug endpoint reads,
// as its package declares them. Any other is refused: a filter an
// endpoint does not have would otherwise be ignored in silence
// (`/debug/ipv6/allocations?vm_id=x` listing every VM's allocations as if
// filtered).
var debugQueryParams = func() map[string][]string {
	m := map[string][]string{}
	for _, p := range []map[string][]string{eventhttp.QueryParams, ipamhttp.QueryParams, api.DebugQueryParams} {
		maps.Copy(m, p)
	}
	return m
}()

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
