// Package nft owns metald's nftables state, the IPv6 first-hop security
// (network.Controls) of every VM NIC, programmed with google/nftables, one
// netlink batch per change.
//
// # Layout
//
//	table netdev metald_00 ... metald_63 (shards, created when first needed,
//	deleted when their last NIC goes)
//	  per NIC <dev>:
//	    chain vm-<dev>-out (filter, ingress device "<dev>", priority -500)
//	    chain vm-<dev>-in  (filter, egress  device "<dev>", priority -500)
//	    helper chains vm-<dev>-out_priv, -out_learn (privacy learning),
//	    vm-<dev>-in_ra (several admitted router MACs)
//	    sets <dev>-addrs, <dev>-ra_src, <dev>-temp
//	    counters <dev>-<control>
//	  per shard: the shared constant sets (SharedSetName) and the dynamic
//	  set priv_owned
//	table bridge metald
//	  chain input (filter, input, priority -300): clears the VLAN mark
//
// Each NIC's from-VM chain is hooked on its host device's ingress (before
// the bridge, or anything else, sees the frame) and its to-VM chain on the
// device's egress (frames the bridge forwards and frames the host sends).
// The kernel dispatches by device, so per-packet cost does not grow with
// the number of VMs. Hooks may name a device that does not exist yet: they
// attach when it appears, so a NIC's chains go in before its port exists,
// and a device deleted and created again with the same name is filtered
// again without metald doing anything.
//
// A NIC's shard (ShardOf) is FNV-1a of its host device name mod 64, or for
// a NIC with privacy extensions of its first privacy /64: NICs that can
// contend for a temporary address must share a priv_owned set, and sets
// are table-scoped. Spreading NICs over a fixed number of tables bounds
// what one NIC's commit costs: the kernel re-validates every base chain
// of each table a commit touches (about NICs/64 NICs here), and looks every
// message's table up by name in the namespace's table list (65 tables).
//
// # Kernel behaviour this design relies on (checked on Linux 6.x)
//
//   - netdev ingress and egress see raw frames: there is no defragmentation
//     before these hooks, and none is wanted.
//   - For IPv6 frames (skb->protocol) nft_do_chain_netdev fills pktinfo with
//     ipv6_find_hdr(-1), as the bridge family did,
//     which walks hop-by-hop, routing, fragment, AH and destination options
//     headers. `meta l4proto` is the first non-extension header (an unknown
//     next header such as 253 counts as the upper layer: a receiver discards
//     it, so nothing can hide behind it). If the walk fails (a truncated
//     header chain) l4proto is unset and every `meta l4proto`, `icmpv6`,
//     `udp` or `@th` match silently does NOT match. Filters that drop on a
//     positive match therefore fail open on a broken chain; so the hooked
//     chain lets an IPv6 frame on only if the first four bytes of the
//     upper-layer header are readable (`@th,0,32`) or the packet is a
//     non-first fragment, and drops everything else (RFC 7112: the first
//     fragment must carry the whole header chain).
//   - Transport-header loads are refused on non-first fragments (fragoff != 0),
//     so a non-first fragment can never be classified as ICMPv6 type X. That
//     is harmless: without the first fragment it cannot be reassembled, and
//     the first fragment (offset 0) carries the ICMPv6 type byte and is
//     always classified. Fragmented ND/RA (RFC 6980) is dropped by matching
//     the first fragment: `exthdr frag exists` + the ICMPv6 type.
//   - `exthdr <hdr> exists` uses ipv6_find_hdr(target): it reports false when
//     the walk breaks before the header, and it does not look past the
//     fragment header of a non-first fragment. The header-chain check above removes
//     the broken-walk case; headers after the fragment header of a non-first
//     fragment are invisible to every middlebox and unusable without the
//     first fragment.
//   - VLAN: veth and tap deliver tags into skb->vlan_tci (hardware-accelerated
//     form). The LL payload load (`ether type`) reconstructs the tag, so a
//     tagged frame shows ether type 0x8100/0x88a8 and fails the untagged-IPv6
//     allowlist.
//   - `limit rate over N/second burst 5 packets`: the bucket holds the burst
//     (5 packets) and refills at N/s, so a flood gets 5 packets plus N per
//     second through (measured: 100 NS at once with N=20 -> 6 passed,
//     94 counted). Every packet is either passed or counted, so
//     sent = delivered + counter exactly.
package nft

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"

	"github.com/metald/metald/internal/network"
)

// Names of metald's shared objects.
const (
	// TableName is the bridge table (`table bridge metald`) and the stem
	// of the shard tables' names (ShardName).
	TableName = "metald"
	// ChainInput is the bridge table's chain that clears VLAN marks.
	ChainInput = "input"
	// PrivOwnedSet holds every learned temporary address of every port of
	// a shard (with the same timeout as the port's own set): an address in
	// it but not in a port's <dev>-temp set is held by another port.
	PrivOwnedSet = "priv_owned"
	// BasePriority is the priority of the bridge table's input chain.
	BasePriority = -300
	// NICPriority is the priority of the NICs' ingress and egress chains:
	// before anything at a default priority.
	NICPriority = -500
	limitBurst  = 5
)

// Helper chain suffixes, per direction. Rules use priv and learn (privacy
// learning) and ra (several admitted router MACs); the others held checks
// of earlier layouts (the controls, the header chain, source guard, NA
// targets, ND format, ICMPv6, hop-by-hop, RA) that now sit in the hooked
// chains. They stay listed so that updates and removals
// delete them where an earlier version left them (they refer to the NIC's
// counters, which could not be deleted while they exist).
var (
	fromParts = []string{"ip6", "hdr", "src", "hbh", "icmp", "na", "nd", "priv", "learn"}
	toParts   = []string{"ip6", "hdr", "hbh", "icmp", "ra"}
)

// ICMPv6 types used below.
const (
	icmpMLDQuery   = 130
	icmpMLDReport  = 131
	icmpMLDDone    = 132
	icmpRS         = 133
	icmpRA         = 134
	icmpNS         = 135
	icmpNA         = 136
	icmpRedirect   = 137
	icmpMLD2Report = 143
	udpDHCPServer  = 547
	protoICMPv6    = unix.IPPROTO_ICMPV6
	protoUDP       = unix.IPPROTO_UDP
	protoTCP       = unix.IPPROTO_TCP
	nhHopByHop     = 0
	nhRouting      = 43
	nhFragment     = 44
	nhDestOpts     = 60
)

// anonSet is a constant set a rule looks up. Rules share one named set
// per content (SharedSetName), created the first time a rule needs it: a
// set per rule would make every NIC add about ten sets, and the kernel
// walks the table's whole set list for each set it adds and each lookup
// by name it resolves, so per-NIC sets make programming a NIC cost more
// the more NICs there are.
type anonSet struct {
	name    string
	keyType nftables.SetDatatype
	elems   [][]byte
	lookup  *expr.Lookup
}

// icmpv6Names are nft's names of the ICMPv6 types the rules list.
var icmpv6Names = map[byte]string{
	icmpMLDQuery: "mld-listener-query", icmpMLDReport: "mld-listener-report", icmpMLDDone: "mld-listener-done",
	icmpRS: "nd-router-solicit", icmpRA: "nd-router-advert", icmpNS: "nd-neighbor-solicit",
	icmpNA: "nd-neighbor-advert", icmpRedirect: "nd-redirect", icmpMLD2Report: "mld2-listener-report",
}

// SharedSetName is the name of the constant set holding elems of type kt:
// for ICMPv6 types "icmpv6_" and nft's type names (so listings read
// `icmpv6 type @icmpv6_nd-router-advert_nd-redirect`), otherwise "k<type>_"
// and the elements in hex, or a digest of them when long.
func SharedSetName(kt nftables.SetDatatype, elems [][]byte) string {
	if kt.Name == nftables.TypeICMP6Type.Name {
		var names []string
		for _, e := range elems {
			n, ok := icmpv6Names[e[0]]
			if !ok || len(e) != 1 {
				names = nil
				break
			}
			names = append(names, n)
		}
		if names != nil {
			return "icmpv6_" + strings.Join(names, "_")
		}
	}
	parts := make([]string, len(elems))
	for i, e := range elems {
		parts[i] = hex.EncodeToString(e)
	}
	name := fmt.Sprintf("k%d_%s", kt.GetNFTMagic(), strings.Join(parts, "_"))
	if len(name) > 128 {
		sum := sha256.Sum256([]byte(name))
		name = fmt.Sprintf("k%d_h%x", kt.GetNFTMagic(), sum[:12])
	}
	return name
}

// rule is one rule of a NIC's chains, before it is bound to a connection.
type rule struct {
	chain   string
	exprs   []expr.Any
	comment string
	anons   []anonSet
}

// nicSpec is everything one NIC owns in the table.
type nicSpec struct {
	plan   network.NICPlan
	names  network.Names
	chains []string
	sets   []setSpec
	rules  []rule
}

type setSpec struct {
	name    string
	keyType nftables.SetDatatype
	elems   [][]byte
	// dynamic sets are filled from the packet path (with timeouts) and
	// never flushed or compared by metald.
	dynamic bool
	timeout time.Duration
	// size bounds a dynamic set (0: unbounded); the packet path adds
	// nothing to a full set.
	size uint32
}

// MaxTempAddrs is how many temporary addresses a port binds at once
// (privacy extensions; Linux's default max_addresses is 16 per interface,
// every address counted). A guest that DADs for more (a flood of targets)
// binds no more until one expires: it cannot grow the kernel's sets, nor
// the security policy that follows them, without bound.
const MaxTempAddrs = 16

// chainsOf lists every chain a NIC may own, in a fixed order. Only those
// with rules exist (usedChains): every chain of the namespace costs every
// nf_tables commit a step, and a NIC with few controls needs few chains.
func chainsOf(n network.Names) []string {
	out := []string{n.FromChain()}
	for _, p := range fromParts {
		out = append(out, n.FromSub(p))
	}
	out = append(out, n.ToChain())
	for _, p := range toParts {
		out = append(out, n.ToSub(p))
	}
	return out
}

// usedChains lists, in chainsOf's order, the chains rules are added to or
// jump to, and always the two hooked chains.
func usedChains(n network.Names, rules []rule) []string {
	used := map[string]bool{n.FromChain(): true, n.ToChain(): true}
	for _, r := range rules {
		used[r.chain] = true
		for _, e := range r.exprs {
			if v, ok := e.(*expr.Verdict); ok && v.Chain != "" {
				used[v.Chain] = true
			}
		}
	}
	var out []string
	for _, c := range chainsOf(n) {
		if used[c] {
			out = append(out, c)
		}
	}
	return out
}

func setsOf(n network.Names) []string {
	return []string{n.AddrSet(), n.RASourceSet(), n.TempSet()}
}

func countersOf(n network.Names) []string {
	out := make([]string, 0, len(network.AllControls))
	for _, c := range network.AllControls {
		out = append(out, n.Counter(c))
	}
	return out
}

// builder accumulates the rules of one NIC.
type builder struct {
	plan  network.NICPlan
	names network.Names
	rules []rule
	anon  map[*expr.Lookup]anonSet
	// logGroup, when not 0, is the NFLOG group a sample of each counted
	// drop is logged to (see logRate).
	logGroup uint16
}

// logRate bounds, per rule and in the kernel, how many dropped packets are
// logged, so a flood cannot drown the event reader. Exact counts come from
// the named counters, never from the log. A NIC under enhanced monitoring
// (NICPlan.Monitor) logs every drop up to the safety cap monitorLogRate.
const (
	logRate         = 10
	logBurst        = 20
	monitorLogRate  = 1000
	monitorLogBurst = 100
)

// LogPrefix is the NFLOG prefix of a drop: "metald:<host device>:<control>"
// (the contract internal/secevent parses).
func LogPrefix(dev, control string) string { return "metald:" + dev + ":" + control }

func (b *builder) add(chain string, control string, parts ...[]expr.Any) {
	r := rule{chain: chain}
	for _, p := range parts {
		r.exprs = append(r.exprs, p...)
	}
	if b.logGroup != 0 {
		b.addLog(chain, control, r.exprs)
	}
	r.comment = fmt.Sprintf("vm=%s nic=%s control=%s", b.plan.VMID, b.plan.NICID, control)
	// collect the anonymous sets this rule's lookups refer to
	for _, e := range r.exprs {
		if l, ok := e.(*expr.Lookup); ok {
			if a, ok := b.anon[l]; ok {
				r.anons = append(r.anons, a)
			}
		}
	}
	b.rules = append(b.rules, r)
}

// addLog queues, before a counted drop, a rule with the same match that
// logs a rate-limited sample of the dropped packets to the NFLOG group and
// falls through to the drop. Rules that do not end in a counted drop are
// not logged.
func (b *builder) addLog(chain, control string, exprs []expr.Any) {
	n := len(exprs)
	if n < 2 {
		return
	}
	if v, ok := exprs[n-1].(*expr.Verdict); !ok || v.Kind != expr.VerdictDrop {
		return
	}
	ref, ok := exprs[n-2].(*expr.Objref)
	if !ok || ref.Type != unix.NFT_OBJECT_COUNTER {
		return
	}
	r := rule{chain: chain, comment: fmt.Sprintf("vm=%s nic=%s control=%s log", b.plan.VMID, b.plan.NICID, control)}
	for _, e := range exprs[:n-2] {
		// The copy gets its own lookup (its set id is patched per rule).
		if l, ok := e.(*expr.Lookup); ok {
			if a, ok := b.anon[l]; ok {
				lc := *l
				ac := a
				ac.lookup = &lc
				b.anon[&lc] = ac
				r.anons = append(r.anons, ac)
				e = &lc
			}
		}
		r.exprs = append(r.exprs, e)
	}
	rate, burst := uint64(logRate), uint32(logBurst)
	if b.plan.Monitor {
		rate, burst = monitorLogRate, monitorLogBurst
	}
	r.exprs = append(r.exprs,
		&expr.Limit{Type: expr.LimitTypePkts, Rate: rate, Unit: expr.LimitTimeSecond, Burst: burst},
		&expr.Log{Key: 1<<unix.NFTA_LOG_GROUP | 1<<unix.NFTA_LOG_PREFIX, Group: b.logGroup, Data: []byte(LogPrefix(b.plan.HostDevice, control))})
	b.rules = append(b.rules, r)
}

// ---- match helpers (each returns a list of expressions) ----

func ll(off, n uint32) expr.Any {
	return &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseLLHeader, Offset: off, Len: n}
}
func nh(off, n uint32) expr.Any {
	return &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n}
}
func th(off, n uint32) expr.Any {
	return &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: off, Len: n}
}
func eq(data []byte) expr.Any  { return &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: data} }
func neq(data []byte) expr.Any { return &expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: data} }

func u16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }

func etherSrc(mac net.HardwareAddr) []expr.Any { return []expr.Any{ll(6, 6), eq(mac)} }
func etherSrcNot(mac net.HardwareAddr) []expr.Any {
	return []expr.Any{ll(6, 6), neq(mac)}
}
func etherTypeIP6() []expr.Any { return []expr.Any{ll(12, 2), eq(u16(unix.ETH_P_IPV6))} }

// etherMulticastIP6 matches destination MACs 33:33:xx:xx:xx:xx.
func etherMulticastIP6() []expr.Any {
	return []expr.Any{
		ll(0, 6),
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 6,
			Mask: []byte{0xff, 0xff, 0, 0, 0, 0}, Xor: make([]byte, 6)},
		eq([]byte{0x33, 0x33, 0, 0, 0, 0}),
	}
}

func l4proto(p byte) []expr.Any {
	return []expr.Any{&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1}, eq([]byte{p})}
}

func inSet(load expr.Any, name string) []expr.Any {
	return []expr.Any{load, &expr.Lookup{SourceRegister: 1, SetName: name}}
}

// inAnon matches the loaded value against an anonymous constant set, or a
// plain comparison when there is one element.
func (b *builder) inAnon(load expr.Any, kt nftables.SetDatatype, elems ...[]byte) []expr.Any {
	if len(elems) == 1 {
		return []expr.Any{load, eq(elems[0])}
	}
	name := SharedSetName(kt, elems)
	l := &expr.Lookup{SourceRegister: 1, SetName: name}
	b.anon[l] = anonSet{name: name, keyType: kt, elems: elems, lookup: l}
	return []expr.Any{load, l}
}

// icmpType matches ICMPv6 with one of the given types (with the l4proto
// dependency nft itself would add, so listings read as `icmpv6 type ...`).
func (b *builder) icmpType(types ...byte) []expr.Any {
	var el [][]byte
	for _, t := range types {
		el = append(el, []byte{t})
	}
	return append(l4proto(protoICMPv6), b.inAnon(th(0, 1), nftables.TypeICMP6Type, el...)...)
}

func exthdrExists(t uint8) []expr.Any {
	return []expr.Any{
		&expr.Exthdr{DestRegister: 1, Type: t, Offset: 0, Len: 1, Op: expr.ExthdrOpIpv6, Flags: unix.NFT_EXTHDR_F_PRESENT},
		eq([]byte{1}),
	}
}

// nonFirstFragment matches a fragment header whose offset is not 0.
func nonFirstFragment() []expr.Any {
	return []expr.Any{
		&expr.Exthdr{DestRegister: 1, Type: nhFragment, Offset: 2, Len: 2, Op: expr.ExthdrOpIpv6},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 2, Mask: u16(0xfff8), Xor: u16(0)},
		neq(u16(0)),
	}
}

// upperLayerInline is the fast path's form of upperLayerReadable: a
// compare that runs inline in nf_tables (a range is a call). The load
// fails, and the rule with it, exactly when upperLayerReadable's does; a
// TCP segment with ports 0 and 0 misses the fast path and meets the full
// checks.
func upperLayerInline() []expr.Any {
	return []expr.Any{th(0, 4), neq(make([]byte, 4))}
}

// upperLayerReadable matches when the first 4 bytes of the upper-layer
// header are in the packet (and the packet is not a non-first fragment).
func upperLayerReadable() []expr.Any {
	return []expr.Any{th(0, 4), &expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: make([]byte, 4), ToData: []byte{0xff, 0xff, 0xff, 0xff}}}
}

// Network-header matchers carry the `meta protocol ip6` dependency so that
// nft lists them as ip6 fields (in the netdev family nft takes the network
// protocol from meta protocol, not from the link layer). They only run in
// chains entered after `ether type ip6` matched an untagged frame, whose
// skb->protocol is IPv6 too, so the dependency never changes a verdict.
func metaProtoIP6() []expr.Any {
	return []expr.Any{&expr.Meta{Key: expr.MetaKeyPROTOCOL, Register: 1}, eq(u16(unix.ETH_P_IPV6))}
}

func saddr(a netip.Addr) []expr.Any {
	s := a.As16()
	return append(metaProtoIP6(), nh(8, 16), eq(s[:]))
}

func saddrIn(set string) []expr.Any { return append(metaProtoIP6(), inSet(nh(8, 16), set)...) }

// saddrLinkLocal matches ip6 saddr fe80::/10.
func saddrLinkLocal() []expr.Any {
	mask := make([]byte, 16)
	mask[0], mask[1] = 0xff, 0xc0
	want := make([]byte, 16)
	want[0], want[1] = 0xfe, 0x80
	return append(metaProtoIP6(), nh(8, 16), &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 16, Mask: mask, Xor: make([]byte, 16)}, eq(want))
}
func hopLimit(v byte) []expr.Any { return []expr.Any{nh(7, 1), eq([]byte{v})} }

// saddrInline matches the IPv6 source a as four 4-byte loads and
// compares: nf_tables runs loads of 1, 2 or 4 aligned bytes of the
// network or transport header and compares of up to 16 bytes inline in
// its rule loop, while a 16-byte load is two calls (nft_payload_eval,
// skb_copy_bits). On the fast path every call counts (docs/PERFORMANCE.md,
// "Inline fast path").
func saddrInline(a netip.Addr) []expr.Any {
	s := a.As16()
	var out []expr.Any
	for i := uint32(0); i < 16; i += 4 {
		out = append(out, nh(8+i, 4), eq(s[i:i+4]))
	}
	return out
}

// l2Fast matches a frame to a unicast MAC other than the port's own
// (packet type "other host", which eth_type_trans sets from the
// destination MAC when the port receives the frame: a group MAC makes it
// multicast or broadcast) from mac with ethertype IPv6 and no VLAN tag (a
// tag shows as ethertype 0x8100): one meta load and one 8-byte link-layer
// load compared inline. Frames to the port's own MAC miss it and meet the
// full checks. The 16-byte link-layer load with a mask that it replaced
// cost a call more (docs/PERFORMANCE.md, "Inline fast path").
func l2Fast(mac net.HardwareAddr) []expr.Any {
	want := append(slices.Clone(mac), u16(unix.ETH_P_IPV6)...)
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyPKTTYPE, Register: 1}, eq([]byte{unix.PACKET_OTHERHOST}),
		ll(6, 8), eq(want),
	}
}

func nextHeader(v byte) []expr.Any   { return []expr.Any{nh(6, 1), eq([]byte{v})} }
func payloadLen(v uint16) []expr.Any { return []expr.Any{nh(4, 2), eq(u16(v))} }

func limitOver(rate uint32) []expr.Any {
	return []expr.Any{&expr.Limit{Type: expr.LimitTypePkts, Rate: uint64(rate), Over: true, Unit: expr.LimitTimeSecond, Burst: limitBurst}}
}

func counter(name string) []expr.Any {
	return []expr.Any{&expr.Objref{Type: unix.NFT_OBJECT_COUNTER, Name: name}}
}

func verdict(k expr.VerdictKind) []expr.Any { return []expr.Any{&expr.Verdict{Kind: k}} }
func jump(c string) []expr.Any              { return []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: c}} }
func goTo(c string) []expr.Any              { return []expr.Any{&expr.Verdict{Kind: expr.VerdictGoto, Chain: c}} }

var (
	accept = verdict(expr.VerdictAccept)
	drop   = verdict(expr.VerdictDrop)
	ret    = verdict(expr.VerdictReturn)
)

func m(e ...expr.Any) []expr.Any { return e }

// VLAN marks: a frame from a VM port carries meta mark vlanTag|VLAN
// (set at the port's ingress) through the bridge to the egress of the
// port it leaves by; the mark is cleared (input chain) before a frame
// enters the host's own stack so it never meets the host's policy routing.
//
// Bit srcOK of the mark says that the from-VM chain found the frame's
// header chain readable and its source bound to the port (see buildNIC);
// bit fastTCP (with srcOK) that its fast path passed it: unicast TCP
// with no extension header. The VLAN comparison leaves both out.
const (
	vlanTag  = 0x6d6c0000 // "ml"
	vlanMask = 0xffff0000
	srcOK    = 0x8000 // above the 12 bits of a VLAN id
	fastTCP  = 0x4000
)

func native32(v uint32) []byte { return binaryutil.NativeEndian.PutUint32(v) }

func setMark(v uint32) []expr.Any {
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: native32(v)},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
	}
}

// markTagged matches frames carrying a VLAN mark.
func markTagged() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: native32(vlanMask), Xor: native32(0)},
		eq(native32(vlanTag)),
	}
}

// markNot matches a mark other than v (a mark is always there to load).
func markNot(v uint32) []expr.Any {
	return []expr.Any{&expr.Meta{Key: expr.MetaKeyMARK, Register: 1}, neq(native32(v))}
}

// markIs matches the mark v.
func markIs(v uint32) []expr.Any {
	return []expr.Any{&expr.Meta{Key: expr.MetaKeyMARK, Register: 1}, eq(native32(v))}
}

// markVLANNot matches a mark whose VLAN part (srcOK and fastTCP left out)
// is not v's.
func markVLANNot(v uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: native32(^uint32(srcOK | fastTCP)), Xor: native32(0)},
		neq(native32(v)),
	}
}

// buildNIC derives every object of one NIC from its plan (pure).
func buildNIC(p network.NICPlan, logGroup uint16) nicSpec {
	n := network.NamesFor(p.HostDevice)
	c := p.Controls
	b := &builder{plan: p, names: n, anon: map[*expr.Lookup]anonSet{}, logGroup: logGroup}
	cnt := func(ctl network.Control) []expr.Any { return counter(n.Counter(ctl)) }
	mac := p.MAC

	// Every nf_tables commit walks every chain of the namespace, so a NIC
	// has one chain per direction, its hooked chain (two more with privacy
	// learning, one with several admitted routers). Allowlists that would
	// need a sub-chain returning on a positive match sit at the end of the
	// chain instead, where their positive match can accept: every check
	// that must also apply to an allowed packet runs before them.

	// ---- from the VM ----
	out := n.FromChain()
	vlanMark := vlanTag | uint32(p.VLAN)
	// Untagged IPv6 from the VM's MAC whose header chain reaches the
	// upper-layer header (RFC 7112), or a non-first fragment, and (source
	// guard) whose source is bound to the port, goes on; positive matches
	// only, so a header that cannot be parsed is dropped. Going on means
	// the frame gets the srcOK bit in its mark, and the drops that follow
	// take every frame without it.
	l2 := etherSrc(mac)
	readable, nonFirst := m(etherTypeIP6()...), m(etherTypeIP6()...)
	readable = append(readable, upperLayerReadable()...)
	nonFirst = append(nonFirst, nonFirstFragment()...)
	// srcs: the source checks (none without source guard); fastSrcs: the
	// same for the fast path, one inline compare per bound address.
	srcs, fastSrcs := [][]expr.Any{nil}, [][]expr.Any{nil}
	if c.SourceGuard {
		srcs, fastSrcs = [][]expr.Any{saddrIn(n.AddrSet())}, nil
		for _, a := range p.BoundAddresses() {
			fastSrcs = append(fastSrcs, saddrInline(a))
		}
		if c.PrivacyExtensions {
			srcs = append(srcs, saddrIn(n.TempSet()))
			fastSrcs = append(fastSrcs, inSet(nh(8, 16), n.TempSet()))
		}
	}
	goOn := setMark(vlanMark | srcOK)
	// Fast path for the bulk of traffic: when the IPv6 header's next
	// header is TCP there is no extension header, no ICMPv6 and no UDP,
	// and a unicast destination keeps it out of the multicast limit, so
	// every later check would let it pass. It comes first, before the
	// VLAN mark, and sets its own mark: fastTCP tells the to-VM chain of
	// the port the frame leaves by that this chain found it untagged IPv6
	// whose upper-layer header is a readable TCP header, so that chain
	// accepts it with one comparison. Each bound address gets its own rule
	// (compared in 4-byte pieces, which nf_tables loads and compares
	// inline; a set lookup is a call and a hash), the upper-layer check is
	// an inline compare too, and the matches do without the `meta
	// protocol` dependency (the 8-byte link-layer match has the
	// ethertype): a bulk transfer meets this rule some 30,000 times a
	// second per direction, and on this path each call counts
	// (docs/PERFORMANCE.md, "The TCP fast path of 2026-11-28" and "Inline
	// fast path").
	for _, src := range fastSrcs {
		b.add(out, "fast_path", l2Fast(mac), nextHeader(protoTCP), upperLayerInline(), src, setMark(vlanMark|srcOK|fastTCP), accept)
	}
	b.add(out, string(network.CtlVLAN), setMark(vlanMark))
	for _, src := range srcs {
		b.add(out, "l2", l2, readable, src, goOn)
		b.add(out, "l2", l2, nonFirst, src, goOn)
	}
	notOK := markNot(vlanMark | srcOK)
	if c.SourceGuard {
		sg := string(network.CtlSourceGuard)
		// DAD and MLD reports of a starting interface come from ::.
		b.add(out, sg, l2, readable, saddr(netip.IPv6Unspecified()), b.icmpType(icmpNS, icmpMLDReport, icmpMLD2Report), goOn)
		b.add(out, sg, l2, readable, notOK, cnt(network.CtlSourceGuard), drop)
		b.add(out, sg, l2, nonFirst, notOK, cnt(network.CtlSourceGuard), drop)
	}
	b.add(out, string(network.CtlHeaderChain), l2, etherTypeIP6(), notOK, cnt(network.CtlHeaderChain), drop)
	b.add(out, string(network.CtlMACSpoof), etherSrcNot(mac), cnt(network.CtlMACSpoof), drop)
	b.add(out, string(network.CtlL2Violation), notOK, cnt(network.CtlL2Violation), drop)

	// Only frames with srcOK get here.
	if c.RAGuard {
		ctl := string(network.CtlRAGuard)
		b.add(out, ctl, l4proto(protoUDP), m(th(0, 2), eq(u16(udpDHCPServer))), cnt(network.CtlRAGuard), drop)
		b.add(out, ctl, b.icmpType(icmpRA, icmpRedirect), cnt(network.CtlRAGuard), drop)
		b.add(out, ctl, exthdrExists(nhFragment), b.icmpType(icmpRS, icmpRA, icmpNS, icmpNA, icmpRedirect), cnt(network.CtlRAGuard), drop)
	}
	extBlocks(b, out, c)
	if c.NDRateLimit > 0 {
		b.add(out, string(network.CtlNDRate), b.icmpType(icmpNS, icmpNA), limitOver(c.NDRateLimit), cnt(network.CtlNDRate), drop)
	}
	if c.ICMPv6RateLimit > 0 {
		b.add(out, string(network.CtlICMPv6Rate), l4proto(protoICMPv6), limitOver(c.ICMPv6RateLimit), cnt(network.CtlICMPv6Rate), drop)
	}
	if c.MulticastRateLimit > 0 {
		b.add(out, string(network.CtlMulticastRate), etherMulticastIP6(), limitOver(c.MulticastRateLimit), cnt(network.CtlMulticastRate), drop)
	}
	if c.PrivacyExtensions {
		privacyLearning(b, out, c)
	}
	// The allowlists: hop-by-hop (MLD) and neighbour discovery. Their
	// message types do not overlap, so each accepts what it allows.
	hopByHop(b, out, c, []byte{icmpMLDReport, icmpMLDDone, icmpMLD2Report}, nil, nil)
	ndAllowlist(b, out, c)
	b.add(out, "allow", accept)

	// ---- toward the VM ----
	// One chain: every check carries the IPv6 match itself, and what
	// accepts also carries the header-chain match (RFC 7112), so only a
	// readable header chain or a non-first fragment is accepted and the
	// rest of IPv6 meets the header_chain drop at the end.
	in := n.ToChain()
	v6 := etherTypeIP6()
	// A frame the from-VM fast path of a port in the same VLAN group
	// passed (its mark is exactly that) is TCP with a readable header and
	// no extension header: no later rule would stop it.
	b.add(in, "fast_path", markIs(vlanMark|srcOK|fastTCP), accept)
	b.add(in, string(network.CtlVLAN), markTagged(), markVLANNot(vlanMark), cnt(network.CtlVLAN), drop)
	// Fast path toward the VM for frames from elsewhere (the host, an
	// uplink), as above: TCP with no extension header meets no later rule.
	b.add(in, "fast_path", readable, nextHeader(protoTCP), accept)
	if c.RAGuard {
		b.add(in, string(network.CtlRAGuard), v6, exthdrExists(nhFragment),
			b.icmpType(icmpRS, icmpRA, icmpNS, icmpNA, icmpRedirect), cnt(network.CtlRAGuard), drop)
	}
	extBlocks(b, in, c, v6...)
	hopByHop(b, in, c, []byte{icmpMLDQuery, icmpMLDReport, icmpMLDDone, icmpMLD2Report}, readable, v6)
	raAllowlist(b, in, c, readable)
	b.add(in, "l2", readable, accept)
	b.add(in, "l2", nonFirst, accept)
	b.add(in, string(network.CtlHeaderChain), v6, cnt(network.CtlHeaderChain), drop)
	b.add(in, "allow", accept)

	spec := nicSpec{plan: p, names: n, chains: usedChains(n, b.rules), rules: b.rules}
	var addrs, raSrc [][]byte
	for _, a := range p.BoundAddresses() {
		s := a.As16()
		addrs = append(addrs, s[:])
	}
	for _, a := range c.AllowedRASources {
		s := a.As16()
		raSrc = append(raSrc, s[:])
	}
	spec.sets = []setSpec{
		{name: n.AddrSet(), keyType: nftables.TypeIP6Addr, elems: addrs},
		{name: n.RASourceSet(), keyType: nftables.TypeIP6Addr, elems: raSrc},
		{name: n.TempSet(), keyType: nftables.TypeIP6Addr, dynamic: true, size: MaxTempAddrs},
	}
	return spec
}

// ndAllowlist ends chain with the neighbour discovery checks (source
// guard: an NA's target is one of the NIC's addresses; strict source
// validation: RS, NS and NA carry no extension header and either no option
// or exactly one 8-byte option, the link-layer address option with the
// VM's MAC or, for NS, a DAD nonce). What passes is accepted: chain has
// nothing after it but its final accept.
func ndAllowlist(b *builder, chain string, c network.Controls) {
	if !c.SourceGuard && !c.StrictSourceValidation {
		return
	}
	n := b.names
	mac := b.plan.MAC
	sg, strict := string(network.CtlSourceGuard), string(network.CtlNDStrict)
	lla := func(typ byte, at uint32) []expr.Any {
		return m(th(at, 2), eq([]byte{typ, 1}), th(at+2, 6), eq(mac))
	}
	plain := func(typ byte) []expr.Any { return append(nextHeader(protoICMPv6), b.icmpType(typ)...) }
	// NA: the target (one rule per bound address rather than a set
	// lookup: nft 1.0.6 has no `icmpv6 taddr` and cannot parse a raw
	// payload against an ipv6_addr set, which would make listings
	// unloadable with nft -f), then the format.
	var targets [][]expr.Any
	if c.SourceGuard {
		for _, a := range b.plan.BoundAddresses() {
			a16 := a.As16()
			targets = append(targets, m(th(8, 16), eq(a16[:])))
		}
		if c.PrivacyExtensions {
			targets = append(targets, inSet(th(8, 16), n.TempSet()))
		}
	} else {
		targets = [][]expr.Any{nil}
	}
	for _, tg := range targets {
		ctl := sg
		if c.StrictSourceValidation {
			ctl = strict
			b.add(chain, ctl, plain(icmpNA), payloadLen(24), tg, accept)
			b.add(chain, ctl, plain(icmpNA), payloadLen(32), lla(2, 24), tg, accept)
			if c.SourceGuard {
				b.add(chain, ctl, b.icmpType(icmpNA), tg, cnt(n, network.CtlNDStrict), drop)
			}
			continue
		}
		b.add(chain, ctl, b.icmpType(icmpNA), tg, accept)
	}
	if c.SourceGuard {
		b.add(chain, sg, b.icmpType(icmpNA), cnt(n, network.CtlSourceGuard), drop)
	}
	if c.StrictSourceValidation {
		b.add(chain, strict, plain(icmpRS), payloadLen(8), accept)
		b.add(chain, strict, plain(icmpRS), payloadLen(16), lla(1, 8), accept)
		b.add(chain, strict, plain(icmpNS), payloadLen(24), accept)
		b.add(chain, strict, plain(icmpNS), payloadLen(32), lla(1, 24), accept)
		b.add(chain, strict, plain(icmpNS), payloadLen(32), m(th(24, 2), eq([]byte{14, 1})), accept)
		b.add(chain, strict, b.icmpType(icmpRS, icmpNS, icmpNA), cnt(n, network.CtlNDStrict), drop)
	}
}

// raAllowlist ends the to-VM chain with RA guard and the RA rate limit:
// RAs and redirects pass only from the allowed sources (and, when given,
// their MACs), RAs at most ra_rate_limit per second. An RA that passes is
// accepted (its rule starts with ok): the extension header checks ran
// before.
func raAllowlist(b *builder, chain string, c network.Controls, ok []expr.Any) {
	n := b.names
	rate := func(from ...[]expr.Any) {
		if c.RARateLimit > 0 {
			b.add(chain, string(network.CtlRARate), b.icmpType(icmpRA), m(slices.Concat(from...)...), limitOver(c.RARateLimit), cnt(n, network.CtlRARate), drop)
		}
	}
	if !c.RAGuard {
		rate()
		return
	}
	ctl := string(network.CtlRAGuard)
	var from [][]expr.Any
	switch len(c.AllowedRAMACs) {
	case 0:
		from = [][]expr.Any{saddrIn(n.RASourceSet())}
	case 1:
		// One rule per allowed MAC rather than an ether_addr set: in the
		// netdev family nft 1.0.6 lists a link-layer load as raw
		// (`@ll,48,48`) and cannot load a raw load against a typed set,
		// which would make listings unloadable with nft -f.
		from = [][]expr.Any{m(slices.Concat(saddrIn(n.RASourceSet()), etherSrc(c.AllowedRAMACs[0]))...)}
	default:
		// Several routers share one rate limit: a helper chain holds it.
		ra := n.ToSub("ra")
		for _, mac := range c.AllowedRAMACs {
			b.add(chain, ctl, ok, b.icmpType(icmpRA, icmpRedirect), saddrIn(n.RASourceSet()), etherSrc(mac), goTo(ra))
		}
		b.add(chain, ctl, b.icmpType(icmpRA, icmpRedirect), cnt(n, network.CtlRAGuard), drop)
		if c.RARateLimit > 0 {
			b.add(ra, string(network.CtlRARate), b.icmpType(icmpRA), limitOver(c.RARateLimit), cnt(n, network.CtlRARate), drop)
		}
		b.add(ra, ctl, accept)
		return
	}
	for _, f := range from {
		rate(f)
		b.add(chain, ctl, ok, b.icmpType(icmpRA, icmpRedirect), f, accept)
	}
	b.add(chain, ctl, b.icmpType(icmpRA, icmpRedirect), cnt(n, network.CtlRAGuard), drop)
}

func cnt(n network.Names, ctl network.Control) []expr.Any { return counter(n.Counter(ctl)) }

// privacyLearning binds temporary addresses first come first served
// (RFC 6620) from the packet path. A DAD NS (source ::, which the ND rules
// before this point have already checked) whose target lies in one of the
// NIC's /64s and is neither a bound address nor held by another port adds
// the target to the port's <dev>-temp set and to priv_owned, both with the
// NIC's lifetime. Elements are added, never refreshed: a binding lasts one
// lifetime from the first DAD, like the address it protects.
func privacyLearning(b *builder, ip6 string, c network.Controls) {
	n := b.names
	priv, learn := n.FromSub("priv"), n.FromSub("learn")
	ctl := "privacy"
	life := c.TempValidLifetime
	if life == 0 {
		life = network.DefaultTempValidLifetime
	}
	b.add(ip6, ctl, saddr(netip.IPv6Unspecified()), b.icmpType(icmpNS), jump(priv))
	for _, p := range b.plan.PrivacyPrefixes() {
		a := p.Addr().As16()
		b.add(priv, ctl, m(th(8, 8), eq(a[:8])), goTo(learn))
	}
	target := th(8, 16)
	if gw := b.plan.Gateway; gw.IsValid() && !gw.IsLinkLocalUnicast() {
		// The router's address is never a temporary address of a VM: a
		// DAD for it is a claim on the gateway (a man in the middle for
		// every neighbour), dropped and counted.
		a := gw.As16()
		b.add(learn, "source_guard", m(target, eq(a[:])), cnt(n, network.CtlSourceGuard), drop)
	}
	b.add(learn, ctl, inSet(target, n.AddrSet()), ret)
	b.add(learn, ctl, inSet(th(8, 16), n.TempSet()), ret)
	b.add(learn, ctl, inSet(th(8, 16), PrivOwnedSet), ret)
	bind := m(th(8, 16),
		&expr.Dynset{SrcRegKey: 1, SetName: n.TempSet(), Operation: unix.NFT_DYNSET_OP_ADD, Timeout: life},
		&expr.Dynset{SrcRegKey: 1, SetName: PrivOwnedSet, Operation: unix.NFT_DYNSET_OP_ADD, Timeout: life})
	if b.logGroup != 0 {
		// Tell metald at once (NFLOG, control "learned"): the security
		// policy judges connections to the new address as to the VM's
		// others (internal/daemon reads the set again). A missed sample is
		// caught by metald's periodic read of the set.
		bind = append(bind,
			&expr.Limit{Type: expr.LimitTypePkts, Rate: learnLogRate, Unit: expr.LimitTimeSecond, Burst: learnLogBurst},
			&expr.Log{Key: 1<<unix.NFTA_LOG_GROUP | 1<<unix.NFTA_LOG_PREFIX, Group: b.logGroup, Data: []byte(LogPrefix(b.plan.HostDevice, ControlLearned))})
	}
	b.add(learn, ctl, bind)
}

// ControlLearned is the log control of a temporary address bound by the
// packet path (privacyLearning): not a drop, a notice to metald.
const ControlLearned = "learned"

// learnLogRate and learnLogBurst bound the learned notices per port (ND
// rate limits already bound the DADs that reach the rule).
const (
	learnLogRate  = 20
	learnLogBurst = 20
)

// extBlocks adds the routing, fragment and destination options header
// blocks to chain, each rule starting with the expressions of v6.
func extBlocks(b *builder, chain string, c network.Controls, v6 ...expr.Any) {
	n := b.names
	if c.BlockRouting {
		b.add(chain, string(network.CtlExtRouting), v6, exthdrExists(nhRouting), cnt(n, network.CtlExtRouting), drop)
	}
	if c.BlockFragment {
		b.add(chain, string(network.CtlExtFragment), v6, exthdrExists(nhFragment), cnt(n, network.CtlExtFragment), drop)
	}
	if c.BlockDestOpts {
		b.add(chain, string(network.CtlExtDestOpts), v6, exthdrExists(nhDestOpts), cnt(n, network.CtlExtDestOpts), drop)
	}
}

// hopByHop adds the hop-by-hop block to chain, after every check an
// allowed packet must also pass: MLD messages of the given types from
// link-local or :: with hop limit 1 carry a Router Alert option and are
// accepted when MLD snooping is on (their rules start with ok); every
// other packet with the header is dropped (its rule starts with v6).
func hopByHop(b *builder, chain string, c network.Controls, mld []byte, ok, v6 []expr.Any) {
	if !c.BlockHopByHop {
		return
	}
	if c.MLDSnooping {
		b.add(chain, "mld", ok, exthdrExists(nhHopByHop), saddrLinkLocal(), hopLimit(1), b.icmpType(mld...), accept)
		b.add(chain, "mld", ok, exthdrExists(nhHopByHop), saddr(netip.IPv6Unspecified()), hopLimit(1), b.icmpType(mld...), accept)
	}
	b.add(chain, string(network.CtlExtHopByHop), v6, exthdrExists(nhHopByHop), cnt(b.names, network.CtlExtHopByHop), drop)
}

func commentData(s string) []byte { return userdata.AppendString(nil, userdata.TypeComment, s) }
