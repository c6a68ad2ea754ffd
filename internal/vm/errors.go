package vm

import (
	"errors"
	"fmt"
)

// Errors the manager returns for expected cases; the API maps them to
// Connect codes.
var (
	// ErrNotFound reports an unknown VM.
	ErrNotFound = errors.New("vm not found")
	// ErrExists reports a VM id or host device that is taken.
	ErrExists = errors.New("vm already exists")
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
