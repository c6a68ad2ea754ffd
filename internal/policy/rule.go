package policy

import (
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// Action is what a matching rule does with a packet.
type Action uint8

// Actions. The zero Action is invalid.
const (
	ActionAllow Action = iota + 1
	ActionDeny
)

// String returns "allow" or "deny" (or "action(N)" for an invalid value).
func (a Action) String() string {
	switch a {
	case ActionAllow:
		return "allow"
	case ActionDeny:
		return "deny"
	}
	return "action(" + strconv.Itoa(int(a)) + ")"
}

// Proto is an IP protocol number as carried in the IPv6 next-header field.
// ProtoAll is special: in a rule it matches every protocol.
type Proto uint8

// Protocols a rule can name.
const (
	ProtoAll    Proto = 0
	ProtoTCP    Proto = 6
	ProtoUDP    Proto = 17
	ProtoICMPv6 Proto = 58
)

// String returns the rule-language name of p ("tcp", "udp", "icmpv6",
// "all"), or "proto(N)" for other protocol numbers.
func (p Proto) String() string {
	switch p {
	case ProtoAll:
		return "all"
	case ProtoTCP:
		return "tcp"
	case ProtoUDP:
		return "udp"
	case ProtoICMPv6:
		return "icmpv6"
	}
	return "proto(" + strconv.Itoa(int(p)) + ")"
}

// hasPorts reports whether rules for p may constrain ports.
func (p Proto) hasPorts() bool { return p == ProtoTCP || p == ProtoUDP }

// PortRange is an inclusive range of ports Lo..Hi; a single port has Lo == Hi.
type PortRange struct {
	Lo, Hi uint16
}

// Contains reports whether port lies in r.
func (r PortRange) Contains(port uint16) bool { return r.Lo <= port && port <= r.Hi }

// String renders r as "80" or "1024-65535".
func (r PortRange) String() string {
	if r.Lo == r.Hi {
		return strconv.Itoa(int(r.Lo))
	}
	return strconv.Itoa(int(r.Lo)) + "-" + strconv.Itoa(int(r.Hi))
}

// EndpointKind says what an Endpoint denotes.
type EndpointKind uint8

// Endpoint kinds. The zero kind is invalid and never matches (Match treats
// it as undecidable and fails closed).
const (
	EndpointInvalid EndpointKind = iota
	// EndpointAny matches every address.
	EndpointAny
	// EndpointPrefix matches the addresses in Prefix (or, while Symbolic
	// and unresolved, the subnet Text names).
	EndpointPrefix
	// EndpointGroup matches the addresses of security group Group,
	// listed in Members once resolved.
	EndpointGroup
)

// Endpoint is the source or destination of a rule.
type Endpoint struct {
	Kind EndpointKind
	// Text is the endpoint as written in the rule ("any", "2001:db8::/32",
	// "2600:BEEF:1000:mgmt::/64", "sg:web").
	Text string
	// Prefix is the matched prefix for EndpointPrefix (a plain address
	// is a /128). It is invalid (the zero netip.Prefix) while a symbolic
	// endpoint is unresolved.
	Prefix netip.Prefix
	// Symbolic is set for an EndpointPrefix whose text is not a literal
	// address or prefix (it contains a subnet label, or needed a custom
	// ParseOptions.ParsePrefix to be understood).
	Symbolic bool
	// Group is the security group name for EndpointGroup.
	Group string
	// Members are the prefixes of a resolved EndpointGroup. nil means
	// unresolved; Resolve stores a non-nil (possibly empty) slice.
	Members []netip.Prefix
}

// Resolved reports whether e can be matched without outside knowledge.
func (e Endpoint) Resolved() bool {
	switch e.Kind {
	case EndpointAny:
		return true
	case EndpointPrefix:
		return e.Prefix.IsValid()
	case EndpointGroup:
		return e.Members != nil
	}
	return false
}

// String renders e canonically: "any", "sg:NAME", a plain address without
// "/128", a prefix in netip form, or a symbolic form lower-cased with its
// zero groups compressed as RFC 5952 does.
func (e Endpoint) String() string {
	switch e.Kind {
	case EndpointAny:
		return "any"
	case EndpointGroup:
		return "sg:" + e.Group
	case EndpointPrefix:
		if e.Symbolic {
			if c, ok := canonicalSymbolic(e.Text); ok {
				return c
			}
			return e.Text
		}
		return formatPrefix(e.Prefix)
	}
	return "invalid-endpoint"
}

func formatPrefix(p netip.Prefix) string {
	if p.IsValid() && p.Bits() == p.Addr().BitLen() {
		return p.Addr().String()
	}
	return p.String()
}

// Equal reports whether e and o denote the same endpoint. The spelling of
// Text matters only for symbolic endpoints, and then only up to case and
// zero compression.
func (e Endpoint) Equal(o Endpoint) bool {
	if e.Kind != o.Kind || e.Symbolic != o.Symbolic || e.Prefix != o.Prefix ||
		e.Group != o.Group || !slices.Equal(e.Members, o.Members) ||
		(e.Members == nil) != (o.Members == nil) {
		return false
	}
	if e.Kind == EndpointPrefix && e.Symbolic {
		return e.String() == o.String()
	}
	return true
}

// Rule is one parsed firewall rule.
type Rule struct {
	Action Action
	Proto  Proto
	// ICMPTypes, for ProtoICMPv6 only, restricts the rule to these ICMPv6
	// types in the order written; empty means every type.
	ICMPTypes []uint8
	Src, Dst  Endpoint
	// SrcPorts and DstPorts, for ProtoTCP and ProtoUDP only, restrict the
	// rule to these ports in the order written; empty means every port.
	SrcPorts, DstPorts []PortRange
	// Log asks for matching packets to be logged.
	Log bool
	// Text is the rule as written. It is not part of the rule's identity:
	// Equal ignores it.
	Text string
}

// String renders r as canonical rule text: lower-case keywords, "all" for
// any protocol, ICMPv6 types by name where they have one, canonical
// endpoints and single spaces. Parsing it yields a rule Equal to r.
func (r Rule) String() string {
	var b strings.Builder
	b.WriteString(r.Action.String())
	b.WriteByte(' ')
	b.WriteString(r.Proto.String())
	if len(r.ICMPTypes) > 0 {
		b.WriteString(" type ")
		for i, t := range r.ICMPTypes {
			if i > 0 {
				b.WriteByte(',')
			}
			b.WriteString(ICMPTypeName(t))
		}
	}
	b.WriteString(" from ")
	b.WriteString(r.Src.String())
	writePorts(&b, r.SrcPorts)
	b.WriteString(" to ")
	b.WriteString(r.Dst.String())
	writePorts(&b, r.DstPorts)
	if r.Log {
		b.WriteString(" log")
	}
	return b.String()
}

func writePorts(b *strings.Builder, ports []PortRange) {
	if len(ports) == 0 {
		return
	}
	b.WriteString(" port ")
	for i, p := range ports {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(p.String())
	}
}

// Equal reports whether r and o are the same rule, ignoring Text and the
// spelling of endpoints (see Endpoint.Equal). Order of list elements
// matters.
func (r Rule) Equal(o Rule) bool {
	return r.Action == o.Action && r.Proto == o.Proto &&
		slices.Equal(r.ICMPTypes, o.ICMPTypes) &&
		r.Src.Equal(o.Src) && r.Dst.Equal(o.Dst) &&
		slices.Equal(r.SrcPorts, o.SrcPorts) &&
		slices.Equal(r.DstPorts, o.DstPorts) &&
		r.Log == o.Log
}
