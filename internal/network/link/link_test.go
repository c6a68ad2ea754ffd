package link_test

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"slices"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/metald/metald/internal/netnstest"
	"github.com/metald/metald/internal/network/link"
	"github.com/metald/metald/internal/network/ns"
)

func TestMain(m *testing.M) { os.Exit(netnstest.Main(m)) }

func newManager(t *testing.T) (*link.Manager, *netnstest.NS) {
	t.Helper()
	n := netnstest.New(t)
	m, err := link.New(n.File)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(m.Close)
	return m, n
}

// addPlain adds a link that is not a bridge (this kernel has no dummy
// driver: a veth pair inside the namespace).
func addPlain(t *testing.T, h *netlink.Handle, name string) {
	t.Helper()
	if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "-p"}); err != nil {
		t.Fatalf("add veth %s: %v", name, err)
	}
}

func TestPortAliasRoundTrip(t *testing.T) {
	for _, c := range []struct{ vm, nic string }{
		{"vm-1", "eth0"}, {"a:b:c", "net1"}, {"550e8400-e29b-41d4-a716-446655440000", "eth0"},
	} {
		a := link.PortAlias(c.vm, c.nic)
		vm, nic, ok := link.ParsePortAlias(a)
		if !ok || vm != c.vm || nic != c.nic {
			t.Errorf("ParsePortAlias(%q) = %q, %q, %v", a, vm, nic, ok)
		}
	}
	for _, bad := range []string{"", "metald:bridge", "metald:", "metald::eth0", "metald:vm:", "other:vm:eth0", "vm:eth0"} {
		if vm, nic, ok := link.ParsePortAlias(bad); ok {
			t.Errorf("ParsePortAlias(%q) = %q, %q, true; want not ok", bad, vm, nic)
		}
	}
}

func FuzzParsePortAlias(f *testing.F) {
	f.Add("metald:vm:eth0")
	f.Add("metald:bridge")
	f.Add("metald:::")
	f.Fuzz(func(t *testing.T, s string) {
		vm, nic, ok := link.ParsePortAlias(s)
		if !ok {
			return
		}
		if vm == "" || nic == "" || link.PortAlias(vm, nic) != s {
			t.Fatalf("ParsePortAlias(%q) = %q, %q: does not round-trip", s, vm, nic)
		}
	})
}

func TestEnsureBridge(t *testing.T) {
	m, n := newManager(t)
	h := n.Handle(t)

	created, err := m.EnsureBridge("br-t")
	if err != nil || !created {
		t.Fatalf("EnsureBridge = %v, %v; want created", created, err)
	}
	l, err := h.LinkByName("br-t")
	if err != nil {
		t.Fatal(err)
	}
	if l.Type() != "bridge" || l.Attrs().Alias != link.BridgeAlias || l.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("bridge type=%s alias=%q flags=%v", l.Type(), l.Attrs().Alias, l.Attrs().Flags)
	}
	if v, _ := ns.ReadSysctl(n.Fd(), "net/ipv6/conf/br-t/disable_ipv6"); v != "0" {
		t.Errorf("disable_ipv6 = %q, want 0", v)
	}

	created, err = m.EnsureBridge("br-t")
	if err != nil || created {
		t.Fatalf("second EnsureBridge = %v, %v; want kept", created, err)
	}

	// A bridge someone else made is kept, not adopted.
	if err := h.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br-foreign"}}); err != nil {
		t.Fatal(err)
	}
	if created, err := m.EnsureBridge("br-foreign"); err != nil || created {
		t.Fatalf("EnsureBridge(foreign) = %v, %v", created, err)
	}
	if l, _ := h.LinkByName("br-foreign"); l.Attrs().Alias != "" || l.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("foreign bridge alias=%q flags=%v; want untouched alias, up", l.Attrs().Alias, l.Attrs().Flags)
	}

	addPlain(t, h, "notabridge")
	if _, err := m.EnsureBridge("notabridge"); !errors.Is(err, link.ErrNotBridge) {
		t.Errorf("EnsureBridge(dummy) err = %v, want ErrNotBridge", err)
	}
}

func TestEnsureGateway(t *testing.T) {
	m, n := newManager(t)
	h := n.Handle(t)
	if _, err := m.EnsureBridge("br-g"); err != nil {
		t.Fatal(err)
	}
	gw := netip.MustParsePrefix("2001:db8:1::1/64")

	if on, _ := m.ForwardingEnabled(); on {
		t.Fatal("forwarding on in a fresh namespace")
	}
	added, err := m.EnsureGateway("br-g", gw)
	if err != nil || !added {
		t.Fatalf("EnsureGateway = %v, %v; want added", added, err)
	}
	if on, err := m.ForwardingEnabled(); err != nil || !on {
		t.Errorf("ForwardingEnabled = %v, %v after adding a gateway", on, err)
	}
	br, _ := h.LinkByName("br-g")
	addrs, _ := h.AddrList(br, netlink.FAMILY_V6)
	found := false
	for _, a := range addrs {
		if a.IP.Equal(net.ParseIP("2001:db8:1::1")) {
			found = true
			if ones, _ := a.Mask.Size(); ones != 64 {
				t.Errorf("prefix length %d", ones)
			}
			if a.Flags&unix.IFA_F_NODAD == 0 || a.Flags&unix.IFA_F_TENTATIVE != 0 {
				t.Errorf("gateway flags %#x: want NODAD and not tentative", a.Flags)
			}
		}
	}
	if !found {
		t.Fatalf("gateway not on bridge: %v", addrs)
	}

	added, err = m.EnsureGateway("br-g", gw)
	if err != nil || added {
		t.Fatalf("second EnsureGateway = %v, %v; want present", added, err)
	}

	// Same address with another prefix length is replaced.
	added, err = m.EnsureGateway("br-g", netip.MustParsePrefix("2001:db8:1::1/56"))
	if err != nil || !added {
		t.Fatalf("EnsureGateway(/56) = %v, %v; want replaced", added, err)
	}
	if _, err := m.EnsureGateway("br-g", gw); err != nil {
		t.Fatal(err)
	}

	// The address on another link is refused.
	if _, err := m.EnsureBridge("br-other"); err != nil {
		t.Fatal(err)
	}
	_, err = m.EnsureGateway("br-other", gw)
	var inUse *link.AddressInUseError
	if !errors.Is(err, link.ErrAddressInUse) || !errors.As(err, &inUse) || inUse.Link != "br-g" {
		t.Fatalf("EnsureGateway on second bridge err = %v; want ErrAddressInUse on br-g", err)
	}

	if _, err := m.EnsureGateway("missing", gw); !errors.Is(err, link.ErrNotFound) {
		t.Errorf("EnsureGateway(missing) err = %v, want ErrNotFound", err)
	}

	if err := m.RemoveGateway("br-g", gw); err != nil {
		t.Fatal(err)
	}
	addrs, _ = h.AddrList(br, netlink.FAMILY_V6)
	for _, a := range addrs {
		if a.IP.Equal(net.ParseIP("2001:db8:1::1")) {
			t.Errorf("gateway still present after RemoveGateway")
		}
	}
	if err := m.RemoveGateway("br-g", gw); err != nil {
		t.Errorf("RemoveGateway again: %v", err)
	}
	if err := m.RemoveGateway("missing", gw); err != nil {
		t.Errorf("RemoveGateway(missing bridge): %v", err)
	}
}

// addVeth makes a veth port whose peer lives in a second namespace.
func addVeth(t *testing.T, m *link.Manager, name, alias string) *netnstest.NS {
	t.Helper()
	peer := netnstest.New(t)
	if err := m.AddVethPort(link.VethPort{Name: name, Alias: alias, PeerName: "eth0", PeerMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, PeerNSFd: peer.Fd()}); err != nil {
		t.Fatal(err)
	}
	return peer
}

func TestPorts(t *testing.T) {
	m, n := newManager(t)
	h := n.Handle(t)
	if _, err := m.EnsureBridge("br-p"); err != nil {
		t.Fatal(err)
	}
	peer := addVeth(t, m, "vp1", link.PortAlias("vm1", "eth0"))
	addVeth(t, m, "vp2", link.PortAlias("vm2", "eth0"))
	addPlain(t, h, "plain")

	pl, err := peer.Handle(t).LinkByName("eth0")
	if err != nil {
		t.Fatalf("peer not in its namespace: %v", err)
	}
	if pl.Attrs().HardwareAddr.String() != "02:00:00:00:00:01" {
		t.Errorf("peer MAC %s", pl.Attrs().HardwareAddr)
	}

	p, err := m.Port("vp1")
	if err != nil {
		t.Fatal(err)
	}
	if p.Up || p.Master != "" || p.VMID != "vm1" || p.NICID != "eth0" || len(p.MAC) != 6 {
		t.Errorf("new port %+v: want down, no master, vm1/eth0", p)
	}
	if _, err := m.Port("nope"); !errors.Is(err, link.ErrNotFound) {
		t.Errorf("Port(nope) err = %v", err)
	}

	if err := m.AttachPort("vp1", "br-p"); err != nil {
		t.Fatal(err)
	}
	if err := m.AttachPort("vp1", "br-p"); err != nil {
		t.Fatalf("AttachPort again: %v", err)
	}
	p, _ = m.Port("vp1")
	if !p.Up || p.Master != "br-p" {
		t.Errorf("attached port %+v", p)
	}
	if v, _ := ns.ReadSysctl(n.Fd(), "net/ipv6/conf/vp1/disable_ipv6"); v != "1" {
		t.Errorf("port disable_ipv6 = %q, want 1", v)
	}
	if err := m.AttachPort("nope", "br-p"); !errors.Is(err, link.ErrNotFound) {
		t.Errorf("AttachPort(nope) err = %v", err)
	}
	if err := m.AttachPort("vp2", "nope"); !errors.Is(err, link.ErrNotFound) {
		t.Errorf("AttachPort(to nope) err = %v", err)
	}

	owned, err := m.OwnedPorts()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, o := range owned {
		names = append(names, o.Name+"="+o.VMID+"/"+o.NICID+"@"+o.Master)
	}
	slices.Sort(names)
	if want := []string{"vp1=vm1/eth0@br-p", "vp2=vm2/eth0@"}; !slices.Equal(names, want) {
		t.Errorf("OwnedPorts = %v, want %v", names, want)
	}

	// In use: kept.
	if del, err := m.DeleteBridgeIfUnused("br-p"); err != nil || del {
		t.Errorf("DeleteBridgeIfUnused(in use) = %v, %v", del, err)
	}
	if err := m.DetachPort("vp1"); err != nil {
		t.Fatal(err)
	}
	p, _ = m.Port("vp1")
	if p.Up || p.Master != "" {
		t.Errorf("detached port %+v", p)
	}
	if err := m.DetachPort("nope"); !errors.Is(err, link.ErrNotFound) {
		t.Errorf("DetachPort(nope) err = %v", err)
	}

	del, err := m.DeleteOwnedPorts("vm1")
	if err != nil || !slices.Equal(del, []string{"vp1"}) {
		t.Errorf("DeleteOwnedPorts(vm1) = %v, %v", del, err)
	}
	if _, err := peer.Handle(t).LinkByName("eth0"); err == nil {
		t.Error("peer survived deletion of the host end")
	}
	if err := m.DeletePort("vp2"); err != nil {
		t.Fatal(err)
	}
	if err := m.DeletePort("vp2"); err != nil {
		t.Errorf("DeletePort again: %v", err)
	}
	if owned, _ := m.OwnedPorts(); len(owned) != 0 {
		t.Errorf("OwnedPorts after delete = %+v", owned)
	}

	// Unused and owned: deleted. Foreign: kept. Missing: fine.
	if del, err := m.DeleteBridgeIfUnused("br-p"); err != nil || !del {
		t.Errorf("DeleteBridgeIfUnused(unused) = %v, %v", del, err)
	}
	if del, err := m.DeleteBridgeIfUnused("br-p"); err != nil || del {
		t.Errorf("DeleteBridgeIfUnused(missing) = %v, %v", del, err)
	}
	if err := h.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br-foreign"}}); err != nil {
		t.Fatal(err)
	}
	if del, err := m.DeleteBridgeIfUnused("br-foreign"); err != nil || del {
		t.Errorf("DeleteBridgeIfUnused(foreign) = %v, %v", del, err)
	}
	if del, err := m.DeleteBridgeIfUnused("plain"); err != nil || del {
		t.Errorf("DeleteBridgeIfUnused(dummy) = %v, %v", del, err)
	}
}

// The manager acts in its namespace even when the caller closed its file,
// and never in the test process's own namespace.
func TestManagerOwnsNamespaceFile(t *testing.T) {
	n := netnstest.New(t)
	f, err := os.Open(n.Path())
	if err != nil {
		t.Fatal(err)
	}
	m, err := link.New(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if _, err := m.EnsureBridge("br-own"); err != nil {
		t.Fatal(err)
	}
	if _, err := n.Handle(t).LinkByName("br-own"); err != nil {
		t.Fatalf("bridge not in the manager's namespace: %v", err)
	}
	if _, err := netlink.LinkByName("br-own"); err == nil {
		t.Fatal("bridge leaked into the test process's namespace")
	}
}

// A bridge metald creates keeps its MAC when ports join.
func TestBridgeMACStable(t *testing.T) {
	n := netnstest.New(t)
	m, err := link.New(n.File)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if _, err := m.EnsureBridge("br-mac"); err != nil {
		t.Fatal(err)
	}
	peer := netnstest.New(t)
	for i, name := range []string{"p-a", "p-b"} {
		if err := m.AddVethPort(link.VethPort{Name: name, PeerName: "eth0", PeerNSFd: []int{peer.Fd(), netnstest.New(t).Fd()}[i]}); err != nil {
			t.Fatal(err)
		}
		if err := m.AttachPort(name, "br-mac"); err != nil {
			t.Fatal(err)
		}
		l, err := n.Handle(t).LinkByName("br-mac")
		if err != nil {
			t.Fatal(err)
		}
		if l.Attrs().HardwareAddr.String() != link.BridgeMAC("br-mac").String() {
			t.Fatalf("bridge MAC %s after %s joined, want %s", l.Attrs().HardwareAddr, name, link.BridgeMAC("br-mac"))
		}
	}
}
