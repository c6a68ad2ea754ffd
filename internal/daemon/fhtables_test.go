package daemon_test

import (
	"strings"
	"testing"

	"github.com/metald/metald/internal/network/nft"
)

// fhTables lists metald's netdev shard tables in the host namespace (every
// NIC's first-hop chains, sets and counters live in one of them).
func (e *env) fhTables(t *testing.T) []string {
	t.Helper()
	out, err := e.host.Run("nft", "list", "tables", "netdev")
	if err != nil {
		t.Fatalf("nft list tables: %v\n%s", err, out)
	}
	var tables []string
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "table" && strings.HasPrefix(f[2], nft.ShardPrefix) {
			tables = append(tables, f[2])
		}
	}
	return tables
}

// fhList runs `nft list <kind> netdev <table> <name>` on the shard table
// that holds the named first-hop object (kind: chain, set, counter); it
// fails with the last error when no table holds it.
func (e *env) fhList(t *testing.T, kind, name string) (string, error) {
	t.Helper()
	var out string
	var err error
	for _, tbl := range e.fhTables(t) {
		if out, err = e.host.Run("nft", "list", kind, "netdev", tbl, name); err == nil {
			return out, nil
		}
	}
	if err == nil {
		out, err = e.host.Run("nft", "list", kind, "netdev", nft.ShardName(0), name)
	}
	return out, err
}
