// Package backend defines how metald runs a VM's guest: the Backend
// interface that the VM manager drives, and the types it exchanges with the
// netns sandbox, QEMU and Firecracker implementations.
package backend

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"time"
)

// Errors a backend returns for expected cases.
var (
	// ErrNotRunning reports an operation that needs a running guest.
	ErrNotRunning = errors.New("guest is not running")
	// ErrGone reports a sandbox or guest that vanished outside metald.
	ErrGone = errors.New("guest sandbox is gone")
)

// NIC is one guest network interface as the backend must build it.
type NIC struct {
	// ID is the NIC id from the config; it names the guest-side device.
	ID string
	// HostDevice is the VM port in the host namespace (veth host end or tap).
	HostDevice string
	// MAC is the guest-side MAC address.
	MAC net.HardwareAddr
	// Address is the guest address with its prefix length; invalid when the
	// NIC has no IPv6 address.
	Address netip.Prefix
	// Gateway is the default router; invalid when none.
	Gateway netip.Addr
	// DNS are the guest's resolvers.
	DNS []netip.Addr
	// PrivacyExtensions enables RFC 8981 temporary addresses.
	PrivacyExtensions bool
	// StableSecret, when set, is the RFC 7217 stable_secret (IPv6 notation).
	StableSecret string
	// TempValidLifetime is the temporary address valid lifetime; 0 keeps the
	// guest kernel default.
	TempValidLifetime time.Duration
}

// Disk is one storage device.
type Disk struct {
	ID       string
	Path     string
	ReadOnly bool
	Root     bool
}

// Spec is everything a backend needs to build and run one VM.
type Spec struct {
	VMID        string
	VCPUs       int32
	MemoryBytes int64
	KernelPath  string
	InitrdPath  string
	KernelArgs  string
	Disks       []Disk
	NICs        []NIC
}

// Instance is a backend's persisted handle on one VM. The VM manager stores
// it and hands it back on every call, including after a daemon restart.
type Instance struct {
	// Backend names the implementation ("netns", "qemu", "firecracker").
	Backend string `json:"backend"`
	// Netns is the VM's network namespace name, when it has one.
	Netns string `json:"netns,omitempty"`
	// PID is the guest process; 0 when not running.
	PID int `json:"pid,omitempty"`
	// StartTime is the guest process start time in clock ticks since boot
	// (/proc/PID/stat field 22), so a reused PID is never mistaken for it.
	StartTime uint64 `json:"start_time,omitempty"`
	// Details are backend-specific facts shown in GetVm.
	Details map[string]string `json:"details,omitempty"`
}

// Health is the result of checking a VM's sandbox and guest.
type Health struct {
	// SandboxOK is false when the VM's sandbox (namespace, process group,
	// sockets) vanished.
	SandboxOK bool
	// Running is true when the guest process is alive.
	Running bool
	// Paused is true when the guest process is stopped.
	Paused bool
	// Reason explains a failed check.
	Reason string
}

// Backend builds and runs VM guests. Implementations must be safe for
// concurrent use on different VMs; the VM manager serialises calls for one
// VM. Every method that removes something treats "already gone" as success.
type Backend interface {
	// Name is the backend's type ("netns", ...).
	Name() string
	// Create builds the VM's sandbox and one host port per NIC. Host ports
	// are left down and detached from any bridge: the caller installs
	// filters, then attaches and raises them. On error Create removes what
	// it built.
	Create(ctx context.Context, spec *Spec) (Instance, error)
	// Boot starts the guest and applies its network configuration.
	Boot(ctx context.Context, spec *Spec, inst Instance) (Instance, error)
	// Shutdown stops the guest, gracefully within timeout, then by force.
	Shutdown(ctx context.Context, inst Instance, timeout time.Duration) (Instance, error)
	// Pause freezes a running guest.
	Pause(ctx context.Context, inst Instance) error
	// Resume continues a paused guest.
	Resume(ctx context.Context, inst Instance) error
	// Reboot restarts a running guest.
	Reboot(ctx context.Context, spec *Spec, inst Instance) (Instance, error)
	// Destroy removes everything the VM holds in the backend, running or
	// not. It is idempotent.
	Destroy(ctx context.Context, vmID string, inst Instance) error
	// Check reports whether the VM's sandbox and guest still exist.
	Check(ctx context.Context, inst Instance) Health
	// Owned lists the VM IDs that have backend resources on this host
	// (namespaces, processes, sockets), for orphan collection.
	Owned(ctx context.Context) ([]string, error)
}
