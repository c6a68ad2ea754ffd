// Package tap creates the persistent tap devices that the qemu and
// firecracker backends give their VMs as host ports.
package tap

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/metald/metald/internal/network/ns"
)

// Create creates the persistent tap name (IFF_TAP|IFF_NO_PI|
// IFF_VNET_HDR), down and unattached, in the network namespace open at
// nsFd. TUNSETIFF acts in the calling thread's namespace, so the ioctl runs
// on a thread that joined nsFd. The tap has no queue attached until QEMU
// opens it by name.
func Create(nsFd int, name string) error {
	return ns.Do(nsFd, func() error {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open /dev/net/tun: %w", err)
		}
		defer unix.Close(fd)
		ifr, err := unix.NewIfreq(name)
		if err != nil {
			return fmt.Errorf("tap %s: %w", name, err)
		}
		ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
		if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			return fmt.Errorf("create tap %s: %w", name, err)
		}
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.TUNSETPERSIST, 1); errno != 0 {
			return fmt.Errorf("make tap %s persistent: %w", name, errno)
		}
		return nil
	})
}
