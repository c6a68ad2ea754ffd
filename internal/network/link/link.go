// Package link owns metald's host-side links: bridges, VM ports and their
// addresses, via netlink.
//
// Every operation acts in the host network namespace handed to New (in
// production /proc/self/ns/net, in tests a private namespace), never in the
// calling thread's namespace implicitly: netlink traffic goes through a
// socket opened inside that namespace and sysctls are written from a thread
// that joined it (see package ns).
//
// Ownership is recorded in the kernel itself, in the link alias (ifalias),
// so that it survives a daemon crash: bridges metald created carry
// BridgeAlias, VM ports carry PortAlias(vmID, nicID). The kernel ignores
// IFLA_IFALIAS in a creating RTM_NEWLINK, so the alias is set by a second
// message right after creation (and the link deleted again if that fails);
// only a crash between the two messages can leave an unmarked link.
package link

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/metald/metald/internal/network"
	"github.com/metald/metald/internal/network/ns"
)

// BridgeAlias is the link alias of bridges metald created and may delete.
const BridgeAlias = "metald:bridge"

// aliasPrefix starts every alias metald writes.
const aliasPrefix = "metald:"

// Errors for expected cases; match them with errors.Is.
var (
	// ErrNotFound reports a link that does not exist.
	ErrNotFound = errors.New("link not found")
	// ErrAddressInUse reports an address already configured on another link.
	ErrAddressInUse = errors.New("address in use on another link")
	// ErrNotBridge reports a link that exists under a bridge's name but is
	// not a bridge.
	ErrNotBridge = errors.New("link is not a bridge")
)

// AddressInUseError says which link already holds an address. It matches
// ErrAddressInUse.
type AddressInUseError struct {
	Addr netip.Addr
	Link string
}

func (e *AddressInUseError) Error() string {
	return fmt.Sprintf("address %s in use on link %s", e.Addr, e.Link)
}

// Is reports whether target is ErrAddressInUse.
func (e *AddressInUseError) Is(target error) bool { return target == ErrAddressInUse }

// PortInfo describes one host link as metald sees it.
type PortInfo struct {
	// Name is the interface name.
	Name string
	// Master is the name of the bridge the link is attached to, or "".
	Master string
	// Up is true when the link is administratively up.
	Up bool
	// MAC is the link's hardware address.
	MAC net.HardwareAddr
	// Alias is the link alias (ifalias).
	Alias string
	// VMID and NICID are parsed from Alias when it is a port alias.
	VMID, NICID string
}

// PortAlias is the alias metald gives the host port of NIC nicID of VM vmID.
func PortAlias(vmID, nicID string) string {
	return aliasPrefix + vmID + ":" + nicID
}

// ParsePortAlias splits an alias made by PortAlias. A NIC id names a Linux
// interface and cannot contain ':', so the split is at the last ':'; the VM
// id may contain ':'. ok is false for any other alias, BridgeAlias included.
func ParsePortAlias(alias string) (vmID, nicID string, ok bool) {
	rest, found := strings.CutPrefix(alias, aliasPrefix)
	if !found {
		return "", "", false
	}
	i := strings.LastIndexByte(rest, ':')
	if i <= 0 || i == len(rest)-1 {
		return "", "", false
	}
	return rest[:i], rest[i+1:], true
}

// Manager manipulates links in one host network namespace. It is safe for
// concurrent use.
type Manager struct {
	nsFile *os.File // private duplicate of the caller's namespace file
	h      *netlink.Handle
	// th is a thread in the namespace for sysctls and requests that must
	// be made from inside it (a new thread per call costs more than the
	// call).
	th *ns.Thread

	// topo serialises changes to bridge membership (create, attach, delete
	// if unused) so that DeleteBridgeIfUnused never races an AttachPort of
	// this Manager.
	topo sync.Mutex
}

// New returns a Manager for the network namespace open at hostNS. The
// Manager keeps its own duplicate of the file; the caller may close hostNS.
func New(hostNS *os.File) (*Manager, error) {
	if hostNS == nil {
		return nil, errors.New("create link manager: nil host namespace")
	}
	fd, err := unix.FcntlInt(hostNS.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("duplicate host namespace fd: %w", err)
	}
	f := os.NewFile(uintptr(fd), hostNS.Name())
	h, err := HandleAt(fd)
	if err != nil {
		f.Close()
		return nil, err
	}
	th, err := ns.NewThread(fd)
	if err != nil {
		h.Close()
		f.Close()
		return nil, fmt.Errorf("start host namespace thread: %w", err)
	}
	return &Manager{nsFile: f, h: h, th: th}, nil
}

// Close releases the Manager's netlink socket, thread and namespace file.
func (m *Manager) Close() {
	m.th.Close()
	m.h.Close()
	m.nsFile.Close()
}

// HandleAt opens a netlink handle whose sockets live in the network
// namespace open at fd. The socket is created on a thread that joined the
// namespace and is then discarded, so no thread ever switches back.
func HandleAt(fd int) (*netlink.Handle, error) {
	var h *netlink.Handle
	err := ns.Do(fd, func() error {
		var err error
		h, err = netlink.NewHandle(unix.NETLINK_ROUTE)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("open netlink handle: %w", err)
	}
	return h, nil
}

// byName looks a link up and maps "no such device" to ErrNotFound.
func (m *Manager) byName(name string) (netlink.Link, error) {
	l, err := m.h.LinkByName(name)
	if err != nil {
		if isNotFound(err) {
			return nil, fmt.Errorf("%s: %w", name, ErrNotFound)
		}
		return nil, err
	}
	return l, nil
}

func isNotFound(err error) bool {
	var lnf netlink.LinkNotFoundError
	return errors.As(err, &lnf) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT)
}

// linkList dumps all links, retrying a dump the kernel interrupted.
func (m *Manager) linkList() ([]netlink.Link, error) {
	var err error
	for range 5 {
		var ls []netlink.Link
		ls, err = m.h.LinkList()
		if err == nil {
			return ls, nil
		}
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	return nil, fmt.Errorf("list links: %w", err)
}

// addrList dumps the IPv6 addresses of l (all links when l is nil),
// retrying an interrupted dump.
func (m *Manager) addrList(l netlink.Link) ([]netlink.Addr, error) {
	var err error
	for range 5 {
		var as []netlink.Addr
		as, err = m.h.AddrList(l, netlink.FAMILY_V6)
		if err == nil {
			return as, nil
		}
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	return nil, fmt.Errorf("list addresses: %w", err)
}

// SetSysctl writes a /proc/sys key (e.g. "net/ipv6/conf/all/forwarding")
// in the host namespace.
func (m *Manager) SetSysctl(key, value string) error {
	if err := m.th.WriteSysctl(key, value); err != nil {
		return fmt.Errorf("set sysctl %s=%s: %w", key, value, err)
	}
	return nil
}

// Sysctl reads a /proc/sys key in the host namespace.
func (m *Manager) Sysctl(key string) (string, error) {
	v, err := m.th.ReadSysctl(key)
	if err != nil {
		return "", fmt.Errorf("read sysctl %s: %w", key, err)
	}
	return v, nil
}

// ForwardingEnabled reports whether IPv6 forwarding is on in the host
// namespace (net/ipv6/conf/all/forwarding).
func (m *Manager) ForwardingEnabled() (bool, error) {
	v, err := m.Sysctl("net/ipv6/conf/all/forwarding")
	if err != nil {
		return false, err
	}
	return v == "1", nil
}

// EnableForwarding turns IPv6 forwarding on in the host namespace if it is
// off.
func (m *Manager) EnableForwarding() error {
	on, err := m.ForwardingEnabled()
	if err != nil || on {
		return err
	}
	return m.SetSysctl("net/ipv6/conf/all/forwarding", "1")
}

// EnsureBridge creates bridge name (owned by metald: alias BridgeAlias)
// unless a bridge of that name exists, in which case it is kept whoever
// owns it. Either way IPv6 is enabled on it and it is set up. created
// reports whether this call created it. A non-bridge link of that name is
// ErrNotBridge.
func (m *Manager) EnsureBridge(name string) (created bool, err error) {
	m.topo.Lock()
	defer m.topo.Unlock()
	l, err := m.byName(name)
	switch {
	case errors.Is(err, ErrNotFound):
		// An explicit MAC: a bridge whose address was never set takes the
		// lowest MAC of its ports and changes as VMs come and go, which
		// would stale the gateway's neighbour entries in every guest and
		// the RA-source MAC metald binds to ports.
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name, HardwareAddr: BridgeMAC(name)}}
		switch err := m.h.LinkAdd(br); {
		case errors.Is(err, unix.EEXIST):
			// Another process created it in between: keep it.
		case err != nil:
			return false, fmt.Errorf("create bridge %s: %w", name, err)
		default:
			if err := m.h.LinkSetAlias(br, BridgeAlias); err != nil {
				m.h.LinkDel(br)
				return false, fmt.Errorf("mark bridge %s: %w", name, err)
			}
			created = true
		}
		if l, err = m.byName(name); err != nil {
			return created, fmt.Errorf("create bridge %s: %w", name, err)
		}
	case err != nil:
		return false, fmt.Errorf("look up bridge %s: %w", name, err)
	}
	if l.Type() != "bridge" {
		return false, fmt.Errorf("ensure bridge %s: %w (type %s)", name, ErrNotBridge, l.Type())
	}
	if !created && l.Attrs().Flags&net.FlagUp != 0 && l.Attrs().Alias == BridgeAlias {
		// Ours and up: it was set up when created (the hot path of every
		// CreateVm on a bridge that already serves VMs).
		return false, nil
	}
	if err := m.SetSysctl("net/ipv6/conf/"+name+"/disable_ipv6", "0"); err != nil {
		return created, fmt.Errorf("enable ipv6 on bridge %s: %w", name, err)
	}
	if created {
		// The bridge's link-local address is the VMs' router address and
		// the source of its MLD querier's queries. Valid from the start:
		// without DAD (the segment is metald's), and put there now, not
		// when the first port brings the carrier up, so that no query
		// leaves from the gateway's global address (hosts discard those,
		// RFC 3810, and a VM port's hop-by-hop block would drop and
		// report it as a violation).
		if err := m.SetSysctl("net/ipv6/conf/"+name+"/accept_dad", "0"); err != nil {
			return created, fmt.Errorf("bridge %s: %w", name, err)
		}
		ll := network.EUI64LinkLocal(l.Attrs().HardwareAddr)
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: ll.AsSlice(), Mask: net.CIDRMask(64, 128)}, Flags: unix.IFA_F_NODAD}
		if err := m.h.AddrAdd(l, addr); err != nil && !errors.Is(err, unix.EEXIST) {
			return created, fmt.Errorf("link-local address of bridge %s: %w", name, err)
		}
	}
	if err := m.h.LinkSetUp(l); err != nil {
		return created, fmt.Errorf("set bridge %s up: %w", name, err)
	}
	return created, nil
}

// EnsureGateway puts gw on bridge, without duplicate address detection
// (IFA_F_NODAD: the gateway must answer at once, and metald's IPAM already
// guarantees it is unique), unless the bridge already holds it; added
// reports whether this call added it. An address equal to gw.Addr() with a
// different prefix length on the bridge is replaced. If gw.Addr() is on any
// other link of the host namespace EnsureGateway fails with an
// *AddressInUseError (ErrAddressInUse) and changes nothing.
//
// On success IPv6 forwarding is on in the host namespace (it is turned on if
// needed, whether or not the address was added), since a gateway that does
// not forward is useless.
func (m *Manager) EnsureGateway(bridge string, gw netip.Prefix) (added bool, err error) {
	if !gw.IsValid() || !gw.Addr().Is6() || gw.Addr().Is4In6() {
		return false, fmt.Errorf("ensure gateway %s on %s: not an IPv6 prefix", gw, bridge)
	}
	br, err := m.byName(bridge)
	if err != nil {
		return false, fmt.Errorf("ensure gateway %s: %w", gw, err)
	}
	// Fast path, the common case once a bridge serves VMs: the bridge
	// already holds exactly this gateway. Only adding needs the host-wide
	// address dump (to refuse an address another link holds), whose cost
	// grows with the number of links.
	own, err := m.addrList(br)
	if err != nil {
		return false, fmt.Errorf("ensure gateway %s on %s: %w", gw, bridge, err)
	}
	for _, a := range own {
		ip, ok := netip.AddrFromSlice(a.IP)
		if ones, _ := a.Mask.Size(); ok && ip.Unmap() == gw.Addr() && ones == gw.Bits() {
			return false, m.EnableForwarding()
		}
	}
	addrs, err := m.addrList(nil)
	if err != nil {
		return false, fmt.Errorf("ensure gateway %s on %s: %w", gw, bridge, err)
	}
	var stale *netlink.Addr
	for i := range addrs {
		a := &addrs[i]
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok || ip.Unmap() != gw.Addr() {
			continue
		}
		if a.LinkIndex != br.Attrs().Index {
			return false, fmt.Errorf("ensure gateway on %s: %w", bridge, &AddressInUseError{Addr: gw.Addr(), Link: m.nameOf(a.LinkIndex)})
		}
		if ones, _ := a.Mask.Size(); ones == gw.Bits() {
			return false, m.EnableForwarding()
		}
		stale = a
	}
	if stale != nil {
		if err := m.h.AddrDel(br, stale); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return false, fmt.Errorf("replace gateway %s on %s: %w", gw, bridge, err)
		}
	}
	a := &netlink.Addr{IPNet: prefixToIPNet(gw), Flags: unix.IFA_F_NODAD}
	if err := m.h.AddrAdd(br, a); err != nil {
		return false, fmt.Errorf("add gateway %s to %s: %w", gw, bridge, err)
	}
	if err := m.EnableForwarding(); err != nil {
		return true, err
	}
	return true, nil
}

// RemoveGateway removes gw from bridge. A missing bridge or address is not
// an error.
func (m *Manager) RemoveGateway(bridge string, gw netip.Prefix) error {
	br, err := m.byName(bridge)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove gateway %s: %w", gw, err)
	}
	err = m.h.AddrDel(br, &netlink.Addr{IPNet: prefixToIPNet(gw)})
	if err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("remove gateway %s from %s: %w", gw, bridge, err)
	}
	return nil
}

func (m *Manager) nameOf(index int) string {
	l, err := m.h.LinkByIndex(index)
	if err != nil {
		return fmt.Sprintf("ifindex %d", index)
	}
	return l.Attrs().Name
}

func prefixToIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// VethPort describes a veth pair whose host end is a VM port.
type VethPort struct {
	// Name is the host end, created in the host namespace.
	Name string
	// Alias marks the host end's owner, normally PortAlias(vmID, nicID).
	Alias string
	// PeerName is the other end, created directly in PeerNSFd.
	PeerName string
	// PeerMAC is the peer's hardware address; nil lets the kernel choose.
	PeerMAC net.HardwareAddr
	// PeerNSFd is an open network namespace fd for the peer.
	PeerNSFd int
}

// AddVethPort creates a veth pair in one netlink message, the host end in
// the host namespace, down and without master, and the peer in p.PeerNSFd;
// then it sets p.Alias on the host end (deleting the pair if that fails).
// An existing link named p.Name fails with unix.EEXIST.
func (m *Manager) AddVethPort(p VethPort) error {
	v := &netlink.Veth{
		LinkAttrs:        netlink.LinkAttrs{Name: p.Name},
		PeerName:         p.PeerName,
		PeerHardwareAddr: p.PeerMAC,
		PeerNamespace:    netlink.NsFd(p.PeerNSFd),
	}
	if err := m.h.LinkAdd(v); err != nil {
		return fmt.Errorf("create veth port %s (peer %s): %w", p.Name, p.PeerName, err)
	}
	if p.Alias != "" {
		if err := m.h.LinkSetAlias(v, p.Alias); err != nil {
			m.h.LinkDel(v)
			return fmt.Errorf("mark veth port %s: %w", p.Name, err)
		}
	}
	return nil
}

// AttachPort makes dev a port of bridge and sets it up. Before the port
// comes up IPv6 is disabled on it: a bridge port is a layer-2 device, and a
// host link-local address on it would make the host reachable from the VM
// behind the bridge's back. A missing dev or bridge is ErrNotFound (the
// bridge may have been deleted as unused; call EnsureBridge again).
func (m *Manager) AttachPort(dev, bridge string) error {
	m.topo.Lock()
	defer m.topo.Unlock()
	l, err := m.byName(dev)
	if err != nil {
		return fmt.Errorf("attach port: %w", err)
	}
	br, err := m.byName(bridge)
	if err != nil {
		return fmt.Errorf("attach port %s: %w", dev, err)
	}
	if br.Type() != "bridge" {
		return fmt.Errorf("attach port %s: %s: %w", dev, bridge, ErrNotBridge)
	}
	if err := m.SetSysctl("net/ipv6/conf/"+dev+"/disable_ipv6", "1"); err != nil {
		return fmt.Errorf("attach port %s: %w", dev, err)
	}
	if l.Attrs().MasterIndex != br.Attrs().Index {
		if err := m.h.LinkSetMaster(l, br); err != nil {
			return fmt.Errorf("attach port %s to %s: %w", dev, bridge, err)
		}
	}
	if err := m.h.LinkSetUp(l); err != nil {
		return fmt.Errorf("set port %s up: %w", dev, err)
	}
	return nil
}

// DetachPort sets dev down and removes it from its bridge. A missing dev is
// ErrNotFound.
func (m *Manager) DetachPort(dev string) error {
	l, err := m.byName(dev)
	if err != nil {
		return fmt.Errorf("detach port: %w", err)
	}
	if err := m.h.LinkSetDown(l); err != nil {
		return fmt.Errorf("set port %s down: %w", dev, err)
	}
	if l.Attrs().MasterIndex != 0 {
		if err := m.h.LinkSetNoMaster(l); err != nil {
			return fmt.Errorf("detach port %s: %w", dev, err)
		}
	}
	return nil
}

// DeletePort deletes dev (for a veth, both ends). A missing dev is not an
// error.
func (m *Manager) DeletePort(dev string) error {
	l, err := m.byName(dev)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("delete port: %w", err)
	}
	if err := m.h.LinkDel(l); err != nil && !isNotFound(err) {
		return fmt.Errorf("delete port %s: %w", dev, err)
	}
	return nil
}

// DeleteOwnedPorts deletes every host link whose alias says it belongs to
// vmID and returns their names. It needs nothing but the VM id, so it can
// clean up after a crash.
func (m *Manager) DeleteOwnedPorts(vmID string) ([]string, error) {
	ports, err := m.OwnedPorts()
	if err != nil {
		return nil, fmt.Errorf("delete ports of %s: %w", vmID, err)
	}
	var deleted []string
	for _, p := range ports {
		if p.VMID != vmID {
			continue
		}
		if err := m.DeletePort(p.Name); err != nil {
			return deleted, err
		}
		deleted = append(deleted, p.Name)
	}
	return deleted, nil
}

// DeleteBridgeIfUnused deletes bridge name if metald owns it (alias
// BridgeAlias) and it has no ports. A missing bridge, a bridge someone else
// owns and a bridge in use are all left alone with deleted=false and no
// error.
func (m *Manager) DeleteBridgeIfUnused(name string) (deleted bool, err error) {
	m.topo.Lock()
	defer m.topo.Unlock()
	br, err := m.byName(name)
	if errors.Is(err, ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("delete bridge: %w", err)
	}
	if br.Type() != "bridge" || br.Attrs().Alias != BridgeAlias {
		return false, nil
	}
	links, err := m.linkList()
	if err != nil {
		return false, fmt.Errorf("delete bridge %s: %w", name, err)
	}
	for _, l := range links {
		if l.Attrs().MasterIndex == br.Attrs().Index {
			return false, nil
		}
	}
	if err := m.h.LinkDel(br); err != nil {
		if isNotFound(err) {
			return false, nil
		}
		return false, fmt.Errorf("delete bridge %s: %w", name, err)
	}
	return true, nil
}

// Port describes host link dev; a missing dev is ErrNotFound.
func (m *Manager) Port(dev string) (PortInfo, error) {
	l, err := m.byName(dev)
	if err != nil {
		return PortInfo{}, fmt.Errorf("look up port: %w", err)
	}
	return m.info(l, nil), nil
}

// OwnedPorts lists the host links whose alias is a port alias
// (PortAlias), whatever their state.
func (m *Manager) OwnedPorts() ([]PortInfo, error) {
	links, err := m.linkList()
	if err != nil {
		return nil, err
	}
	names := make(map[int]string, len(links))
	for _, l := range links {
		names[l.Attrs().Index] = l.Attrs().Name
	}
	var out []PortInfo
	for _, l := range links {
		if _, _, ok := ParsePortAlias(l.Attrs().Alias); ok {
			out = append(out, m.info(l, names))
		}
	}
	return out, nil
}

// info converts a link; names maps ifindex to name when the caller already
// dumped all links.
func (m *Manager) info(l netlink.Link, names map[int]string) PortInfo {
	a := l.Attrs()
	p := PortInfo{
		Name:  a.Name,
		Up:    a.Flags&net.FlagUp != 0,
		MAC:   a.HardwareAddr,
		Alias: a.Alias,
	}
	if a.MasterIndex != 0 {
		if n, ok := names[a.MasterIndex]; ok {
			p.Master = n
		} else {
			p.Master = m.nameOf(a.MasterIndex)
		}
	}
	p.VMID, p.NICID, _ = ParsePortAlias(a.Alias)
	return p
}

// BridgeMAC is the stable, locally administered MAC metald gives a bridge it
// creates, derived from the bridge's name.
func BridgeMAC(name string) net.HardwareAddr {
	h := sha256.Sum256([]byte("metald-bridge/" + name))
	return net.HardwareAddr{0x02, 0x6d, h[0], h[1], h[2], h[3]}
}
