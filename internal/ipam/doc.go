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
package ipam
