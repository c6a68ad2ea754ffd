package sqlite

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/metald/metald/internal/ipam"
)

// IPAMStore is the SQLite implementation of ipam.Store. It shares the
// database (and its migrations) with Store.
type IPAMStore struct {
	db       *sql.DB
	insAlloc *sql.Stmt
	insStamp *sql.Stmt
	delAlloc *sql.Stmt
}

var _ ipam.Store = (*IPAMStore)(nil)

// IPAM returns the ipam.Store on s's database.
func (s *Store) IPAM(ctx context.Context) (*IPAMStore, error) { return NewIPAMStore(ctx, s.db) }

// NewIPAMStore returns an ipam.Store on db, which must carry this package's
// migrations (see Open).
func NewIPAMStore(ctx context.Context, db *sql.DB) (*IPAMStore, error) {
	s := &IPAMStore{db: db}
	var err error
	prep := func(q string) *sql.Stmt {
		if err != nil {
			return nil
		}
		var st *sql.Stmt
		st, err = db.PrepareContext(ctx, q)
		return st
	}
	s.insAlloc = prep(`INSERT INTO ipam_allocations (address, prefix_len, pool_id, vm_id, nic_id, tenant_id, gateway, bridge, created_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`)
	s.insStamp = prep(`INSERT INTO ipam_rate_stamps (tenant_id, pool_id, at) VALUES (?, ?, ?)`)
	s.delAlloc = prep(`DELETE FROM ipam_allocations WHERE address = ?`)
	if err != nil {
		return nil, fmt.Errorf("prepare ipam statements: %w", err)
	}
	return s, nil
}

func addrText(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

func parseAddrText(s string) (netip.Addr, error) {
	if s == "" {
		return netip.Addr{}, nil
	}
	return netip.ParseAddr(s)
}

// Load implements ipam.Store.
func (s *IPAMStore) Load(ctx context.Context, since time.Time) (*ipam.Snapshot, error) {
	tx, err := s.db.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return nil, fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback()
	snap := &ipam.Snapshot{}
	byID := map[string]int{}
	rows, err := tx.QueryContext(ctx, `SELECT id, description, tenant_ids, rate_limit, max_allocations, created_at FROM ipam_pools ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("load pools: %w", err)
	}
	for rows.Next() {
		var p ipam.Pool
		var tenants string
		var created int64
		if err := rows.Scan(&p.ID, &p.Description, &tenants, &p.RateLimit, &p.MaxAllocations, &created); err != nil {
			rows.Close()
			return nil, fmt.Errorf("load pools: %w", err)
		}
		if err := json.Unmarshal([]byte(tenants), &p.TenantIDs); err != nil {
			rows.Close()
			return nil, fmt.Errorf("load pool %q tenants: %w", p.ID, err)
		}
		p.CreatedAt = fromTS(created)
		byID[p.ID] = len(snap.Pools)
		snap.Pools = append(snap.Pools, p)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("load pools: %w", err)
	}
	rows, err = tx.QueryContext(ctx, `SELECT pool_id, prefix FROM ipam_pool_prefixes ORDER BY pool_id, idx`)
	if err != nil {
		return nil, fmt.Errorf("load pool prefixes: %w", err)
	}
	for rows.Next() {
		var id, text string
		if err := rows.Scan(&id, &text); err != nil {
			rows.Close()
			return nil, fmt.Errorf("load pool prefixes: %w", err)
		}
		p, err := netip.ParsePrefix(text)
		i, ok := byID[id]
		if err != nil || !ok {
			rows.Close()
			return nil, fmt.Errorf("load pool prefixes: bad row (%q, %q): %v", id, text, err)
		}
		snap.Pools[i].Prefixes = append(snap.Pools[i].Prefixes, p)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("load pool prefixes: %w", err)
	}
	rows, err = tx.QueryContext(ctx, `SELECT address, prefix_len, pool_id, vm_id, nic_id, tenant_id, gateway, bridge, created_at FROM ipam_allocations`)
	if err != nil {
		return nil, fmt.Errorf("load allocations: %w", err)
	}
	for rows.Next() {
		var a ipam.Allocation
		var addr, gw string
		var created int64
		if err := rows.Scan(&addr, &a.PrefixLen, &a.PoolID, &a.VMID, &a.NICID, &a.TenantID, &gw, &a.Bridge, &created); err != nil {
			rows.Close()
			return nil, fmt.Errorf("load allocations: %w", err)
		}
		var err1, err2 error
		a.Address, err1 = netip.ParseAddr(addr)
		a.Gateway, err2 = parseAddrText(gw)
		if err1 != nil || err2 != nil {
			rows.Close()
			return nil, fmt.Errorf("load allocations: bad address %q or gateway %q", addr, gw)
		}
		a.CreatedAt = fromTS(created)
		snap.Allocations = append(snap.Allocations, a)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("load allocations: %w", err)
	}
	rows, err = tx.QueryContext(ctx, `SELECT parent, name, value, created_at, tentative FROM ipam_subnet_names ORDER BY parent, name`)
	if err != nil {
		return nil, fmt.Errorf("load subnet names: %w", err)
	}
	for rows.Next() {
		var n ipam.SubnetName
		var parent string
		var value, created int64
		if err := rows.Scan(&parent, &n.Name, &value, &created, &n.Tentative); err != nil {
			rows.Close()
			return nil, fmt.Errorf("load subnet names: %w", err)
		}
		p, err := netip.ParsePrefix(parent)
		if err != nil || value < 0 || value > 0xffff {
			rows.Close()
			return nil, fmt.Errorf("load subnet names: bad row (%q, %q, %d)", parent, n.Name, value)
		}
		n.Parent, n.Value, n.CreatedAt = p, uint16(value), fromTS(created)
		snap.SubnetNames = append(snap.SubnetNames, n)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("load subnet names: %w", err)
	}
	rows, err = tx.QueryContext(ctx, `SELECT tenant_id, pool_id, at FROM ipam_rate_stamps WHERE at >= ? ORDER BY at`, ts(since))
	if err != nil {
		return nil, fmt.Errorf("load rate stamps: %w", err)
	}
	for rows.Next() {
		var st ipam.RateStamp
		var at int64
		if err := rows.Scan(&st.TenantID, &st.PoolID, &at); err != nil {
			rows.Close()
			return nil, fmt.Errorf("load rate stamps: %w", err)
		}
		st.At = fromTS(at)
		snap.RateStamps = append(snap.RateStamps, st)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("load rate stamps: %w", err)
	}
	return snap, nil
}

func writePool(ctx context.Context, tx *sql.Tx, p ipam.Pool, insert bool) error {
	tenants := p.TenantIDs
	if tenants == nil {
		tenants = []string{}
	}
	tj, err := json.Marshal(tenants)
	if err != nil {
		return err
	}
	if insert {
		_, err = tx.ExecContext(ctx, `INSERT INTO ipam_pools (id, description, tenant_ids, rate_limit, max_allocations, created_at) VALUES (?, ?, ?, ?, ?, ?)`,
			p.ID, p.Description, string(tj), p.RateLimit, p.MaxAllocations, ts(p.CreatedAt))
		if isUnique(err) {
			return ipam.ErrPoolExists
		}
	} else {
		var res sql.Result
		res, err = tx.ExecContext(ctx, `UPDATE ipam_pools SET description = ?, tenant_ids = ?, rate_limit = ?, max_allocations = ? WHERE id = ?`,
			p.Description, string(tj), p.RateLimit, p.MaxAllocations, p.ID)
		if err == nil {
			if n, _ := res.RowsAffected(); n == 0 {
				return ipam.ErrNotFound
			}
		}
		if err == nil {
			_, err = tx.ExecContext(ctx, `DELETE FROM ipam_pool_prefixes WHERE pool_id = ?`, p.ID)
		}
	}
	if err != nil {
		return err
	}
	for i, pfx := range p.Prefixes {
		_, err := tx.ExecContext(ctx, `INSERT INTO ipam_pool_prefixes (prefix, pool_id, idx) VALUES (?, ?, ?)`, pfx.String(), p.ID, i)
		if isUnique(err) {
			return fmt.Errorf("prefix %s: %w", pfx, ipam.ErrOverlap)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func (s *IPAMStore) inTx(ctx context.Context, what string, f func(tx *sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin %s: %w", what, err)
	}
	defer tx.Rollback()
	if err := f(tx); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit %s: %w", what, err)
	}
	return nil
}

// CreatePool implements ipam.Store.
func (s *IPAMStore) CreatePool(ctx context.Context, p ipam.Pool) error {
	return s.inTx(ctx, "create pool", func(tx *sql.Tx) error { return writePool(ctx, tx, p, true) })
}

// UpdatePool implements ipam.Store.
func (s *IPAMStore) UpdatePool(ctx context.Context, p ipam.Pool) error {
	return s.inTx(ctx, "update pool", func(tx *sql.Tx) error { return writePool(ctx, tx, p, false) })
}

// DeletePool implements ipam.Store.
func (s *IPAMStore) DeletePool(ctx context.Context, id string) error {
	return s.inTx(ctx, "delete pool", func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `DELETE FROM ipam_pool_prefixes WHERE pool_id = ?`, id); err != nil {
			return err
		}
		res, err := tx.ExecContext(ctx, `DELETE FROM ipam_pools WHERE id = ?`, id)
		if err != nil {
			if strings.Contains(err.Error(), "FOREIGN KEY") {
				return ipam.ErrPoolNotEmpty
			}
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return ipam.ErrNotFound
		}
		return nil
	})
}

// InsertAllocations implements ipam.Store: one transaction, committed
// before it returns.
func (s *IPAMStore) InsertAllocations(ctx context.Context, allocs []ipam.Allocation, stamps []ipam.RateStamp) error {
	return s.inTx(ctx, "insert allocations", func(tx *sql.Tx) error {
		ins := tx.StmtContext(ctx, s.insAlloc)
		for _, a := range allocs {
			_, err := ins.ExecContext(ctx, a.Address.String(), a.PrefixLen, a.PoolID, a.VMID, a.NICID, a.TenantID, addrText(a.Gateway), a.Bridge, ts(a.CreatedAt))
			if isUnique(err) {
				return fmt.Errorf("address %s: %w", a.Address, ipam.ErrConflict)
			}
			if err != nil {
				return fmt.Errorf("insert allocation %s: %w", a.Address, err)
			}
		}
		if len(stamps) > 0 {
			st := tx.StmtContext(ctx, s.insStamp)
			for _, r := range stamps {
				if _, err := st.ExecContext(ctx, r.TenantID, r.PoolID, ts(r.At)); err != nil {
					return fmt.Errorf("insert rate stamp: %w", err)
				}
			}
		}
		return nil
	})
}

// DeleteAllocations implements ipam.Store.
func (s *IPAMStore) DeleteAllocations(ctx context.Context, addrs []netip.Addr) error {
	return s.inTx(ctx, "delete allocations", func(tx *sql.Tx) error {
		del := tx.StmtContext(ctx, s.delAlloc)
		for _, a := range addrs {
			if _, err := del.ExecContext(ctx, a.String()); err != nil {
				return fmt.Errorf("delete allocation %s: %w", a, err)
			}
		}
		return nil
	})
}

// PutSubnetName implements ipam.Store.
func (s *IPAMStore) PutSubnetName(ctx context.Context, n ipam.SubnetName) error {
	_, err := s.db.ExecContext(ctx, `INSERT INTO ipam_subnet_names (parent, name, value, created_at, tentative) VALUES (?, ?, ?, ?, ?)`,
		n.Parent.String(), n.Name, int64(n.Value), ts(n.CreatedAt), n.Tentative)
	if isUnique(err) {
		return ipam.ErrSubnetNameTaken
	}
	if err != nil {
		return fmt.Errorf("insert subnet name: %w", err)
	}
	return nil
}

// ConfirmSubnetName implements ipam.Store.
func (s *IPAMStore) ConfirmSubnetName(ctx context.Context, parent netip.Prefix, name string) error {
	return s.execOneName(ctx, "confirm subnet name", `UPDATE ipam_subnet_names SET tentative = 0 WHERE parent = ? AND name = ?`, parent, name)
}

// DeleteSubnetName implements ipam.Store.
func (s *IPAMStore) DeleteSubnetName(ctx context.Context, parent netip.Prefix, name string) error {
	return s.execOneName(ctx, "delete subnet name", `DELETE FROM ipam_subnet_names WHERE parent = ? AND name = ?`, parent, name)
}

// execOneName runs query on the subnet name (parent, name);
// ipam.ErrNotFound when it touched no row.
func (s *IPAMStore) execOneName(ctx context.Context, what, query string, parent netip.Prefix, name string) error {
	res, err := s.db.ExecContext(ctx, query, parent.String(), name)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if n, err := res.RowsAffected(); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	} else if n == 0 {
		return ipam.ErrNotFound
	}
	return nil
}

// PruneRateStamps implements ipam.Store.
func (s *IPAMStore) PruneRateStamps(ctx context.Context, before time.Time) error {
	if _, err := s.db.ExecContext(ctx, `DELETE FROM ipam_rate_stamps WHERE at < ?`, ts(before)); err != nil {
		return fmt.Errorf("prune rate stamps: %w", err)
	}
	return nil
}
