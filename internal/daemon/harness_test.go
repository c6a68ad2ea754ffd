package daemon_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/metald/metald/internal/daemon"
	"github.com/metald/metald/internal/ipam"
	"github.com/metald/metald/internal/netnstest"
	"github.com/metald/metald/internal/network/ns"
)

// Child mode: the test binary doubles as a metald process for the kill -9
// tests. METALD_TEST_CHILD_DIR selects it; the process must already run in
// the test's host namespace.
func TestMain(m *testing.M) {
	if dir := os.Getenv("METALD_TEST_CHILD_DIR"); dir != "" {
		os.Exit(runChild(dir, os.Getenv("METALD_TEST_CRASH_AT")))
	}
	os.Exit(netnstest.Main(m))
}

func optionsFor(dir string) daemon.Options {
	return daemon.Options{
		DataDir: filepath.Join(dir, "data"), LogDir: filepath.Join(dir, "log"),
		Backend:  "netns",
		Region:   "US", // the guide's Example 3 requires it
		NetnsDir: filepath.Join(dir, "netns"), EtcNetnsDir: filepath.Join(dir, "etc"),
		ShutdownTimeout: 2 * time.Second, WatchInterval: 200 * time.Millisecond, EventWindow: 300 * time.Millisecond,
		// Documentation prefixes for the tests' own addresses, and the
		// seed's 2600:beef::/32 for its examples.
		Pools: []ipam.PoolConfig{
			{ID: "default", Prefixes: []string{"2001:db8::/32"}},
			{ID: "seed", Prefixes: []string{"2600:beef::/32"}},
		},
	}
}

func runChild(dir, crashAt string) int {
	opt := optionsFor(dir)
	opt.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	opt.Step = func(step string) {
		if step == crashAt {
			os.WriteFile(filepath.Join(dir, "crash.txt"), debug.Stack(), 0o600)
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {} // never reached
		}
	}
	ctx := context.Background()
	d, err := daemon.New(ctx, opt)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	apiL, err := net.Listen("unix", filepath.Join(dir, "api.sock"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	metL, err := net.Listen("unix", filepath.Join(dir, "metrics.sock"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	if err := d.Serve(ctx, apiL, metL); err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	return 0
}

// env is one metald under test, in a private host namespace.
type env struct {
	t       testing.TB
	dir     string
	host    *netnstest.NS
	d       *daemon.Daemon
	url     string
	metrics string
	stopped chan struct{}
	cancel  context.CancelFunc
	logs    *testLog
	adjust  func(*daemon.Options)
}

// testLog forwards daemon logs to the test until the test ends.
type testLog struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
	buf  bytes.Buffer
}

func (l *testLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Write(p)
	return len(p), nil
}

func (l *testLog) finish() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.t.Failed() {
		l.t.Logf("daemon log:\n%s", l.buf.String())
	}
	l.done = true
}

func newEnv(t testing.TB) *env { return newEnvWith(t, nil) }

// newEnvWith is newEnv with a hook that adjusts the daemon's options.
func newEnvWith(t testing.TB, adjust func(*daemon.Options)) *env {
	t.Helper()
	e := &env{t: t, dir: t.TempDir(), host: netnstest.New(t), adjust: adjust}
	e.logs = &testLog{t: t}
	e.start()
	t.Cleanup(e.cleanup)
	return e
}

func (e *env) options() daemon.Options {
	opt := optionsFor(e.dir)
	opt.HostNS = e.host.File
	opt.Logger = slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	if e.adjust != nil {
		e.adjust(&opt)
	}
	return opt
}

// start opens a daemon on the env's state and serves it on loopback.
func (e *env) start() {
	e.t.Helper()
	d, err := daemon.New(context.Background(), e.options())
	if err != nil {
		e.t.Fatalf("start daemon: %v", err)
	}
	e.d = d
	apiL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		e.t.Fatal(err)
	}
	metL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		e.t.Fatal(err)
	}
	e.url = "http://" + apiL.Addr().String()
	e.metrics = "http://" + metL.Addr().String() + "/metrics"
	ctx, cancel := context.WithCancel(context.Background())
	e.cancel = cancel
	e.stopped = make(chan struct{})
	go func() {
		defer close(e.stopped)
		d.Serve(ctx, apiL, metL)
	}()
}

// stop stops serving and closes the daemon; VMs keep running.
func (e *env) stop() {
	if e.d == nil {
		return
	}
	e.cancel()
	<-e.stopped
	e.d.Close()
	e.d = nil
}

// cleanup deletes every VM (so no guest process outlives the test) and
// checks that nothing is left behind.
func (e *env) cleanup() {
	defer e.logs.finish()
	if e.d == nil {
		e.start()
	}
	m := e.d.Manager()
	vms, _ := m.List(context.Background())
	for _, v := range vms {
		if err := m.Delete(context.Background(), v.ID); err != nil {
			e.t.Errorf("cleanup: delete %s: %v", v.ID, err)
		}
	}
	e.stop()
	e.assertNothingLeft()
}

func (e *env) assertNothingLeft() {
	e.t.Helper()
	if names := e.netnsNames(); len(names) > 0 {
		e.t.Errorf("namespaces left behind: %v", names)
	}
	if links := e.links(); len(links) != 1 || links[0] != "lo" {
		e.t.Errorf("links left behind in the host namespace: %v", links)
	}
}

func (e *env) netnsNames() []string {
	ents, _ := os.ReadDir(filepath.Join(e.dir, "netns"))
	var out []string
	for _, d := range ents {
		out = append(out, d.Name())
	}
	return out
}

func (e *env) links() []string {
	ls, err := e.host.Handle(e.t).LinkList()
	if err != nil {
		e.t.Fatal(err)
	}
	var out []string
	for _, l := range ls {
		out = append(out, l.Attrs().Name)
	}
	return out
}

// call POSTs a JSON body to a VmService procedure the way the seed's curl
// commands do (form content type) and decodes the JSON answer.
func (e *env) call(proc string, body any) (int, map[string]any) {
	e.t.Helper()
	return e.do(http.MethodPost, proc, body, "application/x-www-form-urlencoded")
}

func (e *env) do(method, proc string, body any, contentType string) (int, map[string]any) {
	e.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	case []byte:
		rd = bytes.NewReader(b)
	default:
		raw, _ := json.Marshal(b)
		rd = bytes.NewReader(raw)
	}
	req, _ := http.NewRequest(method, e.url+"/vmprovisioner.v1.VmService/"+proc, rd)
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, proc, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	out := map[string]any{}
	if len(raw) > 0 {
		if err := json.Unmarshal(raw, &out); err != nil {
			e.t.Fatalf("%s %s: answer is not JSON: %s", method, proc, raw)
		}
	}
	return resp.StatusCode, out
}

// mustCall is call that fails the test on a non-200 answer.
func (e *env) mustCall(proc string, body any) map[string]any {
	e.t.Helper()
	code, out := e.call(proc, body)
	if code != 200 {
		e.t.Fatalf("%s: HTTP %d: %v", proc, code, out)
	}
	return out
}

func (e *env) getVM(id string) map[string]any {
	e.t.Helper()
	return e.mustCall("GetVm", map[string]any{"vm_id": id})
}

// vmNS opens a VM's namespace.
func (e *env) vmNS(id string) *os.File {
	e.t.Helper()
	f, err := ns.OpenNamed(filepath.Join(e.dir, "netns", "metald-"+id))
	if err != nil {
		e.t.Fatalf("open namespace of %s: %v", id, err)
	}
	e.t.Cleanup(func() { f.Close() })
	return f
}

func (e *env) inVM(id string, name string, args ...string) (string, error) {
	f := e.vmNS(id)
	out, err := ns.Command(int(f.Fd()), exec.Command(name, args...))
	return string(out), err
}

// waitDAD waits until every NIC's address of the VM finished DAD.
func (e *env) waitDAD(id string) {
	e.t.Helper()
	deadline := time.Now().Add(8 * time.Second)
	for {
		vm := e.getVM(id)
		ok := true
		for _, s := range list(vm["networkStatus"]) {
			if str(s, "dadState") != "preferred" {
				ok = false
			}
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("DAD of %s did not finish: %v", id, vm["networkStatus"])
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// metric returns the value of one series on the metrics endpoint; a series
// that is not exported fails the test.
func (e *env) metric(series string) float64 {
	e.t.Helper()
	v, ok := e.scrape(series)
	if !ok {
		e.t.Fatalf("series %s not exported", series)
	}
	return v
}

// metric0 is metric for a series that may not exist yet (0 then).
func (e *env) metric0(series string) float64 {
	e.t.Helper()
	v, _ := e.scrape(series)
	return v
}

// scrape reads one series from the metrics endpoint.
func (e *env) scrape(series string) (float64, bool) {
	e.t.Helper()
	resp, err := http.Get(e.metrics)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(raw), "\n") {
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			if err != nil {
				e.t.Fatal(err)
			}
			return v, true
		}
	}
	return 0, false
}

func list(v any) []any {
	l, _ := v.([]any)
	return l
}

func obj(v any) map[string]any {
	m, _ := v.(map[string]any)
	return m
}

func str(v any, key string) string {
	s, _ := obj(v)[key].(string)
	return s
}

// loadJSON reads a testdata file of the vm package.
func loadJSON(t *testing.T, name string, v any) {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("..", "vm", "testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, v); err != nil {
		t.Fatal(err)
	}
}

// vmConfig builds a small config for one VM with NICs on bridges.
func vmConfig(tenant string, nics ...map[string]any) map[string]any {
	nl := make([]any, len(nics))
	for i, n := range nics {
		nl[i] = n
	}
	return map[string]any{
		"cpu":       map[string]any{"vcpu_count": 1},
		"memory":    map[string]any{"size_bytes": 134217728},
		"boot":      map[string]any{"kernel_path": "/opt/vm-assets/vmlinux"},
		"network":   nl,
		"tenant_id": tenant,
	}
}

func nic(id, bridge, addr, gw string) map[string]any {
	return map[string]any{"id": id, "interface_type": "virtio-net", "bridge_name": bridge,
		"ipv6": map[string]any{"address": addr, "gateway": gw}}
}

func errorField(out map[string]any) string {
	for _, d := range list(out["details"]) {
		for _, fv := range list(obj(obj(d)["debug"])["fieldViolations"]) {
			return str(fv, "field")
		}
	}
	return ""
}

var errNoProc = errors.New("no such process")

func procState(pid int) (byte, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, errNoProc
	}
	i := bytes.LastIndexByte(raw, ')')
	if i < 0 || i+2 >= len(raw) || raw[i+2] == 'Z' || raw[i+2] == 'X' {
		// Gone, or a zombie: it has exited and only waits to be reaped.
		return 0, errNoProc
	}
	return raw[i+2], nil
}
