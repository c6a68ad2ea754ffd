package secevent

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/mdlayher/netlink"
	vnl "github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// ReaderConfig configures the NFLOG reader.
type ReaderConfig struct {
	// Group is the NFLOG group (default DefaultGroup).
	Group uint16
	// NetNS is an open network-namespace fd to read in (0: the caller's).
	NetNS int
	// CopyRange is how many bytes of each packet the kernel copies
	// (default 256: enough for the headers the parser reads).
	CopyRange uint32
	// QThresh and Timeout (1/100 s) let the kernel batch records
	// (defaults 16 and 5, i.e. at most 50 ms of delay).
	QThresh uint32
	Timeout uint32
	// ReadBuffer is the socket receive buffer in bytes (default 4 MiB).
	ReadBuffer int
}

// Reader reads metald's NFLOG group into a Service.
type Reader struct {
	s      *Service
	nf     *nflogSock
	cancel context.CancelFunc
	done   chan struct{}
	err    error

	nsfd  int
	devMu sync.Mutex
	devs  map[uint32]devName
	nlh   *vnl.Handle
}

type devName struct {
	name string
	at   time.Time
}

// StartReader binds the NFLOG group and feeds every record to Ingest until
// ctx is cancelled or Close is called. The group is bound when it returns.
func (s *Service) StartReader(ctx context.Context, rc ReaderConfig) (*Reader, error) {
	if rc.Group == 0 {
		rc.Group = DefaultGroup
	}
	if rc.CopyRange == 0 {
		rc.CopyRange = 256
	}
	if rc.QThresh == 0 {
		rc.QThresh = 16
	}
	if rc.Timeout == 0 {
		rc.Timeout = 5
	}
	if rc.ReadBuffer == 0 {
		rc.ReadBuffer = 4 << 20
	}
	nf, err := openNflog(rc.NetNS, rc.Group, rc.CopyRange, rc.QThresh, rc.Timeout)
	if err != nil {
		return nil, fmt.Errorf("open nflog group %d: %w", rc.Group, err)
	}
	if err := nf.setReadBuffer(rc.ReadBuffer); err != nil {
		s.log.Warn("nflog read buffer", "err", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	r := &Reader{s: s, nf: nf, cancel: cancel, done: make(chan struct{}), nsfd: rc.NetNS, devs: map[uint32]devName{}}
	go func() {
		<-ctx.Done()
		nf.interrupt()
	}()
	go func() {
		defer func() {
			cancel()
			nf.close()
			r.devMu.Lock()
			if r.nlh != nil {
				r.nlh.Close()
			}
			r.devMu.Unlock()
			close(r.done)
		}()
		for {
			recs, err := nf.receive()
			if ctx.Err() != nil {
				return // shutdown, not a failure
			}
			if err != nil {
				if errors.Is(err, unix.ENOBUFS) {
					s.metrics.overrun()
					continue
				}
				var op *netlink.OpError
				if errors.As(err, &op) && (op.Timeout() || op.Temporary()) {
					continue
				}
				s.log.Error("nflog receive", "group", rc.Group, "err", err)
				r.err = fmt.Errorf("nflog receive: %w", err)
				return
			}
			for _, rec := range recs {
				r.handleRecord(rec)
			}
		}
	}()
	return r, nil
}

// Close stops the reader and waits for it.
func (r *Reader) Close() error {
	r.cancel()
	<-r.done
	return r.err
}

// Done is closed when the reader has stopped.
func (r *Reader) Done() <-chan struct{} { return r.done }

// Err is why the reader stopped (nil for a normal shutdown); valid after
// Done is closed.
func (r *Reader) Err() error { return r.err }

func (r *Reader) handleRecord(a nflogRecord) {
	if !strings.HasPrefix(a.Prefix, PrefixTag+":") {
		r.s.metrics.record()
		return
	}
	rec := LogRecord{Prefix: a.Prefix, HwProtocol: a.HwProtocol, Payload: a.Payload, Time: a.Time}
	if len(a.HwAddr) == 6 {
		rec.HwAddr = a.HwAddr
	}
	if strings.HasPrefix(rec.Prefix, PrefixTag+"::") {
		if idx := cmp.Or(a.PhysInDev, a.InDev); idx != 0 {
			rec.InDev = r.ifName(idx)
		}
		if idx := cmp.Or(a.PhysOutDev, a.OutDev); idx != 0 {
			rec.OutDev = r.ifName(idx)
		}
	}
	r.s.Ingest(rec)
}

// ifName resolves an ifindex in the reader's namespace, caching for 30 s.
func (r *Reader) ifName(idx uint32) string {
	r.devMu.Lock()
	defer r.devMu.Unlock()
	now := time.Now()
	if d, ok := r.devs[idx]; ok && now.Sub(d.at) < 30*time.Second {
		return d.name
	}
	if r.nlh == nil {
		var err error
		if r.nsfd > 0 {
			r.nlh, err = vnl.NewHandleAt(netns.NsHandle(r.nsfd))
		} else {
			r.nlh, err = vnl.NewHandle()
		}
		if err != nil {
			return ""
		}
	}
	name := ""
	if l, err := r.nlh.LinkByIndex(int(idx)); err == nil {
		name = l.Attrs().Name
	}
	if len(r.devs) > 4096 {
		clear(r.devs)
	}
	r.devs[idx] = devName{name, now}
	return name
}
