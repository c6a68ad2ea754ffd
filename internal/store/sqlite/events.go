package sqlite

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/metald/metald/internal/secevent"
)

// EventStore is the SQLite implementation of secevent.Store. It shares the
// database (and its migrations) with Store.
type EventStore struct {
	db *sql.DB
}

var _ secevent.Store = (*EventStore)(nil)

// Events returns the secevent.Store on s's database.
func (s *Store) Events() *EventStore { return NewEventStore(s.db) }

// NewEventStore returns a secevent.Store on db, which must carry this
// package's migrations (see Open).
func NewEventStore(db *sql.DB) *EventStore { return &EventStore{db: db} }

// InsertEvents implements secevent.Store: one transaction per call.
func (s *EventStore) InsertEvents(ctx context.Context, events []secevent.Event) error {
	if len(events) == 0 {
		return nil
	}
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback()
	st, err := tx.PrepareContext(ctx, `INSERT OR IGNORE INTO security_events (id, ts, event_type, severity, vm_id, tenant_id, interface_id, details)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?)`)
	if err != nil {
		return fmt.Errorf("prepare insert event: %w", err)
	}
	defer st.Close()
	for i := range events {
		e := &events[i]
		d, err := json.Marshal(e.Details)
		if err != nil {
			return fmt.Errorf("encode event details: %w", err)
		}
		if _, err := st.ExecContext(ctx, e.ID, ts(e.Timestamp.Time), string(e.Type), string(e.Severity), e.VMID, e.TenantID, e.InterfaceID, string(d)); err != nil {
			return fmt.Errorf("insert event: %w", err)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

// QueryEvents implements secevent.Store.
func (s *EventStore) QueryEvents(ctx context.Context, f secevent.Filter) ([]secevent.Event, error) {
	var where []string
	var args []any
	eq := func(col, v string) {
		if v != "" {
			where = append(where, col+" = ?")
			args = append(args, v)
		}
	}
	eq("vm_id", f.VMID)
	eq("tenant_id", f.TenantID)
	eq("event_type", string(f.Type))
	eq("severity", string(f.Severity))
	if !f.Since.IsZero() {
		where = append(where, "ts >= ?")
		args = append(args, f.Since.UnixNano())
	}
	if !f.Until.IsZero() {
		where = append(where, "ts <= ?")
		args = append(args, f.Until.UnixNano())
	}
	q := `SELECT id, ts, event_type, severity, vm_id, tenant_id, interface_id, details FROM security_events`
	if len(where) > 0 {
		q += " WHERE " + strings.Join(where, " AND ")
	}
	if f.Ascending {
		q += " ORDER BY ts, seq"
	} else {
		q += " ORDER BY ts DESC, seq DESC"
	}
	if f.Limit > 0 {
		q += " LIMIT ?"
		args = append(args, f.Limit)
	}
	rows, err := s.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("query events: %w", err)
	}
	defer rows.Close()
	out := []secevent.Event{}
	for rows.Next() {
		var e secevent.Event
		var t int64
		var typ, sev, details string
		if err := rows.Scan(&e.ID, &t, &typ, &sev, &e.VMID, &e.TenantID, &e.InterfaceID, &details); err != nil {
			return nil, fmt.Errorf("scan event: %w", err)
		}
		e.Timestamp = secevent.TS(fromTS(t))
		e.Type, e.Severity = secevent.EventType(typ), secevent.Severity(sev)
		if err := json.Unmarshal([]byte(details), &e.Details); err != nil {
			return nil, fmt.Errorf("decode event %s details: %w", e.ID, err)
		}
		out = append(out, e)
	}
	return out, rows.Err()
}

// PruneEvents implements secevent.Store.
func (s *EventStore) PruneEvents(ctx context.Context, before time.Time, keep int) (int64, error) {
	var n int64
	if !before.IsZero() {
		res, err := s.db.ExecContext(ctx, `DELETE FROM security_events WHERE ts < ?`, before.UnixNano())
		if err != nil {
			return 0, fmt.Errorf("prune events by age: %w", err)
		}
		m, _ := res.RowsAffected()
		n += m
	}
	if keep > 0 {
		res, err := s.db.ExecContext(ctx, `DELETE FROM security_events WHERE seq <= (SELECT seq FROM security_events ORDER BY seq DESC LIMIT 1 OFFSET ?)`, keep)
		if err != nil {
			return n, fmt.Errorf("prune events by count: %w", err)
		}
		m, _ := res.RowsAffected()
		n += m
	}
	return n, nil
}

// SaveSession implements secevent.Store.
func (s *EventStore) SaveSession(ctx context.Context, se secevent.Session) error {
	_, err := s.db.ExecContext(ctx, `INSERT INTO security_monitor_sessions (tenant_id, log_level, duration, started_at, expires_at)
		VALUES (?, ?, ?, ?, ?)
		ON CONFLICT (tenant_id) DO UPDATE SET log_level = excluded.log_level, duration = excluded.duration,
			started_at = excluded.started_at, expires_at = excluded.expires_at`,
		se.TenantID, se.LogLevel, se.Duration, ts(se.StartedAt.Time), ts(se.ExpiresAt.Time))
	if err != nil {
		return fmt.Errorf("save session: %w", err)
	}
	return nil
}

// DeleteSession implements secevent.Store.
func (s *EventStore) DeleteSession(ctx context.Context, tenantID string) error {
	if _, err := s.db.ExecContext(ctx, `DELETE FROM security_monitor_sessions WHERE tenant_id = ?`, tenantID); err != nil {
		return fmt.Errorf("delete session: %w", err)
	}
	return nil
}

// LoadSessions implements secevent.Store.
func (s *EventStore) LoadSessions(ctx context.Context) ([]secevent.Session, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT tenant_id, log_level, duration, started_at, expires_at FROM security_monitor_sessions ORDER BY tenant_id`)
	if err != nil {
		return nil, fmt.Errorf("load sessions: %w", err)
	}
	defer rows.Close()
	var out []secevent.Session
	for rows.Next() {
		var se secevent.Session
		var started, expires int64
		if err := rows.Scan(&se.TenantID, &se.LogLevel, &se.Duration, &started, &expires); err != nil {
			return nil, fmt.Errorf("scan session: %w", err)
		}
		se.StartedAt, se.ExpiresAt = secevent.TS(fromTS(started)), secevent.TS(fromTS(expires))
		out = append(out, se)
	}
	return out, rows.Err()
}

const settingsKey = "optimize"

// SaveSettings implements secevent.Store.
func (s *EventStore) SaveSettings(ctx context.Context, st secevent.Settings) error {
	b, err := json.Marshal(st)
	if err != nil {
		return fmt.Errorf("encode settings: %w", err)
	}
	_, err = s.db.ExecContext(ctx, `INSERT INTO security_settings (key, value) VALUES (?, ?)
		ON CONFLICT (key) DO UPDATE SET value = excluded.value`, settingsKey, string(b))
	if err != nil {
		return fmt.Errorf("save settings: %w", err)
	}
	return nil
}

// LoadSettings implements secevent.Store.
func (s *EventStore) LoadSettings(ctx context.Context) (secevent.Settings, bool, error) {
	var v string
	err := s.db.QueryRowContext(ctx, `SELECT value FROM security_settings WHERE key = ?`, settingsKey).Scan(&v)
	if err == sql.ErrNoRows {
		return secevent.Settings{}, false, nil
	}
	if err != nil {
		return secevent.Settings{}, false, fmt.Errorf("load settings: %w", err)
	}
	var st secevent.Settings
	if err := json.Unmarshal([]byte(v), &st); err != nil {
		return secevent.Settings{}, false, fmt.Errorf("decode settings: %w", err)
	}
	return st, true, nil
}
