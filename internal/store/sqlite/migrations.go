package sqlite

// migrations is the append-only schema history: entry i moves the database
// from user_version i to i+1. Never edit or reorder an entry that has
// shipped; append a new one.
var migrations = []string{
	// 1: VMs and their NICs.
	`CREATE TABLE vms (
		id           TEXT PRIMARY KEY,
		tenant_id    TEXT NOT NULL,
		state        TEXT NOT NULL,
		state_reason TEXT NOT NULL DEFAULT '',
		config       BLOB NOT NULL,
		backend      TEXT NOT NULL,
		instance     BLOB,
		created_at   INTEGER NOT NULL,
		updated_at   INTEGER NOT NULL,
		started_at   INTEGER NOT NULL DEFAULT 0
	);
	CREATE INDEX vms_tenant ON vms (tenant_id);
	CREATE TABLE nics (
		vm_id             TEXT NOT NULL REFERENCES vms (id) ON DELETE CASCADE,
		nic_id            TEXT NOT NULL,
		idx               INTEGER NOT NULL,
		host_device       TEXT NOT NULL UNIQUE,
		guest_device      TEXT NOT NULL,
		mac               TEXT NOT NULL,
		bridge            TEXT NOT NULL,
		vlan              TEXT NOT NULL DEFAULT '',
		address           TEXT NOT NULL DEFAULT '',
		gateway           TEXT NOT NULL DEFAULT '',
		gateway_on_bridge INTEGER NOT NULL DEFAULT 0,
		stable_secret     TEXT NOT NULL DEFAULT '',
		PRIMARY KEY (vm_id, nic_id)
	);`,
	// 2: IPAM pools, their prefixes, allocations, subnet names and
	// per-tenant rate stamps (internal/store/sqlite/ipam.go).
	`CREATE TABLE ipam_pools (
		id              TEXT PRIMARY KEY,
		description     TEXT NOT NULL DEFAULT '',
		tenant_ids      TEXT NOT NULL DEFAULT '[]',
		rate_limit      INTEGER NOT NULL DEFAULT 0,
		max_allocations INTEGER NOT NULL DEFAULT 0,
		created_at      INTEGER NOT NULL
	);
	CREATE TABLE ipam_pool_prefixes (
		prefix  TEXT PRIMARY KEY,
		pool_id TEXT NOT NULL REFERENCES ipam_pools (id) ON DELETE CASCADE,
		idx     INTEGER NOT NULL
	);
	CREATE INDEX ipam_pool_prefixes_pool ON ipam_pool_prefixes (pool_id, idx);
	CREATE TABLE ipam_allocations (
		address    TEXT PRIMARY KEY,
		prefix_len INTEGER NOT NULL,
		pool_id    TEXT NOT NULL REFERENCES ipam_pools (id),
		vm_id      TEXT NOT NULL,
		nic_id     TEXT NOT NULL,
		tenant_id  TEXT NOT NULL,
		gateway    TEXT NOT NULL DEFAULT '',
		bridge     TEXT NOT NULL DEFAULT '',
		created_at INTEGER NOT NULL
	) WITHOUT ROWID;
	CREATE TABLE ipam_subnet_names (
		parent     TEXT NOT NULL,
		name       TEXT NOT NULL,
		value      INTEGER NOT NULL,
		created_at INTEGER NOT NULL,
		PRIMARY KEY (parent, name),
		UNIQUE (parent, value)
	);
	CREATE TABLE ipam_rate_stamps (
		tenant_id TEXT NOT NULL,
		pool_id   TEXT NOT NULL,
		at        INTEGER NOT NULL
	);
	CREATE INDEX ipam_rate_stamps_at ON ipam_rate_stamps (at);`,
	// 3: look-ups the VM manager makes per CreateVm/DeleteVm without
	// scanning every VM: NICs by bridge and by address.
	`CREATE INDEX nics_bridge ON nics (bridge);
	CREATE INDEX nics_address ON nics (address);`,
	// 4: security events, enhanced-monitoring sessions and optimize
	// settings (internal/store/sqlite/events.go).
	`CREATE TABLE security_events (
		seq          INTEGER PRIMARY KEY AUTOINCREMENT,
		id           TEXT NOT NULL UNIQUE,
		ts           INTEGER NOT NULL,
		event_type   TEXT NOT NULL,
		severity     TEXT NOT NULL,
		vm_id        TEXT NOT NULL DEFAULT '',
		tenant_id    TEXT NOT NULL DEFAULT '',
		interface_id TEXT NOT NULL DEFAULT '',
		details      TEXT NOT NULL DEFAULT '{}'
	);
	CREATE INDEX security_events_ts ON security_events (ts);
	CREATE INDEX security_events_vm ON security_events (vm_id, ts);
	CREATE INDEX security_events_tenant ON security_events (tenant_id, ts);
	CREATE INDEX security_events_type ON security_events (event_type, ts);
	CREATE TABLE security_monitor_sessions (
		tenant_id  TEXT PRIMARY KEY,
		log_level  TEXT NOT NULL,
		duration   TEXT NOT NULL,
		started_at INTEGER NOT NULL,
		expires_at INTEGER NOT NULL
	);
	CREATE TABLE security_settings (
		key   TEXT PRIMARY KEY,
		value TEXT NOT NULL
	);`,
	// 5: the guest's link-local address, learned at boot, which the
	// first-hop source guard binds to the VM's port.
	`ALTER TABLE nics ADD COLUMN link_local TEXT NOT NULL DEFAULT '';`,
	// 6: quarantine (IsolateVm): why and since when.
	`ALTER TABLE vms ADD COLUMN isolated_reason TEXT NOT NULL DEFAULT '';
	ALTER TABLE vms ADD COLUMN isolated_at INTEGER NOT NULL DEFAULT 0;`,
	// 7: the audit log of VMs whose compliance asks for it. Entries
	// outlive their VM.
	`CREATE TABLE audit (
		id     INTEGER PRIMARY KEY AUTOINCREMENT,
		vm_id  TEXT NOT NULL,
		at     INTEGER NOT NULL,
		action TEXT NOT NULL,
		caller TEXT NOT NULL DEFAULT '',
		detail TEXT NOT NULL DEFAULT ''
	);
	CREATE INDEX audit_vm ON audit (vm_id, id);`,
	// 8: subnet names a request assigned and has not finished with
	// (ipam.NameTx); ipam.Open removes those still tentative at start.
	// Existing names are confirmed.
	`ALTER TABLE ipam_subnet_names ADD COLUMN tentative INTEGER NOT NULL DEFAULT 0;`,
	// 9: NICs by MAC (CreateVm refuses a MAC another VM of the host has:
	// the policy finds a VM's egress rules by it).
	`CREATE INDEX nics_mac ON nics (mac);`,
	// 10: the database's instance id, drawn once: the mark on the kernel
	// objects of this metald (its sandboxes, its claim on the host
	// namespace), so that a metald with another database leaves them alone.
	`CREATE TABLE instance (id TEXT NOT NULL);
	INSERT INTO instance (id) VALUES (lower(hex(randomblob(8))));`,
}
