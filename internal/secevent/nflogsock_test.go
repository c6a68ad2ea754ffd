package secevent

import (
	"encoding/binary"
	"net"
	"testing"

	"github.com/mdlayher/netlink"
)

// A record of a netdev-family rule (NFPROTO_NETDEV = 5) parses like any
// other: the 4-byte nfgenmsg header is skipped whatever the family.
func TestParseNflogNetdevFamily(t *testing.T) {
	for _, family := range []byte{2, 5, 7, 10} {
		hw := []byte{0, 6, 0, 0, 0x02, 0, 0, 0, 0, 1, 0, 0}
		attrs, err := netlink.MarshalAttributes([]netlink.Attribute{
			{Type: ulaPacketHdr, Data: []byte{0x86, 0xdd, 0, 0}},
			{Type: ulaMark, Data: binary.BigEndian.AppendUint32(nil, 0x6d6c0000)},
			{Type: ulaInDev, Data: binary.BigEndian.AppendUint32(nil, 7)},
			{Type: ulaHwAddr, Data: hw},
			{Type: ulaPayload, Data: []byte{0x60, 0, 0, 0}},
			{Type: ulaPrefix, Data: []byte("metald:tap-x:ra_guard\x00")},
		})
		if err != nil {
			t.Fatal(err)
		}
		r, err := parseNflog(append([]byte{family, 0, 0x19, 0x14}, attrs...))
		if err != nil {
			t.Fatalf("family %d: %v", family, err)
		}
		if r.Family != family || r.Prefix != "metald:tap-x:ra_guard" || r.HwProtocol != 0x86dd || r.Mark != 0x6d6c0000 ||
			r.InDev != 7 || r.HwAddr.String() != (net.HardwareAddr{2, 0, 0, 0, 0, 1}).String() || len(r.Payload) != 4 {
			t.Errorf("family %d: %+v", family, r)
		}
	}
	if _, err := parseNflog([]byte{5, 0}); err == nil {
		t.Error("a short message parsed")
	}
}
