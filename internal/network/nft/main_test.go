package nft

import (
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/metald/metald/internal/netnstest"
	"github.com/metald/metald/internal/network"
)

func TestMain(m *testing.M) { os.Exit(netnstest.Main(m)) }

func mustMAC(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

// allOn returns every control enabled, with limits high enough that the
// attack tests never reach them.
func allOn() network.Controls {
	return network.Controls{
		RAGuard:                true,
		AllowedRASources:       []netip.Addr{netip.MustParseAddr("2001:db8:1::1"), netip.MustParseAddr("fe80::1")},
		AllowedRAMACs:          []net.HardwareAddr{mustMAC("02:00:00:00:00:01")},
		SourceGuard:            true,
		StrictSourceValidation: true,
		BlockHopByHop:          true,
		BlockRouting:           true,
		BlockFragment:          true,
		BlockDestOpts:          true,
		NDRateLimit:            1000,
		ICMPv6RateLimit:        1000,
		RARateLimit:            10,
		MulticastRateLimit:     1000,
		MLDSnooping:            true,
	}
}

func vmPlan(i int, c network.Controls) network.NICPlan {
	return network.NICPlan{
		VMID:       "vm" + string(rune('0'+i)),
		TenantID:   "tenant-a",
		NICID:      "eth0",
		HostDevice: "tap-vm" + string(rune('0'+i)),
		MAC:        mustMAC("02:00:00:00:01:0" + string(rune('0'+i))),
		Addresses:  []netip.Addr{netip.MustParseAddr("2001:db8:1::1" + string(rune('0'+i-1)))},
		Controls:   c,
	}
}
