package secpolicy

import (
	"fmt"
	"slices"

	"github.com/google/nftables"
)

// Drifted reports whether the kernel's policy tables differ in structure
// from what this Manager programmed: a table, a base, log or NIC chain
// missing, or one of those chains holding another number of rules than
// it was given (an operator's `nft flush chain`, `delete rule` or `delete
// table`). It does not compare rule expressions or set elements. The cost
// is one chain listing and one rule dump per chain, so callers run it only
// after a commit that was not metald's (nftgen). With a NIC whose policy
// is known only from the kernel (after a restart, before Apply), or
// before anything was programmed, it reports true: Resync then settles it.
func (m *Manager) Drifted() (bool, string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.loaded || !m.based {
		return true, "not yet programmed", nil
	}
	want := map[string]map[string]int{} // table → chain → rules
	add := func(table, chain string, rules int) {
		if want[table] == nil {
			want[table] = map[string]int{}
		}
		want[table][chain] = rules
	}
	for _, b := range baseChains {
		add(TableName, b.name, len(baseRules(b.name)))
	}
	add(TableName, chainBlocked, len(blockedRules()))
	add(TableName, chainRAFromVM, len(raFromVMRules()))
	for i := range Shards {
		for _, b := range shardBaseChains {
			add(ShardTable(i), b.name, len(shardBaseRules(b.name)))
		}
		for _, cs := range logChains() {
			add(ShardTable(i), cs.name, len(cs.rules))
		}
	}
	for k, st := range m.nics {
		if st.plan == nil {
			return true, "policy of " + k + " known only from the kernel", nil
		}
		t := ShardTable(Shard(k))
		for _, dir := range []string{dirIn, dirOut} {
			c := buildChain(st.plan, dir, chainName(k, dir, st.gen))
			add(t, chainName(k, dir, 0), len(c.main.rules))
			for _, h := range c.helpers {
				add(t, h.name, len(h.rules))
			}
		}
	}
	chains, err := m.conn.ListChainsOfTableFamily(nftables.TableFamilyIPv6)
	if err != nil {
		return false, "", fmt.Errorf("list chains: %w", err)
	}
	have := map[string]map[string]*nftables.Chain{}
	for _, ch := range chains {
		if want[ch.Table.Name] == nil {
			continue
		}
		if have[ch.Table.Name] == nil {
			have[ch.Table.Name] = map[string]*nftables.Chain{}
		}
		have[ch.Table.Name][ch.Name] = ch
	}
	tables := make([]string, 0, len(want))
	for t := range want {
		tables = append(tables, t)
	}
	slices.Sort(tables)
	for _, t := range tables {
		names := make([]string, 0, len(want[t]))
		for n := range want[t] {
			names = append(names, n)
		}
		slices.Sort(names)
		for _, n := range names {
			ch := have[t][n]
			if ch == nil {
				return true, fmt.Sprintf("chain %s of %s missing", n, t), nil
			}
			rules, err := m.conn.GetRules(ch.Table, ch)
			if err != nil {
				return false, "", fmt.Errorf("list rules of %s %s: %w", t, n, err)
			}
			if len(rules) != want[t][n] {
				return true, fmt.Sprintf("chain %s of %s has %d rules, not %d", n, t, len(rules), want[t][n]), nil
			}
		}
	}
	return false, "", nil
}
