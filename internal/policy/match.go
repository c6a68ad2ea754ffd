package policy

import (
	"fmt"
	"net/netip"
	"slices"
)

// Packet is what Match looks at in a packet.
type Packet struct {
	// Proto is the upper-layer protocol (ProtoTCP, ProtoUDP, ProtoICMPv6
	// or any other IANA protocol number). ProtoAll is not meaningful
	// here.
	Proto    Proto
	Src, Dst netip.Addr
	// SrcPort and DstPort are used for tcp and udp only.
	SrcPort, DstPort uint16
	// ICMPType is used for icmpv6 only.
	ICMPType uint8
}

// Match evaluates rules against pkt with ipfw semantics: the first rule
// that matches decides. It returns the index of the deciding rule (or -1)
// and whether the packet is allowed.
//
// With no rules, everything is allowed: Match returns (-1, true). When the
// list is non-empty and no rule matches, the packet is denied: (-1, false)
// (default deny when the list is non-empty).
//
// Match is pure and resolves nothing: a symbolic prefix or security group
// endpoint must first be filled in by Resolve. A rule whose match depends
// on an unresolved endpoint cannot be decided, and Match fails closed: it
// stops at that rule and denies, returning its index, even if the rule is
// an allow rule. A rule that cannot match on its other criteria (protocol,
// ports, ICMPv6 type, a resolved endpoint) is skipped as usual.
func Match(rules []Rule, pkt Packet) (matchedIndex int, allowed bool) {
	if len(rules) == 0 {
		return -1, true
	}
	pkt.Src = pkt.Src.WithZone("")
	pkt.Dst = pkt.Dst.WithZone("")
	for i, r := range rules {
		switch r.match(pkt) {
		case matchYes:
			return i, r.Action == ActionAllow
		case matchUnknown:
			return i, false
		}
	}
	return -1, false
}

type tristate uint8

const (
	matchNo tristate = iota
	matchYes
	matchUnknown
)

func (r Rule) match(pkt Packet) tristate {
	if r.Proto != ProtoAll && r.Proto != pkt.Proto {
		return matchNo
	}
	if len(r.ICMPTypes) > 0 && (pkt.Proto != ProtoICMPv6 || !slices.Contains(r.ICMPTypes, pkt.ICMPType)) {
		return matchNo
	}
	if len(r.SrcPorts) > 0 && !portsContain(r.SrcPorts, pkt.SrcPort) {
		return matchNo
	}
	if len(r.DstPorts) > 0 && !portsContain(r.DstPorts, pkt.DstPort) {
		return matchNo
	}
	src, dst := r.Src.match(pkt.Src), r.Dst.match(pkt.Dst)
	switch {
	case src == matchNo || dst == matchNo:
		return matchNo
	case src == matchYes && dst == matchYes:
		return matchYes
	}
	return matchUnknown
}

func portsContain(ports []PortRange, port uint16) bool {
	for _, pr := range ports {
		if pr.Contains(port) {
			return true
		}
	}
	return false
}

func (e Endpoint) match(a netip.Addr) tristate {
	if !e.Resolved() {
		return matchUnknown
	}
	switch e.Kind {
	case EndpointAny:
		return matchYes
	case EndpointPrefix:
		if e.Prefix.Contains(a) {
			return matchYes
		}
		return matchNo
	case EndpointGroup:
		for _, m := range e.Members {
			if m.Contains(a) {
				return matchYes
			}
		}
		return matchNo
	}
	return matchUnknown
}

// Resolver supplies the outside knowledge Resolve needs. A nil func leaves
// the corresponding endpoints unresolved.
type Resolver struct {
	// Prefix resolves the text of a symbolic endpoint, such as
	// "2600:BEEF:1000:mgmt::/64", to a prefix.
	Prefix func(text string) (netip.Prefix, error)
	// Group returns the prefixes (addresses as /128) of the members of a
	// security group; an empty result means the group has no members.
	Group func(name string) ([]netip.Prefix, error)
}

// Resolve returns a copy of rules with unresolved symbolic prefixes and
// security groups filled in by res. It does not modify rules. Resolved
// prefixes must be valid IPv6 prefixes without host bits; group members
// must be valid IPv6 prefixes and are masked. Endpoints that are already
// resolved are left alone. The error names the first rule that failed.
func Resolve(rules []Rule, res Resolver) ([]Rule, error) {
	out := make([]Rule, len(rules))
	for i, r := range rules {
		var err error
		if r.Src, err = resolveEndpoint(r.Src, res); err != nil {
			return nil, fmt.Errorf("rule %d (%s): %w", i, quote(r.String()), err)
		}
		if r.Dst, err = resolveEndpoint(r.Dst, res); err != nil {
			return nil, fmt.Errorf("rule %d (%s): %w", i, quote(r.String()), err)
		}
		r.ICMPTypes = slices.Clone(r.ICMPTypes)
		r.SrcPorts = slices.Clone(r.SrcPorts)
		r.DstPorts = slices.Clone(r.DstPorts)
		out[i] = r
	}
	return out, nil
}

func resolveEndpoint(e Endpoint, res Resolver) (Endpoint, error) {
	e.Members = slices.Clone(e.Members)
	if e.Resolved() {
		return e, nil
	}
	switch e.Kind {
	case EndpointPrefix:
		if res.Prefix == nil {
			return e, nil
		}
		pf, err := res.Prefix(e.Text)
		if err != nil {
			return e, fmt.Errorf("resolve %s: %w", quote(e.Text), err)
		}
		if msg := checkPrefix(pf); msg != "" {
			return e, fmt.Errorf("resolve %s: %s %s", quote(e.Text), pf, msg)
		}
		e.Prefix = pf
	case EndpointGroup:
		if res.Group == nil {
			return e, nil
		}
		ms, err := res.Group(e.Group)
		if err != nil {
			return e, fmt.Errorf("resolve security group %s: %w", quote(e.Group), err)
		}
		members := make([]netip.Prefix, 0, len(ms))
		for _, m := range ms {
			if !m.IsValid() || !m.Addr().Is6() {
				return e, fmt.Errorf("resolve security group %s: member %s is not an IPv6 prefix", quote(e.Group), m)
			}
			members = append(members, m.Masked())
		}
		e.Members = members
	}
	return e, nil
}
