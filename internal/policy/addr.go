package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// DefaultParsePrefix is the ParseOptions.ParsePrefix used when none is set.
// It accepts plain netip addresses (as /128) and prefixes, and symbolic
// forms such as "2600:BEEF:1000:mgmt::/64" whose syntax is valid; for those
// it returns the zero (invalid) netip.Prefix and a nil error, leaving the
// label unresolved. Zoned addresses are rejected. It does not check for host
// bits or IPv4; Parse does that for every hook.
func DefaultParsePrefix(s string) (netip.Prefix, error) {
	p, plainErr := parsePlain(s)
	if plainErr == nil {
		return p, nil
	}
	if hasLabel(s) {
		if _, err := parseSymbolic(s); err != nil {
			return netip.Prefix{}, err
		}
		return netip.Prefix{}, nil
	}
	return netip.Prefix{}, plainErr
}

// parsePlain parses a literal netip address or prefix. An address becomes a
// full-length prefix.
func parsePlain(s string) (netip.Prefix, error) {
	if strings.Count(s, "/") > 1 {
		return netip.Prefix{}, errors.New(`more than one "/"`)
	}
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, cleanNetipErr(err)
		}
		return p, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, cleanNetipErr(err)
	}
	if a.Zone() != "" {
		return netip.Prefix{}, errors.New("zoned addresses are not allowed")
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// cleanNetipErr drops the `ParseAddr("...")` preamble netip puts in front of
// its messages; the caller quotes the input itself.
func cleanNetipErr(err error) error {
	msg := err.Error()
	// The input has no blanks, so the last `"): ` ends the last preamble.
	if i := strings.LastIndex(msg, "\"): "); i >= 0 {
		return errors.New(msg[i+4:])
	}
	return err
}

// symGroup is one 16-bit group of a symbolic address: a hex value or a
// label.
type symGroup struct {
	label string // lower-case; "" for a hex group
	val   uint16
}

// symAddr is a parsed symbolic address or prefix.
type symAddr struct {
	groups [8]symGroup
	bits   int
}

// classifyGroup says whether a colon-separated group is hex, a label or
// neither. A group of hex digits only is hex, whatever its length.
func classifyGroup(g string) (isHex, isLabel bool) {
	if g == "" {
		return false, false
	}
	isHex = true
	for i := 0; i < len(g); i++ {
		if !isHexDigit(g[i]) {
			isHex = false
			break
		}
	}
	if isHex {
		return true, false
	}
	if !isLetter(g[0]) {
		return false, false
	}
	for i := 1; i < len(g); i++ {
		c := g[i]
		if !isLetter(c) && !isDigit(c) && c != '-' {
			return false, false
		}
	}
	return false, true
}

// hasLabel reports whether s (an address or prefix) has a group that can
// only be a symbolic label.
func hasLabel(s string) bool {
	addr, _, _ := strings.Cut(s, "/")
	for g := range strings.SplitSeq(addr, ":") {
		if _, isLabel := classifyGroup(g); isLabel {
			return true
		}
	}
	return false
}

// parseSymbolic parses an address or prefix in which exactly one group is a
// label [a-z][a-z0-9-]{0,31} (case-insensitive). A missing "/len" means /128.
func parseSymbolic(s string) (symAddr, error) {
	var sa symAddr
	addr, bitsText, hasBits := strings.Cut(s, "/")
	sa.bits = 128
	if hasBits {
		if !allDigits(bitsText) || (len(bitsText) > 1 && bitsText[0] == '0') {
			return sa, fmt.Errorf("invalid prefix length %s", quote(bitsText))
		}
		n, err := strconv.Atoi(bitsText)
		if err != nil || len(bitsText) > 3 || n > 128 {
			return sa, fmt.Errorf("prefix length %s out of range 0..128", bitsText)
		}
		sa.bits = n
	}
	var head, tail []string
	split := func(part string) ([]string, error) {
		if part == "" {
			return nil, nil
		}
		gs := strings.Split(part, ":")
		for _, g := range gs {
			if g == "" {
				return nil, errors.New(`empty group (single ":" at start or end, or ":::")`)
			}
		}
		return gs, nil
	}
	var err error
	if h, t, ok := strings.Cut(addr, "::"); ok {
		if strings.Contains(t, "::") {
			return sa, errors.New(`more than one "::"`)
		}
		if head, err = split(h); err != nil {
			return sa, err
		}
		if tail, err = split(t); err != nil {
			return sa, err
		}
		if n := len(head) + len(tail); n > 7 {
			return sa, fmt.Errorf(`%d groups and "::"; at most 7 groups may go with "::"`, n)
		}
	} else {
		if head, err = split(addr); err != nil {
			return sa, err
		}
		if len(head) != 8 {
			return sa, fmt.Errorf(`%d groups, want 8 (or fewer with "::")`, len(head))
		}
	}
	var labels []string
	fill := func(gs []string, at int) error {
		for i, g := range gs {
			isHex, isLabel := classifyGroup(g)
			switch {
			case isHex:
				if len(g) > 4 {
					return fmt.Errorf("hex group %s longer than 4 digits", quote(g))
				}
				v, _ := strconv.ParseUint(g, 16, 16)
				sa.groups[at+i] = symGroup{val: uint16(v)}
			case isLabel:
				if len(g) > 32 {
					return fmt.Errorf("label %s longer than 32 characters", quote(g))
				}
				l := strings.ToLower(g)
				labels = append(labels, l)
				sa.groups[at+i] = symGroup{label: l}
			default:
				return fmt.Errorf("invalid group %s (want 1-4 hex digits or a label [a-z][a-z0-9-]{0,31})", quote(g))
			}
		}
		return nil
	}
	if err := fill(head, 0); err != nil {
		return sa, err
	}
	if err := fill(tail, 8-len(tail)); err != nil {
		return sa, err
	}
	switch len(labels) {
	case 0:
		return sa, errors.New("no symbolic label")
	case 1:
	default:
		return sa, fmt.Errorf("%d symbolic labels (%s); at most one group may be a label", len(labels), strings.Join(quoteAll(labels), ", "))
	}
	return sa, nil
}

// hostBits reports a host-bits problem of a symbolic prefix: a hex group
// with bits set beyond the prefix length (with the masked form as a hint) or
// a label lying wholly in the host part.
func (sa symAddr) hostBits() (msg, hint string) {
	masked := sa
	bad := false
	for g := range sa.groups {
		netBits := min(max(sa.bits-16*g, 0), 16)
		grp := sa.groups[g]
		if grp.label != "" {
			if netBits == 0 {
				return fmt.Sprintf("puts label %s in the host part of /%d", quote(grp.label), sa.bits), ""
			}
			continue
		}
		hostMask := uint16(0xffff >> netBits)
		if grp.val&hostMask != 0 {
			bad = true
			masked.groups[g].val &^= hostMask
		}
	}
	if bad {
		return "has host bits set", masked.String()
	}
	return "", ""
}

// String renders sa canonically: lower case, no leading zeros, the first
// longest run of two or more zero groups compressed to "::", and "/len"
// unless the length is 128.
func (sa symAddr) String() string {
	bestAt, bestLen := -1, 1
	for i := 0; i < 8; {
		if sa.groups[i].label != "" || sa.groups[i].val != 0 {
			i++
			continue
		}
		j := i
		for j < 8 && sa.groups[j].label == "" && sa.groups[j].val == 0 {
			j++
		}
		if j-i > bestLen {
			bestAt, bestLen = i, j-i
		}
		i = j
	}
	var b strings.Builder
	for i := 0; i < 8; i++ {
		if i == bestAt {
			b.WriteString("::")
			i += bestLen - 1
			continue
		}
		if i > 0 && i != bestAt+bestLen {
			b.WriteByte(':')
		}
		if g := sa.groups[i]; g.label != "" {
			b.WriteString(g.label)
		} else {
			b.WriteString(strconv.FormatUint(uint64(g.val), 16))
		}
	}
	if sa.bits != 128 {
		b.WriteByte('/')
		b.WriteString(strconv.Itoa(sa.bits))
	}
	return b.String()
}

// canonicalSymbolic returns the canonical form of a valid symbolic address
// or prefix.
func canonicalSymbolic(s string) (string, bool) {
	sa, err := parseSymbolic(s)
	if err != nil {
		return "", false
	}
	return sa.String(), true
}

// validGroupName reports whether s matches [a-z0-9]([a-z0-9-_.]{0,61}[a-z0-9])?.
func validGroupName(s string) bool {
	if len(s) == 0 || len(s) > 63 {
		return false
	}
	alnum := func(c byte) bool { return isDigit(c) || ('a' <= c && c <= 'z') }
	if !alnum(s[0]) || !alnum(s[len(s)-1]) {
		return false
	}
	for i := 1; i < len(s)-1; i++ {
		if c := s[i]; !alnum(c) && c != '-' && c != '_' && c != '.' {
			return false
		}
	}
	return true
}

func isDigit(c byte) bool  { return '0' <= c && c <= '9' }
func isLetter(c byte) bool { return ('a' <= c && c <= 'z') || ('A' <= c && c <= 'Z') }
func isHexDigit(c byte) bool {
	return isDigit(c) || ('a' <= c && c <= 'f') || ('A' <= c && c <= 'F')
}

func allDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !isDigit(s[i]) {
			return false
		}
	}
	return true
}
