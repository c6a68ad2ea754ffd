// Package vm owns a VM's life: it is the one place that sequences creating,
// booting, stopping and deleting a VM (validate, reserve addresses, build
// ports, start the backend, persist) and undoes every step in reverse when a
// later one fails, so a failed request leaves nothing behind. It also
// reconciles the database with the kernel after a daemon restart.
package vm
