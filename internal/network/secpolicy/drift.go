package secpolicy

import (
	"errors"
	"fmt"
	"slices"

	"github.com/google/nftables"

	"github.com/metald/metald/internal/network/nftconn"
)

// ErrChangedMeanwhile reports that the Manager committed while Drifted
// read the kernel: the comparison proves nothing; compare again later.
var ErrChangedMeanwhile = errors.New("policy tables changed by metald during the comparison")

// Drifted reports whether the kernel's policy tables differ in structure
// from what this Manager programmed: a table, a base, log or NIC chain
// missing, or one of those chains holding another number of rules than
// it was given (an operator's `nft flush chain`, `delete rule` or `delete
// table`). It does not compare rule expressions or set elements. The cost
// is one chain listing and one rule dump per chain, read on a connection
// of its own without holding the Manager's lock (programming a policy
// never waits for it), so callers run it only after a commit that was not
// metald's (nftgen); when the Manager commits meanwhile it returns
// ErrChangedMeanwhile. With a NIC whose policy is known only from the
// kernel (after a restart, before Apply), or before anything was
// programmed, it reports true: Resync then settles it.
func (m *Manager) Drifted() (bool, string, error) {
	want, commits, why := m.expectedChains()
	if why != "" {
		return true, why, nil
	}
	drifted, why, err := readDrift(m.opts, want)
	m.mu.Lock()
	changed := m.commits != commits
	m.mu.Unlock()
	switch {
	case err != nil:
		return false, "", err
	case changed:
		return false, "", ErrChangedMeanwhile
	}
	return drifted, why, nil
}

// expectedChains returns the rule count of every chain the Manager
// programmed, by table and chain, and its commit count; why is set when
// there is nothing to compare with.
func (m *Manager) expectedChains() (want map[string]map[string]int, commits uint64, why string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.loaded || !m.based {
		return nil, 0, "not yet programmed"
	}
	want = map[string]map[string]int{}
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
			return nil, 0, "policy of " + k + " known only from the kernel"
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
	return want, m.commits, ""
}

// readDrift compares the kernel's chains with want on a connection of its
// own.
func readDrift(opts []nftables.ConnOption, want map[string]map[string]int) (bool, string, error) {
	conn, err := nftconn.Open(opts)
	if err != nil {
		return false, "", err
	}
	defer conn.CloseLasting()
	chains, err := conn.ListChainsOfTableFamily(nftables.TableFamilyIPv6)
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
			rules, err := conn.GetRules(ch.Table, ch)
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
