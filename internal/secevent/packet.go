package secevent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
)

// IPv6 next-header values the parser knows.
const (
	NHHopByHop = 0
	NHTCP      = 6
	NHUDP      = 17
	NHRouting  = 43
	NHFragment = 44
	NHESP      = 50
	NHAH       = 51
	NHICMPv6   = 58
	NHNone     = 59
	NHDestOpts = 60
	NHMobility = 135
	NHHIP      = 139
	NHShim6    = 140
)

// EtherTypeIPv6 is the IPv6 ethertype.
const EtherTypeIPv6 = 0x86dd

// maxExtHeaders bounds the extension-header walk.
const maxExtHeaders = 16

// Errors from Parse.
var (
	ErrTruncated = errors.New("packet truncated")
	ErrNotIPv6   = errors.New("not an IPv6 packet")
)

// Packet is what the parser extracts from a logged IPv6 packet.
type Packet struct {
	Src, Dst  netip.Addr
	HopLimit  uint8
	FlowLabel uint32
	// NextHeader is the IPv6 header's next-header field; Protocol is the
	// upper-layer protocol found after walking the extension headers
	// (-1 when the walk did not reach it: truncated chain, non-first
	// fragment, ESP).
	NextHeader uint8
	Protocol   int
	// ExtHeaders lists the extension headers in order.
	ExtHeaders []uint8
	// Fragment data, when a fragment header is present.
	Fragment   bool
	FragOffset uint16
	// ICMPv6 type and code, -1 when not ICMPv6 or not readable.
	ICMPv6Type, ICMPv6Code int
	// NDTarget is the target address of a neighbour solicitation or
	// advertisement (ICMPv6 types 135, 136), when captured.
	NDTarget netip.Addr
	// Ports for TCP/UDP (HasPorts false otherwise).
	SrcPort, DstPort uint16
	HasPorts         bool
	// Truncated is set when the header chain or upper-layer header ran past
	// the captured bytes; the fields found before that are still valid.
	Truncated bool
}

// Frame is an Ethernet frame carrying (possibly) an IPv6 packet.
type Frame struct {
	Dst, Src  net.HardwareAddr
	EtherType uint16
	VLANs     []uint16
	// IPv6 is set when EtherType is IPv6 and the packet parsed.
	IPv6 *Packet
}

func isExtHeader(nh uint8) bool {
	switch nh {
	case NHHopByHop, NHRouting, NHFragment, NHDestOpts, NHAH, NHMobility, NHHIP, NHShim6:
		return true
	}
	return false
}

// Parse decodes an IPv6 packet starting at its fixed header (the NFLOG
// payload of inet/ip6/bridge rules). It returns an error only when there is
// no IPv6 header at all; a chain cut short sets Truncated. Parse never
// panics and does not retain b.
func Parse(b []byte) (Packet, error) {
	p := Packet{Protocol: -1, ICMPv6Type: -1, ICMPv6Code: -1}
	if len(b) < 1 || b[0]>>4 != 6 {
		return p, ErrNotIPv6
	}
	if len(b) < 40 {
		return p, fmt.Errorf("ipv6 header: %w", ErrTruncated)
	}
	p.FlowLabel = binary.BigEndian.Uint32(b[0:4]) & 0xfffff
	p.NextHeader = b[6]
	p.HopLimit = b[7]
	p.Src = netip.AddrFrom16([16]byte(b[8:24]))
	p.Dst = netip.AddrFrom16([16]byte(b[24:40]))
	nh, off := b[6], 40
	for isExtHeader(nh) {
		if len(p.ExtHeaders) >= maxExtHeaders {
			p.Truncated = true
			return p, nil
		}
		p.ExtHeaders = append(p.ExtHeaders, nh)
		if len(b) < off+8 {
			p.Truncated = true
			return p, nil
		}
		next := b[off]
		var l int
		switch nh {
		case NHFragment:
			l = 8
			p.Fragment = true
			p.FragOffset = binary.BigEndian.Uint16(b[off+2:off+4]) >> 3
		case NHAH:
			l = (int(b[off+1]) + 2) * 4
		default:
			l = (int(b[off+1]) + 1) * 8
		}
		off += l
		nh = next
		if p.Fragment && p.FragOffset != 0 {
			// Headers after a non-first fragment's header are payload.
			return p, nil
		}
	}
	if off > len(b) {
		p.Truncated = true
		return p, nil
	}
	if nh == NHESP || nh == NHNone {
		p.Protocol = int(nh)
		return p, nil
	}
	p.Protocol = int(nh)
	l4 := b[off:]
	switch nh {
	case NHICMPv6:
		if len(l4) < 2 {
			p.Truncated = true
			return p, nil
		}
		p.ICMPv6Type, p.ICMPv6Code = int(l4[0]), int(l4[1])
		if (l4[0] == 135 || l4[0] == 136) && len(l4) >= 24 {
			p.NDTarget = netip.AddrFrom16([16]byte(l4[8:24]))
		}
	case NHTCP, NHUDP:
		if len(l4) < 4 {
			p.Truncated = true
			return p, nil
		}
		p.SrcPort, p.DstPort = binary.BigEndian.Uint16(l4[0:2]), binary.BigEndian.Uint16(l4[2:4])
		p.HasPorts = true
	}
	return p, nil
}

// ParseFrame decodes an Ethernet frame (up to two 802.1Q/802.1ad tags) and
// the IPv6 packet in it. It never panics and does not retain b.
func ParseFrame(b []byte) (Frame, error) {
	var f Frame
	if len(b) < 14 {
		return f, fmt.Errorf("ethernet header: %w", ErrTruncated)
	}
	f.Dst = append(net.HardwareAddr(nil), b[0:6]...)
	f.Src = append(net.HardwareAddr(nil), b[6:12]...)
	f.EtherType = binary.BigEndian.Uint16(b[12:14])
	off := 14
	for (f.EtherType == 0x8100 || f.EtherType == 0x88a8) && len(f.VLANs) < 2 {
		if len(b) < off+4 {
			return f, fmt.Errorf("vlan tag: %w", ErrTruncated)
		}
		f.VLANs = append(f.VLANs, binary.BigEndian.Uint16(b[off:off+2])&0x0fff)
		f.EtherType = binary.BigEndian.Uint16(b[off+2 : off+4])
		off += 4
	}
	if f.EtherType != EtherTypeIPv6 {
		return f, nil
	}
	p, err := Parse(b[off:])
	if err != nil {
		return f, err
	}
	f.IPv6 = &p
	return f, nil
}

// ProtocolName names an upper-layer protocol number ("icmpv6", "tcp",
// "udp", ... or the number).
func ProtocolName(p int) string {
	switch p {
	case -1:
		return ""
	case NHICMPv6:
		return "icmpv6"
	case NHTCP:
		return "tcp"
	case NHUDP:
		return "udp"
	case NHESP:
		return "esp"
	case NHNone:
		return "none"
	case 132:
		return "sctp"
	}
	return strconv.Itoa(p)
}

// HeaderName names an extension header as details.header does.
func HeaderName(nh uint8) string {
	switch nh {
	case NHHopByHop:
		return "hop_by_hop"
	case NHRouting:
		return "routing"
	case NHFragment:
		return "fragment"
	case NHDestOpts:
		return "destination_options"
	case NHAH:
		return "ah"
	case NHMobility:
		return "mobility"
	case NHHIP:
		return "hip"
	case NHShim6:
		return "shim6"
	}
	return strconv.Itoa(int(nh))
}

// fill copies the packet's fields into d.
func (p *Packet) fill(d *Details) {
	if p.Src.IsValid() {
		d.Src = p.Src.String()
	}
	if p.Dst.IsValid() {
		d.Dst = p.Dst.String()
	}
	d.Protocol = ProtocolName(p.Protocol)
	if p.ICMPv6Type >= 0 {
		t, c := p.ICMPv6Type, p.ICMPv6Code
		d.ICMPv6Type, d.ICMPv6Code = &t, &c
	}
	if p.HasPorts {
		d.SrcPort, d.DstPort = int(p.SrcPort), int(p.DstPort)
	}
	for _, h := range p.ExtHeaders {
		d.Headers = append(d.Headers, HeaderName(h))
	}
}
