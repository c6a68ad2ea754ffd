package vm

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base32"
	"fmt"
	"net"
	"net/netip"
	"strings"
)

// maxIfName is the Linux interface name limit (IFNAMSIZ - 1).
const maxIfName = 15

var lowerBase32 = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// NewID returns a generated VM id: "vm-" plus 8 lower-case base32 characters
// (40 random bits), so that "tap-<id>" fits the interface name limit.
func NewID() string {
	var b [5]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(fmt.Sprintf("read random: %v", err)) // crypto/rand never fails on Linux
	}
	return "vm-" + lowerBase32.EncodeToString(b[:])
}

// HostDevice names the host end of a VM's NIC. The first NIC is
// "tap-<vm_id>" when that fits in 15 characters; other NICs, and VMs whose
// id is too long, get "tap-" plus 11 base32 characters of a hash of the VM
// and NIC ids: stable, and reported in GetVm.
func HostDevice(vmID, nicID string, index int) string {
	if index == 0 {
		if d := "tap-" + vmID; len(d) <= maxIfName {
			return d
		}
	}
	h := sha256.Sum256([]byte(vmID + "/" + nicID))
	return "tap-" + lowerBase32.EncodeToString(h[:])[:maxIfName-4]
}

// BridgeDevice is the kernel device name of a bridge named in a config:
// the name itself when it fits the 15-byte interface-name limit, else "br-"
// plus 12 base32 characters of a hash of the name (stable, and reported in
// GetVm next to the name as given).
func BridgeDevice(name string) string {
	if len(name) <= maxIfName {
		return name
	}
	h := sha256.Sum256([]byte("bridge/" + name))
	return "br-" + lowerBase32.EncodeToString(h[:])[:maxIfName-3]
}

// DefaultMAC derives a stable, locally administered unicast MAC for a NIC.
func DefaultMAC(vmID, nicID string) net.HardwareAddr {
	h := sha256.Sum256([]byte("mac/" + vmID + "/" + nicID))
	return net.HardwareAddr{0x02, h[0], h[1], h[2], h[3], h[4]}
}

// NewStableSecret returns a random RFC 7217 stable_secret in the IPv6
// notation the kernel's sysctl expects.
func NewStableSecret() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(fmt.Sprintf("read random: %v", err))
	}
	return netip.AddrFrom16(b).String()
}

// NetnsName is the netns backend's namespace name for a VM.
func NetnsName(vmID string) string { return "metald-" + vmID }

func normalMAC(s string) (net.HardwareAddr, error) {
	mac, err := net.ParseMAC(strings.TrimSpace(s))
	if err != nil || len(mac) != 6 {
		return nil, fmt.Errorf("invalid MAC %q", s)
	}
	return mac, nil
}
