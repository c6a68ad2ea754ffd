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
}
