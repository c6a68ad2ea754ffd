package config

import (
	"errors"
	"fmt"
	"strings"

	"github.com/metald/metald/internal/policy"
)

// ParseManagementAccess parses and checks the quarantine management-access
// rules (isolation.management_access); field names the list in errors,
// which read
//
//	isolation.management_access[0]: col 7: only allow rules belong here ...
//
// A rule must parse, allow, and name the management side (its source or its
// destination) by a literal IPv6 prefix other than ::/0. "sg:" endpoints
// are refused anywhere in the rule (a tenant chooses its VMs' groups, so a
// group would let a tenant grant itself an exception), and so are symbolic
// subnet names (they are resolved per tenant, after the configuration is
// read). Every bad rule is reported.
func ParseManagementAccess(field string, rules []string) ([]policy.Rule, error) {
	var errs []error
	out := make([]policy.Rule, 0, len(rules))
	for i, text := range rules {
		r, err := policy.Parse(text, policy.ParseOptions{})
		if err == nil {
			err = checkManagementRule(text, r)
		}
		if err != nil {
			errs = append(errs, &policy.ListError{Field: field, Index: i, Err: err})
			continue
		}
		out = append(out, r)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return out, nil
}

func checkManagementRule(text string, r policy.Rule) error {
	cols := endpointCols(text)
	if r.Action != policy.ActionAllow {
		return &policy.ParseError{Col: firstCol(text), Msg: fmt.Sprintf("%q: only allow rules belong here (everything else is dropped while a VM is isolated)", r.Action)}
	}
	named := false
	for i, e := range []policy.Endpoint{r.Src, r.Dst} {
		switch {
		case e.Kind == policy.EndpointGroup:
			return &policy.ParseError{Col: cols[i], Msg: fmt.Sprintf("%q: security groups are not allowed here (tenants choose their groups; name the management hosts by prefix)", e.Text)}
		case e.Kind == policy.EndpointPrefix && (e.Symbolic || !e.Prefix.IsValid()):
			return &policy.ParseError{Col: cols[i], Msg: fmt.Sprintf("%q: symbolic subnet names are not allowed here; write the literal prefix", e.Text)}
		case e.Kind == policy.EndpointPrefix && e.Prefix.Bits() > 0:
			named = true
		}
	}
	if !named {
		return &policy.ParseError{Col: cols[0], Msg: "the rule must name the management hosts by an IPv6 prefix other than ::/0 in its from or to endpoint (\"any\" stands for the isolated VM)"}
	}
	return nil
}

// endpointCols returns the 1-based columns of the tokens after "from" and
// "to" in a rule that parsed.
func endpointCols(text string) [2]int {
	var cols [2]int
	prev := ""
	i := 0
	for i < len(text) {
		for i < len(text) && isBlank(text[i]) {
			i++
		}
		start := i
		for i < len(text) && !isBlank(text[i]) {
			i++
		}
		if start == i {
			break
		}
		switch strings.ToLower(prev) {
		case "from":
			if cols[0] == 0 {
				cols[0] = start + 1
			}
		case "to":
			if cols[1] == 0 {
				cols[1] = start + 1
			}
		}
		prev = text[start:i]
	}
	return cols
}

func firstCol(text string) int {
	for i := 0; i < len(text); i++ {
		if !isBlank(text[i]) {
			return i + 1
		}
	}
	return 1
}

func isBlank(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'
}
