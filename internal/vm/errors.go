package vm

import (
	"context"
	"errors"
	"fmt"
	"regexp"

	"github.com/metald/metald/internal/backend"
)

// Errors the manager returns for expected cases; the API maps them to
// Connect codes.
var (
	// ErrNotFound reports an unknown VM.
	ErrNotFound = errors.New("vm not found")
	// ErrExists reports a VM id or host device that is taken.
	ErrExists = errors.New("vm already exists")
	// ErrHostConflict reports a host object in the way of a VM that is not
	// one of this metald's (a sandbox namespace of the VM's name left by
	// something else); the operator must remove it or pick another id.
	ErrHostConflict = errors.New("the host already has an object of this VM's name that metald does not own")
)

// StateError reports an operation that the VM's current state forbids.
type StateError struct {
	VMID  string
	State string
	Op    string
	Want  []string
}

func (e *StateError) Error() string {
	return fmt.Sprintf("vm %s is %s: %s needs %s", e.VMID, e.State, e.Op, joinOr(e.Want))
}

func joinOr(s []string) string {
	switch len(s) {
	case 0:
		return "another state"
	case 1:
		return s[0]
	}
	out := s[0]
	for _, v := range s[1 : len(s)-1] {
		out += ", " + v
	}
	return out + " or " + s[len(s)-1]
}

// SpecValidator is implemented by backends that check a VM's spec against
// the host (the qemu backend checks that kernel and disks exist).
type SpecValidator interface {
	Validate(spec *backend.Spec) error
}

// DNSUpdater is implemented by backends that can give a live guest new DNS
// servers (netns: the VM's resolv.conf). With other backends a change of
// dns_servers reaches the guest at its next boot.
type DNSUpdater interface {
	UpdateDNS(ctx context.Context, spec *backend.Spec, inst backend.Instance) error
}

var specField = regexp.MustCompile(`^([a-z_]+(\[[0-9]+\])?(\.[a-z_]+(\[[0-9]+\])?)*)( \([^)]*\))?: (.+)$`)

// specError turns a backend's "boot.kernel_path: reason" into a validation
// error naming config.boot.kernel_path.
func specError(err error) error {
	if m := specField.FindStringSubmatch(err.Error()); m != nil {
		return &ValidationError{Violations: []FieldViolation{{Field: "config." + m[1], Reason: m[6]}}}
	}
	return &ValidationError{Violations: []FieldViolation{{Field: "config", Reason: err.Error()}}}
}
