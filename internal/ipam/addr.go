package ipam

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// MaxLabelLen is the longest subnet name.
const MaxLabelLen = 32

// Addr is a parsed IPv6 address that is either plain (a netip.Addr) or
// symbolic: one of its colon groups is a subnet name such as "web" in
// 2600:beef:1000:web::10. A symbolic address becomes a plain one once the
// name is resolved to its 16-bit value under Parent.
type Addr struct {
	ip   netip.Addr // the address; for a symbolic one, the label group is 0
	name string     // lower-case subnet name; "" when plain
	pos  int        // group index of the name (1..7)
	text string     // canonical text of a symbolic address
}

// Prefix is a parsed IPv6 prefix (or address with prefix length) that is
// either plain or symbolic; see Addr.
type Prefix struct {
	addr Addr
	bits int
}

// ParseAddr parses s as a plain address (anything netip.ParseAddr accepts)
// or as a symbolic one: one group before any "::" may be a name
// [a-z][a-z0-9-]{0,31} (case-insensitive) that is not valid hex, with at
// least one explicit group before it.
func ParseAddr(s string) (Addr, error) {
	if ip, err := netip.ParseAddr(s); err == nil {
		return Addr{ip: ip}, nil
	} else {
		a, ok, serr := parseSymbolic(s)
		if serr != nil {
			return Addr{}, serr
		}
		if !ok {
			return Addr{}, err
		}
		return a, nil
	}
}

// ParsePrefix parses s as a plain prefix (anything netip.ParsePrefix
// accepts, host bits included) or as a symbolic one whose name group lies
// inside the prefix length.
func ParsePrefix(s string) (Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err == nil {
		return Prefix{addr: Addr{ip: p.Addr()}, bits: p.Bits()}, nil
	}
	i := strings.LastIndexByte(s, '/')
	if i < 0 {
		return Prefix{}, err
	}
	a, ok, serr := parseSymbolic(s[:i])
	if serr != nil {
		return Prefix{}, serr
	}
	if !ok {
		return Prefix{}, err
	}
	bs := s[i+1:]
	bits, berr := strconv.Atoi(bs)
	if berr != nil || bs == "" || len(bs) > 3 || (len(bs) > 1 && bs[0] == '0') || bits < 0 || bits > 128 {
		return Prefix{}, fmt.Errorf("parse prefix %q: bad prefix length %q", s, bs)
	}
	if bits < 16*(a.pos+1) {
		return Prefix{}, fmt.Errorf("parse prefix %q: subnet name %q (bits %d-%d) lies outside the prefix length /%d", s, a.name, 16*a.pos, 16*(a.pos+1), bits)
	}
	return Prefix{addr: a, bits: bits}, nil
}

// CheckAddrSyntax reports whether s is a valid plain or symbolic address,
// without resolving names. It returns the plain address, or an invalid
// netip.Addr when s is symbolic.
func CheckAddrSyntax(s string) (netip.Addr, error) {
	a, err := ParseAddr(s)
	if err != nil {
		return netip.Addr{}, err
	}
	ip, _ := a.Plain()
	return ip, nil
}

// CheckPrefixSyntax is CheckAddrSyntax for prefixes.
func CheckPrefixSyntax(s string) (netip.Prefix, error) {
	p, err := ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	pp, _ := p.Plain()
	return pp, nil
}

func isHexGroup(g string) bool {
	if len(g) < 1 || len(g) > 4 {
		return false
	}
	for i := 0; i < len(g); i++ {
		c := g[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return false
		}
	}
	return true
}

// IsLabel reports whether s is a valid subnet name (case-insensitive) that
// is not also a hex group.
func IsLabel(s string) bool {
	if len(s) < 1 || len(s) > MaxLabelLen || isHexGroup(s) {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		switch {
		case 'a' <= c && c <= 'z':
		case i > 0 && ('0' <= c && c <= '9' || c == '-'):
		default:
			return false
		}
	}
	return true
}

// parseSymbolic parses s as a symbolic address. ok is false (with a nil
// error) when s has no group that looks like a name, so the caller reports
// netip's own error.
func parseSymbolic(s string) (a Addr, ok bool, err error) {
	if len(s) > 80 || strings.ContainsAny(s, "%./") {
		return Addr{}, false, nil
	}
	head, tail, double := strings.Cut(s, "::")
	var hg, tg []string
	if head != "" {
		hg = strings.Split(head, ":")
	}
	if double && tail != "" {
		tg = strings.Split(tail, ":")
	}
	pos := -1
	for i, g := range hg {
		if IsLabel(g) {
			if pos >= 0 {
				return Addr{}, false, fmt.Errorf("parse address %q: more than one subnet name (%q and %q)", s, hg[pos], g)
			}
			pos = i
		}
	}
	for _, g := range tg {
		if IsLabel(g) {
			if pos >= 0 {
				return Addr{}, false, fmt.Errorf("parse address %q: more than one subnet name (%q and %q)", s, hg[pos], g)
			}
			return Addr{}, false, fmt.Errorf("parse address %q: subnet name %q must come before any \"::\"", s, g)
		}
	}
	if pos < 0 {
		return Addr{}, false, nil
	}
	name := strings.ToLower(hg[pos])
	if pos == 0 {
		return Addr{}, false, fmt.Errorf("parse address %q: subnet name %q needs at least one explicit group before it", s, name)
	}
	if pos > 7 {
		return Addr{}, false, fmt.Errorf("parse address %q: subnet name %q is at group %d; at most 7 is allowed", s, name, pos)
	}
	groups := append([]string(nil), hg...)
	groups[pos] = "0"
	tmpl := strings.Join(groups, ":")
	if double {
		tmpl += "::" + tail
	}
	ip, perr := netip.ParseAddr(tmpl)
	if perr != nil {
		return Addr{}, false, fmt.Errorf("parse address %q: %w", s, stripParse(perr))
	}
	if !ip.Is6() || ip.Is4In6() {
		return Addr{}, false, fmt.Errorf("parse address %q: symbolic addresses must be IPv6", s)
	}
	hg2 := append([]string(nil), hg...)
	for i := range hg2 {
		hg2[i] = strings.ToLower(hg2[i])
	}
	text := strings.Join(hg2, ":")
	if double {
		text += "::" + strings.ToLower(tail)
	}
	return Addr{ip: ip, name: name, pos: pos, text: text}, true, nil
}

// stripParse drops netip's own quoting of the template text, which would
// show a 0 where the user wrote a name.
func stripParse(err error) error {
	msg := err.Error()
	if i := strings.LastIndex(msg, "): "); i >= 0 {
		return errors.New(msg[i+3:])
	}
	if i := strings.LastIndex(msg, ": "); i >= 0 {
		return errors.New(msg[i+2:])
	}
	return err
}

// IsSymbolic reports whether a holds a subnet name.
func (a Addr) IsSymbolic() bool { return a.name != "" }

// IsValid reports whether a was parsed successfully.
func (a Addr) IsValid() bool { return a.ip.IsValid() }

// Name is the lower-case subnet name, or "".
func (a Addr) Name() string { return a.name }

// Parent is the prefix the name is resolved under: the groups before it
// (2600:beef:1000::/48 for 2600:beef:1000:web::10).
func (a Addr) Parent() netip.Prefix {
	if a.name == "" {
		return netip.Prefix{}
	}
	return netip.PrefixFrom(a.ip, 16*a.pos).Masked()
}

// Plain returns the address when a is not symbolic.
func (a Addr) Plain() (netip.Addr, bool) {
	if a.name != "" {
		return netip.Addr{}, false
	}
	return a.ip, true
}

// With returns the address with the name replaced by value. For a plain
// address it returns the address itself.
func (a Addr) With(value uint16) netip.Addr {
	if a.name == "" {
		return a.ip
	}
	b := a.ip.As16()
	b[2*a.pos] = byte(value >> 8)
	b[2*a.pos+1] = byte(value)
	return netip.AddrFrom16(b)
}

// String returns netip's canonical text for a plain address and the
// lower-cased input for a symbolic one.
func (a Addr) String() string {
	if a.name != "" {
		return a.text
	}
	if !a.ip.IsValid() {
		return "invalid Addr"
	}
	return a.ip.String()
}

// IsSymbolic reports whether p holds a subnet name.
func (p Prefix) IsSymbolic() bool { return p.addr.IsSymbolic() }

// IsValid reports whether p was parsed successfully.
func (p Prefix) IsValid() bool { return p.addr.IsValid() }

// Addr is the address part of p.
func (p Prefix) Addr() Addr { return p.addr }

// Bits is the prefix length.
func (p Prefix) Bits() int { return p.bits }

// Name is the lower-case subnet name, or "".
func (p Prefix) Name() string { return p.addr.name }

// Parent is the prefix the name is resolved under; see Addr.Parent.
func (p Prefix) Parent() netip.Prefix { return p.addr.Parent() }

// Plain returns the prefix when p is not symbolic.
func (p Prefix) Plain() (netip.Prefix, bool) {
	if p.addr.name != "" {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(p.addr.ip, p.bits), true
}

// With returns the prefix with the name replaced by value (host bits kept).
func (p Prefix) With(value uint16) netip.Prefix {
	return netip.PrefixFrom(p.addr.With(value), p.bits)
}

// String returns netip's canonical text for a plain prefix and the
// lower-cased input for a symbolic one.
func (p Prefix) String() string {
	if !p.addr.IsValid() {
		return "invalid Prefix"
	}
	return p.addr.String() + "/" + strconv.Itoa(p.bits)
}
