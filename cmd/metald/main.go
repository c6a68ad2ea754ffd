// Command metald is the per-host microVM provisioning daemon. It serves
// vmprovisioner.v1.VmService on --listen and Prometheus metrics on
// --metrics-listen. It must run as root.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/metald/metald/internal/config"
	"github.com/metald/metald/internal/daemon"
	"github.com/metald/metald/internal/logfile"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return // -h, --help: the usage is printed, and that is success
		}
		fmt.Fprintln(os.Stderr, "metald:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("metald", flag.ContinueOnError)
	cfgPath := fs.String("config", "", "config file (YAML or JSON); empty uses the embedded defaults")
	config.RegisterFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		return err
	}
	if err := cfg.ApplyFlags(fs); err != nil {
		return err
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("%w (running as uid %d); start it with sudo or as a systemd service", daemon.ErrNotRoot, os.Geteuid())
	}

	if err := os.MkdirAll(cfg.LogDir, 0o750); err != nil {
		return fmt.Errorf("create log directory: %w", err)
	}
	// metald.log rotates like security.log: metald.log.1 is the newest old
	// file, five are kept, each at most 100 MiB.
	logFile, err := logfile.Open(filepath.Join(cfg.LogDir, "metald.log"), 0, 0)
	if err != nil {
		return err
	}
	defer logFile.Close()
	log := slog.New(slog.NewJSONHandler(io.MultiWriter(os.Stderr, logFile), &slog.HandlerOptions{Level: cfg.SlogLevel()}))
	if cfg.ResolvedBackend() == "netns" && privateMounts("/proc/self/ns/mnt", "/proc/1/ns/mnt") {
		log.Warn("metald runs in a mount namespace of its own (under `ip netns exec`, unshare, or a systemd unit with private mounts): "+
			"the VM namespaces it mounts under netns.dir vanish when it exits, and a metald started later finds those VMs TERMINATED; "+
			"run it in the host's mount namespace", "netns_dir", cfg.Netns.Dir)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	d, err := daemon.New(ctx, daemon.Options{
		DataDir: cfg.DataDir, DBPath: cfg.StorePath(), LogDir: cfg.LogDir, Backend: cfg.ResolvedBackend(),
		NetnsDir: cfg.Netns.Dir, EtcNetnsDir: cfg.Netns.EtcDir, GuestCommand: cfg.Netns.GuestCommand,
		ShutdownTimeout: cfg.VM.ShutdownTimeout.Std(), WatchInterval: cfg.VM.ReconcileInterval.Std(), Logger: log,
		Pools: cfg.IPAM.Pools, NoAutoSubnetNames: !cfg.IPAM.AutoSubnetNames, PerVMLabels: cfg.Metrics.PerVMLabels, Region: cfg.Region, ManagementAccess: cfg.Isolation.ManagementAccess,
		LeakInterval: cfg.IPAM.CleanupInterval.Std(), LeakGrace: cfg.IPAM.CleanupGrace.Std(),
	})
	if err != nil {
		return err
	}
	defer d.Close()
	apiL, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", cfg.Listen, err)
	}
	metL, err := net.Listen("tcp", cfg.MetricsListen)
	if err != nil {
		apiL.Close()
		return fmt.Errorf("listen on %s: %w", cfg.MetricsListen, err)
	}
	err = d.Serve(ctx, apiL, metL)
	if errors.Is(err, context.Canceled) {
		err = nil
	}
	log.Info("metald stopped; VMs keep running")
	return err
}

// privateMounts reports whether the mount namespaces at self and init (two
// /proc/<pid>/ns/mnt links) differ; false when either cannot be read.
func privateMounts(self, init string) bool {
	a, err1 := os.Readlink(self)
	b, err2 := os.Readlink(init)
	return err1 == nil && err2 == nil && a != b
}
