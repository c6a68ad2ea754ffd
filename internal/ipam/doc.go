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
// Validation parses every address through m.PrefixParser(ctx) and
// m.AddrParser(ctx) (hooks for vm.ValidateOptions), which resolve subnet
// names. CreateVm then reserves all NICs at once with ReserveBatch (or one
// Reserve per NIC), passing the resolved ipv6.address (invalid prefix for
// automatic allocation), gateway and bridge; on any later failure it calls
// Release(ctx, vmID). DeleteVm calls Release(ctx, vmID). Reserve is
// idempotent per (VM, NIC), so crash recovery may simply repeat it.
package ipam
