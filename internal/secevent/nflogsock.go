package secevent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// nfnetlink_log, spoken directly over netlink (include/uapi/linux/
// netfilter/nfnetlink_log.h). metald's first-hop rules live in netdev
// tables and log with family NFPROTO_NETDEV; a generic NFLOG client that
// recognises only the inet, ipv6 and bridge families misreads those
// records' headers and drops them.
const (
	ulogMsgPacket = 0 // NFULNL_MSG_PACKET
	ulogMsgConfig = 1 // NFULNL_MSG_CONFIG

	ulogCfgCmd     = 1 // NFULA_CFG_CMD
	ulogCfgMode    = 2 // NFULA_CFG_MODE
	ulogCfgTimeout = 4 // NFULA_CFG_TIMEOUT
	ulogCfgQThresh = 5 // NFULA_CFG_QTHRESH

	ulogCmdBind = 1 // NFULNL_CFG_CMD_BIND

	ulogCopyPacket = 2 // NFULNL_COPY_PACKET

	ulaPacketHdr  = 1  // NFULA_PACKET_HDR
	ulaMark       = 2  // NFULA_MARK
	ulaTimestamp  = 3  // NFULA_TIMESTAMP
	ulaInDev      = 4  // NFULA_IFINDEX_INDEV
	ulaOutDev     = 5  // NFULA_IFINDEX_OUTDEV
	ulaPhysInDev  = 6  // NFULA_IFINDEX_PHYSINDEV
	ulaPhysOutDev = 7  // NFULA_IFINDEX_PHYSOUTDEV
	ulaHwAddr     = 8  // NFULA_HWADDR
	ulaPayload    = 9  // NFULA_PAYLOAD
	ulaPrefix     = 10 // NFULA_PREFIX
)

// nflogRecord is one logged packet as the kernel sends it. Interface
// indexes are 0 when absent.
type nflogRecord struct {
	Family     uint8
	HwProtocol uint16
	Mark       uint32
	Time       time.Time
	InDev      uint32
	OutDev     uint32
	PhysInDev  uint32
	PhysOutDev uint32
	HwAddr     net.HardwareAddr
	Payload    []byte
	Prefix     string
}

// nflogSock is a socket bound to one NFLOG group.
type nflogSock struct {
	c     *netlink.Conn
	group uint16
}

// openNflog binds group in the network namespace open at nsfd (0: the
// caller's), copying copyRange bytes of each packet; the kernel batches up
// to qthresh records or timeout (1/100 s).
func openNflog(nsfd int, group uint16, copyRange, qthresh, timeout uint32) (*nflogSock, error) {
	cfg := &netlink.Config{}
	if nsfd > 0 {
		cfg.NetNS = nsfd
	}
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, cfg)
	if err != nil {
		return nil, fmt.Errorf("open netfilter netlink socket: %w", err)
	}
	s := &nflogSock{c: c, group: group}
	mode := binary.BigEndian.AppendUint32(nil, copyRange)
	mode = append(mode, ulogCopyPacket, 0)
	for _, attrs := range [][]netlink.Attribute{
		{{Type: ulogCfgCmd, Data: []byte{ulogCmdBind}}},
		{{Type: ulogCfgMode, Data: mode}},
		{{Type: ulogCfgQThresh, Data: binary.BigEndian.AppendUint32(nil, qthresh)}},
		{{Type: ulogCfgTimeout, Data: binary.BigEndian.AppendUint32(nil, timeout)}},
	} {
		if err := s.config(attrs); err != nil {
			c.Close()
			return nil, err
		}
	}
	return s, nil
}

// config sends one configuration message for the group and waits for its
// acknowledgement.
func (s *nflogSock) config(attrs []netlink.Attribute) error {
	data, err := netlink.MarshalAttributes(attrs)
	if err != nil {
		return err
	}
	hdr := []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, byte(s.group >> 8), byte(s.group)}
	_, err = s.c.Execute(netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_SUBSYS_ULOG<<8 | ulogMsgConfig), Flags: netlink.Request | netlink.Acknowledge},
		Data:   append(hdr, data...),
	})
	if err != nil {
		return fmt.Errorf("nflog group %d config: %w", s.group, err)
	}
	return nil
}

// receive blocks for the next batch of records. Messages that are not
// packet records, or do not parse, are skipped.
func (s *nflogSock) receive() ([]nflogRecord, error) {
	msgs, err := s.c.Receive()
	if err != nil {
		return nil, err
	}
	out := make([]nflogRecord, 0, len(msgs))
	for _, m := range msgs {
		if m.Header.Type != netlink.HeaderType(unix.NFNL_SUBSYS_ULOG<<8|ulogMsgPacket) {
			continue
		}
		if r, err := parseNflog(m.Data); err == nil {
			out = append(out, r)
		}
	}
	return out, nil
}

// parseNflog decodes one NFULNL_MSG_PACKET body: the nfgenmsg header, then
// attributes.
func parseNflog(b []byte) (nflogRecord, error) {
	var r nflogRecord
	if len(b) < 4 {
		return r, errors.New("short nflog message")
	}
	r.Family = b[0]
	ad, err := netlink.NewAttributeDecoder(b[4:])
	if err != nil {
		return r, err
	}
	ad.ByteOrder = binary.BigEndian
	for ad.Next() {
		v := ad.Bytes()
		switch ad.Type() {
		case ulaPacketHdr:
			if len(v) >= 2 {
				r.HwProtocol = binary.BigEndian.Uint16(v)
			}
		case ulaMark:
			r.Mark = ad.Uint32()
		case ulaTimestamp:
			if len(v) >= 16 {
				sec, usec := binary.BigEndian.Uint64(v), binary.BigEndian.Uint64(v[8:])
				r.Time = time.Unix(int64(sec), int64(usec)*1000)
			}
		case ulaInDev:
			r.InDev = ad.Uint32()
		case ulaOutDev:
			r.OutDev = ad.Uint32()
		case ulaPhysInDev:
			r.PhysInDev = ad.Uint32()
		case ulaPhysOutDev:
			r.PhysOutDev = ad.Uint32()
		case ulaHwAddr:
			// struct nfulnl_msg_packet_hw: be16 length, 2 pad, 8 bytes
			if len(v) >= 4 {
				n := int(binary.BigEndian.Uint16(v))
				if n <= len(v)-4 {
					r.HwAddr = net.HardwareAddr(append([]byte(nil), v[4:4+n]...))
				}
			}
		case ulaPayload:
			r.Payload = append([]byte(nil), v...)
		case ulaPrefix:
			for i, c := range v {
				if c == 0 {
					v = v[:i]
					break
				}
			}
			r.Prefix = string(v)
		}
	}
	return r, ad.Err()
}

// setReadBuffer sets the socket's receive buffer.
func (s *nflogSock) setReadBuffer(n int) error { return s.c.SetReadBuffer(n) }

// interrupt makes a blocked receive return (with a timeout error).
func (s *nflogSock) interrupt() error { return s.c.SetReadDeadline(time.Now().Add(-time.Second)) }

// close closes the socket; the kernel unbinds the group with it.
func (s *nflogSock) close() error { return s.c.Close() }
