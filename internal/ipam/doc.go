// Package ipam owns metald's IPv6 address management: pools and their
// prefixes, per-NIC address reservations and automatic allocation, symbolic
// subnet names (2600:beef:1000:web::10/64) and their persisted registry,
// per-tenant rate limits and quotas, and the collection of leaked
// allocations.
//
// The Manager keeps an in-memory index (per-subnet ordered sets of free
// address ranges) rebuilt from a Store at start, so picking the next free
// address never scans the allocated ones; every change is written through to
// the Store in one transaction before it is acknowledged.
//
// # Wiring
//
//	st, _ := sqliteStore.IPAM(ctx)                       // internal/store/sqlite
//	met, _ := ipammetrics.New(registerer)
//	m, _ := ipam.Open(ctx, st, cfg.Pools, ipam.Options{AutoSubnetNames: auto, Observer: met, Logger: log})
//	met.Watch(m)
//	ipamhttp.New(m, ipamhttp.Options{VMState: ..., Live: ..., Grace: ...}).Register(apiMux)
//	go m.CollectLeaks(ctx, interval, grace, live)
//
// # CreateVm and DeleteVm
//
// Each request that validates content opens a name transaction,
// tx := m.BeginNames(ctx), and parses every address through
// tx.PrefixParser() and tx.AddrParser() (hooks for vm.ValidateOptions),
// which resolve subnet names. A name the request is the first to use is
// assigned and persisted at once, marked tentative in the store:
// tx.Finish(true) (Commit) confirms it, tx.Finish(false) (Rollback) deletes
// it from the store and then from memory, so a failed request leaves no
// name behind. A tentative name anyone else uses meanwhile (another
// transaction, plain resolution, DeclareSubnetName, an allocation in its
// subnet outside the transaction) is pinned: confirmed in the store, then
// in memory, and it survives the rollback. tx.Bind(ctx) carries the
// transaction into the Manager's own methods, so the reservation step
// resolves and allocates as part of the same request.
//
// A crash mid-request (kill -9, power loss) is a failed request too: Open
// finds the names still tentative in the store and removes each whose
// subnet holds no allocation. One whose subnet does (in practice the
// interrupted CreateVm's own addresses, which crash recovery releases
// right after) stays tentative without a transaction, like a name whose
// rollback found its subnet in use: it is removed with the last
// allocation in its subnet (Release, Cleanup), unless something pins it
// first. Each removal or keep is logged with its reason.
//
// CreateVm then reserves all NICs at once with ReserveBatch (or one
// Reserve per NIC), passing the resolved ipv6.address (invalid prefix for
// automatic allocation), gateway and bridge; on any later failure it calls
// Release(ctx, vmID) before rolling the names back (a name whose subnet
// still holds an allocation is kept). DeleteVm calls Release(ctx, vmID).
// Reserve is idempotent per (VM, NIC), so crash recovery may simply repeat
// it. Rule plans of VMs whose requests already resolved their names use
// PlanPrefixParser and PlanAddrParser, which never pin.
package ipam
