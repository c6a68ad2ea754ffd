package daemon_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	bnetns "github.com/metald/metald/internal/backend/netns"
	"github.com/metald/metald/internal/daemon"
	"github.com/metald/metald/internal/ipam"
	"github.com/metald/metald/internal/netnstest"
	"github.com/metald/metald/internal/network/link"
	"github.com/metald/metald/internal/network/ns"
	"github.com/metald/metald/internal/store"
	"github.com/metald/metald/internal/store/sqlite"
	"github.com/metald/metald/internal/vm"
)

// Restarting metald does not disturb running VMs: it re-adopts them with
// the same guest process, keeps their connectivity, and removes only
// orphans it owns.
func TestRestartReadoptsAndCollectsOrphans(t *testing.T) {
	e := newEnv(t)
	for _, id := range []string{"vm-r1", "vm-r2"} {
		e.mustCall("CreateVm", map[string]any{"vm_id": id, "config": vmConfig("t1", nic("eth0", "br-r", "2001:db8:7::1"+id[4:]+"/64", "2001:db8:7::1"))})
	}
	e.mustCall("BootVm", map[string]any{"vm_id": "vm-r1"})
	e.mustCall("BootVm", map[string]any{"vm_id": "vm-r2"})
	e.mustCall("PauseVm", map[string]any{"vm_id": "vm-r2"})
	e.waitDAD("vm-r1")
	pid1, pid2 := pidOf(e.getVM("vm-r1")), pidOf(e.getVM("vm-r2"))
	instance := e.d.InstanceID()

	e.stop()
	// While metald is down: things that are not ours, and orphans that are.
	h := e.host.Handle(t)
	if err := h.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "operator0"}}); err != nil {
		t.Fatal(err)
	}
	orphan := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "tap-ghost"}}
	if err := h.LinkAdd(orphan); err != nil {
		t.Fatal(err)
	}
	h.LinkSetAlias(orphan, link.PortAlias("vm-ghost2", "eth0"))
	// Namespaces named like a VM's: one with this metald's owner mark (a
	// crash after creating it), one with another metald's, one with none.
	for name, mark := range map[string]string{"metald-vm-ghost": bnetns.OwnerAlias(instance),
		"metald-vm-other": bnetns.OwnerAlias("0123456789abcdef"), "metald-vm-stranger": ""} {
		markNamespace(t, filepath.Join(e.dir, "netns", name), mark)
		if mark != bnetns.OwnerAlias(instance) {
			t.Cleanup(func() { ns.RemoveNamed(filepath.Join(e.dir, "netns", name)) })
		}
	}
	foreignNS, err := ns.CreateNamed(filepath.Join(e.dir, "netns", "someone-else"))
	if err != nil {
		t.Fatal(err)
	}
	foreignNS.Close()
	t.Cleanup(func() { ns.RemoveNamed(filepath.Join(e.dir, "netns", "someone-else")) })
	// vm-r2's namespace predates the owner marks: recovery gives it ours.
	setLoAlias(t, filepath.Join(e.dir, "netns", "metald-vm-r2"), "")
	// A bridge port detached by an operator is put back.
	tap, _ := h.LinkByName("tap-vm-r1")
	h.LinkSetNoMaster(tap)

	e.start()
	rep := e.d.Recovery
	if !slices.Contains(rep.Adopted, "vm-r1") || !slices.Contains(rep.Adopted, "vm-r2") || len(rep.Terminated) != 0 {
		t.Fatalf("recovery %+v", rep)
	}
	// The backend reports both the namespace and the port's owner as its
	// resources, so both orphans go through the sandbox collector.
	slices.Sort(rep.OrphanSandboxes)
	if !slices.Equal(rep.OrphanSandboxes, []string{"vm-ghost", "vm-ghost2"}) || !slices.Equal(rep.Reattached, []string{"tap-vm-r1"}) {
		t.Fatalf("orphans %+v", rep)
	}
	a, b := e.getVM("vm-r1"), e.getVM("vm-r2")
	if a["state"] != "VM_STATE_RUNNING" || pidOf(a) != pid1 || b["state"] != "VM_STATE_PAUSED" || pidOf(b) != pid2 {
		t.Fatalf("after restart: %v %d / %v %d", a["state"], pidOf(a), b["state"], pidOf(b))
	}
	if out, err := e.inVM("vm-r1", "ping", "-6", "-c", "1", "-W", "3", "2001:db8:7::1"); err != nil {
		t.Fatalf("adopted vm lost connectivity: %v\n%s", err, out)
	}
	links := e.links()
	if !slices.Contains(links, "operator0") || slices.Contains(links, "tap-ghost") {
		t.Fatalf("links after recovery: %v", links)
	}
	if got := loAlias(t, filepath.Join(e.dir, "netns", "metald-vm-r2")); got != bnetns.OwnerAlias(instance) {
		t.Fatalf("adopted namespace without a mark: alias %q after recovery", got)
	}
	if names := e.netnsNames(); !slices.Contains(names, "someone-else") || slices.Contains(names, "metald-vm-ghost") ||
		!slices.Contains(names, "metald-vm-other") || !slices.Contains(names, "metald-vm-stranger") {
		t.Fatalf("namespaces after recovery: %v", names)
	}
	// Adopted VMs are fully manageable.
	e.mustCall("ResumeVm", map[string]any{"vm_id": "vm-r2"})
	e.mustCall("ShutdownVm", map[string]any{"vm_id": "vm-r1"})
	if _, err := procState(pid1); err == nil {
		t.Fatal("adopted guest survived shutdown")
	}
	// A restart with nothing to do changes nothing.
	e.stop()
	e.start()
	if rep := e.d.Recovery; len(rep.OrphanPorts)+len(rep.OrphanSandboxes)+len(rep.Reattached)+len(rep.Terminated)+len(rep.RolledBack) != 0 {
		t.Fatalf("idle restart changed things: %+v", rep)
	}
	h.LinkDel(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "operator0"}})
	ns.RemoveNamed(filepath.Join(e.dir, "netns", "someone-else"))
}

// withLo runs fn with a netlink handle in the named namespace at path
// (created first when create is set) and its loopback device.
func withLo(t *testing.T, path string, create bool, fn func(h *netlink.Handle, lo netlink.Link)) {
	t.Helper()
	open := ns.OpenNamed
	if create {
		open = ns.CreateNamed
	}
	f, err := open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h, err := link.HandleAt(int(f.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	fn(h, lo)
}

// setLoAlias sets the alias of the loopback of the named namespace at path.
func setLoAlias(t *testing.T, path, alias string) {
	t.Helper()
	withLo(t, path, false, func(h *netlink.Handle, lo netlink.Link) {
		if err := h.LinkSetAlias(lo, alias); err != nil {
			t.Fatal(err)
		}
	})
}

// loAlias reads the alias of the loopback of the named namespace at path.
func loAlias(t *testing.T, path string) (alias string) {
	t.Helper()
	withLo(t, path, false, func(_ *netlink.Handle, lo netlink.Link) { alias = lo.Attrs().Alias })
	return alias
}

// markNamespace creates a named namespace whose loopback has alias mark
// (none when empty).
func markNamespace(t *testing.T, path, mark string) {
	t.Helper()
	withLo(t, path, true, func(h *netlink.Handle, lo netlink.Link) {
		if mark == "" {
			return
		}
		if err := h.LinkSetAlias(lo, mark); err != nil {
			t.Fatal(err)
		}
	})
}

// TestOtherInstanceLeftAlone: a metald with another database never
// removes the first one's VMs. On the same host namespace it refuses to
// start while they have ports there (its recovery would take them for
// orphans); sharing only the namespace directory, from another host
// namespace, it leaves their namespaces alone. The first metald then
// re-adopts its VM, still running and reachable.
func TestOtherInstanceLeftAlone(t *testing.T) {
	e := newEnv(t)
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-first", "config": vmConfig("t1", nic("eth0", "br-o", "2001:db8:7::10/64", "2001:db8:7::1"))})
	e.mustCall("BootVm", map[string]any{"vm_id": "vm-first"})
	e.waitDAD("vm-first")
	pid := pidOf(e.getVM("vm-first"))
	e.stop()

	second := func(host *os.File) (*daemon.Daemon, error) {
		opt := optionsFor(t.TempDir())
		opt.HostNS = host
		opt.NetnsDir, opt.EtcNetnsDir = filepath.Join(e.dir, "netns"), filepath.Join(e.dir, "etc")
		opt.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
		return daemon.New(context.Background(), opt)
	}
	// Same host namespace: refused, with the way out in the message.
	d, err := second(e.host.File)
	if err == nil {
		d.Close()
		t.Fatal("a second metald started on a host namespace with the first one's VMs")
	}
	if !errors.Is(err, daemon.ErrOtherInstance) || !strings.Contains(err.Error(), "tap-vm-first") || !strings.Contains(err.Error(), e.dir) {
		t.Fatalf("error %v", err)
	}
	// Another host namespace, the same namespace directory: starts, and
	// leaves the first metald's namespace alone.
	other := netnstest.New(t)
	d, err = second(other.File)
	if err != nil {
		t.Fatal(err)
	}
	rep := d.Recovery
	d.Close()
	if len(rep.OrphanSandboxes) != 0 || !slices.Contains(e.netnsNames(), "metald-vm-first") {
		t.Fatalf("second metald removed %v; namespaces %v", rep.OrphanSandboxes, e.netnsNames())
	}

	e.start()
	got := e.getVM("vm-first")
	if got["state"] != "VM_STATE_RUNNING" || pidOf(got) != pid {
		t.Fatalf("after the second metald: %v pid %d (was %d)", got["state"], pidOf(got), pid)
	}
	if out, err := e.inVM("vm-first", "ping", "-6", "-c", "1", "-W", "3", "2001:db8:7::1"); err != nil {
		t.Fatalf("vm lost connectivity: %v\n%s", err, out)
	}
	// With no VM of the first metald left, the host is another's to take.
	e.mustCall("DeleteVm", map[string]any{"vm_id": "vm-first"})
	e.stop()
	d, err = second(e.host.File)
	if err != nil {
		t.Fatalf("host with no VMs left: %v", err)
	}
	d.Close()
}

// A VM whose guest died while metald was down is TERMINATED on start.
func TestRestartMarksVanishedTerminated(t *testing.T) {
	e := newEnv(t)
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-v1", "config": vmConfig("t1", nic("eth0", "br-v", "", ""))})
	e.mustCall("BootVm", map[string]any{"vm_id": "vm-v1"})
	pid := pidOf(e.getVM("vm-v1"))
	e.stop()
	syscall.Kill(pid, syscall.SIGKILL)
	for i := 0; i < 50; i++ {
		if _, err := procState(pid); err != nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	e.start()
	if !slices.Equal(e.d.Recovery.Terminated, []string{"vm-v1"}) {
		t.Fatalf("recovery %+v", e.d.Recovery)
	}
	if vm := e.getVM("vm-v1"); vm["state"] != "VM_STATE_TERMINATED" {
		t.Fatalf("state %v", vm["state"])
	}
}

// A CreateVm that fails after building things undoes all of them; a
// duplicate id is already_exists and touches nothing.
func TestFailedCreateLeavesNothing(t *testing.T) {
	e := newEnv(t)
	h := e.host.Handle(t)
	// Something else already holds the VM's host device name, so the
	// sandbox step fails after the row, bridge and gateway exist.
	if err := h.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "tap-vm-clash"}}); err != nil {
		t.Fatal(err)
	}
	clashCfg := vmConfig("t1", nic("eth0", "br-x", "2001:db8:5::10/64", "2001:db8:5::1"))
	clashCfg["security_profile"] = map[string]any{"security_groups": []string{"sg-clash"}}
	code, out := e.call("CreateVm", map[string]any{"vm_id": "vm-clash", "config": clashCfg})
	if code == 200 || out["code"] != "failed_precondition" {
		t.Fatalf("create over a taken device: %d %v", code, out)
	}
	links := e.links()
	if slices.Contains(links, "br-x") || !slices.Contains(links, "tap-vm-clash") {
		t.Fatalf("links after failed create: %v", links)
	}
	if names := e.netnsNames(); len(names) != 0 {
		t.Fatalf("namespaces after failed create: %v", names)
	}
	if rows, _ := e.d.Manager().List(context.Background()); len(rows) != 0 {
		t.Fatalf("rows after failed create: %v", rows)
	}
	// No first-hop or policy rule, limit or allocation of it either.
	if rules := e.host.MustRun(t, "nft", "list", "ruleset"); strings.Contains(rules, "vm-clash") {
		t.Fatalf("rules after failed create:\n%s", rules)
	}
	// Nor a member of the security group it was to join.
	for _, set := range regexp.MustCompile(`(?s)set sg-sg-clash \{.*?\n\s*\}`).FindAllString(e.host.MustRun(t, "nft", "list", "ruleset"), -1) {
		if strings.Contains(set, "elements") {
			t.Fatalf("security group keeps the failed VM's addresses:\n%s", set)
		}
	}
	if allocs := e.shell(t, `curl -s http://localhost:8080/debug/ipv6/allocations`); strings.Contains(allocs, "2001:db8:5::10") || strings.Contains(allocs, "vm-clash") {
		t.Fatalf("allocations after failed create: %s", allocs)
	}
	h.LinkDel(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "tap-vm-clash"}})

	// Second NIC fails: the first NIC's port is removed too.
	cfg := vmConfig("t1", nic("eth0", "br-y", "2001:db8:6::10/64", "2001:db8:6::1"), nic("eth1", "br-y2", "", ""))
	clash := vm.HostDevice("vm-two", "eth1", 1)
	h.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: clash}})
	if code, out := e.call("CreateVm", map[string]any{"vm_id": "vm-two", "config": cfg}); code == 200 {
		t.Fatalf("create succeeded: %v", out)
	}
	links = e.links()
	if slices.Contains(links, "tap-vm-two") || slices.Contains(links, "br-y") || slices.Contains(links, "br-y2") {
		t.Fatalf("links after failed 2-NIC create: %v", links)
	}
	if rules := e.host.MustRun(t, "nft", "list", "ruleset"); strings.Contains(rules, "vm-two") {
		t.Fatalf("rules after failed 2-NIC create:\n%s", rules)
	}
	h.LinkDel(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: clash}})

	// A bridge name that names another kind of link (a veth): the field, and
	// nothing of the VM left.
	if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "br-dummy"}, PeerName: "br-dummy-p"}); err != nil {
		t.Fatal(err)
	}
	code, out = e.call("CreateVm", map[string]any{"vm_id": "vm-nb", "config": vmConfig("t1", nic("eth0", "br-nb", "", ""), nic("eth1", "br-dummy", "", ""))})
	if code != 400 || out["code"] != "invalid_argument" || errorField(out) != "config.network[1].bridge_name" {
		t.Fatalf("bridge name of a dummy link: %d %v", code, out)
	}
	if links := e.links(); slices.Contains(links, "br-nb") || !slices.Contains(links, "br-dummy") {
		t.Fatalf("links after the refused bridge: %v", links)
	}
	h.LinkDel(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "br-dummy"}})

	// A namespace of the VM's name that is not metald's: refused as the
	// host's state, and left as it was.
	markNamespace(t, filepath.Join(e.dir, "netns", "metald-vm-nsclash"), "")
	code, out = e.call("CreateVm", map[string]any{"vm_id": "vm-nsclash", "config": vmConfig("t1", nic("eth0", "br-ns", "", ""))})
	if out["code"] != "failed_precondition" || !strings.Contains(fmt.Sprint(out["message"]), "metald-vm-nsclash") {
		t.Fatalf("namespace clash: %d %v", code, out)
	}
	if !slices.Contains(e.netnsNames(), "metald-vm-nsclash") {
		t.Fatal("the foreign namespace was removed")
	}
	// Nothing of the refused VM is left: bridge, rules, row, allocation.
	if links := e.links(); slices.Contains(links, "br-ns") || slices.Contains(links, "tap-vm-nsclash") {
		t.Fatalf("links after the refused create: %v", links)
	}
	if rules := e.host.MustRun(t, "nft", "list", "ruleset"); strings.Contains(rules, "vm-nsclash") {
		t.Fatalf("rules after the refused create:\n%s", rules)
	}
	if code, _ := e.call("GetVm", map[string]any{"vm_id": "vm-nsclash"}); code != 404 {
		t.Fatalf("GetVm of the refused VM: %d", code)
	}
	if allocs := e.shell(t, `curl -s http://localhost:8080/debug/ipv6/allocations`); strings.Contains(allocs, "vm-nsclash") {
		t.Fatalf("allocations after the refused create: %s", allocs)
	}
	ns.RemoveNamed(filepath.Join(e.dir, "netns", "metald-vm-nsclash"))

	// Duplicate id.
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-dup", "config": vmConfig("t1", nic("eth0", "br-d", "", ""))})
	code, out = e.call("CreateVm", map[string]any{"vm_id": "vm-dup", "config": vmConfig("t2", nic("eth0", "br-other", "", ""))})
	if code != 409 || out["code"] != "already_exists" || errorField(out) != "vm_id" || str(out, "message") != `vm_id: "vm-dup": vm already exists` {
		t.Fatalf("duplicate: %d %v", code, out)
	}
	if vm := e.getVM("vm-dup"); vm["tenantId"] != "t1" || slices.Contains(e.links(), "br-other") {
		t.Fatalf("duplicate create changed the vm: %v", vm)
	}
}

// childEnv runs metald as a separate process (this test binary in child
// mode) inside the test's host namespace, so it can be killed with SIGKILL.
type childEnv struct {
	*env
	cmd    *exec.Cmd
	client *http.Client
}

func startChild(t *testing.T, e *env, crashAt string) *childEnv {
	t.Helper()
	os.Remove(filepath.Join(e.dir, "api.sock"))
	os.Remove(filepath.Join(e.dir, "metrics.sock"))
	self, _ := os.Executable()
	cmd := exec.Command(self, "-test.run=^$")
	cmd.Env = append(os.Environ(), "METALD_TEST_CHILD_DIR="+e.dir, "METALD_TEST_CRASH_AT="+crashAt)
	cmd.Stderr = os.Stderr
	if err := ns.Start(e.host.Fd(), cmd); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(e.dir, "api.sock")
	c := &childEnv{env: e, cmd: cmd, client: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		}}}}
	// The socket file appears at bind(), before listen(): wait until a
	// connection is accepted, not just for the file.
	for i := 0; i < 400; i++ {
		if conn, err := net.Dial("unix", sock); err == nil {
			conn.Close()
			return c
		}
		time.Sleep(25 * time.Millisecond)
	}
	cmd.Process.Kill()
	cmd.Wait()
	t.Fatal("child metald did not start")
	return nil
}

func (c *childEnv) post(proc, body string) (int, error) {
	resp, err := c.client.Post("http://metald/vmprovisioner.v1.VmService/"+proc, "application/json", strings.NewReader(body))
	if err != nil {
		return 0, err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, nil
}

func (c *childEnv) kill() string {
	c.cmd.Process.Signal(syscall.SIGKILL)
	return fmt.Sprint(c.cmd.Wait())
}

// assertConsistent checks, with metald stopped, that kernel and database
// agree: every namespace and port metald owns belongs to a VM row in a
// settled state, and every settled VM still has its namespace and ports.
func assertConsistent(t *testing.T, e *env) {
	t.Helper()
	s, err := sqlite.Open(context.Background(), filepath.Join(e.dir, "data", "metald.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	rows, err := s.ListVMs(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	byID := map[string]*store.VM{}
	for _, r := range rows {
		byID[r.ID] = r
		if r.State == store.StateCreating || r.State == store.StateDeleting {
			t.Errorf("vm %s left in %s", r.ID, r.State)
		}
	}
	for _, name := range e.netnsNames() {
		if id, ok := strings.CutPrefix(name, "metald-"); ok && byID[id] == nil {
			t.Errorf("orphaned namespace %s", name)
		}
	}
	hostLinks := map[string]bool{}
	ls, _ := e.host.Handle(t).LinkList()
	for _, l := range ls {
		hostLinks[l.Attrs().Name] = true
		if vmID, _, ok := link.ParsePortAlias(l.Attrs().Alias); ok && byID[vmID] == nil {
			t.Errorf("orphaned port %s of %s", l.Attrs().Name, vmID)
		}
	}
	for _, r := range rows {
		if r.State == store.StateTerminated {
			continue
		}
		if _, err := os.Stat(filepath.Join(e.dir, "netns", "metald-"+r.ID)); err != nil {
			t.Errorf("vm %s (%s) lost its namespace", r.ID, r.State)
		}
		for _, n := range r.NICs {
			if !hostLinks[n.HostDevice] {
				t.Errorf("vm %s (%s) lost its port %s", r.ID, r.State, n.HostDevice)
			}
		}
	}
}

// kill -9 of metald at every durable step of CreateVm and DeleteVm,
// followed by a restart, leaves no orphan and no half-built VM.
func TestKill9AtEveryStep(t *testing.T) {
	e := newEnv(t)
	e.stop()
	body := func(id string) string {
		return fmt.Sprintf(`{"vm_id":%q,"config":{"cpu":{"vcpu_count":1},"memory":{"size_bytes":134217728},"boot":{"kernel_path":"/k"},"tenant_id":"t",`+
			`"network":[{"id":"eth0","bridge_name":"br-c","ipv6":{"address":"2001:db8:c::%x/64","gateway":"2001:db8:c::1"}},{"id":"eth1","bridge_name":"br-c2"}]}}`, id, len(id)+rand.IntN(60000))
	}
	steps := []string{"create:row", "create:addresses", "create:bridges", "create:firewall", "create:sandbox", "create:attached", "create:done"}
	for i, step := range steps {
		c := startChild(t, e, step)
		id := fmt.Sprintf("vm-c%d", i)
		if _, err := c.post("CreateVm", body(id)); err == nil {
			t.Errorf("%s: request answered, want the daemon killed", step)
		}
		c.kill()
		assertAfterRestart(t, e, step)
	}
	delSteps := []string{"delete:marked", "delete:sandbox", "delete:ports", "delete:firewall", "delete:bridges", "delete:addresses"}
	for i, step := range delSteps {
		id := fmt.Sprintf("vm-d%d", i)
		c := startChild(t, e, "")
		if code, err := c.post("CreateVm", body(id)); err != nil || code != 200 {
			t.Fatalf("create %s: %d %v", id, code, err)
		}
		if code, err := c.post("BootVm", fmt.Sprintf(`{"vm_id":%q}`, id)); err != nil || code != 200 {
			t.Fatalf("boot %s: %d %v", id, code, err)
		}
		c.kill()
		os.Remove(filepath.Join(e.dir, "crash.txt"))
		c = startChild(t, e, step)
		_, perr := c.post("DeleteVm", fmt.Sprintf(`{"vm_id":%q}`, id))
		if perr == nil {
			t.Errorf("%s: request answered, want the daemon killed", step)
		}
		exit := c.kill()
		if s, err := sqlite.Open(context.Background(), filepath.Join(e.dir, "data", "metald.db")); err == nil {
			if r, err := s.GetVM(context.Background(), id); err == nil && r.State != store.StateDeleting {
				crash, _ := os.ReadFile(filepath.Join(e.dir, "crash.txt"))
				t.Errorf("%s: after the crash the row is %s, want DELETING (request error: %v, child exit: %s)\ncrash site:\n%s", step, r.State, perr, exit, crash)
			}
			s.Close()
		}
		assertAfterRestart(t, e, step)
		e.start()
		if code, out := e.call("GetVm", map[string]any{"vm_id": id}); code != 404 {
			t.Errorf("%s: vm %s survived its interrupted delete: %d %v", step, id, code, out)
		}
		e.stop()
	}
}

func assertAfterRestart(t *testing.T, e *env, step string) {
	t.Helper()
	e.start() // recovery runs here
	e.stop()
	t.Run(step, func(t *testing.T) { assertConsistent(t, e) })
}

// kill -9 at random moments under concurrent creates and deletes.
func TestKill9Random(t *testing.T) {
	e := newEnv(t)
	e.stop()
	for round := 0; round < 6; round++ {
		c := startChild(t, e, "")
		var wg sync.WaitGroup
		for w := 0; w < 3; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; ; i++ {
					id := fmt.Sprintf("vm-x%d%d%d", round, w, i)
					b := fmt.Sprintf(`{"vm_id":%q,"config":{"cpu":{"vcpu_count":1},"memory":{"size_bytes":134217728},"boot":{"kernel_path":"/k"},"network":[{"id":"eth0","bridge_name":"br-z"}]}}`, id)
					if _, err := c.post("CreateVm", b); err != nil {
						return
					}
					if i%2 == 0 {
						if _, err := c.post("DeleteVm", fmt.Sprintf(`{"vm_id":%q}`, id)); err != nil {
							return
						}
					}
				}
			}()
		}
		time.Sleep(time.Duration(50+rand.IntN(250)) * time.Millisecond)
		c.kill()
		wg.Wait()
		assertAfterRestart(t, e, fmt.Sprintf("round%d", round))
	}
}

// TestNewFailsCleanly: an error late in New (overlapping pools are only
// found when the address manager opens) is returned, not a panic while
// closing what was opened.
func TestNewFailsCleanly(t *testing.T) {
	host := netnstest.New(t)
	opt := optionsFor(t.TempDir())
	opt.HostNS = host.File
	opt.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	opt.Pools = []ipam.PoolConfig{{ID: "a", Prefixes: []string{"2600:beef::/32"}}, {ID: "b", Prefixes: []string{"2600:beef:1::/48"}}}
	d, err := daemon.New(context.Background(), opt)
	if err == nil {
		d.Close()
		t.Fatal("overlapping pools accepted")
	}
	if !strings.Contains(err.Error(), "overlap") {
		t.Fatalf("error %v", err)
	}
}

// metald killed while RebootVm has the guest down (the row says RUNNING,
// reason "rebooting"; the guest process is gone): on restart the VM is
// SHUTDOWN, not TERMINATED, and BootVm starts it again.
func TestInterruptedRebootLeavesVMBootable(t *testing.T) {
	e := newEnv(t)
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-rb", "config": vmConfig("t1", nic("eth0", "br-rb", "2001:db8:7b::10/64", "2001:db8:7b::1"))})
	e.mustCall("BootVm", map[string]any{"vm_id": "vm-rb"})
	pid := pidOf(e.getVM("vm-rb"))
	e.stop()
	// The state RebootVm records before it stops the guest, and the guest
	// stopped.
	s, err := sqlite.Open(context.Background(), filepath.Join(e.dir, "data", "metald.db"))
	if err != nil {
		t.Fatal(err)
	}
	row, err := s.GetVM(context.Background(), "vm-rb")
	if err != nil {
		t.Fatal(err)
	}
	row.StateReason = "rebooting"
	if err := s.UpdateVM(context.Background(), row); err != nil {
		t.Fatal(err)
	}
	s.Close()
	syscall.Kill(pid, syscall.SIGKILL)
	for syscall.Kill(pid, 0) == nil {
		time.Sleep(10 * time.Millisecond)
	}
	e.start()
	vm := e.getVM("vm-rb")
	if vm["state"] != "VM_STATE_SHUTDOWN" || !strings.Contains(str(vm, "stateReason"), "reboot interrupted") {
		t.Fatalf("after the restart: %v %v", vm["state"], vm["stateReason"])
	}
	if out := e.mustCall("BootVm", map[string]any{"vm_id": "vm-rb"}); out["state"] != "VM_STATE_RUNNING" {
		t.Fatalf("boot after an interrupted reboot: %v", out)
	}
	// A real reboot clears the mark.
	e.mustCall("RebootVm", map[string]any{"vm_id": "vm-rb"})
	if vm := e.getVM("vm-rb"); vm["state"] != "VM_STATE_RUNNING" || str(vm, "stateReason") != "" {
		t.Fatalf("after RebootVm: %v %q", vm["state"], vm["stateReason"])
	}
}
