package secevent

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"
)

// Session is an enhanced-monitoring session for one tenant: while it is
// active the firewall owner logs every dropped packet of the tenant's VMs
// (up to a safety cap of 1000/s per rule instead of 10/s), and at LogLevel
// DEBUG also a sample of allowed ones (policy_allow_sample, 10/s per rule;
// INFO, WARN and ERROR log the drops only); the daemon re-programs the
// tenant's NICs when a session starts, changes level and ends (OnChange).
// It ends by itself at ExpiresAt.
type Session struct {
	TenantID  string    `json:"tenant_id"`
	LogLevel  string    `json:"log_level"`
	Duration  string    `json:"duration"`
	StartedAt Timestamp `json:"started_at"`
	ExpiresAt Timestamp `json:"expires_at"`
}

// Log levels a session accepts.
var LogLevels = []string{"DEBUG", "INFO", "WARN", "ERROR"}

// MaxSessionDuration bounds an enhanced-monitoring session.
const MaxSessionDuration = 30 * 24 * time.Hour

// ErrInvalid reports an invalid request (the message says why).
var ErrInvalid = errors.New("invalid argument")

// invalidf is an error that matches ErrInvalid and says only why (the
// HTTP answer is already "400 invalid_argument").
func invalidf(format string, args ...any) error {
	return invalidError(fmt.Sprintf(format, args...))
}

type invalidError string

func (e invalidError) Error() string        { return string(e) }
func (e invalidError) Is(target error) bool { return target == ErrInvalid }

type monitorState struct {
	mu        sync.Mutex
	sessions  map[string]*Session
	timers    map[string]*time.Timer
	gen       uint64
	gens      map[string]uint64
	callbacks []func(tenant string, active bool)
}

func (s *Service) loadMonitor(ctx context.Context) error {
	s.mon.sessions = map[string]*Session{}
	s.mon.timers = map[string]*time.Timer{}
	s.mon.gens = map[string]uint64{}
	list, err := s.opts.Store.LoadSessions(ctx)
	if err != nil {
		return fmt.Errorf("load monitoring sessions: %w", err)
	}
	now := s.now()
	for _, se := range list {
		if !se.ExpiresAt.After(now) {
			s.opts.Store.DeleteSession(ctx, se.TenantID)
			continue
		}
		se := se
		s.mon.sessions[se.TenantID] = &se
		s.armLocked(se.TenantID, se.ExpiresAt.Sub(now))
	}
	return nil
}

func (s *Service) armLocked(tenant string, d time.Duration) {
	if t := s.mon.timers[tenant]; t != nil {
		t.Stop()
	}
	s.mon.gen++
	gen := s.mon.gen
	s.mon.gens[tenant] = gen
	s.mon.timers[tenant] = time.AfterFunc(d, func() { s.expireSession(tenant, gen) })
}

func (s *Service) expireSession(tenant string, gen uint64) {
	s.mon.mu.Lock()
	if s.mon.gens[tenant] != gen {
		s.mon.mu.Unlock()
		return // superseded
	}
	delete(s.mon.timers, tenant)
	delete(s.mon.gens, tenant)
	delete(s.mon.sessions, tenant)
	cbs := slices.Clone(s.mon.callbacks)
	s.mon.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.opts.Store.DeleteSession(ctx, tenant); err != nil {
		s.log.Error("delete monitoring session", "tenant_id", tenant, "err", err)
	}
	s.log.Info("enhanced monitoring ended", "tenant_id", tenant)
	for _, cb := range cbs {
		cb(tenant, false)
	}
}

// stopTimers disarms every session's expiry (the service stopped; a new
// service on the same store re-arms them from the stored sessions).
func (s *Service) stopTimers() {
	s.mon.mu.Lock()
	defer s.mon.mu.Unlock()
	for t, tm := range s.mon.timers {
		tm.Stop()
		delete(s.mon.timers, t)
		delete(s.mon.gens, t)
	}
}

// StartMonitoring starts (or extends/replaces) the enhanced-monitoring
// session of tenant for duration at logLevel (DEBUG, INFO, WARN, ERROR;
// default DEBUG). The session persists across restarts until it expires.
func (s *Service) StartMonitoring(ctx context.Context, tenant string, duration time.Duration, logLevel string) (Session, error) {
	if tenant == "" {
		return Session{}, invalidf("tenant_id is required")
	}
	if duration <= 0 || duration > MaxSessionDuration {
		return Session{}, invalidf("duration must be > 0 and at most %s", MaxSessionDuration)
	}
	lvl := strings.ToUpper(strings.TrimSpace(logLevel))
	if lvl == "" {
		lvl = "DEBUG"
	}
	if lvl == "WARNING" {
		lvl = "WARN"
	}
	if !slices.Contains(LogLevels, lvl) {
		return Session{}, invalidf("log_level %q: want one of %s", logLevel, strings.Join(LogLevels, ", "))
	}
	now := s.now()
	se := Session{TenantID: tenant, LogLevel: lvl, Duration: duration.String(), StartedAt: TS(now), ExpiresAt: TS(now.Add(duration))}
	if err := s.opts.Store.SaveSession(ctx, se); err != nil {
		return Session{}, fmt.Errorf("save monitoring session: %w", err)
	}
	s.mon.mu.Lock()
	prev, was := s.mon.sessions[tenant]
	changed := !was || prev.LogLevel != se.LogLevel
	s.mon.sessions[tenant] = &se
	s.armLocked(tenant, duration)
	cbs := slices.Clone(s.mon.callbacks)
	s.mon.mu.Unlock()
	s.log.Info("enhanced monitoring started", "tenant_id", tenant, "duration", duration, "log_level", lvl)
	if changed {
		for _, cb := range cbs {
			cb(tenant, true)
		}
	}
	return se, nil
}

// StopMonitoring ends tenant's session now (no-op without one).
func (s *Service) StopMonitoring(tenant string) {
	s.mon.mu.Lock()
	t, gen := s.mon.timers[tenant], s.mon.gens[tenant]
	s.mon.mu.Unlock()
	if t != nil && t.Stop() {
		s.expireSession(tenant, gen)
	}
}

// ActiveSessions lists the active sessions ordered by tenant.
func (s *Service) ActiveSessions() []Session {
	s.mon.mu.Lock()
	defer s.mon.mu.Unlock()
	now := s.now()
	out := make([]Session, 0, len(s.mon.sessions))
	for _, se := range s.mon.sessions {
		if se.ExpiresAt.After(now) {
			out = append(out, *se)
		}
	}
	slices.SortFunc(out, func(a, b Session) int { return strings.Compare(a.TenantID, b.TenantID) })
	return out
}

// MonitoringLevel returns the log level of tenant's active session; ok is
// false when tenant is not under enhanced monitoring.
func (s *Service) MonitoringLevel(tenant string) (level string, ok bool) {
	s.mon.mu.Lock()
	defer s.mon.mu.Unlock()
	se := s.mon.sessions[tenant]
	if se == nil || !se.ExpiresAt.After(s.now()) {
		return "", false
	}
	return se.LogLevel, true
}

// MonitoringActive reports whether tenant is under enhanced monitoring.
func (s *Service) MonitoringActive(tenant string) bool {
	s.mon.mu.Lock()
	defer s.mon.mu.Unlock()
	se := s.mon.sessions[tenant]
	return se != nil && se.ExpiresAt.After(s.now())
}

// OnChange registers fn to be told when a tenant's enhanced monitoring
// switches on or off. fn is called at once (active=true) for every tenant
// already under monitoring, then on each change, from the goroutine that
// made it (a request handler or an expiry timer); it must not block long.
func (s *Service) OnChange(fn func(tenant string, active bool)) {
	s.mon.mu.Lock()
	s.mon.callbacks = append(s.mon.callbacks, fn)
	var active []string
	for t := range s.mon.sessions {
		active = append(active, t)
	}
	s.mon.mu.Unlock()
	slices.Sort(active)
	for _, t := range active {
		fn(t, true)
	}
}

// Settings are the /debug/security/optimize switches:
//
//   - BatchProcessing: the event writer stores the events of one flush
//     window in one transaction instead of one transaction per event (see
//     Run).
//   - CachePolicies: the rule owners (the daemon's wrappers around the
//     first-hop and policy tables) skip programming a NIC whose compiled
//     plan equals the one they last programmed.
//   - HardwareAcceleration: refused (ErrUnsupported) unless the
//     FlowtableOffload capability reports support; metald's VM traffic is
//     bridged and flowtables only offload routed flows, so the daemon
//     always refuses it.
type Settings struct {
	BatchProcessing      bool `json:"batch_processing"`
	HardwareAcceleration bool `json:"hardware_acceleration"`
	CachePolicies        bool `json:"cache_policies"`
}

// ErrUnsupported reports a setting the host cannot honour.
var ErrUnsupported = errors.New("not supported on this host")

type optimizerState struct {
	mu        sync.Mutex
	cur       Settings
	callbacks []func(Settings)
}

func (s *Service) loadSettings(ctx context.Context) error {
	st, ok, err := s.opts.Store.LoadSettings(ctx)
	if err != nil {
		return fmt.Errorf("load optimize settings: %w", err)
	}
	if ok {
		if st.HardwareAcceleration {
			if ok, _ := s.offload(); !ok {
				st.HardwareAcceleration = false
			}
		}
		s.opt.cur = st
	}
	return nil
}

func (s *Service) offload() (bool, string) {
	if s.opts.FlowtableOffload == nil {
		return false, "flowtable hardware offload support was not detected"
	}
	return s.opts.FlowtableOffload()
}

// Settings returns the current optimize settings.
func (s *Service) Settings() Settings {
	s.opt.mu.Lock()
	defer s.opt.mu.Unlock()
	return s.opt.cur
}

// SetSettings validates, persists and publishes new settings. Enabling
// HardwareAcceleration fails with ErrUnsupported (and the reason) unless
// the FlowtableOffload capability says it is supported.
func (s *Service) SetSettings(ctx context.Context, st Settings) error {
	if st.HardwareAcceleration {
		if ok, reason := s.offload(); !ok {
			return fmt.Errorf("hardware_acceleration: %s: %w", reason, ErrUnsupported)
		}
	}
	if err := s.opts.Store.SaveSettings(ctx, st); err != nil {
		return fmt.Errorf("save optimize settings: %w", err)
	}
	s.opt.mu.Lock()
	changed := s.opt.cur != st
	s.opt.cur = st
	cbs := slices.Clone(s.opt.callbacks)
	s.opt.mu.Unlock()
	if changed {
		for _, cb := range cbs {
			cb(st)
		}
	}
	return nil
}

// OnSettingsChange registers fn to receive settings changes; it is called
// at once with the current settings.
func (s *Service) OnSettingsChange(fn func(Settings)) {
	s.opt.mu.Lock()
	s.opt.callbacks = append(s.opt.callbacks, fn)
	cur := s.opt.cur
	s.opt.mu.Unlock()
	fn(cur)
}

// FlowtableOffload reports whether hardware acceleration can be enabled,
// and if not why.
func (s *Service) FlowtableOffload() (bool, string) { return s.offload() }
