// Package nftgen reads a network namespace's nftables ruleset generation
// and remembers the generation after metald's own writes, so a drift check
// can tell "only metald changed the ruleset since I last looked" (nothing to
// compare) from "someone else changed it" (compare and repair).
//
// The kernel bumps one generation counter per namespace on every committed
// batch, whatever the table. Every metald writer in the namespace (the
// first-hop firewall, the policy manager) calls Note after each commit. A
// foreign commit that lands between a metald commit and its Note is not
// seen as foreign; callers bound that by comparing in full now and then
// anyway (see Tracker.Due).
package nftgen

import (
	"encoding/binary"
	"fmt"
	"sync"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Tracker follows the generation: seen is the last generation it read,
// foreign is set when a commit it cannot attribute to metald happened since
// the last full comparison.
type Tracker struct {
	linked  []*Tracker // noted with this one (Link)
	mu      sync.Mutex
	c       *netlink.Conn
	seen    uint32
	valid   bool
	foreign bool
	full    time.Time
}

// New opens a tracker for the network namespace open at nsFd (the
// caller's namespace when nsFd < 0).
func New(nsFd int) (*Tracker, error) {
	cfg := &netlink.Config{}
	if nsFd >= 0 {
		cfg.NetNS = nsFd
	}
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, cfg)
	if err != nil {
		return nil, fmt.Errorf("open netfilter netlink socket: %w", err)
	}
	return &Tracker{c: c}, nil
}

// Close releases the socket.
func (t *Tracker) Close() error { return t.c.Close() }

// Gen returns the namespace's current ruleset generation.
func (t *Tracker) Gen() (uint32, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.gen()
}

func (t *Tracker) gen() (uint32, error) {
	msgs, err := t.c.Execute(netlink.Message{
		Header: netlink.Header{
			Type: netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETGEN),
			// No ack: the kernel answers with the generation message alone.
			Flags: netlink.Request,
		},
		Data: []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, 0},
	})
	if err != nil {
		return 0, fmt.Errorf("read nftables generation: %w", err)
	}
	for _, m := range msgs {
		if len(m.Data) < 4 {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			return 0, fmt.Errorf("decode nftables generation: %w", err)
		}
		for ad.Next() {
			if ad.Type() == unix.NFTA_GEN_ID && len(ad.Bytes()) == 4 {
				return binary.BigEndian.Uint32(ad.Bytes()), nil
			}
		}
	}
	return 0, fmt.Errorf("read nftables generation: no NFTA_GEN_ID in the reply")
}

// Note is called after each metald commit. The commit is metald's own
// when the generation moved by exactly one since the last read; anything
// else (another commit in between, an unreadable generation) counts as
// foreign.
func (t *Tracker) Note() {
	for _, o := range t.linked {
		o.Note()
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	g, err := t.gen()
	if err != nil || !t.valid || g != t.seen+1 {
		t.foreign = true
	}
	t.seen, t.valid = g, err == nil
}

// Link makes every Note of t note o too: o is a second drift check's
// tracker (its own last comparison and foreign flag) over the same
// writers. Call before any Note.
func (t *Tracker) Link(o *Tracker) { t.linked = append(t.linked, o) }

// Unchanged reports whether every commit since the last full comparison
// was metald's own.
func (t *Tracker) Unchanged() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.valid {
		return false
	}
	g, err := t.gen()
	if err != nil {
		return false
	}
	if g != t.seen {
		t.foreign, t.seen = true, g
	}
	return !t.foreign
}

// BeginCompare is called right before a full comparison reads the
// ruleset: whatever was committed up to now is covered by it.
func (t *Tracker) BeginCompare() {
	t.mu.Lock()
	defer t.mu.Unlock()
	g, err := t.gen()
	t.seen, t.valid, t.foreign, t.full = g, err == nil, err != nil, time.Now()
}

// Due reports whether the last full comparison is older than every (or
// none was made): the backstop for a foreign commit that landed between a
// metald commit and its Note.
func (t *Tracker) Due(every time.Duration) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.full.IsZero() || time.Since(t.full) >= every
}

// Abandon is called when a full comparison could not finish: the next
// check compares again.
func (t *Tracker) Abandon() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.foreign = true
}
