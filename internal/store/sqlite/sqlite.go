// Package sqlite owns metald's embedded SQLite database (modernc.org/sqlite,
// no cgo): opening it in WAL mode, its numbered migrations, and the
// store.Store implementation on top.
package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	_ "modernc.org/sqlite" // database/sql driver "sqlite"

	"github.com/metald/metald/internal/store"
)

// Store is the SQLite implementation of store.Store.
type Store struct {
	db *sql.DB
}

var _ store.Store = (*Store)(nil)

// Open opens (creating if needed) the database at path and applies pending
// migrations.
func Open(ctx context.Context, path string) (*Store, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("create database directory: %w", err)
	}
	q := url.Values{}
	for _, p := range []string{"busy_timeout(10000)", "journal_mode(WAL)", "foreign_keys(1)", "synchronous(NORMAL)"} {
		q.Add("_pragma", p)
	}
	q.Set("_txlock", "immediate")
	db, err := sql.Open("sqlite", "file:"+path+"?"+q.Encode())
	if err != nil {
		return nil, fmt.Errorf("open database %s: %w", path, err)
	}
	db.SetMaxOpenConns(8)
	if err := migrate(ctx, db); err != nil {
		db.Close()
		return nil, err
	}
	return &Store{db: db}, nil
}

// DB exposes the database to other store implementations in this package's
// family (IPAM, events) that share the file and its migrations.
func (s *Store) DB() *sql.DB { return s.db }

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

// InstanceID returns the database's instance id (16 hex digits, drawn
// when the database was created): metald marks its kernel objects with it.
func (s *Store) InstanceID(ctx context.Context) (string, error) {
	var id string
	if err := s.db.QueryRowContext(ctx, `SELECT id FROM instance`).Scan(&id); err != nil {
		return "", fmt.Errorf("read instance id: %w", err)
	}
	return id, nil
}

func migrate(ctx context.Context, db *sql.DB) error {
	var version int
	if err := db.QueryRowContext(ctx, "PRAGMA user_version").Scan(&version); err != nil {
		return fmt.Errorf("read schema version: %w", err)
	}
	if version > len(migrations) {
		return fmt.Errorf("database schema version %d is newer than this metald (%d)", version, len(migrations))
	}
	for i := version; i < len(migrations); i++ {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return fmt.Errorf("begin migration %d: %w", i+1, err)
		}
		if _, err := tx.ExecContext(ctx, migrations[i]); err != nil {
			tx.Rollback()
			return fmt.Errorf("apply migration %d: %w", i+1, err)
		}
		if _, err := tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", i+1)); err != nil {
			tx.Rollback()
			return fmt.Errorf("record migration %d: %w", i+1, err)
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("commit migration %d: %w", i+1, err)
		}
	}
	return nil
}

func ts(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func fromTS(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

func isUnique(err error) bool {
	return err != nil && strings.Contains(err.Error(), "UNIQUE constraint failed")
}

// CreateVM implements store.Store.
func (s *Store) CreateVM(ctx context.Context, vm *store.VM) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback()
	_, err = tx.ExecContext(ctx, `INSERT INTO vms (id, tenant_id, state, state_reason, config, backend, instance, created_at, updated_at, started_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		vm.ID, vm.TenantID, vm.State, vm.StateReason, vm.Config, vm.Backend, vm.Instance, ts(vm.CreatedAt), ts(vm.UpdatedAt), ts(vm.StartedAt))
	if isUnique(err) {
		return fmt.Errorf("vm %q: %w", vm.ID, store.ErrConflict)
	}
	if err != nil {
		return fmt.Errorf("insert vm: %w", err)
	}
	if err := insertNICs(ctx, tx, vm); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

func insertNICs(ctx context.Context, tx *sql.Tx, vm *store.VM) error {
	for _, n := range vm.NICs {
		_, err := tx.ExecContext(ctx, `INSERT INTO nics (`+nicColumns+`)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
			vm.ID, n.ID, n.Index, n.HostDevice, n.GuestDevice, n.MAC, n.Bridge, n.VLAN, n.Address, n.Gateway, n.GatewayOnBridge, n.StableSecret, n.LinkLocal)
		if isUnique(err) {
			return fmt.Errorf("nic %q host device %q: %w", n.ID, n.HostDevice, store.ErrConflict)
		}
		if err != nil {
			return fmt.Errorf("insert nic: %w", err)
		}
	}
	return nil
}

const vmColumns = `id, tenant_id, state, state_reason, config, backend, instance, created_at, updated_at, started_at, isolated_reason, isolated_at`

type scanner interface{ Scan(...any) error }

func scanVM(r scanner) (*store.VM, error) {
	var vm store.VM
	var created, updated, started, isolated int64
	if err := r.Scan(&vm.ID, &vm.TenantID, &vm.State, &vm.StateReason, &vm.Config, &vm.Backend, &vm.Instance, &created, &updated, &started, &vm.IsolatedReason, &isolated); err != nil {
		return nil, err
	}
	vm.CreatedAt, vm.UpdatedAt, vm.StartedAt, vm.IsolatedAt = fromTS(created), fromTS(updated), fromTS(started), fromTS(isolated)
	return &vm, nil
}

func (s *Store) loadNICs(ctx context.Context, vms map[string]*store.VM, where string, args ...any) error {
	rows, err := s.db.QueryContext(ctx, `SELECT `+nicColumns+` FROM nics `+where+` ORDER BY vm_id, idx`, args...)
	if err != nil {
		return fmt.Errorf("query nics: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var vmID string
		var n store.NIC
		if err := rows.Scan(&vmID, &n.ID, &n.Index, &n.HostDevice, &n.GuestDevice, &n.MAC, &n.Bridge, &n.VLAN, &n.Address, &n.Gateway, &n.GatewayOnBridge, &n.StableSecret, &n.LinkLocal); err != nil {
			return fmt.Errorf("scan nic: %w", err)
		}
		if vm := vms[vmID]; vm != nil {
			vm.NICs = append(vm.NICs, n)
		}
	}
	return rows.Err()
}

// GetVM implements store.Store.
func (s *Store) GetVM(ctx context.Context, id string) (*store.VM, error) {
	vm, err := scanVM(s.db.QueryRowContext(ctx, `SELECT `+vmColumns+` FROM vms WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("vm %q: %w", id, store.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("get vm: %w", err)
	}
	if err := s.loadNICs(ctx, map[string]*store.VM{id: vm}, "WHERE vm_id = ?", id); err != nil {
		return nil, err
	}
	return vm, nil
}

// ListVMs implements store.Store.
func (s *Store) ListVMs(ctx context.Context) ([]*store.VM, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT `+vmColumns+` FROM vms ORDER BY created_at, id`)
	if err != nil {
		return nil, fmt.Errorf("list vms: %w", err)
	}
	var out []*store.VM
	byID := map[string]*store.VM{}
	for rows.Next() {
		vm, err := scanVM(rows)
		if err != nil {
			rows.Close()
			return nil, fmt.Errorf("scan vm: %w", err)
		}
		out = append(out, vm)
		byID[vm.ID] = vm
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list vms: %w", err)
	}
	if err := s.loadNICs(ctx, byID, ""); err != nil {
		return nil, err
	}
	return out, nil
}

// UpdateVM implements store.Store. It rewrites the VM's NICs in the same
// transaction.
func (s *Store) UpdateVM(ctx context.Context, vm *store.VM) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback()
	res, err := tx.ExecContext(ctx, `UPDATE vms SET tenant_id = ?, state = ?, state_reason = ?, config = ?, instance = ?, updated_at = ?, started_at = ?, isolated_reason = ?, isolated_at = ? WHERE id = ?`,
		vm.TenantID, vm.State, vm.StateReason, vm.Config, vm.Instance, ts(vm.UpdatedAt), ts(vm.StartedAt), vm.IsolatedReason, ts(vm.IsolatedAt), vm.ID)
	if err != nil {
		return fmt.Errorf("update vm: %w", err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("vm %q: %w", vm.ID, store.ErrNotFound)
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM nics WHERE vm_id = ?`, vm.ID); err != nil {
		return fmt.Errorf("update nics: %w", err)
	}
	if err := insertNICs(ctx, tx, vm); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

// DeleteVM implements store.Store.
func (s *Store) DeleteVM(ctx context.Context, id string) error {
	res, err := s.db.ExecContext(ctx, `DELETE FROM vms WHERE id = ?`, id)
	if err != nil {
		return fmt.Errorf("delete vm: %w", err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("vm %q: %w", id, store.ErrNotFound)
	}
	return nil
}

const nicColumns = `vm_id, nic_id, idx, host_device, guest_device, mac, bridge, vlan, address, gateway, gateway_on_bridge, stable_secret, link_local`

func (s *Store) nicRefs(ctx context.Context, where string, args ...any) ([]store.NICRef, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT `+nicColumns+` FROM nics WHERE `+where+` ORDER BY vm_id, idx`, args...)
	if err != nil {
		return nil, fmt.Errorf("query nics: %w", err)
	}
	defer rows.Close()
	var out []store.NICRef
	for rows.Next() {
		var r store.NICRef
		n := &r.NIC
		if err := rows.Scan(&r.VMID, &n.ID, &n.Index, &n.HostDevice, &n.GuestDevice, &n.MAC, &n.Bridge, &n.VLAN, &n.Address, &n.Gateway, &n.GatewayOnBridge, &n.StableSecret, &n.LinkLocal); err != nil {
			return nil, fmt.Errorf("scan nic: %w", err)
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// VMWithMAC implements store.Store (nics_mac index).
func (s *Store) VMWithMAC(ctx context.Context, mac, exceptVM string) (string, error) {
	var id string
	err := s.db.QueryRowContext(ctx, `SELECT vm_id FROM nics WHERE mac = ? AND vm_id != ? LIMIT 1`, mac, exceptVM).Scan(&id)
	if errors.Is(err, sql.ErrNoRows) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("query nics: %w", err)
	}
	return id, nil
}

// TenantHasVMs implements store.Store (vms_tenant index).
func (s *Store) TenantHasVMs(ctx context.Context, tenant string) (bool, error) {
	var has bool
	if err := s.db.QueryRowContext(ctx, `SELECT EXISTS (SELECT 1 FROM vms WHERE tenant_id = ?)`, tenant).Scan(&has); err != nil {
		return false, fmt.Errorf("query vms: %w", err)
	}
	return has, nil
}

// BridgeUsedBy implements store.Store (nics_bridge index).
func (s *Store) BridgeUsedBy(ctx context.Context, bridge, exceptVM string) (bool, error) {
	var used bool
	err := s.db.QueryRowContext(ctx, `SELECT EXISTS (SELECT 1 FROM nics WHERE bridge = ? AND vm_id != ?)`, bridge, exceptVM).Scan(&used)
	if err != nil {
		return false, fmt.Errorf("query nics: %w", err)
	}
	return used, nil
}

// GatewayOnBridgeBy implements store.Store (nics_bridge index).
func (s *Store) GatewayOnBridgeBy(ctx context.Context, bridge, gateway, exceptVM string) (bool, error) {
	var held bool
	err := s.db.QueryRowContext(ctx, `SELECT EXISTS (SELECT 1 FROM nics WHERE bridge = ? AND gateway = ? AND gateway_on_bridge != 0 AND vm_id != ?)`,
		bridge, gateway, exceptVM).Scan(&held)
	if err != nil {
		return false, fmt.Errorf("query nics: %w", err)
	}
	return held, nil
}

// NICsWithAddress implements store.Store. Addresses are stored as
// "addr/len", so an index range scan finds every prefix length: '/' sorts
// just before '0'.
func (s *Store) NICsWithAddress(ctx context.Context, addr string) ([]store.NICRef, error) {
	return s.nicRefs(ctx, `address >= ? AND address < ?`, addr+"/", addr+"0")
}

// NICByHostDevice implements store.Store (host_device is unique and
// indexed).
func (s *Store) NICByHostDevice(ctx context.Context, dev string) (*store.NICRef, error) {
	refs, err := s.nicRefs(ctx, `host_device = ?`, dev)
	if err != nil {
		return nil, err
	}
	if len(refs) == 0 {
		return nil, fmt.Errorf("nic with host device %q: %w", dev, store.ErrNotFound)
	}
	return &refs[0], nil
}

// CountVMsByState implements store.Store.
func (s *Store) CountVMsByState(ctx context.Context) (map[string]int, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT state, COUNT(*) FROM vms GROUP BY state`)
	if err != nil {
		return nil, fmt.Errorf("count vms: %w", err)
	}
	defer rows.Close()
	out := map[string]int{}
	for rows.Next() {
		var st string
		var n int
		if err := rows.Scan(&st, &n); err != nil {
			return nil, fmt.Errorf("count vms: %w", err)
		}
		out[st] = n
	}
	return out, rows.Err()
}

// AppendAudit implements store.Store.
func (s *Store) AppendAudit(ctx context.Context, e store.AuditEntry) error {
	if _, err := s.db.ExecContext(ctx, `INSERT INTO audit (vm_id, at, action, caller, detail) VALUES (?, ?, ?, ?, ?)`,
		e.VMID, ts(e.At), e.Action, e.Caller, e.Detail); err != nil {
		return fmt.Errorf("append audit: %w", err)
	}
	return nil
}

// ListAudit implements store.Store.
func (s *Store) ListAudit(ctx context.Context, vmID string) ([]store.AuditEntry, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT vm_id, at, action, caller, detail FROM audit WHERE ? = '' OR vm_id = ? ORDER BY id`, vmID, vmID)
	if err != nil {
		return nil, fmt.Errorf("list audit: %w", err)
	}
	defer rows.Close()
	var out []store.AuditEntry
	for rows.Next() {
		var e store.AuditEntry
		var at int64
		if err := rows.Scan(&e.VMID, &at, &e.Action, &e.Caller, &e.Detail); err != nil {
			return nil, fmt.Errorf("scan audit: %w", err)
		}
		e.At = fromTS(at)
		out = append(out, e)
	}
	return out, rows.Err()
}
