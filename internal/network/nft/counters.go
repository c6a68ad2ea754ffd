package nft

import (
	"errors"
	"fmt"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/metald/metald/internal/network"
)

// AllCounters returns the packet count of every control counter of every
// NIC in the table, keyed by host device, from one dump of the table's
// named objects. A missing table yields an empty map.
func (f *Firewall) AllCounters() (map[string]map[network.Control]uint64, error) {
	f.mu.Lock()
	defer f.unlock()
	objs, err := f.conn.GetNamedObjects(table())
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return map[string]map[network.Control]uint64{}, nil
		}
		return nil, fmt.Errorf("read counters: %w", err)
	}
	known := map[string]network.Control{}
	for _, c := range network.AllControls {
		known[string(c)] = c
	}
	out := map[string]map[network.Control]uint64{}
	for _, o := range objs {
		var name string
		var packets uint64
		switch co := o.(type) {
		case *nftables.CounterObj:
			name, packets = co.Name, co.Packets
		case *nftables.NamedObj:
			cnt, ok := co.Obj.(*expr.Counter)
			if !ok {
				continue
			}
			name, packets = co.Name, cnt.Packets
		default:
			continue
		}
		// Counter names are "<dev>-<control>" and controls contain no '-'.
		i := strings.LastIndexByte(name, '-')
		if i <= 0 {
			continue
		}
		ctl, ok := known[name[i+1:]]
		if !ok {
			continue
		}
		dev := name[:i]
		if out[dev] == nil {
			out[dev] = map[network.Control]uint64{}
		}
		out[dev][ctl] = packets
	}
	return out, nil
}
