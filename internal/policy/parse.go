package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// ParseOptions configures Parse.
type ParseOptions struct {
	// ParsePrefix parses the text of an address or prefix endpoint (any
	// endpoint token containing ":" that is not "sg:GROUP"). It may
	// resolve symbolic labels, returning a valid prefix, or leave them
	// unresolved by returning the zero netip.Prefix and a nil error. A
	// plain address must yield a valid prefix (a /128 for an address).
	// Parse rejects results that are IPv4 or have host bits set. nil
	// means DefaultParsePrefix.
	ParsePrefix func(string) (netip.Prefix, error)
}

// Check parses text and returns only the error; it suits hooks that take a
// func(string) error.
func (o ParseOptions) Check(text string) error {
	_, err := Parse(text, o)
	return err
}

// ParseError is a syntax or value error in one rule.
type ParseError struct {
	// Col is the 1-based byte column of the offending token or list
	// element; one past the end of the text when the rule ended early.
	Col int
	// Expected describes what the parser wanted, for "expected X, got Y"
	// errors; it is empty when Msg is set.
	Expected string
	// Got is the offending token or list element as written; "" means the
	// end of the rule.
	Got string
	// Msg, when set, replaces the "expected X, got Y" text.
	Msg string
	// Hint, when set, is a likely intended spelling, rendered as
	// (did you mean "HINT"?).
	Hint string
}

// Error renders e as `col 17: expected "from", got "form"` or
// `col 22: port 70000 out of range 1..65535`.
func (e *ParseError) Error() string {
	var b strings.Builder
	b.WriteString("col ")
	b.WriteString(strconv.Itoa(e.Col))
	b.WriteString(": ")
	if e.Msg != "" {
		b.WriteString(e.Msg)
	} else {
		b.WriteString("expected ")
		b.WriteString(e.Expected)
		b.WriteString(", got ")
		if e.Got == "" {
			b.WriteString("end of rule")
		} else {
			b.WriteString(quote(e.Got))
		}
	}
	if e.Hint != "" {
		b.WriteString(" (did you mean ")
		b.WriteString(quote(e.Hint))
		b.WriteString("?)")
	}
	return b.String()
}

// ListError is an error in one rule of a list, as returned by ParseList.
type ListError struct {
	Field string // such as "security_policy.ingress_rules"
	Index int    // 0-based position of the rule in the list
	Err   error  // usually a *ParseError
}

// Error renders e as `security_policy.ingress_rules[2]: col 17: ...`.
func (e *ListError) Error() string {
	return e.Field + "[" + strconv.Itoa(e.Index) + "]: " + e.Err.Error()
}

// Unwrap returns e.Err.
func (e *ListError) Unwrap() error { return e.Err }

// ParseList parses every rule of a list, field naming the list in errors.
// On failure it returns nil rules and an error for every bad rule: a single
// *ListError, or several joined with errors.Join (errors.As finds the
// first).
func ParseList(field string, rules []string, opts ParseOptions) ([]Rule, error) {
	out := make([]Rule, 0, len(rules))
	var errs []error
	for i, text := range rules {
		r, err := Parse(text, opts)
		if err != nil {
			errs = append(errs, &ListError{Field: field, Index: i, Err: err})
			continue
		}
		out = append(out, r)
	}
	switch len(errs) {
	case 0:
		return out, nil
	case 1:
		return nil, errs[0]
	}
	return nil, errors.Join(errs...)
}

// Parse parses one rule. Errors are *ParseError.
func Parse(text string, opts ParseOptions) (Rule, error) {
	if opts.ParsePrefix == nil {
		opts.ParsePrefix = DefaultParsePrefix
	}
	p := parser{toks: tokenize(text), endCol: len(text) + 1, opts: opts}
	r, err := p.rule()
	if err != nil {
		return Rule{}, err
	}
	r.Text = text
	return r, nil
}

type token struct {
	s   string
	col int // 1-based
}

// tokenize splits s at runs of ASCII white space.
func tokenize(s string) []token {
	var toks []token
	start := -1
	for i := 0; i <= len(s); i++ {
		if i == len(s) || isSpace(s[i]) {
			if start >= 0 {
				toks = append(toks, token{s: s[start:i], col: start + 1})
				start = -1
			}
			continue
		}
		if start < 0 {
			start = i
		}
	}
	return toks
}

func isSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'
}

type parser struct {
	toks   []token
	pos    int
	endCol int
	opts   ParseOptions
}

const (
	expAction   = `"allow" or "deny"`
	expProto    = `"tcp", "udp", "icmpv6" or "all"`
	expEndpoint = `endpoint ("any", IPv6 address, prefix or "sg:GROUP")`
)

func (p *parser) next() (token, bool) {
	if p.pos >= len(p.toks) {
		return token{col: p.endCol}, false
	}
	t := p.toks[p.pos]
	p.pos++
	return t, true
}

// accept consumes the next token if it is keyword kw.
func (p *parser) accept(kw string) (token, bool) {
	if p.pos < len(p.toks) && strings.EqualFold(p.toks[p.pos].s, kw) {
		p.pos++
		return p.toks[p.pos-1], true
	}
	return token{}, false
}

func (p *parser) expect(kw string) error {
	if _, ok := p.accept(kw); ok {
		return nil
	}
	t, _ := p.next()
	return expected(t, strconv.Quote(kw))
}

func expected(t token, what string) *ParseError {
	return &ParseError{Col: t.col, Expected: what, Got: t.s}
}

func errAt(col int, got, format string, args ...any) *ParseError {
	return &ParseError{Col: col, Got: got, Msg: fmt.Sprintf(format, args...)}
}

func (p *parser) rule() (Rule, error) {
	var r Rule
	t, _ := p.next()
	switch strings.ToLower(t.s) {
	case "allow":
		r.Action = ActionAllow
	case "deny":
		r.Action = ActionDeny
	default:
		return r, expected(t, expAction)
	}

	t, _ = p.next()
	switch strings.ToLower(t.s) {
	case "tcp":
		r.Proto = ProtoTCP
	case "udp":
		r.Proto = ProtoUDP
	case "icmpv6":
		r.Proto = ProtoICMPv6
	case "all", "ip", "any":
		r.Proto = ProtoAll
	default:
		return r, expected(t, expProto)
	}

	if t, ok := p.accept("type"); ok {
		if r.Proto != ProtoICMPv6 {
			return r, errAt(t.col, t.s, "%s is only valid with icmpv6", quote(t.s))
		}
		list, ok := p.next()
		if !ok || isKeyword(list.s) {
			return r, expected(list, "icmpv6 type list")
		}
		types, err := parseICMPTypes(list)
		if err != nil {
			return r, err
		}
		r.ICMPTypes = types
	}

	if err := p.expect("from"); err != nil {
		return r, err
	}
	var err error
	if r.Src, err = p.endpoint(); err != nil {
		return r, err
	}
	if r.SrcPorts, err = p.ports(r.Proto); err != nil {
		return r, err
	}
	if err := p.expect("to"); err != nil {
		return r, err
	}
	if r.Dst, err = p.endpoint(); err != nil {
		return r, err
	}
	if r.DstPorts, err = p.ports(r.Proto); err != nil {
		return r, err
	}
	if _, ok := p.accept("log"); ok {
		r.Log = true
	}
	if t, ok := p.next(); ok {
		return r, errAt(t.col, t.s, "unexpected %s after end of rule", quote(t.s))
	}
	return r, nil
}

// isKeyword reports whether s is a keyword that cannot be an endpoint or a
// list.
func isKeyword(s string) bool {
	switch strings.ToLower(s) {
	case "from", "to", "port", "type", "log":
		return true
	}
	return false
}

// ports parses an optional "port PORTS" clause.
func (p *parser) ports(proto Proto) ([]PortRange, error) {
	kw, ok := p.accept("port")
	if !ok {
		return nil, nil
	}
	if !proto.hasPorts() {
		return nil, errAt(kw.col, kw.s, "%s is only valid with tcp or udp", quote(kw.s))
	}
	list, ok := p.next()
	if !ok || isKeyword(list.s) {
		return nil, expected(list, "port list")
	}
	var out []PortRange
	err := eachElement(list, "port", func(el string, col int) error {
		lo, hi, isRange := strings.Cut(el, "-")
		if isRange && (lo == "" || hi == "") {
			return errAt(col, el, "incomplete port range %s", quote(el))
		}
		a, err := parsePort(lo, col)
		if err != nil {
			return err
		}
		b := a
		if isRange {
			if b, err = parsePort(hi, col+len(lo)+1); err != nil {
				return err
			}
			if a > b {
				return errAt(col, el, "invalid port range %s: %d > %d", quote(el), a, b)
			}
		}
		out = append(out, PortRange{Lo: a, Hi: b})
		return nil
	})
	return out, err
}

func parsePort(s string, col int) (uint16, error) {
	if !allDigits(s) {
		return 0, &ParseError{Col: col, Expected: "port number", Got: s}
	}
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n < 1 {
		return 0, errAt(col, s, "port %s out of range 1..65535", s)
	}
	return uint16(n), nil
}

func parseICMPTypes(list token) ([]uint8, error) {
	var out []uint8
	err := eachElement(list, "icmpv6 type", func(el string, col int) error {
		if allDigits(el) {
			n, err := strconv.ParseUint(el, 10, 8)
			if err != nil {
				return errAt(col, el, "icmpv6 type %s out of range 0..255", el)
			}
			out = append(out, uint8(n))
			return nil
		}
		t, ok := LookupICMPType(el)
		if !ok {
			e := errAt(col, el, "unknown icmpv6 type %s", quote(el))
			e.Hint = suggestICMPType(el)
			return e
		}
		out = append(out, t)
		return nil
	})
	return out, err
}

// eachElement calls f for each comma-separated element of a list token,
// with the element's column.
func eachElement(list token, what string, f func(el string, col int) error) error {
	off := 0
	for {
		el, _, more := strings.Cut(list.s[off:], ",")
		col := list.col + off
		if el == "" {
			if !more {
				// Point at the trailing comma.
				return errAt(col-1, list.s, "%s list %s ends with \",\" (lists must not contain blanks)", what, quote(list.s))
			}
			return errAt(col, list.s, "empty element in %s list %s", what, quote(list.s))
		}
		if err := f(el, col); err != nil {
			return err
		}
		if !more {
			return nil
		}
		off += len(el) + 1
	}
}

// endpoint parses an ENDPOINT.
func (p *parser) endpoint() (Endpoint, error) {
	t, ok := p.next()
	if !ok || isKeyword(t.s) {
		return Endpoint{}, expected(t, expEndpoint)
	}
	if strings.EqualFold(t.s, "any") {
		return Endpoint{Kind: EndpointAny, Text: t.s}, nil
	}
	if len(t.s) >= 3 && strings.EqualFold(t.s[:3], "sg:") {
		name := t.s[3:]
		if name == "" {
			return Endpoint{}, errAt(t.col, t.s, `missing security group name after "sg:"`)
		}
		if !validGroupName(name) {
			e := errAt(t.col, t.s, "invalid security group name %s (want [a-z0-9]([a-z0-9-_.]{0,61}[a-z0-9])?)", quote(name))
			if l := strings.ToLower(name); validGroupName(l) {
				e.Hint = "sg:" + l
			}
			return Endpoint{}, e
		}
		return Endpoint{Kind: EndpointGroup, Text: t.s, Group: name}, nil
	}
	what := "address"
	if strings.Contains(t.s, "/") {
		what = "prefix"
	}
	if !strings.Contains(t.s, ":") {
		if pf, err := parsePlain(t.s); err == nil && pf.Addr().Is4() {
			return Endpoint{}, errAt(t.col, t.s, "IPv4 %s %s not supported; rules are IPv6-only", what, quote(t.s))
		}
		return Endpoint{}, expected(t, expEndpoint)
	}
	_, plainErr := parsePlain(t.s)
	symbolic := plainErr != nil
	if symbolic && hasLabel(t.s) {
		if sa, err := parseSymbolic(t.s); err == nil {
			if msg, hint := sa.hostBits(); msg != "" {
				e := errAt(t.col, t.s, "%s %s %s", what, quote(t.s), msg)
				e.Hint = hint
				return Endpoint{}, e
			}
		}
	}
	pf, err := p.opts.ParsePrefix(t.s)
	if err != nil && !strings.Contains(t.s, "/") {
		// An address is its /128, also for a parser that wants prefixes.
		if pf128, err128 := p.opts.ParsePrefix(t.s + "/128"); err128 == nil {
			pf, err = pf128, nil
		}
	}
	if err != nil {
		return Endpoint{}, errAt(t.col, t.s, "invalid %s %s: %v", what, quote(t.s), err)
	}
	ep := Endpoint{Kind: EndpointPrefix, Text: t.s, Symbolic: symbolic}
	if !pf.IsValid() {
		if !symbolic {
			return Endpoint{}, errAt(t.col, t.s, "invalid %s %s: ParsePrefix returned no prefix", what, quote(t.s))
		}
		return ep, nil
	}
	if msg := checkPrefix(pf); msg != "" {
		e := errAt(t.col, t.s, "%s %s %s", what, quote(t.s), msg)
		if msg == msgHostBits && !symbolic {
			e.Hint = formatPrefix(pf.Masked())
		}
		return Endpoint{}, e
	}
	ep.Prefix = pf
	return ep, nil
}

const msgHostBits = "has host bits set"

// checkPrefix returns why a resolved prefix is unusable in a rule, or "".
func checkPrefix(pf netip.Prefix) string {
	switch {
	case !pf.IsValid():
		return "is not a valid prefix"
	case !pf.Addr().Is6():
		return "is not IPv6"
	case pf.Addr().Zone() != "":
		return "has a zone"
	case pf != pf.Masked():
		return msgHostBits
	}
	return ""
}

// quote quotes s for an error message, shortening long strings.
func quote(s string) string {
	const max = 64
	if len(s) > max {
		return strconv.Quote(s[:max]) + "..."
	}
	return strconv.Quote(s)
}

func quoteAll(ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = quote(s)
	}
	return out
}
