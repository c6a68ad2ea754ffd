// Package shape owns per-NIC bandwidth and packet-rate limits on a VM's
// host port, in both directions.
//
// Bandwidth:
//   - toward the VM: an HTB root qdisc (1:) on the host port with one
//     default class 1:1 whose rate and ceil are the limit (tc,
//     vishvananda/netlink);
//   - from the VM: a policer, `limit rate over <bytes>/second drop`, in
//     a base chain `<port>-from-vm` of `table netdev metald_shape_bw`
//     hooked on the port's ingress at priority 100, after the first-hop
//     checks (priority -500), so frames those drop never use the VM's
//     budget. The bucket holds one second of the rate (the kernel's
//     byte-mode limit), so a transfer after an idle second starts with
//     that much at line rate, then runs at the limit.
//
// Shaping traffic from the VM in a qdisc would need a tc ingress redirect
// to an IFB device, and tc ingress runs before netfilter's netdev ingress
// hook, which a redirected frame then skips when it comes back: the
// first-hop checks would never see it. (Earlier versions did that;
// Remove still deletes their IFB devices and ingress qdiscs.)
//
// Packet rate: this kernel has no act_police, so tc cannot drop by packet
// rate. The limit is an nftables `limit rate over N/second drop` in
// `table bridge metald_shape`, dispatched by port name (iifname for frames
// from the VM at bridge prerouting, oifname for frames toward it at bridge
// postrouting). Packet-rate limits therefore apply to bridged ports only.
package shape

import (
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"strings"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/metald/metald/internal/network/nftconn"
)

// Limits are a NIC's limits; zero means unlimited.
type Limits struct {
	// Mbps is the bandwidth limit in megabits per second, each direction.
	Mbps uint32
	// PPS is the packet-rate limit in packets per second, each direction.
	PPS uint32
}

// Table is the nftables table holding packet-rate limits.
const Table = "metald_shape"

// BandwidthTable is the netdev table holding the from-VM bandwidth
// policers; BandwidthPriority their hooks' priority.
const (
	BandwidthTable    = "metald_shape_bw"
	BandwidthPriority = 100
)

const (
	chainPre   = "prerouting"
	chainPost  = "postrouting"
	mapFromVM  = "from_vm"
	mapToVM    = "to_vm"
	htbHandle  = 0x10000 // 1:
	htbDefault = 0x10001 // 1:1
)

// IFBName returns the IFB device earlier versions shaped traffic from the
// VM on hostDev through.
func IFBName(hostDev string) string {
	h := fnv.New32a()
	h.Write([]byte(hostDev))
	return fmt.Sprintf("ifb%08x", h.Sum32())
}

// Shaper applies limits in one network namespace. It keeps one netlink
// handle and one lasting nftables connection: CreateVm removes limits from
// every new port, and a connection per call would close a netfilter socket
// each time, which waits for the previous commit's deferred release (an
// RCU grace period, 8-24 ms) whenever that commit deleted a chain. Methods
// are safe for concurrent use.
type Shaper struct {
	mu   sync.Mutex
	h    *netlink.Handle
	nft  *nftables.Conn
	opts []nftables.ConnOption
	// gen, when set, is called after each nftables commit (see nftgen).
	gen func()
	// st is what the Shaper's nftables tables hold, read from the kernel
	// on first use and after a failed batch, then kept by its own
	// commits: listing chains dumps every table's of the family (the
	// first-hop shards' thousands), and CreateVm removes limits from
	// every new port.
	st *nftState
}

type nftState struct {
	ppsTable, bwTable bool
	pps, bw           map[string]bool // devices with packet-rate / policer chains
}

// state returns st, reading the kernel when it is unknown.
func (s *Shaper) state() (*nftState, error) {
	if s.st != nil {
		return s.st, nil
	}
	st := &nftState{pps: map[string]bool{}, bw: map[string]bool{}}
	for _, f := range []struct {
		family nftables.TableFamily
		table  string
		exists *bool
		devs   map[string]bool
	}{{nftables.TableFamilyBridge, Table, &st.ppsTable, st.pps}, {nftables.TableFamilyNetdev, BandwidthTable, &st.bwTable, st.bw}} {
		tables, err := s.nft.ListTablesOfFamily(f.family)
		if err != nil {
			return nil, fmt.Errorf("list tables: %w", err)
		}
		for _, t := range tables {
			*f.exists = *f.exists || t.Name == f.table
		}
		if !*f.exists {
			continue
		}
		chains, err := s.nft.ListChainsOfTableFamily(f.family)
		if err != nil {
			return nil, fmt.Errorf("list chains: %w", err)
		}
		for _, ch := range chains {
			if dev, ok := strings.CutSuffix(ch.Name, "-from-vm"); ok && ch.Table.Name == f.table {
				f.devs[dev] = true
			}
		}
	}
	s.st = st
	return st, nil
}

// New opens a Shaper for the namespace open at hostNS.
func New(hostNS int) (*Shaper, error) {
	h, err := netlink.NewHandleAt(netns.NsHandle(hostNS))
	if err != nil {
		return nil, fmt.Errorf("netlink handle: %w", err)
	}
	opts := nftconn.Options(hostNS)
	c, err := nftconn.Open(opts)
	if err != nil {
		h.Close()
		return nil, err
	}
	return &Shaper{h: h, nft: c, opts: opts}, nil
}

// OnCommit sets a function called after every nftables commit (the
// daemon's ruleset generation tracker). Call it before using the Shaper.
func (s *Shaper) OnCommit(f func()) { s.gen = f }

// Close releases the handle and the connection; limits stay.
func (s *Shaper) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.h.Close()
	return s.nft.CloseLasting()
}

// Apply sets hostDev's limits, replacing earlier ones; a zero field
// removes that limit.
func (s *Shaper) Apply(hostDev string, l Limits) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	h := s.h
	port, err := h.LinkByName(hostDev)
	if err != nil {
		return fmt.Errorf("find port %s: %w", hostDev, err)
	}
	if l.Mbps == 0 {
		if err := removeBandwidth(h, port); err != nil {
			return err
		}
	} else {
		if err := htb(h, port.Attrs().Index, l.Mbps); err != nil {
			return fmt.Errorf("shape toward vm on %s: %w", hostDev, err)
		}
		if err := removeIFB(h, port); err != nil {
			return err
		}
	}
	if err := s.police(hostDev, l.Mbps); err != nil {
		return fmt.Errorf("police traffic from vm on %s: %w", hostDev, err)
	}
	return s.applyPPS(hostDev, l.PPS)
}

// Remove deletes every limit of hostDev. Missing pieces are not errors.
func (s *Shaper) Remove(hostDev string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	h := s.h
	var errs []error
	if port, err := h.LinkByName(hostDev); err == nil {
		errs = append(errs, removeBandwidth(h, port))
	} else if ifb, err := h.LinkByName(IFBName(hostDev)); err == nil {
		errs = append(errs, h.LinkDel(ifb))
	}
	errs = append(errs, s.police(hostDev, 0), s.applyPPS(hostDev, 0))
	return errors.Join(errs...)
}

// police sets (mbps > 0) or removes the from-VM bandwidth policer of
// hostDev, in one batch. The caller holds mu.
func (s *Shaper) police(hostDev string, mbps uint32) error {
	return s.retry(func() error { return s.queuePolice(hostDev, mbps) })
}

// retry runs one batch (build and commit); after a failure it replaces
// the connection and, since the tables may have changed behind metald's
// back, reads them again and runs the batch once more.
func (s *Shaper) retry(batch func() error) error {
	err := batch()
	if err != nil {
		s.reopen()
		if err = batch(); err != nil {
			s.reopen()
		}
	}
	return err
}

func (s *Shaper) queuePolice(hostDev string, mbps uint32) error {
	st, err := s.state()
	if err != nil {
		return err
	}
	c := s.nft
	t := &nftables.Table{Name: BandwidthTable, Family: nftables.TableFamilyNetdev}
	name := hostDev + "-from-vm"
	exists := st.bw[hostDev]
	switch {
	case mbps == 0 && !exists:
		return nil
	case mbps == 0 && len(st.bw) == 1:
		c.DelTable(t) // the last policer goes with its table
	case mbps == 0:
		ch := &nftables.Chain{Name: name, Table: t}
		c.FlushChain(ch)
		c.DelChain(ch)
	default:
		c.AddTable(t)
		accept := nftables.ChainPolicyAccept
		ch := c.AddChain(&nftables.Chain{Name: name, Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookIngress, Priority: nftables.ChainPriorityRef(BandwidthPriority),
			Device: hostDev, Policy: &accept})
		c.FlushChain(ch)
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
			&expr.Limit{Type: expr.LimitTypePktBytes, Rate: uint64(mbps) * 1_000_000 / 8, Unit: expr.LimitTimeSecond, Over: true},
			&expr.Counter{},
			&expr.Verdict{Kind: expr.VerdictDrop},
		}})
	}
	if err := s.commit(); err != nil {
		return err
	}
	if mbps == 0 {
		delete(st.bw, hostDev)
	} else {
		st.bw[hostDev] = true
	}
	st.bwTable = len(st.bw) > 0
	return nil
}

// commit flushes the batch and notes the commit.
func (s *Shaper) commit() error {
	err := s.nft.Flush()
	if s.gen != nil {
		s.gen()
	}
	return err
}

// reopen replaces the connection after a failed batch: messages queued
// for a batch that was never sent cannot be taken back. What the tables
// hold is read again.
func (s *Shaper) reopen() {
	s.st = nil
	if c, err := nftconn.Open(s.opts); err == nil {
		s.nft.CloseLasting()
		s.nft = c
	}
}

// removeBandwidth removes the port's HTB root qdisc and what earlier
// versions used for traffic from the VM (an ingress redirect to an IFB),
// whichever exist. It asks the kernel to delete them by handle instead of
// listing qdiscs first: a qdisc listing dumps every device's, which grows
// with the number of VMs, and CreateVm calls this for every new port.
func removeBandwidth(h *netlink.Handle, port netlink.Link) error {
	root := netlink.NewHtb(netlink.QdiscAttrs{LinkIndex: port.Attrs().Index, Parent: netlink.HANDLE_ROOT, Handle: htbHandle})
	if err := h.QdiscDel(root); !qdiscGone(err) {
		return fmt.Errorf("delete htb qdisc: %w", err)
	}
	return removeIFB(h, port)
}

// qdiscGone: a delete failed because there was nothing (of ours) to
// delete. EINVAL: the root qdisc has another handle, or there is no
// ingress qdisc.
func qdiscGone(err error) bool {
	return err == nil || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EINVAL)
}

// removeIFB removes an earlier version's ingress redirect and IFB device
// of port (the redirect existed only with the IFB).
func removeIFB(h *netlink.Handle, port netlink.Link) error {
	ifb, err := h.LinkByName(IFBName(port.Attrs().Name))
	if err != nil {
		return nil
	}
	ing := &netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: port.Attrs().Index, Parent: netlink.HANDLE_INGRESS, Handle: netlink.MakeHandle(0xffff, 0)}}
	if err := h.QdiscDel(ing); !qdiscGone(err) {
		return fmt.Errorf("delete ingress qdisc: %w", err)
	}
	if err := h.LinkDel(ifb); err != nil {
		return fmt.Errorf("delete %s: %w", ifb.Attrs().Name, err)
	}
	return nil
}

// htb installs (or replaces) root HTB 1: with default class 1:1 at mbps.
func htb(h *netlink.Handle, idx int, mbps uint32) error {
	// HTB has no change operation: keep an existing 1: htb, replace
	// anything else.
	ours, err := hasQdisc(h, idx, netlink.HANDLE_ROOT, htbHandle, "htb")
	if err != nil {
		return err
	}
	if !ours {
		q := netlink.NewHtb(netlink.QdiscAttrs{LinkIndex: idx, Parent: netlink.HANDLE_ROOT, Handle: htbHandle})
		q.Defcls = 1
		if err := h.QdiscReplace(q); err != nil {
			return fmt.Errorf("htb qdisc: %w", err)
		}
	}
	bits := uint64(mbps) * 1_000_000
	// A 10 ms burst (at least a 64 KiB GSO frame) keeps TCP at the rate
	// without long overshoot.
	burst := uint32(max(bits/8/100, 65536+1600))
	c := netlink.NewHtbClass(netlink.ClassAttrs{LinkIndex: idx, Parent: htbHandle, Handle: htbDefault},
		netlink.HtbClassAttrs{Rate: bits, Ceil: bits, Buffer: burst, Cbuffer: burst})
	if err := h.ClassReplace(c); err != nil {
		return fmt.Errorf("htb class: %w", err)
	}
	return nil
}

func nftTable() *nftables.Table {
	return &nftables.Table{Name: Table, Family: nftables.TableFamilyBridge}
}

func ifname(n string) []byte {
	b := make([]byte, 16)
	copy(b, n)
	return b
}

// applyPPS sets (pps > 0) or removes the packet-rate chains of hostDev in
// one batch. The caller holds mu. After an error the connection is
// replaced: messages queued for a batch that was never sent cannot be
// taken back.
func (s *Shaper) applyPPS(hostDev string, pps uint32) error {
	return s.retry(func() error { return s.queuePPS(hostDev, pps) })
}

func (s *Shaper) queuePPS(hostDev string, pps uint32) error {
	st, err := s.state()
	if err != nil {
		return err
	}
	c := s.nft
	exists := st.ppsTable
	if !exists && pps == 0 {
		return nil
	}
	t := nftTable()
	fromVM, toVM := hostDev+"-from-vm", hostDev+"-to-vm"
	vmap := func(name string) *nftables.Set {
		return &nftables.Set{Table: t, Name: name, IsMap: true, KeyType: nftables.TypeIFName, DataType: nftables.TypeVerdict, KeyByteOrder: binaryutil.NativeEndian}
	}
	have := map[string]bool{fromVM: st.pps[hostDev], toVM: st.pps[hostDev]}
	if !exists {
		c.AddTable(t)
		accept := nftables.ChainPolicyAccept
		for _, m := range []string{mapFromVM, mapToVM} {
			if err := c.AddSet(vmap(m), nil); err != nil {
				return err
			}
		}
		for _, b := range []struct {
			name, set string
			hook      *nftables.ChainHook
			key       expr.MetaKey
		}{{chainPre, mapFromVM, nftables.ChainHookPrerouting, expr.MetaKeyIIFNAME}, {chainPost, mapToVM, nftables.ChainHookPostrouting, expr.MetaKeyOIFNAME}} {
			ch := c.AddChain(&nftables.Chain{Name: b.name, Table: t, Type: nftables.ChainTypeFilter,
				Hooknum: b.hook, Priority: nftables.ChainPriorityFilter, Policy: &accept})
			c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
				&expr.Meta{Key: b.key, Register: 1},
				&expr.Lookup{SourceRegister: 1, SetName: b.set, DestRegister: 0, IsDestRegSet: true},
			}})
		}
	}
	key := []nftables.SetElement{{Key: ifname(hostDev)}}
	chains := []struct{ chain, set string }{{fromVM, mapFromVM}, {toVM, mapToVM}}
	switch {
	case pps == 0 && have[fromVM]:
		for _, d := range chains {
			if err := c.SetDeleteElements(vmap(d.set), key); err != nil {
				return err
			}
			ch := &nftables.Chain{Name: d.chain, Table: t}
			c.FlushChain(ch)
			c.DelChain(ch)
		}
	case pps > 0:
		// Rewrite the chains' one rule in place; map entries are added
		// when the chains are new.
		for _, d := range chains {
			ch := c.AddChain(&nftables.Chain{Name: d.chain, Table: t})
			c.FlushChain(ch)
			c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
				&expr.Limit{Type: expr.LimitTypePkts, Rate: uint64(pps), Unit: expr.LimitTimeSecond, Over: true, Burst: max(pps/100, 5)},
				&expr.Counter{},
				&expr.Verdict{Kind: expr.VerdictDrop},
			}})
			if !have[d.chain] {
				if err := c.SetAddElements(vmap(d.set), []nftables.SetElement{{Key: ifname(hostDev),
					VerdictData: &expr.Verdict{Kind: expr.VerdictJump, Chain: d.chain}}}); err != nil {
					return err
				}
			}
		}
	}
	if pps == 0 && !have[fromVM] {
		return nil // nothing queued
	}
	if err := s.commit(); err != nil {
		return fmt.Errorf("packet rate limit on %s: %w", hostDev, err)
	}
	st.ppsTable = true
	if pps == 0 {
		delete(st.pps, hostDev)
	} else {
		st.pps[hostDev] = true
	}
	return nil
}

// hasQdisc reports whether link idx has a qdisc of kind at parent/handle.
// (htb and ingress have no change operation, so a replace of an existing
// one fails with EINVAL.)
func hasQdisc(h *netlink.Handle, idx int, parent, handle uint32, kind string) (bool, error) {
	qs, err := h.QdiscList(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: idx}})
	if err != nil {
		return false, fmt.Errorf("list qdiscs: %w", err)
	}
	return slices.ContainsFunc(qs, func(q netlink.Qdisc) bool {
		return q.Attrs().Parent == parent && q.Attrs().Handle == handle && q.Type() == kind
	}), nil
}
