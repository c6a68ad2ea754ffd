// Package store owns metald's persistent state contract: the records the
// daemon keeps across restarts and the Store interface every database
// implementation (SQLite by default) satisfies.
package store

import (
	"context"
	"errors"
	"time"
)

// Errors every Store returns for expected cases.
var (
	// ErrNotFound reports a record that does not exist.
	ErrNotFound = errors.New("not found")
	// ErrConflict reports a record whose key (VM id, host device) is taken.
	ErrConflict = errors.New("already exists")
)

// VM states as persisted. Creating and Deleting are intent states: a row in
// them after a crash tells the daemon to roll the operation back or forward.
const (
	StateCreating   = "CREATING"
	StateCreated    = "CREATED"
	StateRunning    = "RUNNING"
	StatePaused     = "PAUSED"
	StateShutdown   = "SHUTDOWN"
	StateTerminated = "TERMINATED"
	StateDeleting   = "DELETING"
)

// VM is one VM's persisted record.
type VM struct {
	ID       string
	TenantID string
	State    string
	// StateReason explains a state the caller did not ask for.
	StateReason string
	// Config is the protojson encoding of the VmConfig as the caller gave it.
	Config []byte
	// Backend names the backend that runs the VM.
	Backend string
	// Instance is the backend's JSON handle on the VM.
	Instance  []byte
	NICs      []NIC
	CreatedAt time.Time
	UpdatedAt time.Time
	// StartedAt is the last boot time; zero when never booted.
	StartedAt time.Time
	// IsolatedAt is when the VM was quarantined; zero when it is not.
	IsolatedAt time.Time
	// IsolatedReason is why it was quarantined.
	IsolatedReason string
}

// NIC is one VM network interface as metald built it.
type NIC struct {
	ID          string
	Index       int
	HostDevice  string
	GuestDevice string
	MAC         string
	Bridge      string
	VLAN        string
	// Address is the canonical guest address with prefix length, or "".
	Address string
	// Gateway is the canonical gateway address, or "".
	Gateway string
	// GatewayOnBridge is true when metald put the gateway on the bridge.
	GatewayOnBridge bool
	// StableSecret is the RFC 7217 secret (IPv6 notation), or "".
	StableSecret string
	// LinkLocal is the guest's link-local address as learned at boot, or "".
	LinkLocal string
}

// NICRef is a NIC with the id of the VM it belongs to.
type NICRef struct {
	VMID string
	NIC
}

// AuditEntry records one change to a VM: what, when and by whom.
type AuditEntry struct {
	VMID   string
	At     time.Time
	Action string
	Caller string
	Detail string
}

// Store persists metald's state. Implementations are safe for concurrent use.
type Store interface {
	// CreateVM inserts a VM and its NICs; ErrConflict when the id or a host
	// device name is taken.
	CreateVM(ctx context.Context, vm *VM) error
	// GetVM returns one VM; ErrNotFound when absent.
	GetVM(ctx context.Context, id string) (*VM, error)
	// ListVMs returns every VM ordered by creation time, then id.
	ListVMs(ctx context.Context) ([]*VM, error)
	// UpdateVM replaces a VM's mutable fields (state, reason, config,
	// instance, timestamps) and its NICs; ErrNotFound when absent.
	UpdateVM(ctx context.Context, vm *VM) error
	// DeleteVM removes a VM and its NICs; ErrNotFound when absent.
	DeleteVM(ctx context.Context, id string) error
	// VMWithMAC returns the id of a VM other than exceptVM with a NIC of
	// MAC mac (as stored: lower-case, colon-separated), or "".
	VMWithMAC(ctx context.Context, mac, exceptVM string) (string, error)
	// TenantHasVMs reports whether any VM of tenant exists.
	TenantHasVMs(ctx context.Context, tenant string) (bool, error)
	// BridgeUsedBy reports whether a NIC of a VM other than exceptVM is on
	// bridge.
	BridgeUsedBy(ctx context.Context, bridge, exceptVM string) (bool, error)
	// GatewayOnBridgeBy reports whether a NIC of a VM other than exceptVM,
	// on bridge, has gateway put on the bridge (GatewayOnBridge): one row
	// looked for, however many NICs the bridge has.
	GatewayOnBridgeBy(ctx context.Context, bridge, gateway, exceptVM string) (bool, error)
	// NICsWithAddress returns every NIC whose address (any prefix length)
	// is addr, given in canonical form.
	NICsWithAddress(ctx context.Context, addr string) ([]NICRef, error)
	// NICByHostDevice returns the NIC whose host device is dev;
	// ErrNotFound when none.
	NICByHostDevice(ctx context.Context, dev string) (*NICRef, error)
	// AppendAudit records an audit entry.
	AppendAudit(ctx context.Context, e AuditEntry) error
	// ListAudit returns a VM's audit entries, oldest first ("" lists all).
	ListAudit(ctx context.Context, vmID string) ([]AuditEntry, error)
	// CountVMsByState returns the number of VMs in each state.
	CountVMsByState(ctx context.Context) (map[string]int, error)
	// Close releases the database.
	Close() error
}
