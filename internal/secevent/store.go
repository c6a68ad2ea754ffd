package secevent

import (
	"context"
	"time"
)

// Filter selects events. Zero fields match everything.
type Filter struct {
	VMID     string
	TenantID string
	Type     EventType
	Severity Severity
	// Since and Until bound the event timestamp: Since <= ts <= Until.
	Since, Until time.Time
	// Limit caps the result (0: no cap). Events come newest first unless
	// Ascending is set.
	Limit     int
	Ascending bool
}

// Store persists events, monitoring sessions and optimize settings
// (internal/store/sqlite.EventStore implements it).
type Store interface {
	InsertEvents(ctx context.Context, events []Event) error
	QueryEvents(ctx context.Context, f Filter) ([]Event, error)
	// PruneEvents deletes events older than before and all but the newest
	// keep events (keep <= 0: no count bound). It returns how many it
	// deleted.
	PruneEvents(ctx context.Context, before time.Time, keep int) (int64, error)

	SaveSession(ctx context.Context, s Session) error
	DeleteSession(ctx context.Context, tenantID string) error
	LoadSessions(ctx context.Context) ([]Session, error)

	SaveSettings(ctx context.Context, s Settings) error
	// LoadSettings returns ok=false when none were ever saved.
	LoadSettings(ctx context.Context) (s Settings, ok bool, err error)
}

// Resolver attributes a host device (tap/veth name on the bridge) to the
// VM, tenant and NIC it belongs to; ok=false when the device is unknown.
type Resolver func(hostDev string) (vmID, tenantID, nicID string, ok bool)
