package vm

import (
	"encoding/binary"
	"math/bits"
	"net"
	"net/netip"
)

// StableLinkLocal computes the link-local address a Linux guest derives
// with stable privacy (RFC 7217, addr_gen_mode stable_privacy) from its
// stable_secret and MAC, as the kernel does (net/ipv6/addrconf.c,
// ipv6_generate_stable_address): one SHA-1 compression of the block
// secret(16) ‖ prefix(8) ‖ hardware address padded to 32 ‖ dad_count(1),
// zero-filled to 64 bytes; the first two state words, in the CPU's byte
// order (little endian on the hosts metald supports), are the interface
// identifier. metald generates the secret, so it knows the address before
// the guest boots, which lets the source guard bind it to the port for
// guests it cannot look into (QEMU, Firecracker).
func StableLinkLocal(secret string, mac net.HardwareAddr) (netip.Addr, bool) {
	sec, err := netip.ParseAddr(secret)
	if err != nil || !sec.Is6() || len(mac) > 32 {
		return netip.Addr{}, false
	}
	prefix := [8]byte{0xfe, 0x80}
	for dad := byte(0); dad < 3; dad++ { // the kernel's idgen_retries
		var block [64]byte
		s := sec.As16()
		copy(block[0:16], s[:])
		copy(block[16:24], prefix[:])
		copy(block[24:56], mac)
		block[56] = dad
		d := sha1Block(block)
		var a [16]byte
		copy(a[:8], prefix[:])
		binary.LittleEndian.PutUint32(a[8:12], d[0])
		binary.LittleEndian.PutUint32(a[12:16], d[1])
		addr := netip.AddrFrom16(a)
		if !reservedIID(a) {
			return addr, true
		}
	}
	return netip.Addr{}, false
}

// reservedIID reports interface identifiers the kernel refuses (RFC 5453):
// the subnet-router anycast, ISATAP's, and the reserved subnet anycasts.
func reservedIID(a [16]byte) bool {
	iid := binary.BigEndian.Uint64(a[8:])
	switch {
	case iid == 0:
		return true
	case iid>>32 == 0x02005efe || iid>>32 == 0x00005efe:
		return true
	case iid >= 0xfdffffffffffff80:
		return true
	}
	return false
}

// sha1Block is the SHA-1 compression function applied once to one block
// from the standard initial state, without padding or length (the kernel's
// sha1_init + sha1_transform).
func sha1Block(block [64]byte) [5]uint32 {
	h := [5]uint32{0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476, 0xc3d2e1f0}
	var w [80]uint32
	for i := 0; i < 16; i++ {
		w[i] = binary.BigEndian.Uint32(block[i*4:])
	}
	for i := 16; i < 80; i++ {
		w[i] = bits.RotateLeft32(w[i-3]^w[i-8]^w[i-14]^w[i-16], 1)
	}
	a, b, c, d, e := h[0], h[1], h[2], h[3], h[4]
	for i := 0; i < 80; i++ {
		var f, k uint32
		switch {
		case i < 20:
			f, k = (b&c)|(^b&d), 0x5a827999
		case i < 40:
			f, k = b^c^d, 0x6ed9eba1
		case i < 60:
			f, k = (b&c)|(b&d)|(c&d), 0x8f1bbcdc
		default:
			f, k = b^c^d, 0xca62c1d6
		}
		t := bits.RotateLeft32(a, 5) + f + e + k + w[i]
		a, b, c, d, e = t, a, bits.RotateLeft32(b, 30), c, d
	}
	return [5]uint32{h[0] + a, h[1] + b, h[2] + c, h[3] + d, h[4] + e}
}
