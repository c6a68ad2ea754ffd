// Package daemon owns metald's process: it wires the store, the kernel-facing
// managers, the backend, the VM manager and the API together, recovers state
// after a restart, and owns the start and stop order.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/vishvananda/netlink"

	"github.com/metald/metald/internal/api"
	"github.com/metald/metald/internal/backend"
	"github.com/metald/metald/internal/config"
	"github.com/metald/metald/internal/ipam"
	"github.com/metald/metald/internal/ipam/ipamhttp"
	"github.com/metald/metald/internal/ipam/ipammetrics"
	"github.com/metald/metald/internal/network"
	"github.com/metald/metald/internal/network/fhmetrics"
	"github.com/metald/metald/internal/network/link"
	"github.com/metald/metald/internal/network/nft"
	"github.com/metald/metald/internal/network/nftconn"
	"github.com/metald/metald/internal/network/nftgen"
	"github.com/metald/metald/internal/network/secpolicy"
	"github.com/metald/metald/internal/network/shape"
	"github.com/metald/metald/internal/policy"
	"github.com/metald/metald/internal/secevent"
	"github.com/metald/metald/internal/secevent/eventhttp"
	"github.com/metald/metald/internal/store"
	"github.com/metald/metald/internal/store/sqlite"
	"github.com/metald/metald/internal/vm"
)

// Options configure a Daemon. Zero values take the documented defaults.
type Options struct {
	// DataDir holds the database and per-VM state (default /var/lib/metald).
	DataDir string
	// DBPath overrides <DataDir>/metald.db.
	DBPath string
	// LogDir holds metald's log files (default /var/log/metald).
	LogDir string
	// Backend is the VM backend; only "netns" exists in this build.
	Backend string
	// NetnsDir is where VM namespaces are bind-mounted (default /run/netns).
	NetnsDir string
	// EtcNetnsDir holds per-VM resolv.conf files (default /etc/netns).
	EtcNetnsDir string
	// GuestCommand is the netns backend's guest process.
	GuestCommand []string
	// ShutdownTimeout bounds a graceful guest stop (default 10 s).
	ShutdownTimeout time.Duration
	// WatchInterval is how often VM liveness is checked (default 2 s).
	WatchInterval time.Duration
	// TempAddrInterval is how often the temporary addresses guests bound
	// are read again from the first-hop sets (default 10 s; a notice from
	// the learning rule makes metald read a port's set at once).
	TempAddrInterval time.Duration
	// HostNS is the namespace metald's bridges and ports live in; nil means
	// the daemon's own. Tests pass a private namespace.
	HostNS *os.File
	// Logger receives the daemon's logs.
	Logger *slog.Logger
	// Registry receives metrics; nil makes a new one with Go and process
	// collectors.
	Registry *prometheus.Registry
	// Pools are the IPv6 address pools from the config file.
	Pools []ipam.PoolConfig
	// NoAutoSubnetNames makes unknown symbolic subnet names an error
	// instead of assigning them on first use.
	NoAutoSubnetNames bool
	// LeakInterval and LeakGrace drive the leaked-allocation collector
	// (defaults 10 min and 1 h).
	LeakInterval, LeakGrace time.Duration
	// EventWindow is the security-event aggregation window (default 5 s).
	EventWindow time.Duration
	// Region is the host's region (compliance.data_residency).
	Region string
	// ManagementAccess are the quarantine exceptions
	// (isolation.management_access, see config.ParseManagementAccess).
	ManagementAccess []string
	// PerVMLabels adds vm_id labels to per-VM metrics.
	PerVMLabels bool
	// QEMUBinary, QEMUAccelerator configure the qemu backend.
	QEMUBinary, QEMUAccelerator string
	// FirecrackerBinary is the firecracker executable; "" disables it.
	FirecrackerBinary string
	// GuestTest is passed to guests' metald-init as metald.test= (tests
	// only).
	GuestTest string
	// Step is passed to the VM manager (crash tests only).
	Step func(string)
	// SkipRootCheck lets tests that supply their own namespaces run the
	// daemon; production always checks.
	SkipRootCheck bool
}

// Daemon is a running metald.
type Daemon struct {
	opt      Options
	log      *slog.Logger
	hostNS   *os.File
	ownNS    bool
	store    *sqlite.Store
	instance string // the database's instance id: the mark on our kernel objects
	links    *link.Manager
	backend  backend.Backend
	vms      *vm.Manager
	ipam     *ipam.Manager
	fw       *nft.Firewall
	gens     *nftgen.Tracker
	polGens  *nftgen.Tracker // the policy tables' drift check (linked to gens)
	shaper   *shape.Shaper
	pol      *secpolicy.Manager
	hostH    *netlink.Handle
	labels   labelCache
	events   *secevent.Service
	temps    *tempAddrs
	evw      eventWiring
	joint    *joint
	registry *prometheus.Registry
	reg      *recordingRegisterer
	mux      *http.ServeMux
	Recovery *vm.RecoveryReport
}

// ErrNotRoot reports a daemon started without root privileges.
var ErrNotRoot = errors.New("metald must run as root: it creates network namespaces, bridges, links and nftables rules")

// ErrOtherInstance reports a host network namespace that keeps VMs of a
// metald with another database (claimHost).
var ErrOtherInstance = errors.New("another metald's VMs are on this host")

func (o *Options) defaults() {
	if o.DataDir == "" {
		o.DataDir = "/var/lib/metald"
	}
	if o.DBPath == "" {
		o.DBPath = filepath.Join(o.DataDir, "metald.db")
	}
	if o.LogDir == "" {
		o.LogDir = "/var/log/metald"
	}
	if o.Backend == "" {
		o.Backend = "auto"
	}
	if o.NetnsDir == "" {
		o.NetnsDir = "/run/netns"
	}
	if o.EtcNetnsDir == "" {
		o.EtcNetnsDir = "/etc/netns"
	}
	if o.ShutdownTimeout <= 0 {
		o.ShutdownTimeout = 10 * time.Second
	}
	if o.TempAddrInterval <= 0 {
		o.TempAddrInterval = 10 * time.Second
	}
	if o.WatchInterval <= 0 {
		o.WatchInterval = 2 * time.Second
	}
	if o.LeakInterval <= 0 {
		o.LeakInterval = 10 * time.Minute
	}
	if o.LeakGrace <= 0 {
		o.LeakGrace = time.Hour
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
}

// New opens the daemon's state and kernel handles and reconciles them.
func New(ctx context.Context, opt Options) (d *Daemon, err error) {
	opt.defaults()
	if !opt.SkipRootCheck && os.Geteuid() != 0 {
		return nil, fmt.Errorf("%w (running as uid %d)", ErrNotRoot, os.Geteuid())
	}
	mgmt, err := config.ParseManagementAccess("isolation.management_access", opt.ManagementAccess)
	if err != nil {
		return nil, err
	}
	d = &Daemon{opt: opt, log: opt.Logger, registry: opt.Registry}
	// The returned d is nil on error; close what was opened through a
	// copy.
	opened := d
	defer func() {
		if err != nil {
			opened.Close()
		}
	}()
	if err := os.MkdirAll(opt.LogDir, 0o750); err != nil {
		return nil, fmt.Errorf("create log directory: %w", err)
	}
	d.hostNS = opt.HostNS
	if d.hostNS == nil {
		if d.hostNS, err = os.Open("/proc/self/ns/net"); err != nil {
			return nil, fmt.Errorf("open host network namespace: %w", err)
		}
		d.ownNS = true
	}
	if d.store, err = sqlite.Open(ctx, opt.DBPath); err != nil {
		return nil, err
	}
	if d.instance, err = d.store.InstanceID(ctx); err != nil {
		return nil, err
	}
	if d.links, err = link.New(d.hostNS); err != nil {
		return nil, fmt.Errorf("open link manager: %w", err)
	}
	// Before anything that could treat another metald's VMs as orphans.
	if err := d.claimHost(); err != nil {
		return nil, err
	}
	if d.backend, err = d.openBackend(); err != nil {
		return nil, err
	}
	if d.registry == nil {
		d.registry = prometheus.NewRegistry()
	}
	d.reg = &recordingRegisterer{Registry: d.registry}
	if opt.Registry == nil {
		d.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	if err := d.reg.Register(newVMCollector(d.store)); err != nil {
		return nil, fmt.Errorf("register metrics: %w", err)
	}

	ipamStore, err := d.store.IPAM(ctx)
	if err != nil {
		return nil, fmt.Errorf("open address store: %w", err)
	}
	ipamMetrics, err := ipammetrics.New(d.reg)
	if err != nil {
		return nil, fmt.Errorf("register address metrics: %w", err)
	}
	if d.ipam, err = ipam.Open(ctx, ipamStore, opt.Pools, ipam.Options{
		AutoSubnetNames: !opt.NoAutoSubnetNames, Observer: ipamMetrics, Logger: d.log,
	}); err != nil {
		return nil, fmt.Errorf("open address pools: %w", err)
	}
	ipamMetrics.Watch(d.ipam)

	if d.fw, err = nft.New(int(d.hostNS.Fd())); err != nil {
		return nil, fmt.Errorf("open nftables: %w", err)
	}
	if d.pol, err = secpolicy.New(int(d.hostNS.Fd())); err != nil {
		return nil, fmt.Errorf("open security policy table: %w", err)
	}
	// Both tables' commits are noted, so the first-hop drift check compares
	// the table only after a commit that was not metald's.
	if d.gens, err = nftgen.New(int(d.hostNS.Fd())); err != nil {
		return nil, fmt.Errorf("open nftables generation: %w", err)
	}
	d.fw.SetGenTracker(d.gens)
	d.pol.SetGenTracker(d.gens)
	// The policy tables have their own drift check (vm.Options.PolicyDrift):
	// a second tracker, noted on every metald commit.
	if d.polGens, err = nftgen.New(int(d.hostNS.Fd())); err != nil {
		return nil, fmt.Errorf("open nftables generation: %w", err)
	}
	d.gens.Link(d.polGens)
	if d.hostH, err = link.HandleAt(int(d.hostNS.Fd())); err != nil {
		return nil, fmt.Errorf("open netlink: %w", err)
	}

	// Security events: counted drops log a rate-limited sample to NFLOG,
	// read back, aggregated and stored; set before any NIC is programmed.
	d.fw.SetLogGroup(secevent.DefaultGroup)
	evMetrics := secevent.NewMetrics(d.reg)
	d.temps = newTempAddrs()
	if d.events, err = secevent.New(ctx, secevent.Config{Window: opt.EventWindow, LogDir: opt.LogDir}, secevent.Options{
		Store: d.store.Events(), Resolve: d.resolveDevice, Metrics: evMetrics, Logger: d.log,
		FlowtableOffload: flowtableOffload, Learned: d.temps.noticeLearned,
	}); err != nil {
		return nil, fmt.Errorf("open security events: %w", err)
	}

	fh, err := fhmetrics.New(d.reg, d.fw, fhmetrics.Options{PerVMLabels: opt.PerVMLabels, Labels: d.deviceLabels})
	if err != nil {
		return nil, fmt.Errorf("register first-hop metrics: %w", err)
	}
	d.fw.SetObserver(observers{fh, restoreAfterRepair{d}})

	// Addresses in requests may use symbolic subnet names everywhere: each
	// request's validator parses them through its own name transaction
	// (new names are removed again when the request fails); rule plans of
	// configs a request already resolved use the plan parsers, which leave
	// that request's tentative names alone.
	if d.shaper, err = shape.New(int(d.hostNS.Fd())); err != nil {
		return nil, fmt.Errorf("open shaper: %w", err)
	}
	d.shaper.OnCommit(d.gens.Note)
	hostPorts := ports{m: d.links, hostFd: int(d.hostNS.Fd()), netfiltered: &sync.Map{}, shaper: d.shaper}
	// Plans pass through the event wrappers (events.go): enhanced
	// monitoring, policy drops logged to NFLOG, cache_policies.
	d.evw = eventWiring{
		fw:  newEventFirewall(firewall{f: d.fw, obs: func(t time.Duration) { d.events.ObserveProcessing(secevent.StageRules, t) }}, d.events, evMetrics),
		pol: newEventPolicy(d.pol, d.events, evMetrics),
	}
	d.evw.fw.removed = d.temps.forget
	d.joint = &joint{fw: d.evw.fw, pol: d.evw.pol, fwMgr: d.fw, polMgr: d.pol, gens: d.gens, opts: nftconn.Options(int(d.hostNS.Fd())),
		obs: func(t time.Duration) { d.events.ObserveProcessing(secevent.StageRules, t) }}
	d.vms = vm.NewManager(vm.Options{Store: d.store, Backend: d.backend, Ports: hostPorts, Policy: d.evw.pol, Shaper: hostPorts, Region: opt.Region, ManagementAccess: mgmt, Joint: d.joint, TempAddrs: d.temps.get,
		TenantGone: func(tenant string) { evMetrics.ForgetTenant(tenant); fh.ForgetTenant(tenant) },
		PolicyDrift: func() bool {
			if d.polGens.Unchanged() {
				return false
			}
			// Someone else committed (an operator's nft command; adding to
			// blocked_sources is one): rebuild only if the policy tables'
			// structure changed.
			d.polGens.BeginCompare()
			drifted, why, err := d.pol.Drifted()
			if err != nil {
				d.polGens.Abandon() // compare again at the next pass
				if !errors.Is(err, secpolicy.ErrChangedMeanwhile) {
					d.log.Error("compare security policy tables", "err", err)
				}
				return false
			}
			if drifted {
				d.log.Warn("security policy tables changed outside metald", "change", why)
				fh.CountRepair("policy")
			}
			return drifted
		},
		Addresses: addresses{d.ipam}, Firewall: d.evw.fw, Router: newRouter(d.hostH), Logger: d.log,
		// VLANs are separated by nftables port marks whatever the kernel's
		// bridge VLAN filtering (which metald does not program).
		Emit: func(typ, sev string, row *store.VM, reason string) {
			d.events.Emit(secevent.Event{Type: secevent.EventType(typ), Severity: secevent.Severity(sev),
				VMID: row.ID, TenantID: row.TenantID, Details: secevent.Details{Reason: reason}})
		},
		Caps: vm.Capabilities{Firewall: true, VLANMode: string(network.VLANModeNFTables), BridgeSnooping: true, Policy: true, Limits: true}, Snooper: hostPorts, ShutdownTimeout: opt.ShutdownTimeout, Step: opt.Step,
		Validate: validateOptions(d.ipam.PlanPrefixParser(), d.ipam.PlanAddrParser()),
		Names:    func(ctx context.Context) vm.NameTx { return requestNames{d.ipam.BeginNames(ctx)} }})

	rep, err := d.vms.Recover(ctx)
	d.Recovery = rep
	// Recovery programmed every policy from what the kernel held: the
	// policy drift check starts from here.
	d.polGens.BeginCompare()
	if err != nil {
		// Recovery problems are logged and retried by the next start; the
		// VMs that did recover are served.
		d.log.Error("recovery incomplete", "err", err)
	}
	if rep != nil {
		d.log.Info("recovered state", "adopted", len(rep.Adopted), "terminated", len(rep.Terminated),
			"rolled_back", len(rep.RolledBack), "deletes_finished", len(rep.DeletesFinished),
			"orphan_sandboxes", len(rep.OrphanSandboxes), "orphan_ports", len(rep.OrphanPorts), "reattached", len(rep.Reattached))
	}

	// An enhanced-monitoring session that starts or ends re-programs its
	// tenant's NICs.
	d.events.OnChange(d.reprogramTenant)

	d.mux = http.NewServeMux()
	status, _ := d.backend.(api.NICStatuser)
	srv := api.NewServer(d.vms, status)
	path, h := srv.Handler()
	d.mux.Handle(path, h)
	srv.SetBridgeL3(func(bridge string) (bool, string) {
		st, err := secpolicy.BridgeNetfilterStatus(int(d.hostNS.Fd()), bridge)
		if err != nil {
			return false, err.Error()
		}
		return st.Visible, st.Reason
	})
	srv.SetRuleCounters(func(vmID, nic string) ([]api.RuleHit, error) {
		rc, err := d.pol.RuleCounters(vmID, nic)
		out := make([]api.RuleHit, 0, len(rc))
		for _, c := range rc {
			out = append(out, api.RuleHit{Direction: c.Direction, Rule: c.Rule, Packets: c.Packets, Bytes: c.Bytes})
		}
		return out, err
	})
	srv.RegisterDebug(d.mux, d.counters)
	srv.RegisterAudit(d.mux)
	d.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	ipamhttp.New(d.ipam, ipamhttp.Options{VMState: d.vmState, Live: d.live, Grace: opt.LeakGrace}).Register(d.mux)
	eventhttp.New(d.events).Register(d.mux)
	return d, nil
}

// counters reads a port's first-hop drop counters for the debug endpoint.
func (d *Daemon) counters(dev string) (map[string]uint64, error) {
	c, err := d.fw.Counters(dev)
	if err != nil {
		return nil, err
	}
	out := make(map[string]uint64, len(c))
	for k, v := range c {
		out[string(k)] = v
	}
	return out, nil
}

// vmState reports a VM's persisted state for the address endpoints.
func (d *Daemon) vmState(ctx context.Context, vmID string) (string, bool) {
	vm, err := d.store.GetVM(ctx, vmID)
	if err != nil {
		return "", false
	}
	return vm.State, true
}

// live tells the leak collector whether a VM exists and since when it is
// TERMINATED.
func (d *Daemon) live(vmID string) (bool, time.Time) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	vm, err := d.store.GetVM(ctx, vmID)
	if errors.Is(err, store.ErrNotFound) {
		return false, time.Time{}
	}
	if err != nil {
		return true, time.Time{} // unknown: keep its addresses
	}
	if vm.State == store.StateTerminated {
		return true, vm.UpdatedAt
	}
	return true, time.Time{}
}

// Manager returns the VM manager.
func (d *Daemon) Manager() *vm.Manager { return d.vms }

// Handler returns the API port's handler (VmService and debug endpoints).
func (d *Daemon) Handler() http.Handler { return debugGuard{d.mux} }

// MetricsHandler returns the Prometheus endpoint's handler.
func (d *Daemon) MetricsHandler() http.Handler {
	return promhttp.HandlerFor(d.registry, promhttp.HandlerOpts{Registry: d.registry})
}

// NewHTTPServer returns a server for h that speaks HTTP/1.1 and cleartext
// HTTP/2 (h2c), so plain gRPC clients work.
func NewHTTPServer(h http.Handler) *http.Server {
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	return &http.Server{Handler: h, Protocols: &p, ReadHeaderTimeout: 10 * time.Second}
}

// Serve serves the API and metrics on the given listeners and watches VM
// liveness until ctx ends, then shuts the servers down. VMs keep running.
func (d *Daemon) Serve(ctx context.Context, apiL, metricsL net.Listener) error {
	apiSrv := NewHTTPServer(d.Handler())
	metSrv := NewHTTPServer(d.MetricsHandler())
	errc := make(chan error, 2)
	go func() { errc <- apiSrv.Serve(apiL) }()
	go func() { errc <- metSrv.Serve(metricsL) }()
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	go d.vms.Watch(watchCtx, d.opt.WatchInterval)
	go d.ipam.CollectLeaks(watchCtx, d.opt.LeakInterval, d.opt.LeakGrace, d.live)
	go d.watchTempAddrs(watchCtx, d.opt.TempAddrInterval)
	evDone := make(chan struct{})
	go func() { defer close(evDone); d.events.Run(watchCtx) }()
	defer func() { stopWatch(); <-evDone }()
	if _, err := d.events.StartReader(watchCtx, secevent.ReaderConfig{Group: secevent.DefaultGroup, NetNS: int(d.hostNS.Fd())}); err != nil {
		d.log.Error("security event reader not started: events from kernel drops are not recorded", "err", err)
	}
	d.log.Info("metald serving", "api", apiL.Addr().String(), "metrics", metricsL.Addr().String(), "backend", d.backend.Name())
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	apiSrv.Shutdown(sctx)
	metSrv.Shutdown(sctx)
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// Close releases the daemon's handles. It does not stop VMs.
func (d *Daemon) Close() error {
	if d.links != nil {
		d.links.Close()
	}
	if d.hostH != nil {
		d.hostH.Close()
	}
	if d.pol != nil {
		d.pol.Close()
	}
	if d.joint != nil {
		d.joint.Close()
	}
	if d.fw != nil {
		d.fw.Close()
	}
	if d.shaper != nil {
		d.shaper.Close()
	}
	if d.polGens != nil {
		d.polGens.Close()
	}
	if d.gens != nil {
		d.gens.Close()
	}
	var err error
	if d.store != nil {
		err = d.store.Close()
	}
	if d.ownNS && d.hostNS != nil {
		d.hostNS.Close()
	}
	return err
}

// requestNames adapts an IPAM name transaction to vm.NameTx.
type requestNames struct{ *ipam.NameTx }

func (t requestNames) Validate() vm.ValidateOptions {
	return validateOptions(t.PrefixParser(), t.AddrParser())
}

// validateOptions parses addresses, and the prefixes inside rules, with
// the given parsers.
func validateOptions(parsePrefix func(string) (netip.Prefix, error), parseAddr func(string) (netip.Addr, error)) vm.ValidateOptions {
	return vm.ValidateOptions{ParsePrefix: parsePrefix, ParseAddr: parseAddr, ParseRule: policy.ParseOptions{ParsePrefix: parsePrefix}.Check}
}

// InstanceID returns the database's instance id, the mark on this
// metald's kernel objects.
func (d *Daemon) InstanceID() string { return d.instance }
