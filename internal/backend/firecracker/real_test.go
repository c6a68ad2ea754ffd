package firecracker

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/metald/metald/internal/backend"
	"github.com/metald/metald/internal/netnstest"
	"github.com/metald/metald/internal/network/link"
)

func TestMain(m *testing.M) { os.Exit(netnstest.Main(m)) }

// TestRealFirecracker boots metald's guest image under a real Firecracker.
//
// THIS IS THE ONE TEST THAT IS SKIPPED BY DESIGN: no Firecracker binary can
// be installed on metald's development and CI machines, and their /dev/kvm
// cannot run a guest. It runs when METALD_FIRECRACKER_BIN names a
// firecracker binary, METALD_FIRECRACKER_KERNEL an uncompressed vmlinux
// with virtio-mmio, and /dev/kvm works. The initrd is build/guest/initrd.img
// (make guest-image).
func TestRealFirecracker(t *testing.T) {
	bin := os.Getenv("METALD_FIRECRACKER_BIN")
	if bin == "" {
		t.Skip("METALD_FIRECRACKER_BIN not set: no real Firecracker on this machine (opt-in end-to-end test)")
	}
	if err := Available(bin); err != nil {
		t.Skipf("firecracker unusable here: %v", err)
	}
	kernel := os.Getenv("METALD_FIRECRACKER_KERNEL")
	initrd, _ := filepath.Abs(filepath.Join("..", "..", "..", "build", "guest", "initrd.img"))
	if kernel == "" {
		t.Fatal("METALD_FIRECRACKER_KERNEL must name a vmlinux when METALD_FIRECRACKER_BIN is set")
	}
	host := netnstest.New(t)
	links, err := link.New(host.File)
	if err != nil {
		t.Fatal(err)
	}
	defer links.Close()
	links.EnsureBridge("br0")
	links.EnsureGateway("br0", netip.MustParsePrefix("2001:db8:1::1/64"))
	b, err := New(Config{Binary: bin, HostNS: host.File, Links: links, DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ctx := context.Background()
	spec := &backend.Spec{VMID: "fc1", VCPUs: 1, MemoryBytes: 256 << 20, KernelPath: kernel, InitrdPath: initrd,
		KernelArgs: "console=ttyS0 reboot=k panic=1 pci=off",
		NICs: []backend.NIC{{ID: "eth0", HostDevice: "fc-fc1-0", MAC: net.HardwareAddr{2, 0, 0, 0, 0, 0x50},
			Address: netip.MustParsePrefix("2001:db8:1::50/64"), Gateway: netip.MustParseAddr("2001:db8:1::1")}}}
	inst, err := b.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Destroy(ctx, spec.VMID, inst)
	if err := links.AttachPort("fc-fc1-0", "br0"); err != nil {
		t.Fatal(err)
	}
	if inst, err = b.Boot(ctx, spec, inst); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		data, _ := os.ReadFile(inst.Details[DetailConsoleLog])
		if bytes.Contains(data, []byte("metald-init: network up")) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("guest network not up:\n%s", data)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := host.Run("ping", "-6", "-c1", "-W2", "2001:db8:1::50"); err != nil {
		t.Errorf("ping guest: %v", err)
	}
	if err := b.Pause(ctx, inst); err != nil {
		t.Fatal(err)
	}
	if h := b.Check(ctx, inst); !h.Paused {
		t.Errorf("Check after pause: %+v", h)
	}
	if err := b.Resume(ctx, inst); err != nil {
		t.Fatal(err)
	}
	if inst, err = b.Shutdown(ctx, inst, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if h := b.Check(ctx, inst); h.Running {
		t.Errorf("Check after shutdown: %+v", h)
	}
}
