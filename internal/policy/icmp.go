package policy

import (
	"strconv"
	"strings"
)

// icmpTypes lists the ICMPv6 type names the rule language knows (RFC 4443,
// RFC 4861, RFC 3810), in numeric order.
var icmpTypes = []struct {
	name string
	typ  uint8
}{
	{"destination-unreachable", 1},
	{"packet-too-big", 2},
	{"time-exceeded", 3},
	{"parameter-problem", 4},
	{"echo-request", 128},
	{"echo-reply", 129},
	{"mld-listener-query", 130},
	{"mld-listener-report", 131},
	{"mld-listener-done", 132},
	{"router-solicitation", 133},
	{"router-advertisement", 134},
	{"neighbor-solicitation", 135},
	{"neighbor-advertisement", 136},
	{"redirect", 137},
	{"mldv2-listener-report", 143},
}

// ICMPTypeName returns the rule-language name of ICMPv6 type t, such as
// "echo-request" for 128, or its decimal number when it has no name.
func ICMPTypeName(t uint8) string {
	for _, e := range icmpTypes {
		if e.typ == t {
			return e.name
		}
	}
	return strconv.Itoa(int(t))
}

// LookupICMPType returns the ICMPv6 type called name (case-insensitive).
// It does not accept numbers.
func LookupICMPType(name string) (uint8, bool) {
	for _, e := range icmpTypes {
		if strings.EqualFold(e.name, name) {
			return e.typ, true
		}
	}
	return 0, false
}

// suggestICMPType returns the known name closest to a misspelt one, or ""
// when none is close enough to be a plausible typo.
func suggestICMPType(name string) string {
	name = strings.ToLower(name)
	if len(name) > 64 {
		return ""
	}
	limit := 1
	if len(name) >= 6 {
		limit = 2
	}
	if len(name) >= 16 {
		limit = 3
	}
	best, bestD := "", limit+1
	for _, e := range icmpTypes {
		if d := editDistance(name, e.name); d < bestD {
			best, bestD = e.name, d
		}
	}
	return best
}

// editDistance is the Damerau-Levenshtein (optimal string alignment)
// distance between a and b, counting bytes.
func editDistance(a, b string) int {
	prev2 := make([]int, len(b)+1)
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
			if i > 1 && j > 1 && a[i-1] == b[j-2] && a[i-2] == b[j-1] {
				cur[j] = min(cur[j], prev2[j-2]+1)
			}
		}
		prev2, prev, cur = prev, cur, prev2
	}
	return prev[len(b)]
}
