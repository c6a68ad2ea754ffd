package policy

import (
	"errors"
	"net/netip"
	"testing"
)

// FuzzParse checks that Parse never panics, that errors are *ParseError
// with a column inside the text (or one past it), and that an accepted rule
// re-parses from its String to an Equal rule whose String is the same.
func FuzzParse(f *testing.F) {
	for _, s := range seedRules {
		f.Add(s)
	}
	for _, s := range moreValidRules {
		f.Add(s)
	}
	for _, tt := range invalidRules {
		f.Add(tt.text)
	}
	f.Fuzz(func(t *testing.T, text string) {
		r, err := Parse(text, ParseOptions{})
		if err != nil {
			var pe *ParseError
			if !errors.As(err, &pe) {
				t.Fatalf("Parse(%q) error %T %v is not a *ParseError", text, err, err)
			}
			if pe.Col < 1 || pe.Col > len(text)+1 {
				t.Fatalf("Parse(%q): column %d outside 1..%d", text, pe.Col, len(text)+1)
			}
			if (pe.Msg == "") == (pe.Expected == "") {
				t.Fatalf("Parse(%q): exactly one of Msg and Expected must be set: %+v", text, pe)
			}
			_ = err.Error()
			return
		}
		if r.Text != text {
			t.Fatalf("Text = %q, want %q", r.Text, text)
		}
		s := r.String()
		r2, err := Parse(s, ParseOptions{})
		if err != nil {
			t.Fatalf("Parse(%q) ok, but String %q does not re-parse: %v", text, s, err)
		}
		if !r2.Equal(r) {
			t.Fatalf("round trip of %q via %q:\n got  %#v\n want %#v", text, s, r2, r)
		}
		if s2 := r2.String(); s2 != s {
			t.Fatalf("String of %q not stable: %q then %q", text, s, s2)
		}
		// Match must not panic on whatever was accepted.
		Match([]Rule{r}, Packet{Proto: r.Proto, Src: netip.IPv6Loopback(), Dst: netip.IPv6Unspecified()})
	})
}
