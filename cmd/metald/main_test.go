package main

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestHelpIsSuccess: `metald --help` prints the usage and exits 0; an
// unknown flag exits 1 naming it.
func TestHelpIsSuccess(t *testing.T) {
	if args := os.Getenv("METALD_TEST_ARGS"); args != "" {
		os.Args = append([]string{"metald"}, strings.Fields(args)...)
		main()
		return
	}
	run := func(args string) (string, error) {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelpIsSuccess$")
		cmd.Env = append(os.Environ(), "METALD_TEST_ARGS="+args)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := run("--help")
	if err != nil || !strings.Contains(out, "-config") || strings.Contains(out, "help requested") {
		t.Fatalf("--help: %v\n%s", err, out)
	}
	out, err = run("--no-such-flag")
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(out, "no-such-flag") {
		t.Fatalf("unknown flag: %v\n%s", err, out)
	}
}

// A mount namespace of its own is told from the host's: the same link is
// not private, a child unshared into a new mount namespace is.
func TestPrivateMounts(t *testing.T) {
	if privateMounts("/proc/self/ns/mnt", "/proc/self/ns/mnt") {
		t.Fatal("a namespace differs from itself")
	}
	if privateMounts("/proc/self/ns/mnt", "/nonexistent") {
		t.Fatal("an unreadable link counted as private")
	}
	child := exec.Command("unshare", "--mount", "--propagation", "private", "sleep", "30")
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { child.Process.Kill(); child.Wait() }()
	link := fmt.Sprintf("/proc/%d/ns/mnt", child.Process.Pid)
	for range 100 { // until unshare has execed sleep
		if privateMounts("/proc/self/ns/mnt", link) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("a process in its own mount namespace was not told apart")
}
