package daemon_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"testing"

	"github.com/metald/metald/internal/store/sqlite"
)

// storedName reads a subnet name's row with metald stopped: whether it
// exists and its tentative mark.
func storedName(t *testing.T, e *env, parent, name string) (exists, tentative bool) {
	t.Helper()
	s, err := sqlite.Open(context.Background(), filepath.Join(e.dir, "data", "metald.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var mark int
	switch err := s.DB().QueryRow(`SELECT tentative FROM ipam_subnet_names WHERE parent = ? AND name = ?`, parent, name).Scan(&mark); {
	case err == nil:
		return true, mark != 0
	case errors.Is(err, sql.ErrNoRows):
		return false, false
	default:
		t.Fatal(err)
		return false, false
	}
}

// kill -9 of metald in the middle of a CreateVm that assigned a new subnet
// name is a failed request: after the restart (and its crash recovery) the
// name is gone and its value goes to the next new name. A CreateVm killed
// after its VM was durably created keeps the name while the VM holds its
// address.
func TestIPAMNamesCrashMidCreate(t *testing.T) {
	e := newEnv(t)
	const parent = "2600:beef:1000::/48"
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-web",
		"config": vmConfig("t1", nic("eth0", "br-nc", "2600:BEEF:1000:web::10/64", "2600:BEEF:1000:web::1"))})
	names := map[string]int{parent + "/web": 1}
	wantSubnetNames(t, e, "before the crashes", names)
	e.stop()

	body := func(id, name string) string {
		return fmt.Sprintf(`{"vm_id":%q,"config":{"cpu":{"vcpu_count":1},"memory":{"size_bytes":134217728},"boot":{"kernel_path":"/k"},"tenant_id":"t1",`+
			`"network":[{"id":"eth0","bridge_name":"br-nc","ipv6":{"address":"2600:BEEF:1000:%s::10/64","gateway":"2600:BEEF:1000:%s::1"}}]}}`, id, name, name)
	}
	// After validation assigned the name: with the VM's row only, with its
	// address reserved too, and with everything built but the row still
	// CREATING.
	for i, step := range []string{"create:row", "create:addresses", "create:attached"} {
		name := fmt.Sprintf("crash%d", i)
		c := startChild(t, e, step)
		if _, err := c.post("CreateVm", body(fmt.Sprintf("vm-nc%d", i), name)); err == nil {
			t.Fatalf("%s: request answered, want the daemon killed", step)
		}
		c.kill()
		// The crash left the name in the database, marked tentative.
		if exists, tentative := storedName(t, e, parent, name); !exists || !tentative {
			t.Fatalf("%s: after the crash %s exists=%v tentative=%v, want a tentative row", step, name, exists, tentative)
		}
		e.start() // recovery runs here
		wantSubnetNames(t, e, "after the restart from "+step, names)
		if n := allocationCount(t, e); n != 1 {
			t.Fatalf("%s: %d allocations after the restart, want vm-web's only", step, n)
		}
		if ids := vmIDs(t, e); !slices.Equal(ids, []string{"vm-web"}) {
			t.Fatalf("%s: vms after the restart: %v", step, ids)
		}
		e.stop()
		if exists, _ := storedName(t, e, parent, name); exists {
			t.Fatalf("%s: %s still in the database after the restart", step, name)
		}
	}

	// The value the interrupted requests had is the next new name's.
	e.start()
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-next",
		"config": vmConfig("t1", nic("eth0", "br-nc", "2600:BEEF:1000:next::10/64", "2600:BEEF:1000:next::1"))})
	names[parent+"/next"] = 2
	wantSubnetNames(t, e, "after the next create", names)
	e.stop()

	// Killed after the VM was persisted CREATED but before the request
	// answered: the names were made permanent just before that row, so
	// recovery keeps the VM and its name, and the name outlives the VM like
	// the name of any VM that was created.
	c := startChild(t, e, "create:done")
	if _, err := c.post("CreateVm", body("vm-late", "late")); err == nil {
		t.Fatal("create:done: request answered, want the daemon killed")
	}
	c.kill()
	e.start()
	if ids := vmIDs(t, e); !slices.Equal(ids, []string{"vm-late", "vm-next", "vm-web"}) {
		t.Fatalf("create:done: vms after the restart: %v", ids)
	}
	names[parent+"/late"] = 3
	wantSubnetNames(t, e, "after the restart from create:done", names)
	e.mustCall("DeleteVm", map[string]any{"vm_id": "vm-late"})
	wantSubnetNames(t, e, "after deleting vm-late", names)
}
