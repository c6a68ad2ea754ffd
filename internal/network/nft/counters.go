package nft

import (
	"fmt"
	"strings"

	"github.com/google/nftables"

	"github.com/metald/metald/internal/network"
)

// AllCounters returns the packet count of every control counter of every
// NIC in the shard tables, keyed by host device, from one dump of each
// shard table's named objects. No tables yield an empty map.
func (f *Firewall) AllCounters() (map[string]map[network.Control]uint64, error) {
	f.mu.Lock()
	defer f.unlock()
	tables, err := f.conn.ListTablesOfFamily(nftables.TableFamilyNetdev)
	if err != nil {
		return nil, fmt.Errorf("read counters: %w", err)
	}
	known := map[string]network.Control{}
	for _, c := range network.AllControls {
		known[string(c)] = c
	}
	out := map[string]map[network.Control]uint64{}
	for _, t := range tables {
		s, ok := parseShard(t.Name)
		if !ok {
			continue
		}
		objs, err := f.conn.GetNamedObjects(shardTable(s))
		if err != nil {
			if isNotExist(err) {
				continue // deleted since the listing
			}
			return nil, fmt.Errorf("read counters: %w", err)
		}
		for name, v := range countersIn(objs) {
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
			out[dev][ctl] += v.packets
		}
	}
	return out, nil
}
