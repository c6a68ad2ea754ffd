package daemon_test

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/metald/metald/internal/network"
	"github.com/metald/metald/internal/network/nftgen"
	"github.com/metald/metald/internal/network/secpolicy"
)

// nftGen reads the host namespace's nf_tables generation (one per commit).
func (e *env) nftGen(t *testing.T) uint32 {
	t.Helper()
	tr, err := nftgen.New(e.host.Fd())
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	g, err := tr.Gen()
	if err != nil {
		t.Fatal(err)
	}
	return g
}

// policyChains lists the policy chains of a VM's NIC in the ip6 tables.
func (e *env) policyChains(t *testing.T, vmID string) []string {
	t.Helper()
	out, err := e.host.Run("nft", "list", "chains", "ip6")
	if err != nil {
		t.Fatalf("nft list chains: %v\n%s", err, out)
	}
	var chains []string
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "chain" && strings.HasPrefix(f[1], "vm-"+vmID+".") {
			chains = append(chains, f[1])
		}
	}
	return chains
}

// CreateVm programs a VM's first-hop rules and its policy in one nf_tables
// commit (each commit walks every chain of the namespace), and both are in
// place and enforced.
func TestCreateVmCommitsRulesAndPolicyOnce(t *testing.T) {
	e := newEnv(t)
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-a", "config": vmConfig("t1", nic("eth0", "br-j", "2001:db8:71::10/64", "2001:db8:71::1"))})
	cfg := vmConfig("t1", nic("eth0", "br-j", "2001:db8:71::11/64", "2001:db8:71::1"))
	obj(list(cfg["network"])[0])["security_policy"] = map[string]any{
		"ingress_rules": []any{"allow tcp from any to any port 80", "deny all from any to any"},
	}
	before := e.nftGen(t)
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-b", "config": cfg})
	if n := e.nftGen(t) - before; n != 1 {
		t.Fatalf("CreateVm made %d nf_tables commits, want 1", n)
	}
	if out, err := e.fhList(t, "chain", "vm-tap-vm-b-out"); err != nil {
		t.Fatalf("first-hop chain missing: %v\n%s", err, out)
	}
	if pc := e.policyChains(t, "vm-b"); len(pc) == 0 {
		t.Fatal("no policy chain for vm-b")
	}
	// A VM with two NICs: still one commit.
	before = e.nftGen(t)
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-c", "config": vmConfig("t1",
		nic("eth0", "br-j", "2001:db8:71::12/64", "2001:db8:71::1"), nic("eth1", "br-j2", "2001:db8:73::12/64", "2001:db8:73::1"))})
	if n := e.nftGen(t) - before; n != 1 {
		t.Fatalf("CreateVm of two NICs made %d nf_tables commits, want 1", n)
	}
	if pc := e.policyChains(t, "vm-c"); len(pc) < 2 {
		t.Fatalf("policy chains of vm-c: %v", pc)
	}
	// Enforced: the policy admits port 80 only.
	for _, id := range []string{"vm-a", "vm-b"} {
		e.mustCall("BootVm", map[string]any{"vm_id": id})
	}
	for _, id := range []string{"vm-a", "vm-b"} {
		e.waitDAD(id)
	}
	e.startListener(t, "vm-b", "80", "22")
	if !e.tcpConnect(t, "vm-a", "2001:db8:71::11", "80") {
		t.Error("port 80 is refused")
	}
	if e.tcpConnect(t, "vm-a", "2001:db8:71::11", "22") {
		t.Error("port 22 is admitted")
	}
}

// A one-transaction install that fails while staging commits nothing: the
// first-hop rules staged before the failing policy are not in the kernel,
// other VMs' state is intact, and both managers take the next change.
func TestJointInstallFailureCommitsNothing(t *testing.T) {
	e := newEnv(t)
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-a", "config": vmConfig("t1", nic("eth0", "br-j", "2001:db8:72::10/64", "2001:db8:72::1"))})
	aChains := e.policyChains(t, "vm-a")
	if len(aChains) == 0 {
		t.Fatal("no policy chain for vm-a")
	}
	mac, _ := net.ParseMAC("02:00:00:00:72:11")
	addr := netip.MustParseAddr("2001:db8:72::11")
	rules := []network.NICPlan{{VMID: "vm-j", TenantID: "t1", NICID: "eth0", HostDevice: "tap-vm-j", MAC: mac, Addresses: []netip.Addr{addr}}}
	ctx := context.Background()
	for name, pol := range map[string]secpolicy.NICPolicy{
		// Fails validation before anything of the policy is queued.
		"invalid": {VMID: "vm-j", NIC: "eth0"},
		// Fails after the policy's base objects are queued: vm-a holds the
		// address.
		"taken address": {VMID: "vm-j", NIC: "eth0", MAC: mac, Addrs: []netip.Addr{netip.MustParseAddr("2001:db8:72::10")}},
	} {
		before := e.nftGen(t)
		if err := e.d.InstallJoint(ctx, append([]network.NICPlan(nil), rules...), []secpolicy.NICPolicy{pol}); err == nil {
			t.Fatalf("%s: install succeeded", name)
		}
		if n := e.nftGen(t) - before; n != 0 {
			t.Fatalf("%s: %d commits after a failed install", name, n)
		}
		if out, err := e.fhList(t, "chain", "vm-tap-vm-j-out"); err == nil {
			t.Fatalf("%s: first-hop chain of the failed install exists:\n%s", name, out)
		}
		if got := e.policyChains(t, "vm-a"); strings.Join(got, ",") != strings.Join(aChains, ",") {
			t.Fatalf("%s: vm-a's policy chains changed: %v, were %v", name, got, aChains)
		}
	}
	good := secpolicy.NICPolicy{VMID: "vm-j", NIC: "eth0", Tenant: "t1", Bridge: "br-j", MAC: mac, Addrs: []netip.Addr{addr}}
	if err := e.d.InstallJoint(ctx, rules, []secpolicy.NICPolicy{good}); err != nil {
		t.Fatalf("install after failures: %v", err)
	}
	if out, err := e.fhList(t, "chain", "vm-tap-vm-j-out"); err != nil {
		t.Fatalf("first-hop chain missing: %v\n%s", err, out)
	}
	if len(e.policyChains(t, "vm-j")) == 0 {
		t.Fatal("no policy chain for vm-j")
	}
	// Both managers still program on their own.
	e.mustCall("CreateVm", map[string]any{"vm_id": "vm-c", "config": vmConfig("t1", nic("eth0", "br-j", "2001:db8:72::12/64", "2001:db8:72::1"))})
	if len(e.policyChains(t, "vm-c")) == 0 {
		t.Fatal("no policy chain for vm-c")
	}
}
