package main

import (
	"os"
	"os/exec"
	"strings"
	"testing"
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
