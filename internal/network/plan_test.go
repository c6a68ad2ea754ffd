package network

import (
	"errors"
	"net"
	"net/netip"
	"testing"
)

func TestEUI64LinkLocal(t *testing.T) {
	mac, _ := net.ParseMAC("02:00:00:00:01:01")
	if got, want := EUI64LinkLocal(mac), netip.MustParseAddr("fe80::ff:fe00:101"); got != want {
		t.Errorf("EUI64LinkLocal = %s, want %s", got, want)
	}
	mac, _ = net.ParseMAC("52:54:00:12:34:56")
	if got, want := EUI64LinkLocal(mac), netip.MustParseAddr("fe80::5054:ff:fe12:3456"); got != want {
		t.Errorf("EUI64LinkLocal = %s, want %s", got, want)
	}
}

func TestValidate(t *testing.T) {
	mac, _ := net.ParseMAC("02:00:00:00:01:01")
	ok := NICPlan{HostDevice: "tap-vm1", MAC: mac, Addresses: []netip.Addr{netip.MustParseAddr("2001:db8::1")}}
	for _, tc := range []struct {
		name string
		edit func(*NICPlan)
		ok   bool
	}{
		{"valid", func(*NICPlan) {}, true},
		{"empty device", func(p *NICPlan) { p.HostDevice = "" }, false},
		{"long device", func(p *NICPlan) { p.HostDevice = "0123456789abcdef" }, false},
		{"device with space", func(p *NICPlan) { p.HostDevice = "tap vm" }, false},
		{"multicast mac", func(p *NICPlan) { p.MAC = net.HardwareAddr{1, 0, 0, 0, 0, 1} }, false},
		{"ipv4 address", func(p *NICPlan) { p.Addresses = []netip.Addr{netip.MustParseAddr("10.0.0.1")} }, false},
		{"global link-local", func(p *NICPlan) { p.LinkLocal = netip.MustParseAddr("2001:db8::5") }, false},
		{"vlan 4095", func(p *NICPlan) { p.VLAN = 4095 }, false},
	} {
		p := ok
		tc.edit(&p)
		err := p.Validate()
		if (err == nil) != tc.ok || (err != nil && !errors.Is(err, ErrInvalidPlan)) {
			t.Errorf("%s: Validate() = %v", tc.name, err)
		}
	}
	if err := (Plan{NICs: []NICPlan{ok, ok}}).Validate(); err == nil {
		t.Error("duplicate host device accepted")
	}
}

// Names of different NICs never collide, even when one device name is a
// prefix of another.
func TestNamesDisjoint(t *testing.T) {
	devs := []string{"tap", "tap-in", "tap-out", "tap-in-out", "tap-out_ip6", "x-addrs", "x", "tap-ra_guard"}
	owner := map[string]string{}
	for _, d := range devs {
		n := NamesFor(d)
		names := []string{n.FromChain(), n.ToChain(), n.AddrSet(), n.RASourceSet(), n.RAMACSet()}
		for _, p := range []string{"ip6", "hdr", "src", "hbh", "icmp", "na", "nd", "ra"} {
			names = append(names, n.FromSub(p), n.ToSub(p))
		}
		for _, c := range AllControls {
			names = append(names, n.Counter(c))
		}
		for _, name := range names {
			if o, dup := owner[name]; dup && o != d {
				t.Errorf("%q is owned by both %q and %q", name, o, d)
			}
			owner[name] = d
		}
	}
}
