// Package eventhttp owns the operator HTTP endpoints for security events
// under /debug/security/ (events, report, enhance-monitoring, optimize):
// plain net/http handlers with snake_case JSON over a secevent.Service.
//
// Request bodies are JSON whatever the Content-Type says (curl -d sends
// application/x-www-form-urlencoded); unknown fields and unknown query
// parameters are rejected with 400 naming them. Errors are
// {"code": "...", "message": "..."} with Connect-style codes.
package eventhttp

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/metald/metald/internal/httpjson"
	"github.com/metald/metald/internal/secevent"
)

// Limits of GET /debug/security/events.
const (
	DefaultLimit = 10000
	MaxLimit     = 100000
)

// Handler serves /debug/security/.
type Handler struct {
	s   *secevent.Service
	mux *http.ServeMux
}

// New returns the handler; mount it with Register or as a whole under
// "/debug/security/".
func New(s *secevent.Service) *Handler {
	h := &Handler{s: s, mux: http.NewServeMux()}
	h.Register(h.mux)
	return h
}

// QueryParams are the query parameters each route reads (by mux
// pattern); the handlers refuse any other, and so does the daemon's guard
// of the API port.
var QueryParams = map[string][]string{
	"GET /debug/security/events":  {"vm_id", "tenant_id", "event_type", "severity", "since", "until", "limit", "order"},
	"GET /debug/security/report":  {"start_time", "end_time"},
	"POST /debug/security/report": {"start_time", "end_time"},
}

// Register adds the routes to mux.
func (h *Handler) Register(mux *http.ServeMux) {
	mux.HandleFunc("GET /debug/security/events", h.events)
	mux.HandleFunc("GET /debug/security/report", h.report)
	mux.HandleFunc("POST /debug/security/report", h.report)
	mux.HandleFunc("GET /debug/security/enhance-monitoring", h.listSessions)
	mux.HandleFunc("POST /debug/security/enhance-monitoring", h.startSession)
	mux.HandleFunc("DELETE /debug/security/enhance-monitoring/{tenant_id}", h.stopSession)
	mux.HandleFunc("GET /debug/security/optimize", h.getOptimize)
	mux.HandleFunc("PUT /debug/security/optimize", h.putOptimize)
}

// ServeHTTP implements http.Handler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) { h.mux.ServeHTTP(w, r) }

func writeJSON(w http.ResponseWriter, status int, v any) { httpjson.Write(w, status, v) }

func fail(w http.ResponseWriter, status int, code, format string, args ...any) {
	httpjson.WriteError(w, status, code, fmt.Sprintf(format, args...))
}

func invalid(w http.ResponseWriter, format string, args ...any) {
	fail(w, http.StatusBadRequest, "invalid_argument", format, args...)
}

func internal(w http.ResponseWriter, err error) {
	fail(w, http.StatusInternalServerError, "internal", "%v", err)
}

// decode reads a JSON object body into v; an empty body leaves v as is.
func decode(r *http.Request, v any) error { return httpjson.Decode(r, v, true) }

func checkParams(q url.Values, allowed ...string) error {
	for k := range q {
		ok := false
		for _, a := range allowed {
			ok = ok || k == a
		}
		if !ok {
			return fmt.Errorf("unknown query parameter %q (known: %s)", k, strings.Join(allowed, ", "))
		}
	}
	return nil
}

func parseTimeParam(q url.Values, name string) (time.Time, error) {
	v := q.Get(name)
	if v == "" {
		return time.Time{}, nil
	}
	t, err := secevent.ParseTime(v)
	if err != nil {
		return time.Time{}, fmt.Errorf("%s: %v", name, err)
	}
	return t, nil
}

// events serves GET /debug/security/events: a JSON array, newest first
// (order=asc for oldest first), filtered by vm_id, tenant_id, event_type,
// severity, since, until (RFC 3339), limit (default 10000, max 100000).
func (h *Handler) events(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if err := checkParams(q, QueryParams["GET /debug/security/events"]...); err != nil {
		invalid(w, "%v", err)
		return
	}
	f := secevent.Filter{VMID: q.Get("vm_id"), TenantID: q.Get("tenant_id"),
		Type: secevent.EventType(q.Get("event_type")), Severity: secevent.Severity(q.Get("severity")), Limit: DefaultLimit}
	if f.Severity != "" && !f.Severity.Valid() {
		invalid(w, "severity %q: want low, medium, high or critical", f.Severity)
		return
	}
	if f.Type != "" && !f.Type.Valid() {
		names := make([]string, len(secevent.Types))
		for i, t := range secevent.Types {
			names[i] = string(t)
		}
		invalid(w, "event_type %q: want one of %s", f.Type, strings.Join(names, ", "))
		return
	}
	for k, vs := range q {
		if len(vs) > 1 {
			invalid(w, "query parameter %q given %d times", k, len(vs))
			return
		}
	}
	var err error
	if f.Since, err = parseTimeParam(q, "since"); err != nil {
		invalid(w, "%v", err)
		return
	}
	if f.Until, err = parseTimeParam(q, "until"); err != nil {
		invalid(w, "%v", err)
		return
	}
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > MaxLimit {
			invalid(w, "limit %q: want 1..%d", v, MaxLimit)
			return
		}
		f.Limit = n
	}
	switch q.Get("order") {
	case "", "desc":
	case "asc":
		f.Ascending = true
	default:
		invalid(w, "order %q: want asc or desc", q.Get("order"))
		return
	}
	events, err := h.s.Query(r.Context(), f)
	if err != nil {
		internal(w, err)
		return
	}
	writeJSON(w, http.StatusOK, events)
}

// reportRequest is the body (or query) of /debug/security/report.
type reportRequest struct {
	StartTime string `json:"start_time"`
	EndTime   string `json:"end_time"`
}

// report serves GET and POST /debug/security/report {start_time,
// end_time}; defaults: the last 24 hours.
func (h *Handler) report(w http.ResponseWriter, r *http.Request) {
	var req reportRequest
	q := r.URL.Query()
	if err := checkParams(q, QueryParams["GET /debug/security/report"]...); err != nil {
		invalid(w, "%v", err)
		return
	}
	req.StartTime, req.EndTime = q.Get("start_time"), q.Get("end_time")
	if r.Method == http.MethodPost {
		if err := decode(r, &req); err != nil {
			invalid(w, "%v", err)
			return
		}
	}
	end := time.Now().UTC()
	if req.EndTime != "" {
		t, err := secevent.ParseTime(req.EndTime)
		if err != nil {
			invalid(w, "end_time: %v", err)
			return
		}
		end = t
	}
	start := end.Add(-24 * time.Hour)
	if req.StartTime != "" {
		t, err := secevent.ParseTime(req.StartTime)
		if err != nil {
			invalid(w, "start_time: %v", err)
			return
		}
		start = t
	}
	rep, err := h.s.Report(r.Context(), start, end)
	if errors.Is(err, secevent.ErrInvalid) {
		invalid(w, "%v", err)
		return
	}
	if err != nil {
		internal(w, err)
		return
	}
	writeJSON(w, http.StatusOK, rep)
}

type sessionRequest struct {
	TenantID string          `json:"tenant_id"`
	Duration json.RawMessage `json:"duration"`
	LogLevel string          `json:"log_level"`
}

// parseDuration accepts a Go duration ("24h", "90m"), days ("7d") or a
// number of seconds (string or JSON number).
func parseDuration(raw json.RawMessage) (time.Duration, error) {
	if len(raw) == 0 {
		return 0, errors.New("duration is required (e.g. \"24h\")")
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		var n float64
		if err := json.Unmarshal(raw, &n); err != nil {
			return 0, fmt.Errorf("duration: want a string like \"24h\" or seconds")
		}
		return time.Duration(n * float64(time.Second)), nil
	}
	s = strings.TrimSpace(s)
	if d, ok := strings.CutSuffix(s, "d"); ok {
		if n, err := strconv.ParseFloat(d, 64); err == nil {
			return time.Duration(n * 24 * float64(time.Hour)), nil
		}
	}
	if n, err := strconv.ParseFloat(s, 64); err == nil {
		return time.Duration(n * float64(time.Second)), nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("duration %q: want e.g. \"24h\", \"30m\", \"7d\"", s)
	}
	return d, nil
}

// sessionsResponse lists sessions.
type sessionsResponse struct {
	Sessions []secevent.Session `json:"sessions"`
}

func (h *Handler) listSessions(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, sessionsResponse{Sessions: h.s.ActiveSessions()})
}

func (h *Handler) startSession(w http.ResponseWriter, r *http.Request) {
	var req sessionRequest
	if err := decode(r, &req); err != nil {
		invalid(w, "%v", err)
		return
	}
	if req.TenantID == "" {
		invalid(w, "tenant_id is required")
		return
	}
	d, err := parseDuration(req.Duration)
	if err != nil {
		invalid(w, "%v", err)
		return
	}
	se, err := h.s.StartMonitoring(r.Context(), req.TenantID, d, req.LogLevel)
	if errors.Is(err, secevent.ErrInvalid) {
		invalid(w, "%v", err)
		return
	}
	if err != nil {
		internal(w, err)
		return
	}
	writeJSON(w, http.StatusOK, se)
}

func (h *Handler) stopSession(w http.ResponseWriter, r *http.Request) {
	tenant := r.PathValue("tenant_id")
	if !h.s.MonitoringActive(tenant) {
		fail(w, http.StatusNotFound, "not_found", "no active monitoring session for tenant %q", tenant)
		return
	}
	h.s.StopMonitoring(tenant)
	w.WriteHeader(http.StatusNoContent)
}

// optimizeRequest: absent fields keep their current value.
type optimizeRequest struct {
	BatchProcessing      *bool `json:"batch_processing"`
	HardwareAcceleration *bool `json:"hardware_acceleration"`
	CachePolicies        *bool `json:"cache_policies"`
}

type optimizeResponse struct {
	secevent.Settings
	HardwareAccelerationSupported bool   `json:"hardware_acceleration_supported"`
	HardwareAccelerationReason    string `json:"hardware_acceleration_reason,omitempty"`
}

func (h *Handler) optimizeState() optimizeResponse {
	ok, reason := h.s.FlowtableOffload()
	return optimizeResponse{Settings: h.s.Settings(), HardwareAccelerationSupported: ok, HardwareAccelerationReason: reason}
}

func (h *Handler) getOptimize(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, h.optimizeState())
}

func (h *Handler) putOptimize(w http.ResponseWriter, r *http.Request) {
	var req optimizeRequest
	if err := decode(r, &req); err != nil {
		invalid(w, "%v", err)
		return
	}
	st := h.s.Settings()
	if req.BatchProcessing != nil {
		st.BatchProcessing = *req.BatchProcessing
	}
	if req.HardwareAcceleration != nil {
		st.HardwareAcceleration = *req.HardwareAcceleration
	}
	if req.CachePolicies != nil {
		st.CachePolicies = *req.CachePolicies
	}
	err := h.s.SetSettings(r.Context(), st)
	if errors.Is(err, secevent.ErrUnsupported) {
		fail(w, http.StatusBadRequest, "failed_precondition", "%v", err)
		return
	}
	if err != nil {
		internal(w, err)
		return
	}
	writeJSON(w, http.StatusOK, h.optimizeState())
}
