// Package secpolicy owns `table ip6 metald_security` and its shard tables
// metald_security_0..7: kernel enforcement
// of each VM NIC's resolved security policy (policy.Rule lists), tenant
// isolation, microsegmentation, allowed destinations, quarantine and the
// operator's blocked_sources set.
//
// # Layout of the tables
//
// The policy is spread over a main table and Shards (8) shard tables, so
// that an update validates only an eighth of the VMs' chains: a commit
// that adds a rule with a verdict makes the kernel validate every chain
// reachable from the base chains of each table the commit changed
// (nft_table_validate), and an update changes one shard only (at 1000
// VMs, update p50 2.2 ms with 8 shards, 3.9 with 4, 6.1 with 2;
// docs/PERFORMANCE.md).
//
// Only the main table's base chains see every packet. The shards' base
// chains are of type nat: nf_nat calls a hook's nat chains for a
// connection until it has a NAT binding, and ours make none, so the kernel
// calls them for the first packet of each new connection and then, having
// set up a null binding, never again for that connection (either
// direction). An established flow's packet therefore passes one base
// chain, not nine (in a profile of a TCP transfer between two VMs,
// nf_tables' share of the bottleneck CPU fell from 3.5% to 1.5%;
// docs/PERFORMANCE.md). A packet the main table drops never reaches a
// shard; a drop in a shard is final. Policy changes do not re-judge open
// connections (they never did: established flows were accepted first);
// IsolateVm deletes the VM's conntrack entries so that the quarantine
// judges them again.
//
// `table ip6 metald_security` (TableName), content fixed: the operator's
// blocked_sources, a copy of vm_addrs, and three base chains (forward,
// input, output; filter priority 0, policy accept):
//
//	blocked_sources drop (both directions; in input/output only for VM addresses;
//	  forward: one lookup per address, jump to chain blocked: sample, drop)
//	ct state established,related accept
//	ND/MLD (130-133,135,136,143) accept            RFC 4890: never broken by a user's deny all
//	RA/redirect (134,137) from a VM address drop   (output: the host is the gateway, they pass)
//	RA (forward) accept                            the first-hop RA guard decides
//	ct state untracked, from or to a VM, drop      never judged by a shard (another table's notrack)
//	ct state invalid drop
//
// `table ip6 metald_security_0` .. `_7` (ShardTable, NICTable): a NIC's
// chains live in shard FNV-1a(Key(vm, nic)) mod 8 (Shard), with the
// shard's verdict maps egress_by_mac and ingress_by_dst, its log_deny and
// log_allow chains, a copy of every managed set, and two base chains of
// type nat, policy accept:
//
//	new_postrouting (hook postrouting, priority -150: forwarded, bridged or
//	  routed, and host-sent packets; before any other table's source NAT,
//	  whose binding would end the walk before ours)
//	    ether saddr vmap @egress_by_mac   (the frame the packet came in)
//	    ip6 daddr vmap @ingress_by_dst
//	new_input (hook input, priority 10: after the main table's input chain)
//	    ether saddr vmap @egress_by_mac
//
// A new connection's first packet passes the main table's base chain and
// then the 8 shards' for its hook. Between two local VMs the sender's
// egress chain runs in the sender's shard and the receiver's ingress chain
// in the receiver's, in shard order (when the receiver's shard comes first
// its ingress chain sees, and counts, a packet the sender's egress then
// drops). Shard base chains of the layout before this one (filter chains
// at forward, input and output that every packet passed) are deleted by a
// Manager's first commit. Shard tables of a layout with another shard
// count (a NIC's chains in a table that is not its shard) are not loaded:
// the first commit deletes and recreates them, and the Apply that follows
// a start programs every NIC again in its shard, in the same batch.
//
// Egress is dispatched by the source MAC of the frame the packet arrived
// in (egress_by_mac): the first-hop table drops a VM port's frames from
// any other MAC, so whatever source address a VM uses (a temporary address
// of privacy extensions, or any address without the source guard), its
// egress rules judge the packet. A packet the host sends has no link-layer
// header and one routed in from elsewhere carries a router's MAC: neither
// matches. Ingress is dispatched by destination address (ingress_by_dst,
// every address of NICPolicy.Addrs: configured, link-local, and the
// temporary addresses the first-hop rules bound from the guest's DAD,
// which the daemon adds as it learns them; a Manager learns a NIC's
// addresses from it after a restart). Each entry jumps to the NIC's chain
// for that direction. (The former layouts' egress_by_src map, by source
// address, is deleted on a Manager's first commit.) A NIC
// chain ends with `return` when the packet is allowed and `drop` when it is
// not, so for traffic between two local VMs the sender's egress chain and
// the receiver's ingress chain both decide ("both sides' rules").
//
// A NIC chain, in order:
//
//  1. quarantine (Isolated): management rules, then log + drop;
//  2. allowed_destinations (egress): jump to helper chain <chain>-dst,
//     which returns for a listed prefix and drops anything else;
//  3. strict tenant isolation: a peer outside @tenant-<t>, the gateways
//     and allowed_destinations (another tenant's VM, or a host beyond the
//     gateway) goes (goto) to <chain>-strict, which holds the user's rules
//     without the allow rules whose peer is `any` (the peer is the source
//     of an ingress rule, the destination of an egress rule), then drops:
//     across tenants only a rule naming the peer by prefix or sg: allows.
//     Each side applies its own level, so between two strict VMs of
//     different tenants the sender's egress rule and the receiver's
//     ingress rule must both name the other (the guide's 3-tier example);
//  4. the user's rules in order, first match wins; a port list or ICMPv6
//     type list becomes one kernel rule per element (no anonymous sets:
//     creating one costs the kernel a walk over all sets of the table). A
//     logged verdict is `goto log_deny` (rate limit, log prefix
//     "metald-ipv6-deny ", drop) or `goto log_allow` (prefix
//     "metald-ipv6-allow ", then back to the base chain); the log rate
//     limit is one budget per shard table;
//  5. when the default is allow: moderate isolation drops a peer that is a
//     local VM of another tenant, and microsegmentation drops a peer of the
//     same tenant on the same bridge (both need an explicit allow rule);
//  6. the default verdict.
//
// Every verdict rule carries a counter; RuleCounters reads them (summed per
// policy rule). With NICPolicy.EventLogGroup each counted drop is preceded
// by a rule with the same match that logs a rate-limited sample to NFLOG,
// attributed to device and rule, for internal/secevent (eventlog.go);
// blocked_sources drops in the forward chain are sampled the same way (in
// chain blocked, one rate limit for both directions).
//
// Named sets: blocked_sources (main table; operator-owned: created if
// absent, never flushed, never deleted), vm_addrs (every local VM address;
// main table and every shard), tenant-<t>, bridge-<b>, and sg-<group> for
// security groups (every shard). The copies of a set have the same
// elements. Membership changes are element additions and removals in every
// copy, in the change's one batch; rules are never rewritten for them. A
// tenant, bridge or group set with no member left that no NIC's policy
// references is deleted (every copy) in the batch that left it so; Apply
// also collects those earlier runs left. While a NIC's policy is known
// only from the kernel (after a restart, before Apply), nothing is
// deleted.
//
// A main table of the former single-table layout (NIC chains, maps, log
// chains and managed sets in metald_security) is cleaned up by the first
// commit of a Manager; its NICs are not loaded and are enforced again when
// they are next applied.
//
// # Updates
//
// A NIC's main chains are vm-<vm>.<nic>-{in,out}-g0, in its shard table;
// the maps point at them. Its helper chains are named per generation,
// vm-<vm>.<nic>-{in,out}-g<N>-{dst,strict}. An update builds the helpers of
// generation N+1, rewrites the main chains in place (flush and add), and
// deletes the generation-N helpers, all in one netlink batch (one
// nf_tables transaction): a failed update changes nothing, and a packet
// sees the old rules or the new ones, never neither. Map elements change
// only when the NIC's addresses do. (An earlier layout kept the main rules
// in chains of generation N and only a jump to them in generation 0; the
// first update of such a NIC moves them.)
//
// # Drift
//
// Drifted compares the tables' structure with what the Manager programmed
// (tables; base, log and NIC chains; each chain's rule count), one rule
// dump per chain, for callers that run it after a foreign commit
// (internal/network/nftgen). Resync reads the kernel again and programs
// every NIC whole, as a restart does, re-creating missing tables, maps and
// sets and re-adding their elements; blocked_sources elements are kept.
//
// # Bridged traffic
//
// Bridged IPv6 reaches the ip6 hooks only through br_netfilter. See
// EnsureBridgeNetfilter and BridgeNetfilterStatus.
package secpolicy
