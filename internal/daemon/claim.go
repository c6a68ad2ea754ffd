package daemon

import (
	"fmt"
	"strings"

	"github.com/metald/metald/internal/network/link"
)

// claimPrefix starts the alias of the host namespace's loopback device
// that records which metald (instance id, data directory) keeps VMs in
// this namespace. Not "metald:", which starts the aliases of VM ports.
const claimPrefix = "metald-host:"

// claimHost marks the host network namespace as this metald's, unless
// another metald (another database) still has VM ports in it: then it
// refuses, because this metald's recovery would remove them as orphans
// (their VMs are not in its database). A namespace whose claimant has no
// ports left is taken over. A loopback alias that is not metald's is left
// as it is (the claim is then not recorded).
func (d *Daemon) claimHost() error {
	h, err := link.HandleAt(int(d.hostNS.Fd()))
	if err != nil {
		return fmt.Errorf("claim host namespace: %w", err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("claim host namespace: %w", err)
	}
	want := claimPrefix + d.instance + " " + d.opt.DataDir
	if len(want) > 255 { // IFALIASZ - 1
		want = claimPrefix + d.instance
	}
	alias := lo.Attrs().Alias
	switch {
	case alias == want:
		return nil
	case alias == "", strings.HasPrefix(alias, claimPrefix+d.instance):
	case strings.HasPrefix(alias, claimPrefix):
		ports, err := d.links.OwnedPorts()
		if err != nil {
			return fmt.Errorf("claim host namespace: %w", err)
		}
		if len(ports) > 0 {
			other := strings.TrimPrefix(alias, claimPrefix)
			id, dir, _ := strings.Cut(other, " ")
			return fmt.Errorf("%w: this network namespace has %d VM port(s) (%s first) of another metald (instance %s, data directory %q); "+
				"starting on this database would remove them as orphans. Start metald with --data-dir %q, or delete those VMs with it first",
				ErrOtherInstance, len(ports), ports[0].Name, id, dir, dir)
		}
		d.log.Info("host namespace taken over from a metald with no VMs left", "previous", strings.TrimPrefix(alias, claimPrefix))
	default:
		d.log.Warn("host loopback has an alias that is not metald's: this metald's claim on the namespace is not recorded", "alias", alias)
		return nil
	}
	if err := h.LinkSetAlias(lo, want); err != nil {
		return fmt.Errorf("claim host namespace: %w", err)
	}
	return nil
}
