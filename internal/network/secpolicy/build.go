package secpolicy

import (
	"encoding/binary"
	"fmt"
	"math/big"
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

// ports matches a port list at transport offset off.
func (b *builder) ports(off uint32, ports []policy.PortRange) []expr.Any {
	if len(ports) == 1 {
		p := ports[0]
		if p.Lo == p.Hi {
			return []expr.Any{th(off, 2), eq(u16(p.Lo))}
		}
		return []expr.Any{th(off, 2), &expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: u16(p.Lo), ToData: u16(p.Hi)}}
	}
	var rs []ivl
	for _, p := range ports {
		rs = append(rs, ivl{big.NewInt(int64(p.Lo)), big.NewInt(int64(p.Hi))})
	}
	a := &anonSet{keyType: nftables.TypeInetService, interval: true, elems: intervalElems(rs, 2)}
	return b.anonLookup(th(off, 2), a, false)
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

// prefixSet matches (or, inverted, does not match) any of prefixes.
func (b *builder) prefixSet(off uint32, prefixes []netip.Prefix, invert bool) []expr.Any {
	var rs []ivl
	for _, p := range prefixes {
		p = p.Masked()
		lo := new(big.Int).SetBytes(p.Addr().AsSlice())
		span := new(big.Int).Lsh(big.NewInt(1), uint(128-p.Bits()))
		hi := new(big.Int).Add(lo, span)
		hi.Sub(hi, big.NewInt(1))
		rs = append(rs, ivl{lo, hi})
	}
	a := &anonSet{keyType: nftables.TypeIP6Addr, interval: true, elems: intervalElems(rs, 16)}
	return b.anonLookup(nh(off, 16), a, invert)
}

type ivl struct{ lo, hi *big.Int }

// intervalElems encodes inclusive ranges the way nft does for an interval
// set: merged, sorted, a leading interval end at zero, each range as a start
// element and an end element at hi+1 (omitted when hi is the maximum).
func intervalElems(rs []ivl, size int) []nftables.SetElement {
	slices.SortFunc(rs, func(a, b ivl) int { return a.lo.Cmp(b.lo) })
	var merged []ivl
	one := big.NewInt(1)
	for _, r := range rs {
		if n := len(merged); n > 0 {
			last := &merged[n-1]
			if r.lo.Cmp(new(big.Int).Add(last.hi, one)) <= 0 {
				if r.hi.Cmp(last.hi) > 0 {
					last.hi = r.hi
				}
				continue
			}
		}
		merged = append(merged, ivl{new(big.Int).Set(r.lo), new(big.Int).Set(r.hi)})
	}
	max := new(big.Int).Sub(new(big.Int).Lsh(one, uint(size*8)), one)
	key := func(v *big.Int) []byte { return v.FillBytes(make([]byte, size)) }
	var out []nftables.SetElement
	if len(merged) > 0 && merged[0].lo.Sign() != 0 {
		out = append(out, nftables.SetElement{Key: make([]byte, size), IntervalEnd: true})
	}
	for _, r := range merged {
		out = append(out, nftables.SetElement{Key: key(r.lo)})
		if r.hi.Cmp(max) < 0 {
			out = append(out, nftables.SetElement{Key: key(new(big.Int).Add(r.hi, one)), IntervalEnd: true})
		}
	}
	return out
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
	ctlIsolated    = "isolated"
	ctlAllowedDst  = "allowed-destinations"
	ctlStrict      = "tenant-strict"
	ctlModerate    = "tenant-moderate"
	ctlMicroseg    = "microsegmentation"
	ctlDefault     = "default"
	commentLogPart = " log"
)

// matchRule returns the match expressions of a policy rule. The peer is the
// remote side: for egress the destination, for ingress the source; rules
// name both explicitly, so the direction does not change the translation.
func (b *builder) matchRule(r policy.Rule) []expr.Any {
	var m []expr.Any
	if r.Proto != policy.ProtoAll {
		m = append(m, l4proto(byte(r.Proto))...)
	}
	if len(r.ICMPTypes) > 0 {
		if r.Proto == policy.ProtoAll {
			m = append(m, b.icmpTypes(r.ICMPTypes)...)
		} else {
			m = append(m, b.icmpTypes(r.ICMPTypes)[2:]...)
		}
	}
	m = append(m, b.endpoint(offSaddr, r.Src)...)
	m = append(m, b.endpoint(offDaddr, r.Dst)...)
	if len(r.SrcPorts) > 0 {
		m = append(m, b.ports(0, r.SrcPorts)...)
	}
	if len(r.DstPorts) > 0 {
		m = append(m, b.ports(2, r.DstPorts)...)
	}
	return m
}

// decide adds a log rule (when asked) and a counted verdict rule for match.
// The anonymous sets in the builder's pending list belong to the match; a
// logged rule rebuilds the match for the verdict rule via mk.
func (b *builder) decide(ctl string, allow, log bool, mk func() []expr.Any) {
	v := verdict(expr.VerdictDrop)
	prefix := LogPrefixDeny
	if allow {
		v = verdict(expr.VerdictReturn)
		prefix = LogPrefixAllow
	}
	if log {
		b.add(ctl+commentLogPart, mk(), []expr.Any{logLimit(), logExpr(prefix)})
	}
	b.add(ctl, mk(), []expr.Any{&expr.Counter{}, v})
}

// buildChain builds the chain for one direction of p. peerOff is the offset
// of the remote address (daddr for egress, saddr for ingress).
func buildChain(p *NICPolicy, dir string, name string) chainSpec {
	b := &builder{}
	peerOff := uint32(offDaddr)
	rules, mgmt, def := p.Egress, p.ManagementEgress, defaultAction(p.Egress, p.EgressDefault)
	listName := "egress"
	if dir == dirIn {
		peerOff = offSaddr
		rules, mgmt, def = p.Ingress, p.ManagementIngress, defaultAction(p.Ingress, p.IngressDefault)
		listName = "ingress"
	}
	logAll := p.LogSecurityEvents
	none := func() []expr.Any { return nil }

	if p.Isolated {
		for i, r := range mgmt {
			b.decide(fmt.Sprintf("management_%s[%d]: %s", listName, i, r.String()),
				r.Action == policy.ActionAllow, r.Log || (logAll && r.Action == policy.ActionDeny),
				func() []expr.Any { return b.matchRule(r) })
		}
		b.decide(ctlIsolated, false, logAll, none)
		return chainSpec{name: name, rules: b.rules}
	}
	if dir == dirOut && len(p.AllowedDestinations) > 0 {
		b.decide(ctlAllowedDst, false, logAll, func() []expr.Any {
			return b.prefixSet(offDaddr, p.AllowedDestinations, true)
		})
	}
	if p.TenantIsolation == IsolationStrict {
		peers := append(addrPrefixes(p.Gateways), p.AllowedDestinations...)
		b.decide(ctlStrict, false, logAll, func() []expr.Any {
			m := inNamed(peerOff, tenantSet(p.Tenant), true)
			if len(peers) > 0 {
				m = append(m, b.prefixSet(peerOff, peers, true)...)
			}
			return m
		})
	}
	for i, r := range rules {
		allow := r.Action == policy.ActionAllow
		b.decide(fmt.Sprintf("%s[%d]: %s", listName, i, r.String()), allow,
			r.Log || (logAll && !allow), func() []expr.Any { return b.matchRule(r) })
	}
	if def == policy.ActionAllow {
		if p.TenantIsolation == IsolationModerate {
			b.decide(ctlModerate, false, logAll, func() []expr.Any {
				return append(inNamed(peerOff, VMAddrsSet, false), inNamed(peerOff, tenantSet(p.Tenant), true)...)
			})
		}
		if p.Microsegmentation {
			b.decide(ctlMicroseg, false, logAll, func() []expr.Any {
				return append(inNamed(peerOff, tenantSet(p.Tenant), false), inNamed(peerOff, bridgeSet(p.Bridge), false)...)
			})
		}
	}
	b.decide(ctlDefault, def == policy.ActionAllow, logAll && def != policy.ActionAllow, none)
	return chainSpec{name: name, rules: b.rules}
}

// baseRules returns the rules of the base chain hooked at name.
func baseRules(name string) []nrule {
	b := &builder{}
	ndMLD := []uint8{130, 131, 132, 133, 135, 136, 143}
	raRedirect := []uint8{134, 137}
	switch name {
	case ChainForward:
		b.add("blocked source", inNamed(offSaddr, BlockedSources, false), []expr.Any{&expr.Counter{}, verdict(expr.VerdictDrop)})
		b.add("blocked destination", inNamed(offDaddr, BlockedSources, false), []expr.Any{&expr.Counter{}, verdict(expr.VerdictDrop)})
	case ChainInput:
		b.add("blocked source", inNamed(offSaddr, VMAddrsSet, false), inNamed(offSaddr, BlockedSources, false), []expr.Any{&expr.Counter{}, verdict(expr.VerdictDrop)})
	case ChainOutput:
		b.add("blocked destination", inNamed(offDaddr, VMAddrsSet, false), inNamed(offDaddr, BlockedSources, false), []expr.Any{&expr.Counter{}, verdict(expr.VerdictDrop)})
	}
	b.add("established", ctState(expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED), []expr.Any{verdict(expr.VerdictAccept)})
	if name == ChainOutput {
		// The host is the VMs' gateway: its ND, MLD, RA and redirects pass.
		b.add("nd mld ra", b.icmpTypes(append(ndMLD, raRedirect...)), []expr.Any{verdict(expr.VerdictAccept)})
	} else {
		b.add("nd mld", b.icmpTypes(ndMLD), []expr.Any{verdict(expr.VerdictAccept)})
		b.add("ra redirect from vm", inNamed(offSaddr, VMAddrsSet, false), b.icmpTypes(raRedirect), []expr.Any{&expr.Counter{}, verdict(expr.VerdictDrop)})
	}
	b.add("invalid", ctState(expr.CtStateBitINVALID), []expr.Any{&expr.Counter{}, verdict(expr.VerdictDrop)})
	if name != ChainOutput {
		b.add("dispatch egress", []expr.Any{nh(offSaddr, 16), &expr.Lookup{SourceRegister: 1, SetName: EgressMap, DestRegister: 0, IsDestRegSet: true}})
	}
	if name != ChainInput {
		b.add("dispatch ingress", []expr.Any{nh(offDaddr, 16), &expr.Lookup{SourceRegister: 1, SetName: IngressMap, DestRegister: 0, IsDestRegSet: true}})
	}
	return b.rules
}
