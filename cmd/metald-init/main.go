// Command metald-init is the guest side of metald: a static binary that
// runs as PID 1 of a metald microVM (or before the real init, which it then
// execs). It mounts the basic filesystems, loads the virtio modules listed
// in the image, reads the NIC configuration metald put on the kernel
// command line (metald.net=, see package guestcfg), configures every NIC
// found by MAC (privacy sysctls first, then link up, address, default
// route) and /etc/resolv.conf, and then either execs metald.init or stays
// PID 1: it reaps orphans and powers the VM off on SIGTERM, on SIGINT
// and on the ACPI power button (QEMU's system_powerdown), and reboots on
// SIGINT (Ctrl-Alt-Del, as Firecracker's SendCtrlAltDel delivers it).
//
// With metald.test=rogue-ra it also sends rogue Router Advertisements from
// every configured NIC, for the first-hop security tests.
package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/metald/metald/cmd/metald-init/guestcfg"
)

// ModuleDir holds the kernel modules of the image and the file "order"
// listing them (one file name a line) in load order.
const ModuleDir = "/lib/modules/metald"

// NetworkUpMarker is printed on the console once every NIC is configured;
// the host watches the serial log for it.
const NetworkUpMarker = "metald-init: network up"

func logf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "metald-init: "+format+"\n", a...)
}

func main() {
	pid1 := os.Getpid() == 1
	if pid1 {
		mountBasics()
	}
	// Ctrl-Alt-Del becomes SIGINT to PID 1 instead of an immediate reboot.
	if pid1 {
		if err := unix.Reboot(unix.LINUX_REBOOT_CMD_CAD_OFF); err != nil {
			logf("disable ctrl-alt-del: %v", err)
		}
	}
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, unix.SIGTERM, unix.SIGINT, unix.SIGCHLD, unix.SIGPWR)

	raw, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		logf("read /proc/cmdline: %v", err)
	}
	loadModules(ModuleDir, string(raw))

	cl, err := guestcfg.ParseCmdline(string(raw))
	if err != nil {
		logf("kernel command line: %v", err)
	}
	if cl.Net != nil {
		if err := configure(*cl.Net); err != nil {
			logf("network: %v", err)
		} else {
			fmt.Fprintln(os.Stderr, NetworkUpMarker)
		}
	}
	if rogue, pings := cl.TestModes(); cl.Net != nil {
		if rogue {
			go rogueRA(*cl.Net)
		}
		for _, a := range pings {
			go ping6(a)
		}
	}
	if cl.Init != "" {
		if _, err := os.Stat(cl.Init); err == nil {
			signal.Reset()
			err := syscall.Exec(cl.Init, []string{cl.Init}, os.Environ())
			logf("exec %s: %v", cl.Init, err)
		} else {
			logf("%s: %v; staying as init", cl.Init, err)
		}
	}
	if !pid1 {
		logf("not PID 1: exiting")
		return
	}
	go watchPowerButton(sigs)
	startShell()
	for s := range sigs {
		switch s {
		case unix.SIGCHLD:
			reap()
		case unix.SIGINT:
			// Ctrl-Alt-Del means reboot, as with any init; under
			// Firecracker (reboot=k) a guest reboot ends the VMM, which
			// is how its SendCtrlAltDel stops a VM.
			logf("%v: rebooting", s)
			stopAll(unix.LINUX_REBOOT_CMD_RESTART)
		default:
			logf("%v: powering off", s)
			stopAll(unix.LINUX_REBOOT_CMD_POWER_OFF)
		}
	}
}

// mountBasics mounts /proc, /sys, /dev, /run (errors are logged: a mount
// that already exists is fine).
func mountBasics() {
	for _, m := range []struct{ src, dst, typ string }{
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"},
		{"tmpfs", "/run", "tmpfs"},
		{"tmpfs", "/tmp", "tmpfs"},
		{"devpts", "/dev/pts", "devpts"},
	} {
		os.MkdirAll(m.dst, 0o755)
		if err := unix.Mount(m.src, m.dst, m.typ, unix.MS_NOSUID, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			logf("mount %s: %v", m.dst, err)
		}
	}
}

// loadModules loads dir/order's modules in order, with the parameters the
// kernel command line gives them (module.param=value, as modprobe would:
// Firecracker describes its virtio-mmio devices that way); already loaded
// or built-in ones are fine.
func loadModules(dir, cmdline string) {
	f, err := os.Open(filepath.Join(dir, "order"))
	if err != nil {
		return
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name := strings.TrimSpace(sc.Text())
		if name == "" || strings.HasPrefix(name, "#") {
			continue
		}
		if err := loadModule(filepath.Join(dir, name), moduleParams(name, cmdline)); err != nil {
			logf("load module %s: %v", name, err)
		}
	}
}

// moduleParams returns the "k=v ..." parameters cmdline gives module file
// (e.g. virtio_mmio.device=4K@0xd0000000:5 for virtio_mmio.ko).
func moduleParams(file, cmdline string) string {
	mod := strings.ReplaceAll(strings.TrimSuffix(file, ".ko"), "-", "_")
	var ps []string
	for _, f := range strings.Fields(cmdline) {
		if f == "--" {
			break
		}
		k, _, _ := strings.Cut(f, "=")
		if m, p, ok := strings.Cut(k, "."); ok && p != "" && strings.ReplaceAll(m, "-", "_") == mod {
			ps = append(ps, strings.TrimPrefix(f, m+"."))
		}
	}
	return strings.Join(ps, " ")
}

func loadModule(path, params string) error {
	m, err := os.Open(path)
	if err != nil {
		return err
	}
	defer m.Close()
	err = unix.FinitModule(int(m.Fd()), params, 0)
	if errors.Is(err, unix.EEXIST) {
		return nil
	}
	return err
}

// reap collects every exited child.
func reap() {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
	}
}

// stopAll stops every other process, syncs and powers the machine off or
// restarts it (cmd).
func stopAll(cmd int) {
	unix.Kill(-1, unix.SIGTERM)
	time.Sleep(200 * time.Millisecond)
	unix.Kill(-1, unix.SIGKILL)
	unix.Sync()
	if err := unix.Reboot(cmd); err != nil {
		logf("reboot(%#x): %v", cmd, err)
	}
}

// startShell starts a busybox shell on the console when the image has one,
// for debugging over the serial console; the image works without it.
func startShell() {
	const sh = "/bin/sh"
	if _, err := os.Stat(sh); err != nil {
		return
	}
	var attr = &syscall.ProcAttr{
		Env:   []string{"PATH=/bin:/sbin:/usr/bin:/usr/sbin", "HOME=/"},
		Files: []uintptr{0, 1, 2},
		Sys:   &syscall.SysProcAttr{Setsid: true},
	}
	if _, err := syscall.ForkExec(sh, []string{"-sh"}, attr); err != nil {
		logf("start shell: %v", err)
	}
}

// watchPowerButton turns a KEY_POWER press on any input device (the ACPI
// power button QEMU's system_powerdown presses) into SIGPWR on sigs.
func watchPowerButton(sigs chan<- os.Signal) {
	seen := map[string]bool{}
	for range 60 {
		ms, _ := filepath.Glob("/dev/input/event*")
		for _, p := range ms {
			if seen[p] {
				continue
			}
			seen[p] = true
			go func() {
				f, err := os.Open(p)
				if err != nil {
					return
				}
				defer f.Close()
				// struct input_event on 64-bit: timeval (16), type, code
				// (u16 each), value (s32).
				var ev [24]byte
				for {
					if _, err := io.ReadFull(f, ev[:]); err != nil {
						return
					}
					typ := uint16(ev[16]) | uint16(ev[17])<<8
					code := uint16(ev[18]) | uint16(ev[19])<<8
					val := int32(uint32(ev[20]) | uint32(ev[21])<<8 | uint32(ev[22])<<16 | uint32(ev[23])<<24)
					if typ == 1 && code == 116 && val == 1 { // EV_KEY, KEY_POWER, press
						sigs <- unix.SIGPWR
					}
				}
			}()
		}
		time.Sleep(time.Second)
	}
}
