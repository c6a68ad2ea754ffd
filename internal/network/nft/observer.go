package nft

import "github.com/metald/metald/internal/network"

// Observer is told about changes the Firewall makes that metrics must not
// miss. Calls are made after the Firewall's lock is released, in the
// goroutine that made the change; they must not block for long.
type Observer interface {
	// NICRemoved reports that hostDev's objects were deleted; final holds
	// its counters as read in the same operation, right before the delete
	// batch (packets counted between that read and the delete, a window
	// of one netlink round trip, are lost).
	NICRemoved(hostDev string, final map[network.Control]uint64)
	// Repaired reports drift that Reconcile repaired (never called with an
	// empty Repairs).
	Repaired(r Repairs)
}

type removed struct {
	dev   string
	final map[network.Control]uint64
}

// SetObserver installs o (nil removes it).
func (f *Firewall) SetObserver(o Observer) {
	f.mu.Lock()
	f.obs = o
	f.mu.Unlock()
}

// notifyRemoved queues a removal notification; called with f.mu held.
func (f *Firewall) notifyRemoved(dev string, final map[network.Control]uint64) {
	if f.obs == nil {
		return
	}
	f.pending = append(f.pending, removed{dev: dev, final: final})
}

// unlock releases f.mu and then delivers queued notifications.
func (f *Firewall) unlock() {
	p, rep, o := f.pending, f.pendingRepairs, f.obs
	f.pending, f.pendingRepairs = nil, nil
	f.mu.Unlock()
	if o == nil {
		return
	}
	for _, r := range p {
		o.NICRemoved(r.dev, r.final)
	}
	if rep != nil {
		// Observers may call the Firewall again (metald restores learned
		// bindings a repair lost): f.mu is free here.
		o.Repaired(*rep)
	}
}
