// Package config owns metald's daemon configuration: the file format,
// embedded defaults and validation.
//
// A configuration file is YAML (.yaml, .yml) or JSON (.json, read with the
// same strict rules; JSON is a subset of YAML). TOML is not supported: no
// TOML module is a dependency and a hand-written subset would be a second
// format to keep strict. Every key is optional and keeps its default (see
// Default) when absent or null; keys use snake_case. Unknown keys, values of
// the wrong type, duplicate keys and duration strings that do not parse are
// errors that name the file, the line and the full key path, e.g.
//
//	config file metald.yaml: line 3: unknown key "netns.guest_comand"
//
// The daemon's main function uses the package in four steps:
//
//	fs := flag.NewFlagSet("metald", flag.ContinueOnError)
//	path := fs.String("config", "/etc/metald/metald.yaml", "configuration file")
//	config.RegisterFlags(fs) // --listen --metrics-listen --data-dir --backend --log-dir
//	if err := fs.Parse(os.Args[1:]); err != nil { ... }
//	cfg, err := config.Load(*path)            // file over defaults
//	if err == nil { err = cfg.ApplyFlags(fs) } // flags that were set, over the file
//	if err == nil { err = cfg.Validate() }     // semantic checks, naming each key
//
// Load does not call Validate, so that flags can correct a file before it
// is checked. Derived values are read through methods (ResolvedBackend,
// StorePath, SlogLevel) rather than written back into the Config, so a
// Config always shows what the operator wrote.
package config

import (
	"errors"
	"fmt"
	"github.com/metald/metald/internal/ipam"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Config is metald's daemon configuration. The zero value is not useful;
// start from Default or Load.
type Config struct {
	// Listen is the host:port of the ConnectRPC API and the debug handlers.
	// Default "127.0.0.1:8080". Flag --listen.
	Listen string `yaml:"listen"`
	// MetricsListen is the host:port of the Prometheus /metrics endpoint.
	// Default "127.0.0.1:9464". Flag --metrics-listen.
	MetricsListen string `yaml:"metrics_listen"`
	// DataDir holds metald's persistent state (the database, per-VM
	// files). Absolute. Default "/var/lib/metald". Flag --data-dir.
	DataDir string `yaml:"data_dir"`
	// LogDir holds metald's log files, such as security.log. Absolute.
	// Default "/var/log/metald". Flag --log-dir.
	LogDir string `yaml:"log_dir"`
	// Backend runs the guests: "auto", "netns", "qemu" or "firecracker".
	// "auto" picks firecracker when firecracker.binary is set and KVM is
	// usable, else qemu when it is installed, else netns (the choice is
	// logged and shown in GetVm). Default "auto". Flag --backend.
	Backend string `yaml:"backend"`
	// Region is the host's region (e.g. "US"); a VM whose
	// compliance.data_residency names another region is refused. Default "".
	Region string `yaml:"region"`
	// LogLevel is the minimum level logged: "debug", "info", "warn" or
	// "error". Default "info".
	LogLevel string `yaml:"log_level"`
	// Netns configures the netns (sandbox) backend.
	Netns NetnsConfig `yaml:"netns"`
	// VM configures VM lifecycle timing.
	VM VMConfig `yaml:"vm"`
	// Store configures the database.
	Store StoreConfig `yaml:"store"`
	// Metrics configures the metrics endpoint's content.
	Metrics MetricsConfig `yaml:"metrics"`
	// IPAM configures IPv6 address pools.
	IPAM IPAMConfig `yaml:"ipam"`
	// QEMU configures the qemu backend.
	QEMU QEMUConfig `yaml:"qemu"`
	// Firecracker configures the firecracker backend.
	Firecracker FirecrackerConfig `yaml:"firecracker"`
	// Isolation configures quarantine (IsolateVm).
	Isolation IsolationConfig `yaml:"isolation"`
}

// IsolationConfig configures quarantine (IsolateVm). Only the operator
// sets it: no API request can add an exception to a quarantine.
type IsolationConfig struct {
	// ManagementAccess lists the flows that still pass while a VM is
	// isolated, as allow rules in metald's rule language, each written
	// from the management host's or the VM's point of view: "allow tcp
	// from 2001:db8:ffff::/48 to any port 22" lets the management network
	// open SSH connections to an isolated VM (replies pass, being part of
	// the allowed connection), "allow udp from any to 2001:db8:ffff::10
	// port 514" lets the VM send syslog to a collector. Every rule applies
	// to both directions of each isolated NIC; "any" stands for the VM.
	// Each rule must be an allow rule that names the management side by
	// a literal IPv6 prefix other than ::/0 (not "any", not "sg:", whose
	// membership tenants choose, not a symbolic subnet name). Everything
	// else to and from an isolated VM is dropped, except ND/MLD (RFC
	// 4890). Default none: isolation is total.
	ManagementAccess []string `yaml:"management_access"`
}

// QEMUConfig configures the qemu backend (real VMs under QEMU).
type QEMUConfig struct {
	// Binary is the QEMU executable. Default "qemu-system-x86_64".
	Binary string `yaml:"binary"`
	// Accelerator is "auto" (KVM when a probe boot works, else TCG),
	// "kvm" or "tcg". Default "auto".
	Accelerator string `yaml:"accelerator"`
}

// FirecrackerConfig configures the firecracker backend.
type FirecrackerConfig struct {
	// Binary is the firecracker executable; backend "auto" picks
	// firecracker only when it is set and KVM works. Default "".
	Binary string `yaml:"binary"`
}

// IPAMConfig configures IPv6 address management.
type IPAMConfig struct {
	// AutoSubnetNames assigns a value to an unknown symbolic subnet name
	// (the "web" in 2600:beef:1000:web::10/64) on first use. When false an
	// unknown name is an error naming the field and the label. Default true.
	AutoSubnetNames bool `yaml:"auto_subnet_names"`
	// Pools are created (or updated) at start; pools created through the
	// API persist too. With no pools at all, metald creates pool "default"
	// on a random RFC 4193 ULA /48 at first start and keeps it. Each pool:
	// id, prefixes, description, tenant_ids (empty = shared), rate_limit
	// (allocations per hour per tenant, 0 = none), max_allocations (0 =
	// none). Default none.
	Pools []ipam.PoolConfig `yaml:"pools"`
	// CleanupInterval is how often leaked allocations (VM gone, or
	// TERMINATED for longer than CleanupGrace) are released. Default "10m".
	CleanupInterval Duration `yaml:"cleanup_interval"`
	// CleanupGrace is how long a TERMINATED VM keeps its addresses before
	// the collector releases them. Default "1h".
	CleanupGrace Duration `yaml:"cleanup_grace"`
}

// NetnsConfig configures the netns backend, which runs each guest as a
// process in its own network namespace.
type NetnsConfig struct {
	// Dir is where named network namespaces are bind-mounted, as by
	// "ip netns add". Absolute. Default "/run/netns".
	Dir string `yaml:"dir"`
	// EtcDir holds per-namespace files (resolv.conf) that "ip netns exec"
	// bind-mounts over /etc. Absolute. Default "/etc/netns".
	EtcDir string `yaml:"etc_dir"`
	// GuestCommand is the program and arguments run as the guest inside
	// the namespace. Must not be empty. Default ["sleep", "infinity"].
	GuestCommand []string `yaml:"guest_command"`
}

// VMConfig configures VM lifecycle timing.
type VMConfig struct {
	// ShutdownTimeout bounds a graceful guest stop before the guest is
	// killed, when a ShutdownVm request gives no timeout. A Go duration
	// string greater than zero. Default "10s".
	ShutdownTimeout Duration `yaml:"shutdown_timeout"`
	// ReconcileInterval is how often metald compares each VM's kernel
	// state (links, firewall, guest process) with its desired state. A Go
	// duration string greater than zero. Default "5s".
	ReconcileInterval Duration `yaml:"reconcile_interval"`
}

// StoreConfig configures the database.
type StoreConfig struct {
	// Driver is the database driver; "sqlite" is the only one. Default
	// "sqlite".
	Driver string `yaml:"driver"`
	// Path is the SQLite database file. Empty means <data_dir>/metald.db
	// (see StorePath); otherwise absolute. Default "".
	Path string `yaml:"path"`
}

// MetricsConfig configures the metrics endpoint's content.
type MetricsConfig struct {
	// PerVMLabels adds a vm_id label to per-VM series. Off by default
	// because it makes series count grow with the number of VMs. Default
	// false.
	PerVMLabels bool `yaml:"per_vm_labels"`
}

// Duration is a time.Duration written as a Go duration string ("10s",
// "1m30s") in configuration files.
type Duration time.Duration

// Std returns d as a time.Duration.
func (d Duration) Std() time.Duration { return time.Duration(d) }

// String returns d in Go duration notation.
func (d Duration) String() string { return time.Duration(d).String() }

// MarshalText implements encoding.TextMarshaler.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler with time.ParseDuration.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// Backend names.
const (
	BackendAuto        = "auto"
	BackendNetns       = "netns"
	BackendQEMU        = "qemu"
	BackendFirecracker = "firecracker"
)

// Default returns the built-in configuration. Each call returns a new
// value that the caller may modify.
func Default() *Config {
	return &Config{
		Listen:        "127.0.0.1:8080",
		MetricsListen: "127.0.0.1:9464",
		DataDir:       "/var/lib/metald",
		LogDir:        "/var/log/metald",
		Backend:       BackendAuto,
		LogLevel:      "info",
		Netns: NetnsConfig{
			Dir:          "/run/netns",
			EtcDir:       "/etc/netns",
			GuestCommand: []string{"sleep", "infinity"},
		},
		VM: VMConfig{
			ShutdownTimeout:   Duration(10 * time.Second),
			ReconcileInterval: Duration(5 * time.Second),
		},
		Store: StoreConfig{
			Driver: "sqlite",
			Path:   "",
		},
		Metrics: MetricsConfig{
			PerVMLabels: false,
		},
		QEMU:      QEMUConfig{Binary: "qemu-system-x86_64", Accelerator: "auto"},
		Isolation: IsolationConfig{ManagementAccess: []string{}},
		IPAM: IPAMConfig{
			AutoSubnetNames: true,
			CleanupInterval: Duration(10 * time.Minute),
			CleanupGrace:    Duration(time.Hour),
		},
	}
}

// ResolvedBackend returns the backend metald runs: Backend, with "auto"
// resolved to the best backend available in this build (netns).
//
// "auto" is resolved by the daemon, which probes the host (see
// internal/daemon): it is returned as is.
func (c *Config) ResolvedBackend() string {
	return c.Backend
}

// StorePath returns the database file: Store.Path, or <data_dir>/metald.db
// when it is empty.
func (c *Config) StorePath() string {
	if c.Store.Path != "" {
		return c.Store.Path
	}
	return filepath.Join(c.DataDir, "metald.db")
}

// SlogLevel returns LogLevel as a slog.Level; an invalid level (which
// Validate rejects) yields slog.LevelInfo.
func (c *Config) SlogLevel() slog.Level {
	var l slog.Level
	if err := l.UnmarshalText([]byte(c.LogLevel)); err != nil {
		return slog.LevelInfo
	}
	return l
}

// Validate checks the configuration's values and returns every problem
// found, joined, each prefixed by its key path:
//
//	metrics_listen: invalid address "x": address x: missing port in address
//
// Rules: listen and metrics_listen are host:port with an empty host, an IP
// address or a host name, and a numeric port, and differ from each other;
// data_dir, log_dir, netns.dir, netns.etc_dir and a non-empty store.path
// are absolute; backend is auto, netns, qemu or firecracker, and qemu and
// firecracker are rejected as not available in this build; log_level is
// debug, info, warn or error; netns.guest_command is non-empty and its
// program is non-empty; vm.shutdown_timeout and vm.reconcile_interval are
// greater than zero; store.driver is sqlite; every
// isolation.management_access rule is one ParseManagementAccess accepts.
func (c *Config) Validate() error {
	var errs []error
	add := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...)))
	}

	listenOK := true
	for _, a := range []struct{ key, val string }{{"listen", c.Listen}, {"metrics_listen", c.MetricsListen}} {
		if err := checkListenAddr(a.val); err != nil {
			add(a.key, "invalid address %q: %v", a.val, err)
			listenOK = false
		}
	}
	if listenOK && sameListener(c.Listen, c.MetricsListen) {
		add("metrics_listen", "%q is the same address as listen", c.MetricsListen)
	}

	for _, d := range []struct{ key, val string }{
		{"data_dir", c.DataDir},
		{"log_dir", c.LogDir},
		{"netns.dir", c.Netns.Dir},
		{"netns.etc_dir", c.Netns.EtcDir},
	} {
		if err := checkAbsPath(d.val); err != nil {
			add(d.key, "%v", err)
		}
	}

	switch c.Backend {
	case BackendAuto, BackendNetns:
	case BackendQEMU:
	case BackendFirecracker:
		if c.Firecracker.Binary == "" {
			add("firecracker.binary", "required for backend %q", BackendFirecracker)
		}
	default:
		add("backend", "unknown backend %q; want auto, netns, qemu or firecracker", c.Backend)
	}

	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		add("log_level", "unknown level %q; want debug, info, warn or error", c.LogLevel)
	}

	if len(c.Netns.GuestCommand) == 0 {
		add("netns.guest_command", "must name a program")
	} else if strings.TrimSpace(c.Netns.GuestCommand[0]) == "" {
		add("netns.guest_command", "program name %q is empty", c.Netns.GuestCommand[0])
	}

	for _, d := range []struct {
		key string
		val Duration
	}{{"vm.shutdown_timeout", c.VM.ShutdownTimeout}, {"vm.reconcile_interval", c.VM.ReconcileInterval}} {
		if d.val <= 0 {
			add(d.key, "must be greater than zero, got %q", d.val)
		}
	}

	for _, d := range []struct {
		key string
		val Duration
	}{{"ipam.cleanup_interval", c.IPAM.CleanupInterval}, {"ipam.cleanup_grace", c.IPAM.CleanupGrace}} {
		if d.val <= 0 {
			add(d.key, "must be greater than zero, got %q", d.val)
		}
	}
	seen := map[string]bool{}
	for i, p := range c.IPAM.Pools {
		key := fmt.Sprintf("ipam.pools[%d]", i)
		if p.ID == "" {
			add(key+".id", "required")
		} else if seen[p.ID] {
			add(key+".id", "duplicate pool id %q", p.ID)
		}
		seen[p.ID] = true
		if len(p.Prefixes) == 0 {
			add(key+".prefixes", "at least one prefix is required")
		}
		for j, s := range p.Prefixes {
			if _, err := ipam.ParsePrefix(s); err != nil {
				add(fmt.Sprintf("%s.prefixes[%d]", key, j), "%v", err)
			}
		}
		if p.RateLimit < 0 {
			add(key+".rate_limit", "must not be negative, got %d", p.RateLimit)
		}
		if p.MaxAllocations < 0 {
			add(key+".max_allocations", "must not be negative, got %d", p.MaxAllocations)
		}
	}

	switch c.QEMU.Accelerator {
	case "auto", "kvm", "tcg":
	default:
		add("qemu.accelerator", "unknown accelerator %q; want auto, kvm or tcg", c.QEMU.Accelerator)
	}
	if c.QEMU.Binary == "" {
		add("qemu.binary", "must name a program")
	}

	if _, err := ParseManagementAccess("isolation.management_access", c.Isolation.ManagementAccess); err != nil {
		errs = append(errs, err)
	}

	if c.Store.Driver != "sqlite" {
		add("store.driver", "unknown driver %q; want sqlite", c.Store.Driver)
	}
	if c.Store.Path != "" {
		if err := checkAbsPath(c.Store.Path); err != nil {
			add("store.path", "%v", err)
		}
	}
	return errors.Join(errs...)
}

func checkAbsPath(p string) error {
	switch {
	case p == "":
		return errors.New("must not be empty")
	case strings.ContainsAny(p, "\x00\n"):
		return fmt.Errorf("path %q contains NUL or a newline", p)
	case !filepath.IsAbs(p):
		return fmt.Errorf("path %q is not absolute", p)
	}
	return nil
}

// checkListenAddr accepts host:port where host is empty, an IP address or a
// host name, and port is a number 0..65535.
func checkListenAddr(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return err
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return fmt.Errorf("port %q is not a number 0..65535", port)
	}
	if host == "" {
		return nil
	}
	if _, err := netip.ParseAddr(host); err == nil {
		return nil
	}
	if !isHostname(host) {
		return fmt.Errorf("host %q is neither an IP address nor a host name", host)
	}
	return nil
}

func isHostname(s string) bool {
	if len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(strings.TrimSuffix(s, "."), ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

// sameListener reports whether two valid listen addresses would collide:
// same port (not 0) and same host, or either host a wildcard (empty,
// 0.0.0.0 or ::).
func sameListener(a, b string) bool {
	ha, pa, _ := net.SplitHostPort(a)
	hb, pb, _ := net.SplitHostPort(b)
	na, _ := strconv.Atoi(pa)
	nb, _ := strconv.Atoi(pb)
	if na == 0 || na != nb {
		return false
	}
	return isWildcardHost(ha) || isWildcardHost(hb) || ha == hb
}

func isWildcardHost(h string) bool {
	if h == "" {
		return true
	}
	a, err := netip.ParseAddr(h)
	return err == nil && a.IsUnspecified()
}
