package daemon

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/google/nftables"

	"github.com/metald/metald/internal/network"
	"github.com/metald/metald/internal/network/nft"
	"github.com/metald/metald/internal/network/nftconn"
	"github.com/metald/metald/internal/network/nftgen"
	"github.com/metald/metald/internal/network/secpolicy"
)

// joint programs a new VM's first-hop rules and policies in one nf_tables
// transaction (vm.JointInstaller). Every commit walks every chain of the
// namespace to publish the new rule generation, so CreateVm's two commits
// (first-hop, then policy) cost two such walks, a time that grows with the
// number of VMs; one commit costs one.
//
// It stages both changes through the event wrappers' marks (the same plans
// AddNIC and Upsert would program) on a connection of its own, flushes once
// and tells each manager the result. It holds the wrappers' locks
// throughout, first-hop before policy, as no other path holds both.
type joint struct {
	fw     *eventFirewall
	pol    *eventPolicy
	fwMgr  *nft.Firewall
	polMgr *secpolicy.Manager
	gens   *nftgen.Tracker
	obs    func(time.Duration)
	opts   []nftables.ConnOption

	mu   sync.Mutex
	conn *nftables.Conn
}

// InstallJoint implements vm.JointInstaller. On an error nothing was
// committed.
func (j *joint) InstallJoint(ctx context.Context, rules []network.NICPlan, policies []secpolicy.NICPolicy) error {
	if len(rules) == 0 && len(policies) == 0 {
		return nil // a VM without NICs
	}
	start := time.Now()
	rules, policies = slices.Clone(rules), slices.Clone(policies)
	for i := range rules {
		rules[i] = j.fw.mark(rules[i])
	}
	for i := range policies {
		policies[i] = j.pol.mark(policies[i])
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	j.fw.mu.Lock()
	defer j.fw.mu.Unlock()
	j.pol.mu.Lock()
	defer j.pol.mu.Unlock()
	if j.conn == nil {
		c, err := nftconn.Open(j.opts)
		if err != nil {
			return err
		}
		j.conn = c
	}
	var dones []func(error)
	finish := func(err error) {
		for _, d := range dones {
			d(err)
		}
	}
	stageErr := func(err error) error {
		finish(err)
		// The connection holds part of the change: start a new one.
		j.conn.CloseLasting()
		j.conn = nil
		return err
	}
	d, err := j.fwMgr.StageNICs(rules, j.conn)
	if err != nil {
		return stageErr(fmt.Errorf("stage first-hop rules: %w", err))
	}
	dones = append(dones, d)
	if d, err = j.polMgr.Stage(ctx, policies, j.conn); err != nil {
		return stageErr(fmt.Errorf("stage security policies: %w", err))
	}
	dones = append(dones, d)
	err = j.conn.Flush()
	finish(err)
	if err != nil {
		j.conn.CloseLasting()
		j.conn = nil
		return fmt.Errorf("commit first-hop rules and policies: %w", err)
	}
	if j.gens != nil {
		j.gens.Note()
	}
	// As AddNIC and Upsert would have: remember what the kernel holds
	// and, with the cache on, count the misses.
	caching := j.fw.ev.Settings().CachePolicies
	for _, p := range rules {
		j.fw.last[p.HostDevice] = p
		if caching {
			j.fw.metrics.PolicyCache(cacheFirstHop, false)
		}
	}
	for _, p := range policies {
		j.pol.last[secpolicy.Key(p.VMID, p.NIC)] = p
		if caching {
			j.pol.metrics.PolicyCache(cachePolicy, false)
		}
	}
	if j.obs != nil {
		j.obs(time.Since(start))
	}
	return nil
}

// Close releases the connection.
func (j *joint) Close() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.conn == nil {
		return nil
	}
	err := j.conn.CloseLasting()
	j.conn = nil
	return err
}
