// Package guestproc owns how metald holds on to guest processes across its
// own restarts: their identity (PID plus start time from /proc, so a reused
// PID is never mistaken for the guest), pidfd handles for signalling and
// waiting without races, and reaping children without a thread per guest.
// The netns, qemu and firecracker backends share it.
package guestproc

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ErrGone reports that a recorded guest process no longer exists (it
// exited, or its PID now belongs to another process).
var ErrGone = errors.New("process is gone")

// Stat is the part of /proc/PID/stat the backend needs.
type Stat struct {
	State     byte   // field 3: R, S, D, T, Z, X, ...
	StartTime uint64 // field 22: start time in clock ticks since boot
}

// Dead reports a process that exited but was not yet reaped (or is being).
func (s Stat) Dead() bool { return s.State == 'Z' || s.State == 'X' || s.State == 'x' }

// ParseStat parses the contents of /proc/PID/stat. The command name (field
// 2) is in parentheses and may itself contain spaces and parentheses, so
// fields are counted from the last ')'.
func ParseStat(b []byte) (Stat, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return Stat{}, errors.New("parse stat: no command name")
	}
	// After ") " come fields 3..; field 22 is the 20th of them.
	fields := strings.Fields(string(b[i+1:]))
	if len(fields) < 20 {
		return Stat{}, fmt.Errorf("parse stat: %d fields after command name, want at least 20", len(fields))
	}
	if len(fields[0]) != 1 {
		return Stat{}, fmt.Errorf("parse stat: bad state %q", fields[0])
	}
	start, err := strconv.ParseUint(fields[19], 10, 64)
	if err != nil {
		return Stat{}, fmt.Errorf("parse stat: start time: %w", err)
	}
	return Stat{State: fields[0][0], StartTime: start}, nil
}

// ReadStat reads /proc/PID/stat; a missing process is ErrGone.
func ReadStat(pid int) (Stat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ESRCH) {
			return Stat{}, ErrGone
		}
		return Stat{}, fmt.Errorf("read stat of %d: %w", pid, err)
	}
	return ParseStat(b)
}

// LiveStat returns the stat of pid if it is the live process that started
// at start; otherwise ErrGone.
func LiveStat(pid int, start uint64) (Stat, error) {
	if pid <= 0 {
		return Stat{}, ErrGone
	}
	st, err := ReadStat(pid)
	if err != nil {
		return Stat{}, err
	}
	if st.StartTime != start || st.Dead() {
		return Stat{}, ErrGone
	}
	return st, nil
}

// Handle is a handle on one guest process through a pidfd, so signals can
// never hit a process that reused the PID. It works for processes that are
// not our children (after a daemon restart) as well as for our own.
type Handle struct {
	pid int
	fd  int
}

// Open opens the process pid that started at start, or ErrGone.
func Open(pid int, start uint64) (*Handle, error) {
	if pid <= 0 {
		return nil, ErrGone
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil, ErrGone
		}
		return nil, fmt.Errorf("open pidfd of %d: %w", pid, err)
	}
	// The pidfd pins the process identity; checking the start time after
	// opening it proves the pidfd refers to the recorded process.
	if _, err := LiveStat(pid, start); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return &Handle{pid: pid, fd: fd}, nil
}

func (p *Handle) Close() { unix.Close(p.fd) }

// Signal sends sig; a process that already exited is ErrGone.
func (p *Handle) Signal(sig unix.Signal) error {
	if err := unix.PidfdSendSignal(p.fd, sig, nil, 0); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return ErrGone
		}
		return fmt.Errorf("send %v to %d: %w", sig, p.pid, err)
	}
	return nil
}

// Wait waits until the process exits, up to d or until ctx ends; it reports
// whether the process exited.
func (p *Handle) Wait(ctx context.Context, d time.Duration) (bool, error) {
	deadline := time.Now().Add(d)
	for {
		left := time.Until(deadline)
		if left < 0 {
			left = 0
		}
		// Short slices so that a cancelled ctx is noticed.
		ms := int(min(left, 50*time.Millisecond) / time.Millisecond)
		if ms == 0 && left > 0 {
			ms = 1
		}
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

// WaitState polls until the process state satisfies ok, up to d.
func WaitState(pid int, start uint64, d time.Duration, ok func(byte) bool) error {
	deadline := time.Now().Add(d)
	for {
		st, err := LiveStat(pid, start)
		if err != nil {
			return err
		}
		if ok(st.State) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("process %d still in state %c after %v", pid, st.State, d)
		}
		time.Sleep(time.Millisecond)
	}
}

// PIDsInNetns lists the processes whose network namespace has inode ino.
func PIDsInNetns(ino uint64) ([]int, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("list processes: %w", err)
	}
	want := fmt.Sprintf("net:[%d]", ino)
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		if l, err := os.Readlink("/proc/" + e.Name() + "/ns/net"); err == nil && l == want {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// Reap collects the guest child p when it exits, without holding an OS
// thread while it runs: its pidfd is registered with the runtime's network
// poller and the zombie is collected with a non-blocking waitid once the
// pidfd turns readable. (One goroutine blocked in cmd.Wait per guest pins
// one thread per VM, which slows every other operation down as VMs add up.)
func Reap(p *os.Process) {
	pid := p.Pid
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		go p.Wait() // no pidfd: fall back to a blocking wait
		return
	}
	p.Release()
	f := os.NewFile(uintptr(fd), "pidfd")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return
	}
	go func() {
		defer f.Close()
		rc.Read(func(fd uintptr) bool {
			var info unix.Siginfo
			err := unix.Waitid(unix.P_PIDFD, int(fd), &info, unix.WEXITED|unix.WNOHANG, nil)
			if errors.Is(err, unix.EINTR) {
				return false
			}
			// Done when reaped (si_pid set), or when there is nothing to
			// Reap (ECHILD); otherwise wait for the pidfd to be readable.
			return err != nil || siginfoPid(&info) != 0
		})
	}()
}

// siginfoPid reads si_pid from a waitid result. On 64-bit Linux the
// union after si_signo, si_errno and si_code is 8-byte aligned, so si_pid
// is at byte offset 16 (unix.Siginfo pads the same way).
func siginfoPid(info *unix.Siginfo) int32 {
	b := (*[20]byte)(unsafe.Pointer(info))
	return int32(binary.NativeEndian.Uint32(b[16:20]))
}

// StartTime returns the start time of the live process pid, or ErrGone.
func StartTime(pid int) (uint64, error) {
	st, err := ReadStat(pid)
	if err != nil {
		return 0, err
	}
	if st.Dead() {
		return 0, ErrGone
	}
	return st.StartTime, nil
}

// Alive reports whether pid is the live process that started at start.
func Alive(pid int, start uint64) bool {
	st, err := StartTime(pid)
	return err == nil && st == start
}

// Kill SIGKILLs the process pid that started at start and waits up to d
// for it to exit. A process already gone is not an error.
func Kill(ctx context.Context, pid int, start uint64, d time.Duration) error {
	p, err := Open(pid, start)
	if errors.Is(err, ErrGone) {
		return nil
	}
	if err != nil {
		return err
	}
	defer p.Close()
	if err := p.Signal(unix.SIGKILL); err != nil {
		if errors.Is(err, ErrGone) {
			return nil
		}
		return err
	}
	gone, err := p.Wait(ctx, d)
	if err != nil {
		return err
	}
	if !gone {
		return fmt.Errorf("kill %d: still alive %v after SIGKILL", pid, d)
	}
	return nil
}
