// Package policy owns metald's firewall rule language: parsing rule text into
// typed rules and checking them.
//
// A rule is one line of ipfw-like text:
//
//	ACTION PROTO [type ICMPTYPES] from ENDPOINT [port PORTS] to ENDPOINT [port PORTS] [log]
//
// where
//
//   - ACTION is "allow" or "deny";
//   - PROTO is "tcp", "udp", "icmpv6" or "all" ("ip" and "any" are aliases
//     of "all");
//   - ICMPTYPES (icmpv6 only) is a comma-separated list of ICMPv6 type names
//     (see [ICMPTypeName]) or numbers 0..255;
//   - ENDPOINT is "any", an IPv6 address (meaning /128), an IPv6 prefix
//     "addr/len" without host bits, or "sg:GROUP" naming a security group
//     (GROUP matches [a-z0-9]([a-z0-9-_.]{0,61}[a-z0-9])?);
//   - PORTS (tcp and udp only) is a comma-separated list of ports 1..65535
//     and ranges "lo-hi" with lo <= hi. "port" after the "from" endpoint
//     constrains the source port, after the "to" endpoint the destination
//     port;
//   - "log" asks for matching packets to be logged.
//
// Keywords, protocol names, ICMPv6 type names, "any", the "sg:" prefix and
// symbolic labels are case-insensitive; tokens are separated by blanks and
// lists contain no blanks ("port 80,443", not "port 80, 443").
//
// # Symbolic addresses
//
// An address or prefix may name its subnet symbolically, as in
// "2600:BEEF:1000:mgmt::/64": exactly one colon-separated group may be a
// label [a-z][a-z0-9-]{0,31} standing for a 16-bit group. A group made only
// of hex digits is always hex, so "2600:beef:1000:db::/64" is a plain
// prefix. This package never resolves labels itself: every address goes
// through [ParseOptions.ParsePrefix], whose default accepts plain netip
// addresses and prefixes and leaves syntactically valid symbolic ones
// unresolved (Endpoint.Symbolic set, Endpoint.Prefix invalid). [Resolve]
// fills in unresolved prefixes and security group members later.
//
// # Semantics
//
// A rule list is evaluated in order and the first matching rule decides
// (ipfw semantics); see [Match]. An empty list allows everything; a
// non-empty list denies what no rule matches (default deny when the list is
// non-empty).
//
// The package is pure: it does no I/O and keeps no global state.
package policy
