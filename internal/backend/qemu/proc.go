package qemu

import (
	"context"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/metald/metald/internal/backend/guestproc"
)

// The guest-process primitives are shared with the other backends
// (internal/backend/guestproc); these names keep this package's code short.

var errProcGone = guestproc.ErrGone

func startTime(pid int) (uint64, error) { return guestproc.StartTime(pid) }
func alive(pid int, start uint64) bool  { return guestproc.Alive(pid, start) }

func reap(p *os.Process) { guestproc.Reap(p) }

// proc is a pidfd handle on the VMM process.
type proc struct{ h *guestproc.Handle }

func openProc(pid int, start uint64) (*proc, error) {
	h, err := guestproc.Open(pid, start)
	if err != nil {
		return nil, err
	}
	return &proc{h}, nil
}

func (p *proc) close()                       { p.h.Close() }
func (p *proc) signal(sig unix.Signal) error { return p.h.Signal(sig) }
func (p *proc) wait(ctx context.Context, d time.Duration) (bool, error) {
	return p.h.Wait(ctx, d)
}
