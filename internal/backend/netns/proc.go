package netns

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

type procStat = guestproc.Stat

func readStat(pid int) (procStat, error)               { return guestproc.ReadStat(pid) }
func liveStat(pid int, start uint64) (procStat, error) { return guestproc.LiveStat(pid, start) }
func pidsInNetns(ino uint64) ([]int, error)            { return guestproc.PIDsInNetns(ino) }
func reap(p *os.Process)                               { guestproc.Reap(p) }
func waitState(pid int, start uint64, d time.Duration, ok func(byte) bool) error {
	return guestproc.WaitState(pid, start, d, ok)
}

// proc is a pidfd handle on a guest process.
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
