package secpolicy

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"

	"github.com/metald/metald/internal/policy"
)

// anonSet is an anonymous constant set a rule looks up; it is queued right
// before its rule and the lookup is patched with its id.
type anonSet struct {
	keyType  nftables.SetDatatype
	interval bool
	elems    []nftables.SetElement
	lookup   *expr.Lookup
}

// nrule is one rule before it is bound to a connection.
type nrule struct {
	exprs   []expr.Any
	comment string
	anons   []*anonSet
}

// chainSpec is the complete content of one NIC chain.
type chainSpec struct {
	name  string
	rules []nrule
}

// builder accumulates rules of one chain.
type builder struct {
	rules []nrule
	cur   []*anonSet
}

func (b *builder) add(comment string, parts ...[]expr.Any) {
	r := nrule{comment: comment, anons: b.cur}
	for _, p := range parts {
		r.exprs = append(r.exprs, p...)
	}
	b.rules = append(b.rules, r)
	b.cur = nil
}

// ---- expression helpers ----

func nh(off, n uint32) expr.Any {
	return &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n}
}
func th(off, n uint32) expr.Any {
	return &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: off, Len: n}
}
func eq(data []byte) expr.Any { return &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: data} }

func u16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }

const (
	offSaddr = 8
	offDaddr = 24
)

func l4proto(p byte) []expr.Any {
	return []expr.Any{&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1}, eq([]byte{p})}
}

func inNamed(off uint32, set string, invert bool) []expr.Any {
	return []expr.Any{nh(off, 16), &expr.Lookup{SourceRegister: 1, SetName: set, Invert: invert}}
}

func verdict(k expr.VerdictKind) expr.Any { return &expr.Verdict{Kind: k} }

func ctState(bits uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binary.NativeEndian.AppendUint32(nil, bits), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
	}
}

// anonLookup loads with load and looks the value up in a new anonymous set.
func (b *builder) anonLookup(load expr.Any, a *anonSet, invert bool) []expr.Any {
	l := &expr.Lookup{SourceRegister: 1, Invert: invert}
	a.lookup = l
	b.cur = append(b.cur, a)
	return []expr.Any{load, l}
}

func (b *builder) icmpTypes(types []uint8) []expr.Any {
	out := l4proto(unix.IPPROTO_ICMPV6)
	if len(types) == 1 {
		return append(out, th(0, 1), eq([]byte{types[0]}))
	}
	a := &anonSet{keyType: nftables.TypeICMP6Type}
	for _, t := range dedupe(types) {
		a.elems = append(a.elems, nftables.SetElement{Key: []byte{t}})
	}
	return append(out, b.anonLookup(th(0, 1), a, false)...)
}

func dedupe[T ~uint8](in []T) []T {
	out := slices.Clone(in)
	slices.Sort(out)
	return slices.Compact(out)
}

// endpoint matches an address field against a rule endpoint.
func (b *builder) endpoint(off uint32, e policy.Endpoint) []expr.Any {
	switch e.Kind {
	case policy.EndpointAny:
		return nil
	case policy.EndpointGroup:
		return inNamed(off, groupSet(e.Group), false)
	}
	return prefixMatch(off, e.Prefix)
}

func prefixMatch(off uint32, p netip.Prefix) []expr.Any {
	p = p.Masked()
	a := p.Addr().As16()
	switch p.Bits() {
	case 0:
		return nil
	case 128:
		return []expr.Any{nh(off, 16), eq(a[:])}
	}
	mask := make([]byte, 16)
	for i := 0; i < p.Bits(); i++ {
		mask[i/8] |= 0x80 >> (i % 8)
	}
	// Compare only the bytes the prefix covers, as nft does.
	n := uint32((p.Bits() + 7) / 8)
	if p.Bits()%8 == 0 {
		return []expr.Any{nh(off, n), eq(a[:n])}
	}
	return []expr.Any{nh(off, n),
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: n, Mask: mask[:n], Xor: make([]byte, n)},
		eq(a[:n])}
}

func addrPrefixes(addrs []netip.Addr) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(addrs))
	for _, a := range addrs {
		out = append(out, netip.PrefixFrom(a, 128))
	}
	return out
}

func logExpr(prefix string) expr.Any {
	return &expr.Log{Key: 1<<unix.NFTA_LOG_PREFIX | 1<<unix.NFTA_LOG_LEVEL, Level: expr.LogLevelWarning, Data: []byte(prefix)}
}

// logLimit is the per-rule kernel log rate.
func logLimit() expr.Any {
	return &expr.Limit{Type: expr.LimitTypePkts, Rate: 10, Unit: expr.LimitTimeSecond, Burst: 5}
}

func commentData(s string) []byte { return userdata.AppendString(nil, userdata.TypeComment, s) }

// Comments of NIC chain rules. Counters are read back by these.
const (
	ctlIsolated   = "isolated"
	ctlAllowedDst = "allowed-destinations"
	ctlStrict     = "tenant-strict"
	ctlModerate   = "tenant-moderate"
	ctlMicroseg   = "microsegmentation"
	ctlDefault    = "default"
)

// alternatives returns the match expressions of a policy rule as a list of
// alternatives (one rule each): port lists and ICMPv6 type lists are
// expanded instead of being anonymous sets, because creating an anonymous
// set costs the kernel a walk over every set of the table, which made an
// update at 1000 VMs slow.
func alternatives(r policy.Rule) [][]expr.Any {
	var base []expr.Any
	if r.Proto != policy.ProtoAll {
		base = append(base, l4proto(byte(r.Proto))...)
	} else if len(r.ICMPTypes) > 0 {
		base = append(base, l4proto(unix.IPPROTO_ICMPV6)...)
	}
	b := &builder{}
	base = append(base, b.endpoint(offSaddr, r.Src)...)
	base = append(base, b.endpoint(offDaddr, r.Dst)...)
	alts := [][]expr.Any{base}
	cross := func(parts [][]expr.Any) {
		if len(parts) == 0 {
			return
		}
		var out [][]expr.Any
		for _, a := range alts {
			for _, p := range parts {
				out = append(out, append(slices.Clone(a), p...))
			}
		}
		alts = out
	}
	var icmp [][]expr.Any
	for _, t := range dedupe(r.ICMPTypes) {
		icmp = append(icmp, []expr.Any{th(0, 1), eq([]byte{t})})
	}
	cross(icmp)
	cross(portAlts(0, r.SrcPorts))
	cross(portAlts(2, r.DstPorts))
	return alts
}

func portAlts(off uint32, ports []policy.PortRange) [][]expr.Any {
	var out [][]expr.Any
	for _, p := range ports {
		if p.Lo == p.Hi {
			out = append(out, []expr.Any{th(off, 2), eq(u16(p.Lo))})
		} else {
			out = append(out, []expr.Any{th(off, 2), &expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: u16(p.Lo), ToData: u16(p.Hi)}})
		}
	}
	return out
}

// Shared chains the NIC chains goto to log: they rate-limit (one budget per
// shard table) and log, then end the NIC chain's evaluation: log_deny drops,
// log_allow returns to the base chain (a goto'd chain returns to the
// caller of the chain that jumped).
const (
	chainLogDeny  = "log_deny"
	chainLogAllow = "log_allow"
)

func logChains() []chainSpec {
	return []chainSpec{
		{name: chainLogDeny, rules: []nrule{{comment: "log deny", exprs: []expr.Any{logLimit(), logExpr(LogPrefixDeny)}},
			{comment: "deny", exprs: []expr.Any{verdict(expr.VerdictDrop)}}}},
		{name: chainLogAllow, rules: []nrule{{comment: "log allow", exprs: []expr.Any{logLimit(), logExpr(LogPrefixAllow)}}}},
	}
}

// decide adds one counted verdict rule per alternative.
func (b *builder) decide(ctl string, allow, log bool, alts [][]expr.Any) {
	var v expr.Any
	switch {
	case allow && log:
		v = &expr.Verdict{Kind: expr.VerdictGoto, Chain: chainLogAllow}
	case allow:
		v = verdict(expr.VerdictReturn)
	case log:
		v = &expr.Verdict{Kind: expr.VerdictGoto, Chain: chainLogDeny}
	default:
		v = verdict(expr.VerdictDrop)
	}
	for _, a := range alts {
		b.add(ctl, a, []expr.Any{&expr.Counter{}, v})
	}
}

// nicChains are the chains of one direction of a NIC: main jumps to the
// helpers, so helpers are created first and deleted last.
type nicChains struct {
	main    chainSpec
	helpers []chainSpec
}

// peerCheck builds a helper chain that returns when the peer address is in
// one of sets or prefixes and drops (logging when log) otherwise.
func peerCheck(name, ctl string, peerOff uint32, sets []string, prefixes []netip.Prefix, log bool) chainSpec {
	b := &builder{}
	for _, s := range sets {
		b.add(ctl+" pass", inNamed(peerOff, s, false), []expr.Any{verdict(expr.VerdictReturn)})
	}
	for _, p := range prefixes {
		b.add(ctl+" pass", prefixMatch(peerOff, p), []expr.Any{verdict(expr.VerdictReturn)})
	}
	b.decide(ctl, false, log, [][]expr.Any{nil})
	return chainSpec{name: name, rules: b.rules}
}

// Strict tenant isolation across tenants. A rule's peer is the endpoint on
// the far side of the NIC (the source of an ingress rule, the destination of
// an egress rule). Under strict isolation a peer that is not a VM of the
// NIC's tenant, one of its gateways or in its allowed destinations (another
// tenant's VM, or any host beyond the gateway) passes only through an allow
// rule that names the peer explicitly: a prefix other than ::/0 or an sg:
// group. `any` covers the tenant's own peers only. Each side enforces its
// own level, so between two strict VMs of different tenants the sender's
// egress rule and the receiver's ingress rule must both name the other.

// namesPeer reports whether r names its peer explicitly.
func namesPeer(r policy.Rule, dir string) bool {
	e := r.Dst
	if dir == dirIn {
		e = r.Src
	}
	switch e.Kind {
	case policy.EndpointGroup:
		return true
	case policy.EndpointPrefix:
		return e.Prefix.IsValid() && e.Prefix.Bits() > 0
	}
	return false
}

// strictOutsider returns the match of a peer outside the tenant, the
// gateways and the allowed destinations (one rule: every condition
// negated); ok is false when no peer can be outside (an allowed destination
// of ::/0).
func strictOutsider(p *NICPolicy, peerOff uint32) ([]expr.Any, bool) {
	cond := inNamed(peerOff, tenantSet(p.Tenant), true)
	for _, pf := range append(addrPrefixes(p.Gateways), p.AllowedDestinations...) {
		m := prefixMatch(peerOff, pf)
		if len(m) == 0 {
			return nil, false
		}
		// prefixMatch ends in an equality compare: negate it.
		last := *m[len(m)-1].(*expr.Cmp)
		last.Op = expr.CmpOpNeq
		m[len(m)-1] = &last
		cond = append(cond, m...)
	}
	return cond, true
}

// strictChain is the chain an outside peer is decided by: the NIC's rules
// in order without the allow rules that do not name the peer, then drop.
func strictChain(p *NICPolicy, name, listName string, peerOff uint32, rules []policy.Rule, logAll bool) chainSpec {
	dir := dirOut
	if peerOff == offSaddr {
		dir = dirIn
	}
	b := &builder{}
	for i, r := range rules {
		allow := r.Action == policy.ActionAllow
		if allow && !namesPeer(r, dir) {
			continue
		}
		b.decide(fmt.Sprintf("%s[%d]: %s", listName, i, r.String()), allow, r.Log || (logAll && !allow), alternatives(r))
	}
	b.decide(ctlStrict, false, logAll, [][]expr.Any{nil})
	return chainSpec{name: name, rules: b.rules}
}

// buildChain builds the chains for one direction of p, with the security
// event log rules (eventlog.go).
func buildChain(p *NICPolicy, dir string, name string) nicChains {
	return withEventLogs(p, dir, buildPolicyChain(p, dir, name))
}

// buildPolicyChain builds the chains for one direction of p. peerOff is the
// offset of the remote address (daddr for egress, saddr for ingress).
func buildPolicyChain(p *NICPolicy, dir string, name string) nicChains {
	b := &builder{}
	var out nicChains
	peerOff := uint32(offDaddr)
	rules, mgmt, def := p.Egress, p.ManagementEgress, defaultAction(p.Egress, p.EgressDefault)
	listName := "egress"
	if dir == dirIn {
		peerOff = offSaddr
		rules, mgmt, def = p.Ingress, p.ManagementIngress, defaultAction(p.Ingress, p.IngressDefault)
		listName = "ingress"
	}
	logAll := p.LogSecurityEvents
	one := [][]expr.Any{nil}
	jump := func(h chainSpec) {
		out.helpers = append(out.helpers, h)
		b.add("check "+h.name, []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: h.name}})
	}

	if p.Isolated {
		for i, r := range mgmt {
			b.decide(fmt.Sprintf("management_%s[%d]: %s", listName, i, r.String()),
				r.Action == policy.ActionAllow, r.Log || (logAll && r.Action == policy.ActionDeny), alternatives(r))
		}
		b.decide(ctlIsolated, false, logAll, one)
		out.main = chainSpec{name: name, rules: b.rules}
		return out
	}
	if dir == dirOut && len(p.AllowedDestinations) > 0 {
		jump(peerCheck(name+"-dst", ctlAllowedDst, offDaddr, nil, p.AllowedDestinations, logAll))
	}
	if p.TenantIsolation == IsolationStrict {
		// A peer outside the tenant, the gateways and the allowed
		// destinations is decided by the -strict chain (goto: its verdict
		// is the NIC's), which keeps only the allow rules naming the peer.
		if cond, ok := strictOutsider(p, peerOff); ok {
			out.helpers = append(out.helpers, strictChain(p, name+"-strict", listName, peerOff, rules, logAll))
			b.add("check "+name+"-strict", cond, []expr.Any{&expr.Verdict{Kind: expr.VerdictGoto, Chain: name + "-strict"}})
		}
	}
	for i, r := range rules {
		allow := r.Action == policy.ActionAllow
		b.decide(fmt.Sprintf("%s[%d]: %s", listName, i, r.String()), allow, r.Log || (logAll && !allow), alternatives(r))
	}
	if def == policy.ActionAllow {
		if p.TenantIsolation == IsolationModerate {
			b.decide(ctlModerate, false, logAll, [][]expr.Any{
				append(inNamed(peerOff, VMAddrsSet, false), inNamed(peerOff, tenantSet(p.Tenant), true)...)})
		}
		if p.Microsegmentation {
			b.decide(ctlMicroseg, false, logAll, [][]expr.Any{
				append(inNamed(peerOff, tenantSet(p.Tenant), false), inNamed(peerOff, bridgeSet(p.Bridge), false)...)})
		}
	}
	b.decide(ctlDefault, def == policy.ActionAllow, logAll && def != policy.ActionAllow, one)
	out.main = chainSpec{name: name, rules: b.rules}
	return out
}

// ndMLD are the ND and MLD types every base chain accepts (RFC 4890);
// raRedirect are RA and redirect, dropped from a VM address.
var (
	ndMLD      = []uint8{130, 131, 132, 133, 135, 136, 143}
	raRedirect = []uint8{134, 137}
)

// baseRules returns the rules of the main table's base chain hooked at
// name: blocked sources, established, ND/MLD, RA/redirect from VMs,
// untracked and invalid. These chains see every packet; the dispatch to
// NIC chains is the shards' (shardBaseRules), for new connections.
func baseRules(name string) []nrule {
	b := &builder{}
	switch name {
	case ChainForward:
		// Every bridged packet passes here: one lookup per address, the
		// sample and the drop in chain blocked (blockedRules).
		toBlocked := []expr.Any{&expr.Counter{}, &expr.Verdict{Kind: expr.VerdictJump, Chain: chainBlocked}}
		b.add("blocked source", inNamed(offSaddr, BlockedSources, false), toBlocked)
		b.add("blocked destination", inNamed(offDaddr, BlockedSources, false), toBlocked)
	case ChainInput:
		b.add("blocked source", inNamed(offSaddr, VMAddrsSet, false), inNamed(offSaddr, BlockedSources, false), []expr.Any{&expr.Counter{}, verdict(expr.VerdictDrop)})
	case ChainOutput:
		b.add("blocked destination", inNamed(offDaddr, VMAddrsSet, false), inNamed(offDaddr, BlockedSources, false), []expr.Any{&expr.Counter{}, verdict(expr.VerdictDrop)})
	}
	b.add("established", ctState(expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED), []expr.Any{verdict(expr.VerdictAccept)})
	if name == ChainOutput {
		// The host is the VMs' gateway: its ND, MLD, RA and redirects pass.
		b.add("nd mld ra", b.icmpTypes(append(slices.Clone(ndMLD), raRedirect...)), []expr.Any{verdict(expr.VerdictAccept)})
	} else {
		b.add("nd mld", b.icmpTypes(ndMLD), []expr.Any{verdict(expr.VerdictAccept)})
		b.add("ra redirect from vm", inNamed(offSaddr, VMAddrsSet, false), b.icmpTypes(raRedirect), []expr.Any{&expr.Counter{}, &expr.Verdict{Kind: expr.VerdictJump, Chain: chainRAFromVM}})
	}
	if name == ChainForward {
		// An RA from a router that is not a VM: the first-hop RA guard
		// decides which VMs it reaches.
		b.add("ra to vm", b.icmpTypes([]uint8{134}), []expr.Any{verdict(expr.VerdictAccept)})
	}
	// The shards judge a connection by its first packet; a packet that
	// belongs to no connection reaches no NIC chain. Untracked packets (the
	// kernel does not track ND, MLD and RA, which passed above; anything
	// else only when another table says notrack) from or to a VM are
	// dropped rather than let through unjudged, and a packet that fits no
	// connection is invalid.
	drop := []expr.Any{&expr.Counter{}, verdict(expr.VerdictDrop)}
	b.add("untracked from vm", ctState(expr.CtStateBitUNTRACKED), inNamed(offSaddr, VMAddrsSet, false), drop)
	b.add("untracked to vm", ctState(expr.CtStateBitUNTRACKED), inNamed(offDaddr, VMAddrsSet, false), drop)
	b.add("invalid", ctState(expr.CtStateBitINVALID), drop)
	return b.rules
}

// chainBlocked is the main table's chain of forwarded packets from or to
// a blocked source: a rate-limited event sample, then drop.
const chainBlocked = "blocked"

// blockedRules returns the rules of chainBlocked.
func blockedRules() []nrule {
	return []nrule{blockedSourceLog(), {comment: "blocked", exprs: []expr.Any{verdict(expr.VerdictDrop)}}}
}

// chainRAFromVM is the main table's chain of router advertisements and
// redirects a VM sent (whatever its port's RA guard): a rate-limited
// ra_guard event sample, attributed to the port the packet came in, then
// drop.
const chainRAFromVM = "ra_from_vm"

// raFromVMRules returns the rules of chainRAFromVM.
func raFromVMRules() []nrule {
	return []nrule{raFromVMLog(), {comment: "ra redirect from vm", exprs: []expr.Any{verdict(expr.VerdictDrop)}}}
}

// shardBaseRules returns the rules of a shard table's base chain name
// (shardBaseChains): the dispatch to the shard's NIC chains. Such a chain
// sees only a new connection's first packet (it is a nat chain), so
// established flows, ND and MLD (untracked), and packets without a
// connection (dropped as invalid by the main table) never reach it.
func shardBaseRules(name string) []nrule {
	b := &builder{}
	// By the frame's source MAC (link-layer header bytes 6-11): a packet
	// the host sends or routes in from elsewhere has no VM's MAC there, or
	// no link-layer header at all (the lookup then does not match).
	b.add("dispatch egress", []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseLLHeader, Offset: 6, Len: 6},
		&expr.Lookup{SourceRegister: 1, SetName: EgressMACMap, DestRegister: 0, IsDestRegSet: true}})
	if name == ChainNewPostrouting {
		b.add("dispatch ingress", []expr.Any{nh(offDaddr, 16), &expr.Lookup{SourceRegister: 1, SetName: IngressMap, DestRegister: 0, IsDestRegSet: true}})
	}
	return b.rules
}
