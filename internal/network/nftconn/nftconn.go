// Package nftconn opens the nftables connections metald's table owners
// (the first-hop firewall, the policy manager) program through.
//
// The connections are lasting. A connection per batch closes its socket
// after each commit, and closing a netfilter socket waits for the previous
// commit's deferred release (an RCU grace period, 8-24 ms on the project's
// machine) whenever that commit replaced or deleted a chain.
//
// Their socket buffers are large: a NIC is a few hundred netlink messages,
// each acknowledged, and a batch is one sendmsg; the default buffers
// overflow (ENOBUFS) on a batch that programs several NICs.
package nftconn

import (
	"fmt"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// BufferSize is the send and receive buffer size asked for.
const BufferSize = 16 << 20

// Options are the options of a lasting, large-buffer connection in the
// network namespace open at nsFd (the caller's namespace when nsFd < 0).
// Open again with them to replace a connection.
func Options(nsFd int) []nftables.ConnOption {
	opts := []nftables.ConnOption{nftables.AsLasting(), nftables.WithSockOptions(bigBuffers)}
	if nsFd >= 0 {
		opts = append(opts, nftables.WithNetNSFd(nsFd))
	}
	return opts
}

// Open opens a connection with opts (see Options).
func Open(opts []nftables.ConnOption) (*nftables.Conn, error) {
	c, err := nftables.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("open nftables connection: %w", err)
	}
	return c, nil
}

func bigBuffers(c *netlink.Conn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		// FORCE variants pass net.core.{r,w}mem_max as root.
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, BufferSize)
		if serr == nil {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, BufferSize)
		}
	}); err != nil {
		return err
	}
	if serr != nil {
		// Not privileged: take what the sysctl limits allow.
		if err := c.SetReadBuffer(BufferSize); err != nil {
			return err
		}
		return c.SetWriteBuffer(BufferSize)
	}
	return nil
}
