// Package netnstest gives kernel-facing tests private network namespaces and
// guards the machine's own interfaces and nftables ruleset against change.
package netnstest

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/metald/metald/internal/network/ns"
)

// NS is a private network namespace owned by one test.
type NS struct {
	File *os.File
}

// Fd returns the namespace file descriptor.
func (n *NS) Fd() int { return int(n.File.Fd()) }

// Path returns a path to the namespace usable by `nsenter --net=PATH` while
// the test runs.
func (n *NS) Path() string { return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), n.Fd()) }

// RequireRoot fails the test in CI (CI=true) and skips it elsewhere when the
// process is not root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatal("kernel test needs root; CI must run as root")
	}
	t.Skip("kernel test needs root")
}

// New creates a namespace with lo up; it is released when the test ends.
func New(t testing.TB) *NS {
	t.Helper()
	RequireRoot(t)
	f, err := ns.New()
	if err != nil {
		t.Fatalf("create namespace: %v", err)
	}
	n := &NS{File: f}
	t.Cleanup(func() { f.Close() })
	h := n.Handle(t)
	lo, err := h.LinkByName("lo")
	if err != nil {
		t.Fatalf("lo: %v", err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		t.Fatalf("lo up: %v", err)
	}
	return n
}

// Handle returns a netlink handle bound to the namespace.
func (n *NS) Handle(t testing.TB) *netlink.Handle {
	t.Helper()
	h, err := netlink.NewHandleAt(newNsHandle(n.Fd()))
	if err != nil {
		t.Fatalf("netlink handle: %v", err)
	}
	t.Cleanup(h.Close)
	return h
}

// Run runs a command inside the namespace and returns its combined output.
func (n *NS) Run(name string, args ...string) (string, error) {
	out, err := ns.Command(n.Fd(), exec.Command(name, args...))
	return string(out), err
}

// MustRun runs a command inside the namespace and fails the test on error.
func (n *NS) MustRun(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := n.Run(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// Main wraps testing.M: it snapshots the host's links and nftables ruleset,
// runs the tests and fails the run if either changed. Use it from TestMain:
//
//	func TestMain(m *testing.M) { os.Exit(netnstest.Main(m)) }
func Main(m *testing.M) int {
	before := hostSnapshot()
	code := m.Run()
	after := hostSnapshot()
	if before != after {
		fmt.Fprintf(os.Stderr, "host guard: the test run changed the machine's own links or nftables ruleset\n--- before\n%s\n--- after\n%s\n", before, after)
		if code == 0 {
			code = 1
		}
	}
	return code
}

func hostSnapshot() string {
	if os.Geteuid() != 0 {
		return ""
	}
	var b bytes.Buffer
	for _, c := range [][]string{{"ip", "-o", "link", "show"}, {"nft", "list", "ruleset"}} {
		out, err := exec.Command(c[0], c[1:]...).CombinedOutput()
		if err != nil {
			fmt.Fprintf(&b, "%s: %v\n", strings.Join(c, " "), err)
		}
		b.Write(out)
	}
	return b.String()
}
