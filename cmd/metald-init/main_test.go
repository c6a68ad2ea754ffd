package main

import (
	"net"
	"net/netip"
	"reflect"
	"testing"

	"github.com/metald/metald/cmd/metald-init/guestcfg"
)

func TestSysctlsOrder(t *testing.T) {
	got := sysctls("eth0", guestcfg.NIC{Privacy: true, StableSecret: "2001:db8::1", TempValidLft: 3600})
	want := []sysctl{
		{"net/ipv6/conf/eth0/use_tempaddr", "2"},
		{"net/ipv6/conf/eth0/stable_secret", "2001:db8::1"},
		{"net/ipv6/conf/eth0/temp_valid_lft", "3600"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v", got)
	}
	if got := sysctls("eth1", guestcfg.NIC{}); !reflect.DeepEqual(got, []sysctl{{"net/ipv6/conf/eth1/use_tempaddr", "0"}}) {
		t.Fatalf("defaults: %v", got)
	}
}

func TestResolvConf(t *testing.T) {
	d := netip.MustParseAddr("2001:db8::53")
	c := guestcfg.Config{V: 1, NICs: []guestcfg.NIC{{DNS: []netip.Addr{d}}, {DNS: []netip.Addr{d, netip.MustParseAddr("2001:db8::54")}}}}
	if got, want := resolvConf(c), "# written by metald-init\nnameserver 2001:db8::53\nnameserver 2001:db8::54\n"; got != want {
		t.Fatalf("got %q", got)
	}
}

func TestRAMessage(t *testing.T) {
	mac := net.HardwareAddr{2, 0, 0, 0, 0, 1}
	b := RAMessage(mac, netip.MustParsePrefix("2001:db8:bad::/64"))
	if len(b) != 56 || b[0] != 134 || b[16] != 1 || b[17] != 1 || net.HardwareAddr(b[18:24]).String() != mac.String() ||
		b[24] != 3 || b[25] != 4 || b[26] != 64 || b[27] != 0xc0 || b[40] != 0x20 || b[41] != 0x01 {
		t.Fatalf("ra % x", b)
	}
}

func TestModuleParams(t *testing.T) {
	cl := "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 virtio-net.napi_tx=0 quiet -- virtio_mmio.x=1"
	if got := moduleParams("virtio_mmio.ko", cl); got != "device=4K@0xd0000000:5 device=4K@0xd0001000:6" {
		t.Errorf("virtio_mmio: %q", got)
	}
	if got := moduleParams("virtio_net.ko", cl); got != "napi_tx=0" {
		t.Errorf("virtio_net: %q", got)
	}
	if got := moduleParams("evdev.ko", cl); got != "" {
		t.Errorf("evdev: %q", got)
	}
}
