package secevent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Config tunes the pipeline. Zero values take the defaults shown.
type Config struct {
	// Window is the aggregation window: packets with the same host device,
	// event type, source and rule within Window of the first one fold into
	// one event. Default 5s.
	Window time.Duration
	// MaxBuckets bounds the aggregation table (distinct keys in flight).
	// Packets that would open a bucket beyond it are dropped and counted.
	// Default 4096.
	MaxBuckets int
	// MaxSourcesPerKey bounds the distinct sources tracked per host device
	// and event type; further sources fold into one event with src "*"
	// (spoofing floods). Default 32.
	MaxSourcesPerKey int
	// QueueSize bounds the queue of directly emitted events. Default 1024.
	QueueSize int
	// BatchSize is the most events written in one transaction when
	// batch_processing is on (Settings). Default 4096.
	BatchSize int
	// MaxAge and MaxEvents bound the stored events. Defaults 30 days and
	// 100000 events.
	MaxAge    time.Duration
	MaxEvents int
	// PruneInterval is how often old events are pruned. Default 1 minute.
	PruneInterval time.Duration
	// LogDir is where security.log goes; "" disables the file.
	LogDir string
	// LogMaxSize and LogMaxFiles configure rotation (defaults 100 MiB, 5).
	LogMaxSize  int64
	LogMaxFiles int
}

func (c *Config) defaults() {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	if c.Window <= 0 {
		c.Window = 5 * time.Second
	}
	def(&c.MaxBuckets, 4096)
	def(&c.MaxSourcesPerKey, 32)
	def(&c.QueueSize, 1024)
	def(&c.BatchSize, 4096)
	def(&c.MaxEvents, 100000)
	if c.MaxAge <= 0 {
		c.MaxAge = 30 * 24 * time.Hour
	}
	if c.PruneInterval <= 0 {
		c.PruneInterval = time.Minute
	}
}

// Options are the service's collaborators.
type Options struct {
	// Learned is told of each temporary address a port's guest bound by
	// its DAD (records of control ControlLearned: notices, not events).
	// It must not block: the NFLOG reader calls it. Nil: ignored.
	Learned func(dev string, addr netip.Addr)
	// Store persists events, sessions and settings. Required.
	Store Store
	// Resolve attributes host devices to VMs. Nil: events carry only
	// details.host_device.
	Resolve Resolver
	// Metrics may be nil.
	Metrics *Metrics
	// Logger may be nil (discard).
	Logger *slog.Logger
	// Now is the clock (default time.Now).
	Now func() time.Time
	// FlowtableOffload reports whether hardware (flowtable) offload is
	// supported, and if not why. Nil: unsupported.
	FlowtableOffload func() (ok bool, reason string)
}

// ErrQueueFull reports an emitted event dropped by back-pressure.
var ErrQueueFull = errors.New("security event queue full")

// Service is the security event pipeline: NFLOG records and emitted events
// in; aggregated events out to the store, security.log and metrics.
type Service struct {
	cfg     Config
	opts    Options
	log     *slog.Logger
	now     func() time.Time
	metrics *Metrics
	file    *LogFile

	queue chan Event

	mu       sync.Mutex
	buckets  map[aggKey]*bucket
	perKey   map[devType]int
	maxSeen  int
	wake     chan struct{}
	dropped  atomic.Int64
	ingested atomic.Int64
	written  atomic.Int64
	txns     atomic.Int64
	queueHW  atomic.Int64
	flushAll atomic.Bool

	mon monitorState
	opt optimizerState
}

type aggKey struct {
	dev    string
	typ    EventType
	src    netip.Addr
	mac    [6]byte // when there is no IPv6 source
	rule   string
	folded bool // the catch-all beyond MaxSourcesPerKey
}

type devType struct {
	dev string
	typ EventType
}

type bucket struct {
	ev          Event
	count       int64
	first, last time.Time
}

// New builds the service and restores monitoring sessions and optimize
// settings from the store. Start it with Run.
func New(ctx context.Context, cfg Config, opts Options) (*Service, error) {
	if opts.Store == nil {
		return nil, errors.New("secevent: a Store is required")
	}
	cfg.defaults()
	s := &Service{
		cfg: cfg, opts: opts, log: opts.Logger, now: opts.Now, metrics: opts.Metrics,
		queue:   make(chan Event, cfg.QueueSize),
		buckets: map[aggKey]*bucket{},
		perKey:  map[devType]int{},
		wake:    make(chan struct{}, 1),
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.now == nil {
		s.now = time.Now
	}
	if cfg.LogDir != "" {
		f, err := OpenLogFile(cfg.LogDir, cfg.LogMaxSize, cfg.LogMaxFiles)
		if err != nil {
			return nil, err
		}
		s.file = f
	}
	if err := s.loadMonitor(ctx); err != nil {
		s.closeFile()
		return nil, err
	}
	if err := s.loadSettings(ctx); err != nil {
		s.closeFile()
		return nil, err
	}
	return s, nil
}

func (s *Service) closeFile() {
	if s.file != nil {
		s.file.Close()
	}
}

// LogRecord is one logged packet as the kernel reports it.
type LogRecord struct {
	// Prefix is the rule's log prefix (see Prefix).
	Prefix string
	// HwProtocol is the packet's ethertype (0 if unknown).
	HwProtocol uint16
	// HwAddr is the source link-layer address, if reported.
	HwAddr net.HardwareAddr
	// Payload starts at the network header (or, with HwProtocol 0 and no
	// IPv6 version nibble, at an Ethernet header).
	Payload []byte
	// InDev and OutDev name the input and output ports (bridge ports when
	// the packet was bridged); used when the prefix names no device: the
	// input port when it is a VM's, else the output port.
	InDev, OutDev string
	// Time is when the packet was seen (zero: now).
	Time time.Time
}

// Ingest folds one logged packet into the aggregation table. It is cheap
// and never blocks on I/O: the NFLOG reader calls it per record. Records
// whose prefix is not metald's are ignored. Details are only built when a
// packet opens a new bucket; a repeat costs a parse and a map look-up.
func (s *Service) Ingest(r LogRecord) {
	s.metrics.record()
	dev, ctl, err := ParsePrefix(r.Prefix)
	if err != nil {
		return
	}
	if dev == "" {
		dev = r.InDev
		if r.OutDev != "" && s.opts.Resolve != nil {
			if _, _, _, ok := s.opts.Resolve(dev); !ok {
				dev = r.OutDev
			}
		}
	}
	if ctl == ControlLearned {
		s.learned(dev, r)
		return
	}
	s.ingested.Add(1)
	class, _ := Classify(ctl)
	pkt, etherType := decode(&r)
	key := aggKey{dev: dev, typ: class.Type, rule: ctl}
	if pkt != nil {
		key.src = pkt.Src
	}
	if !key.src.IsValid() && len(r.HwAddr) == 6 {
		key.mac = [6]byte(r.HwAddr)
	}
	t := r.Time
	if t.IsZero() {
		t = s.now()
	}
	dt := devType{dev, class.Type}

	s.mu.Lock()
	b := s.buckets[key]
	if b == nil && s.perKey[dt] >= s.cfg.MaxSourcesPerKey {
		key.src, key.mac, key.folded = netip.Addr{}, [6]byte{}, true
		b = s.buckets[key]
	}
	if b == nil {
		if len(s.buckets) >= s.cfg.MaxBuckets {
			s.mu.Unlock()
			s.dropped.Add(1)
			s.metrics.drop(1)
			return
		}
		b = &bucket{first: t, ev: Event{Type: class.Type, Severity: class.Severity,
			Details: details(pkt, etherType, r.HwAddr, ctl, dev, class.Header)}}
		if key.folded {
			b.ev.Details.Src, b.ev.Details.SourcesFolded = "*", true
			b.ev.Details.Reason = fmt.Sprintf("more than %d sources within the window; folded", s.cfg.MaxSourcesPerKey)
		} else {
			s.perKey[dt]++
		}
		s.buckets[key] = b
		if n := len(s.buckets); n > s.maxSeen {
			s.maxSeen = n
		}
	}
	b.count++
	if t.After(b.last) {
		b.last = t
	}
	if t.Before(b.first) {
		b.first = t
	}
	s.mu.Unlock()
}

// decode parses a record's payload: an IPv6 packet, or (hardware protocol
// unknown) an Ethernet frame, whose source MAC fills r.HwAddr when the
// record had none. It returns the packet (nil when unreadable) and the
// ethertype.
func decode(r *LogRecord) (*Packet, uint16) {
	switch {
	case r.HwProtocol == EtherTypeIPv6 || (r.HwProtocol == 0 && len(r.Payload) > 0 && r.Payload[0]>>4 == 6):
		if p, err := Parse(r.Payload); err == nil {
			return &p, EtherTypeIPv6
		}
		return nil, EtherTypeIPv6
	case r.HwProtocol == 0:
		if f, err := ParseFrame(r.Payload); err == nil || f.Src != nil {
			if len(r.HwAddr) == 0 {
				r.HwAddr = f.Src
			}
			return f.IPv6, f.EtherType
		}
	}
	return nil, r.HwProtocol
}

// ControlLearned is the log control of the first-hop rule that binds a
// temporary address from the guest's DAD (internal/network/nft).
const ControlLearned = "learned"

// learned passes a ControlLearned record's address (the DAD's target) to
// Options.Learned.
func (s *Service) learned(dev string, r LogRecord) {
	if s.opts.Learned == nil || dev == "" {
		return
	}
	pkt, _ := decode(&r)
	if pkt == nil || pkt.ICMPv6Type != 135 || !pkt.NDTarget.IsValid() {
		return
	}
	s.opts.Learned(dev, pkt.NDTarget)
}

func details(pkt *Packet, etherType uint16, mac net.HardwareAddr, ctl, dev, header string) Details {
	var d Details
	if pkt != nil {
		pkt.fill(&d)
	}
	if etherType != EtherTypeIPv6 && etherType != 0 {
		d.EtherType = fmt.Sprintf("0x%04x", etherType)
	}
	if len(mac) == 6 {
		d.SrcMAC = mac.String()
		if d.Src == "" {
			d.Src = d.SrcMAC
		}
	}
	d.HostDevice, d.Header = dev, header
	d.Rule = ctl
	if _, rule := SplitControl(ctl); rule != "" {
		d.Rule = rule
	}
	return d
}

// Emit records an event produced by metald itself (vm_isolated,
// vm_released, firewall_drift_repaired, ...). Missing id and timestamp are
// filled in; a missing vm_id is resolved from details.host_device. It never
// blocks: when the queue is full the event is dropped, counted, and
// ErrQueueFull returned.
func (s *Service) Emit(e Event) error {
	if e.Timestamp.IsZero() {
		e.Timestamp = TS(s.now())
	}
	if !e.Severity.Valid() {
		e.Severity = SeverityLow
	}
	select {
	case s.queue <- e:
		if n := int64(len(s.queue)); n > s.queueHW.Load() {
			s.queueHW.Store(n)
		}
		return nil
	default:
		s.dropped.Add(1)
		s.metrics.drop(1)
		return ErrQueueFull
	}
}

// Flush closes every open aggregation bucket now (instead of at the end of
// its window) and wakes the writer. Tests and shutdown use it.
func (s *Service) Flush() {
	s.flushAll.Store(true)
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Stats are counters for tests and debugging.
type Stats struct {
	Ingested       int64 // metald log records ingested
	Written        int64 // events written
	Transactions   int64 // store transactions (InsertEvents calls)
	Dropped        int64 // events dropped by back-pressure
	Buckets        int   // open aggregation buckets
	MaxBucketsSeen int   // high-water mark of Buckets
	Queue          int   // emitted events waiting
	QueueHighWater int64
}

// Stats returns the current counters.
func (s *Service) Stats() Stats {
	s.mu.Lock()
	n, m := len(s.buckets), s.maxSeen
	s.mu.Unlock()
	return Stats{Ingested: s.ingested.Load(), Written: s.written.Load(), Transactions: s.txns.Load(), Dropped: s.dropped.Load(),
		Buckets: n, MaxBucketsSeen: m, Queue: len(s.queue), QueueHighWater: s.queueHW.Load()}
}

// expired removes and returns the buckets whose window has closed (all of
// them when force is set) as events.
func (s *Service) expired(now time.Time, force bool) []Event {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Event
	for k, b := range s.buckets {
		if !force && now.Sub(b.first) < s.cfg.Window {
			continue
		}
		delete(s.buckets, k)
		if !k.folded {
			dt := devType{k.dev, k.typ}
			if s.perKey[dt]--; s.perKey[dt] <= 0 {
				delete(s.perKey, dt)
			}
		}
		e := b.ev
		e.Timestamp = TS(b.first)
		e.Details.PacketCount = b.count
		e.Details.FirstSeen, e.Details.LastSeen = TS(b.first), TS(b.last)
		out = append(out, e)
	}
	return out
}

// Run writes events until ctx is cancelled, then flushes every open bucket
// and queued event and returns. It also prunes stored events periodically.
//
// How events reach the store depends on Settings.BatchProcessing: off,
// every event is written in its own transaction as soon as it is ready
// (its aggregation window closed, or it was emitted); on, the events that
// become ready within one flush window (Config.Window/5, between 10 ms and
// 1 s) are written together in one transaction at the window's end (at
// most Config.BatchSize per transaction).
func (s *Service) Run(ctx context.Context) error {
	defer s.closeFile()
	// Session expiries call back into the firewall owner, which is going
	// away with the service.
	defer s.stopTimers()
	tick := s.cfg.Window / 5
	tick = min(max(tick, 10*time.Millisecond), time.Second)
	sweep := time.NewTicker(tick)
	defer sweep.Stop()
	prune := time.NewTicker(s.cfg.PruneInterval)
	defer prune.Stop()
	s.prune(ctx)
	var pending []Event
	// ready takes events that are ready to be written: at once, or at the
	// end of the flush window when batching.
	ready := func(ctx context.Context, evs []Event) {
		if len(evs) == 0 {
			return
		}
		if !s.Settings().BatchProcessing {
			s.write(ctx, pending)
			pending = nil
			s.write(ctx, evs)
			return
		}
		pending = append(pending, evs...)
		if len(pending) >= s.cfg.BatchSize {
			s.write(ctx, pending)
			pending = nil
		}
	}
	flushPending := func(ctx context.Context) {
		s.write(ctx, pending)
		pending = nil
	}
	for {
		select {
		case <-ctx.Done():
			fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			ready(fctx, s.expired(s.now(), true))
			ready(fctx, s.takeQueue())
			flushPending(fctx)
			cancel()
			return nil
		case e := <-s.queue:
			ready(ctx, append([]Event{e}, s.takeQueue()...))
		case <-s.wake:
			ready(ctx, s.expired(s.now(), s.flushAll.Swap(false)))
			ready(ctx, s.takeQueue())
			flushPending(ctx)
		case <-sweep.C:
			ready(ctx, s.expired(s.now(), false))
			flushPending(ctx)
		case <-prune.C:
			s.prune(ctx)
		}
		s.metrics.setPending(len(s.queue) + len(pending))
	}
}

// takeQueue returns the events waiting in the queue (at most QueueSize).
func (s *Service) takeQueue() []Event {
	var batch []Event
	for len(batch) < s.cfg.QueueSize {
		select {
		case e := <-s.queue:
			batch = append(batch, e)
			continue
		default:
		}
		break
	}
	return batch
}

// write attributes, stores, logs and counts events: in transactions of
// up to BatchSize events when batch processing is on, else one per event.
func (s *Service) write(ctx context.Context, events []Event) {
	size := 1
	if s.Settings().BatchProcessing {
		size = s.cfg.BatchSize
	}
	for len(events) > 0 {
		n := min(len(events), size)
		s.writeBatch(ctx, events[:n])
		events = events[n:]
	}
}

func (s *Service) writeBatch(ctx context.Context, batch []Event) {
	start := time.Now()
	now := s.now()
	for i := range batch {
		e := &batch[i]
		if e.ID == "" {
			e.ID = NewID(now)
		}
		if e.VMID == "" && e.Details.HostDevice != "" && s.opts.Resolve != nil {
			if vm, tenant, nic, ok := s.opts.Resolve(e.Details.HostDevice); ok {
				e.VMID, e.TenantID, e.InterfaceID = vm, tenant, nic
			}
		}
	}
	s.txns.Add(1)
	s.metrics.transaction()
	if err := s.opts.Store.InsertEvents(ctx, batch); err != nil {
		s.log.Error("store security events", "err", err, "count", len(batch))
	}
	if s.file != nil {
		if err := s.file.Write(batch); err != nil {
			s.log.Error("write security log", "err", err)
		}
	}
	for i := range batch {
		s.metrics.event(&batch[i])
	}
	s.written.Add(int64(len(batch)))
	s.metrics.ObserveProcessing(StageEvent, time.Since(start))
}

func (s *Service) prune(ctx context.Context) {
	n, err := s.opts.Store.PruneEvents(ctx, s.now().Add(-s.cfg.MaxAge), s.cfg.MaxEvents)
	if err != nil {
		if ctx.Err() == nil {
			s.log.Error("prune security events", "err", err)
		}
		return
	}
	if n > 0 {
		s.log.Debug("pruned security events", "count", n)
	}
}

// Query returns stored events matching f.
func (s *Service) Query(ctx context.Context, f Filter) ([]Event, error) {
	return s.opts.Store.QueryEvents(ctx, f)
}

// ObserveProcessing records time spent in IPv6 security processing; the
// firewall owner calls it with StageRules around rule programming.
func (s *Service) ObserveProcessing(stage string, d time.Duration) {
	s.metrics.ObserveProcessing(stage, d)
}
