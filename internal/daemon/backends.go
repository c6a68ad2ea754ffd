package daemon

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/metald/metald/internal/backend"
	"github.com/metald/metald/internal/backend/firecracker"
	bnetns "github.com/metald/metald/internal/backend/netns"
	"github.com/metald/metald/internal/backend/qemu"
)

// openBackend builds the configured backend. "auto" takes firecracker when
// its binary is configured and KVM is usable, else qemu when it is
// installed, else the netns sandbox; the choice is logged and shown in
// GetVm (backendInfo.type).
func (d *Daemon) openBackend() (backend.Backend, error) {
	opt := d.opt
	name := opt.Backend
	if name == "auto" {
		name = d.chooseBackend()
	}
	switch name {
	case "netns":
		b, err := bnetns.New(bnetns.Config{NetnsDir: opt.NetnsDir, EtcNetnsDir: opt.EtcNetnsDir,
			GuestCommand: opt.GuestCommand, HostNS: d.hostNS, Links: d.links, Logger: d.log, Owner: d.instance})
		if err != nil {
			return nil, fmt.Errorf("open netns backend: %w", err)
		}
		return b, nil
	case "qemu":
		b, err := qemu.New(qemu.Config{Binary: opt.QEMUBinary, DataDir: filepath.Join(opt.DataDir, "qemu"),
			Accelerator: opt.QEMUAccelerator, HostNS: d.hostNS, Links: d.links, GuestTest: opt.GuestTest, Logger: d.log})
		if err != nil {
			return nil, fmt.Errorf("open qemu backend: %w", err)
		}
		if err := b.Available(); err != nil {
			return nil, fmt.Errorf("qemu backend: %w", err)
		}
		return b, nil
	case "firecracker":
		b, err := firecracker.New(firecracker.Config{Binary: opt.FirecrackerBinary, DataDir: filepath.Join(opt.DataDir, "firecracker"),
			HostNS: d.hostNS, Links: d.links, Logger: d.log})
		if err != nil {
			return nil, fmt.Errorf("open firecracker backend: %w", err)
		}
		return b, nil
	}
	return nil, fmt.Errorf("unknown backend %q", name)
}

func (d *Daemon) chooseBackend() string {
	if bin := d.opt.FirecrackerBinary; bin != "" {
		if err := firecracker.Available(bin); err == nil && kvmUsable() {
			d.log.Info("backend auto: firecracker", "binary", bin)
			return "firecracker"
		} else {
			d.log.Info("backend auto: firecracker not usable", "err", err, "kvm", kvmUsable())
		}
	}
	probe, err := qemu.New(qemu.Config{Binary: d.opt.QEMUBinary, HostNS: d.hostNS, Links: d.links, Logger: d.log})
	if err == nil && probe.Available() == nil {
		probe.Close()
		d.log.Info("backend auto: qemu")
		return "qemu"
	}
	d.log.Info("backend auto: netns (no usable VMM found)")
	return "netns"
}

// kvmUsable reports whether /dev/kvm can be opened for VMs.
func kvmUsable() bool {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}
