package firecracker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// errProcGone reports that a recorded VMM process no longer exists (it
// exited, or its PID now belongs to another process).
var errProcGone = errors.New("process is gone")

// startTime reads field 22 of /proc/PID/stat (the start time in clock
// ticks), failing with errProcGone for a missing or dead process.
func startTime(pid int) (uint64, error) {
	if pid <= 0 {
		return 0, errProcGone
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ESRCH) {
			return 0, errProcGone
		}
		return 0, fmt.Errorf("read stat of %d: %w", pid, err)
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("parse stat: no command name")
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, fmt.Errorf("parse stat: %d fields", len(f))
	}
	if s := f[0]; s == "Z" || s == "X" || s == "x" {
		return 0, errProcGone
	}
	return strconv.ParseUint(f[19], 10, 64)
}

// alive reports whether pid is the live process that started at start.
func alive(pid int, start uint64) bool {
	st, err := startTime(pid)
	return err == nil && st == start
}

// proc is a pidfd handle on a VMM process: signals never reach a process
// that reused the PID, and it works for processes that are not our
// children (after a daemon restart).
type proc struct {
	pid int
	fd  int
}

func openProc(pid int, start uint64) (*proc, error) {
	if pid <= 0 {
		return nil, errProcGone
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil, errProcGone
		}
		return nil, fmt.Errorf("open pidfd of %d: %w", pid, err)
	}
	if !alive(pid, start) {
		unix.Close(fd)
		return nil, errProcGone
	}
	return &proc{pid: pid, fd: fd}, nil
}

func (p *proc) close() { unix.Close(p.fd) }

func (p *proc) signal(sig unix.Signal) error {
	if err := unix.PidfdSendSignal(p.fd, sig, nil, 0); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return errProcGone
		}
		return fmt.Errorf("send %v to %d: %w", sig, p.pid, err)
	}
	return nil
}

// wait waits up to d (or until ctx ends) for the process to exit and
// reports whether it did.
func (p *proc) wait(ctx context.Context, d time.Duration) (bool, error) {
	deadline := time.Now().Add(d)
	for {
		left := max(time.Until(deadline), 0)
		ms := int(min(left, 50*time.Millisecond) / time.Millisecond)
		fds := []unix.PollFd{{Fd: int32(p.fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, ms)
		if err != nil && !errors.Is(err, unix.EINTR) {
			return false, fmt.Errorf("wait for %d: %w", p.pid, err)
		}
		if n > 0 {
			return true, nil
		}
		if left == 0 {
			return false, nil
		}
		if err := ctx.Err(); err != nil {
			return false, fmt.Errorf("wait for %d: %w", p.pid, err)
		}
	}
}
