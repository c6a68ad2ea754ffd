// Package setname gives the anonymous nftables sets metald creates
// explicit, unique names.
//
// A set added with a name containing "%d" (which is what
// github.com/google/nftables sends for an anonymous set) makes the kernel
// allocate a free number by parsing the name of every set in the table
// with sscanf. With a few anonymous sets per NIC and a thousand NICs that
// scan costs milliseconds per set, and a NIC adds about ten of them. An
// explicit name only costs the kernel's uniqueness check (a string
// comparison per set). nft still prints anonymous sets inline.
package setname

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"strings"
	"sync/atomic"

	"github.com/google/nftables"
)

// idBase keeps our batch-local set IDs clear of the ones the library
// allocates from its own counter (which starts at 1).
const idBase = 1 << 31

var nextID atomic.Uint32

// Namer names anonymous sets "__m<run>_<n>": run is random per Namer, so
// names never collide with sets a previous run left in the table.
type Namer struct {
	run string
	n   atomic.Uint64
}

// New returns a Namer with a fresh random run prefix.
func New() *Namer {
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return &Namer{run: fmt.Sprintf("%08x", binary.BigEndian.Uint32(b[:]))}
}

// Name gives s (an anonymous set about to be added) an explicit name and a
// batch ID, so the library neither renames it nor allocates its ID.
func (n *Namer) Name(s *nftables.Set) {
	s.Name = fmt.Sprintf("__m%s_%d", n.run, n.n.Add(1))
	s.ID = idBase + nextID.Add(1)%(1<<30)
}

// Anonymous reports whether name is the name of an anonymous set: one the
// kernel numbered ("__set<n>", "__map<n>") or one a Namer named.
func Anonymous(name string) bool {
	return strings.HasPrefix(name, "__set") || strings.HasPrefix(name, "__map") || strings.HasPrefix(name, "__m")
}
