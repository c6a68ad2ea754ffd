// Package secevent owns metald's security events: it reads the packets that
// metald's nftables rules drop and log (NFLOG), parses them (pure, fuzzed
// parser), folds repeats into aggregated events, attributes them to VM,
// tenant and NIC, and records them in the store, in <log-dir>/security.log
// and in metrics. It also holds the state behind the operator endpoints
// (enhanced-monitoring sessions, optimize settings); the HTTP handlers are
// in package eventhttp.
//
// # Log prefix contract (for the rule builders)
//
// A rule that drops a packet for a security reason logs it with
//
//	log group <G> prefix "metald:<hostdev>:<control>"
//
// before its verdict (`... counter log group 6420 prefix "metald:tap-vm1:ra_guard" drop`).
// Build the string with Prefix(dev, control); ParsePrefix splits it.
//
//   - G is the NFLOG group (ReaderConfig.Group; DefaultGroup 6420).
//
//   - <hostdev> is the VM NIC's host device (tap/veth on the bridge, at most
//     15 bytes) whose chain the rule is in; it is how the event is attributed
//     to VM, tenant and NIC (Options.Resolve). An empty <hostdev>
//     ("metald::blocked_source") is allowed for rules outside per-NIC chains:
//     the packet's input port is used instead.
//
//   - <control> is the reason (no ':' or spaces), optionally followed by
//     "/<rule>" naming the policy rule that decided
//     ("policy_deny/egress_rules[2]", "tenant_isolation/ingress_strict");
//     <rule> becomes details.rule (else details.rule is the control).
//     Known controls and the events they become (Classify):
//
//     ra_guard                           ra_guard_block            high
//     source_guard, mac_spoof, nd_strict source_guard_violation    high
//     ext_hbh, ext_routing, ext_fragment,
//     ext_dstopts, header_chain          extension_header_block    medium (details.header)
//     nd_rate                            nd_rate_limit_exceeded    medium
//     icmpv6_rate, ra_rate,
//     multicast_rate                     <kind>_rate_limit_exceeded medium
//     l2_violation                       l2_violation              medium
//     policy_deny                        policy_deny               low
//     blocked_source                     blocked_source            high
//     tenant_isolation                   tenant_isolation_block    medium
//     monitor (logged, not dropped)      monitored_packet          low
//     allow_sample (allowed, sampled)    policy_allow_sample       low (not a violation)
//     anything else                      security_drop             low (details.rule)
//
//     One control is not an event: "learned" (ControlLearned) is the
//     first-hop rule that bound a temporary address from the guest's DAD;
//     its NS target goes to Options.Learned, so that the daemon adds the
//     address to the VM's security policy.
//
//   - The whole prefix is at most 63 bytes (MaxPrefixLen).
//
//   - Rules should carry a kernel-side rate limit on the log statement
//     (`limit rate 100/second burst 20 packets log ...` in a separate
//     rule, or the log's own group threshold) so a flood cannot drown the
//     reader; exact counts are the rules' named counters, never the log.
//     The reader stays bounded without one (see below). metald's rules log
//     at most 10 packets/s per rule, and at most 1000/s per rule (every
//     drop, short of a flood) for the VMs of a tenant under enhanced
//     monitoring, which also log a sample (10/s per rule) of the packets
//     their policy allows (allow_sample).
//
//   - For "metald::<control>" the reader attributes the packet to its input
//     port when that is a VM's, else to its output port (a blocked source
//     reaching a VM).
//
// # Events
//
// Packets with the same host device, event type, source (IPv6 address, or
// MAC when there is none) and control within Config.Window (default 5 s) of
// the first one become one event with details.packet_count, first_seen and
// last_seen; the event's timestamp is first_seen. Events are written when
// their window closes. metald's own events (vm_isolated, vm_released,
// firewall_drift_repaired) enter through Service.Emit.
//
// # Bounded memory
//
// Ingest (called per NFLOG record) only updates the aggregation table,
// which holds at most Config.MaxBuckets keys; per host device and type at
// most Config.MaxSourcesPerKey sources are tracked, further sources fold
// into one "src":"*" event (spoofing floods then cost one bucket). Emitted
// events go through a queue of Config.QueueSize. Whatever does not fit is
// dropped and counted in metald_security_events_dropped_total. Kernel-side
// losses (socket overruns) are counted in metald_security_nflog_overruns_total.
//
// # Batching
//
// With Settings.BatchProcessing off every event is stored in its own
// transaction as soon as it is ready; on, the events of one flush window
// (Config.Window/5, 10 ms to 1 s) go in one transaction (Stats.Transactions,
// metald_security_event_store_transactions_total).
//
// # Storage and security.log
//
// Events are stored through Store (SQLite: internal/store/sqlite.EventStore),
// pruned every Config.PruneInterval to Config.MaxAge and Config.MaxEvents,
// and returned newest first by default. Each event is also one JSON line in
// <log-dir>/security.log; violation lines start with
// {"marker":"IPv6_VIOLATION", so `grep IPv6_VIOLATION` selects them. The file
// rotates by size (security.log.1 newest).
package secevent
