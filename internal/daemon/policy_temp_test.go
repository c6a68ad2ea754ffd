package daemon_test

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/metald/metald/internal/daemon"
	"github.com/metald/metald/internal/network/nft"
	"github.com/metald/metald/internal/secevent"
)

// connectFromScript connects from a given source address.
const connectFromScript = `
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2, source_address=(sys.argv[3], 0))
    print("connected", c.recv(2).decode())
except Exception as e:
    print("failed", e)
`

// The security policy judges a guest's temporary addresses (privacy
// extensions) as its own: once the first-hop rules bind one from the
// guest's DAD, a connection to it meets the VM's ingress rules and tenant
// isolation, and a peer's strict isolation knows it as the tenant's. When
// the binding goes (here deleted by hand; normally it expires), the policy
// forgets the address at the next read.
func TestPolicyJudgesTemporaryAddresses(t *testing.T) {
	if nft.ControlLearned != secevent.ControlLearned {
		t.Fatalf("learning rule logs control %q, the event reader expects %q", nft.ControlLearned, secevent.ControlLearned)
	}
	e := newEnvWith(t, func(o *daemon.Options) { o.TempAddrInterval = 500 * time.Millisecond })
	mk := func(id, tenant, addr string, privacy bool, pol map[string]any) {
		n := map[string]any{"id": "eth0", "bridge_name": "br-tp", "ipv6": map[string]any{
			"address": addr, "gateway": "2001:db8:77::1", "enable_privacy_extensions": privacy, "temp_valid_lifetime": 600},
			"security_policy": pol}
		cfg := vmConfig(tenant, n)
		cfg["security_profile"] = map[string]any{"profile_name": "high"}
		e.mustCall("CreateVm", map[string]any{"vm_id": id, "config": cfg})
		e.mustCall("BootVm", map[string]any{"vm_id": id})
	}
	strictWeb := map[string]any{"ingress_rules": []any{"allow tcp from any to any port 80", "deny all from any to any"}, "tenant_isolation_level": "strict"}
	mk("vm-tp", "t1", "2001:db8:77::10/64", true, strictWeb)
	mk("vm-tc", "t1", "2001:db8:77::11/64", false, strictWeb)
	mk("vm-tx", "t2", "2001:db8:77::12/64", false, map[string]any{"tenant_isolation_level": "none"})
	for _, id := range []string{"vm-tp", "vm-tc", "vm-tx"} {
		e.waitDAD(id)
	}
	temp := e.tempAddr(t, "vm-tp")
	e.startListener(t, "vm-tp", "80", "22")
	e.startListener(t, "vm-tc", "80")

	// The configured address and the temporary one get the same verdicts.
	for _, dst := range []string{"2001:db8:77::10", temp} {
		if !e.tcpConnect(t, "vm-tc", dst, "80") {
			t.Fatalf("tcp/80 to %s (allowed) did not connect", dst)
		}
		if e.tcpConnect(t, "vm-tc", dst, "22") {
			t.Fatalf("tcp/22 to %s connected through `deny all`", dst)
		}
		if e.tcpConnect(t, "vm-tx", dst, "80") {
			t.Fatalf("another tenant reached %s of a strictly isolated VM", dst)
		}
	}
	// From the temporary address, a strictly isolated peer of the same
	// tenant accepts the connection: it knows the address as t1's.
	out, _ := e.inVM("vm-tp", "python3", "-c", connectFromScript, "2001:db8:77::11", "80", temp)
	if !strings.Contains(out, "connected hi") {
		t.Fatalf("from temporary address %s to the same tenant's VM: %s", temp, out)
	}
	st := map[string]string{}
	for _, c := range list(obj(list(e.getVM("vm-tp")["networkStatus"])[0])["policyControls"]) {
		st[str(c, "control")] = str(c, "status")
	}
	if st["policy_address_identity"] != "enforced" {
		t.Fatalf("GetVm policy controls with privacy extensions: %v", st)
	}
	if got := list(obj(list(e.getVM("vm-tp")["networkStatus"])[0])["temporaryAddresses"]); len(got) != 1 || got[0] != temp {
		t.Fatalf("GetVm temporaryAddresses %v, want [%s]", got, temp)
	}

	// The binding goes: so does the address from the policy's ingress map.
	if !strings.Contains(e.policyTables(t), temp) {
		t.Fatalf("temporary address %s not in the policy tables", temp)
	}
	dev := str(obj(list(e.getVM("vm-tp")["networkStatus"])[0]), "hostDevice")
	for _, tbl := range e.fhTables(t) {
		e.host.Run("nft", "delete", "element", "netdev", tbl, dev+"-temp", "{ "+temp+" }")
	}
	deadline := time.Now().Add(10 * time.Second)
	for strings.Contains(e.policyTables(t), temp) {
		if time.Now().After(deadline) {
			t.Fatalf("temporary address %s still in the policy tables after its binding went", temp)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if got := list(obj(list(e.getVM("vm-tp")["networkStatus"])[0])["temporaryAddresses"]); len(got) != 0 {
		t.Fatalf("GetVm temporaryAddresses %v after the binding went", got)
	}
}

// A temporary address whose binding ended on one port (expired; here
// deleted) and that another port's guest then takes, first come first
// served, moves to the new owner's policy: a connection to it meets the
// new owner's ingress rules, not the old owner's. The old owner's
// addresses are read again before the new owner's policy is programmed
// (with no periodic read in between: the interval is an hour).
func TestTemporaryAddressChangesOwner(t *testing.T) {
	e := newEnvWith(t, func(o *daemon.Options) { o.TempAddrInterval = time.Hour })
	mk := func(id, addr string, privacy bool, pol map[string]any) {
		n := map[string]any{"id": "eth0", "bridge_name": "br-to", "ipv6": map[string]any{
			"address": addr, "gateway": "2001:db8:78::1", "enable_privacy_extensions": privacy, "temp_valid_lifetime": 600},
			"security_policy": pol}
		cfg := vmConfig("t1", n)
		cfg["security_profile"] = map[string]any{"profile_name": "high"}
		e.mustCall("CreateVm", map[string]any{"vm_id": id, "config": cfg})
		e.mustCall("BootVm", map[string]any{"vm_id": id})
	}
	only := func(port string) map[string]any {
		return map[string]any{"ingress_rules": []any{"allow tcp from any to any port " + port, "deny all from any to any"}}
	}
	mk("vm-old", "2001:db8:78::10/64", true, only("22"))
	mk("vm-new", "2001:db8:78::11/64", true, only("80"))
	mk("vm-peer", "2001:db8:78::12/64", false, nil)
	for _, id := range []string{"vm-old", "vm-new", "vm-peer"} {
		e.waitDAD(id)
	}
	temp := e.tempAddr(t, "vm-old")
	e.startListener(t, "vm-old", "22")
	e.startListener(t, "vm-new", "22", "80")
	if !e.tcpConnect(t, "vm-peer", temp, "22") {
		t.Fatalf("tcp/22 to %s, allowed by its owner's rules, did not connect", temp)
	}

	// The old owner's binding ends and it stops using the address.
	oldDev := str(obj(list(e.getVM("vm-old")["networkStatus"])[0]), "hostDevice")
	for _, tbl := range e.fhTables(t) {
		e.host.Run("nft", "delete", "element", "netdev", tbl, oldDev+"-temp", "{ "+temp+" }")
		e.host.Run("nft", "delete", "element", "netdev", tbl, nft.PrivOwnedSet, "{ "+temp+" }")
	}
	e.inVM("vm-old", "ip", "-6", "addr", "del", temp+"/64", "dev", "eth0")
	// The new owner's guest takes it (its DAD binds it to its port).
	if out, err := e.inVM("vm-new", "ip", "-6", "addr", "add", temp+"/64", "dev", "eth0"); err != nil {
		t.Fatalf("add %s in vm-new: %v\n%s", temp, err, out)
	}
	// The peer's neighbour entry still names the old owner's MAC (in a
	// real takeover the old owner stopped using the address long before).
	e.inVM("vm-peer", "ip", "-6", "neigh", "flush", "to", temp)
	deadline := time.Now().Add(10 * time.Second)
	for !e.tcpConnect(t, "vm-peer", temp, "80") {
		if time.Now().After(deadline) {
			t.Fatalf("tcp/80 to %s, allowed by its new owner's rules, did not connect\n%s", temp, e.policyTables(t))
		}
		time.Sleep(200 * time.Millisecond)
	}
	if e.tcpConnect(t, "vm-peer", temp, "22") {
		t.Fatalf("tcp/22 to %s connected: judged by its old owner's rules", temp)
	}

	// A VM created again under the same id (so the same port name)
	// starts with no temporary address of its predecessor.
	temps := func() []any { return list(obj(list(e.getVM("vm-new")["networkStatus"])[0])["temporaryAddresses"]) }
	before := temps()
	if !slices.Contains(before, any(temp)) {
		t.Fatalf("vm-new's temporary addresses %v lack %s", before, temp)
	}
	e.mustCall("DeleteVm", map[string]any{"vm_id": "vm-new"})
	mk("vm-new", "2001:db8:78::11/64", true, only("80"))
	for _, a := range temps() {
		if slices.Contains(before, a) {
			t.Fatalf("the new vm-new inherited its predecessor's temporary address %v", a)
		}
	}
}

// A guest with privacy extensions claims, by DAD, another VM's configured
// address in its /64 (first come, first served learning binds anything
// that looks free): metald unbinds it from the claimant's port, records a
// source_guard_violation, and the claimant's traffic from the address is
// dropped from then on.
func TestTemporaryAddressClaimOfAnotherNIC(t *testing.T) {
	e := newEnvWith(t, func(o *daemon.Options) { o.TempAddrInterval = 500 * time.Millisecond })
	mk := func(id, tenant, addr string, privacy bool) {
		n := map[string]any{"id": "eth0", "bridge_name": "br-ts", "ipv6": map[string]any{
			"address": addr, "gateway": "2001:db8:78::1", "enable_privacy_extensions": privacy, "temp_valid_lifetime": 600}}
		cfg := vmConfig(tenant, n)
		cfg["security_profile"] = map[string]any{"profile_name": "high"} // source guard on
		e.mustCall("CreateVm", map[string]any{"vm_id": id, "config": cfg})
		e.mustCall("BootVm", map[string]any{"vm_id": id})
	}
	mk("vm-sa", "t1", "2001:db8:78::10/64", true)
	mk("vm-sv", "t2", "2001:db8:78::20/64", false)
	e.waitDAD("vm-sa")
	e.waitDAD("vm-sv")
	dev := str(obj(list(e.getVM("vm-sa")["networkStatus"])[0]), "hostDevice")
	if out, err := e.scapy("vm-sa", `
sendp(Ether(src=get_if_hwaddr("eth0"), dst="33:33:ff:00:00:20")/IPv6(src="::", dst="ff02::1:ff00:20", hlim=255)/ICMPv6ND_NS(tgt="2001:db8:78::20"), iface="eth0")`); err != nil {
		t.Fatalf("send DAD: %v\n%s", err, out)
	}
	ev := e.waitEvent(t, "vm_id=vm-sa&event_type=source_guard_violation", func(ev event) bool { return detail(ev, "src") == "2001:db8:78::20" })
	if ev.TenantID != "t1" || ev.Severity != "high" || !strings.Contains(detail(ev, "reason"), "vm-sv.eth0") {
		t.Fatalf("event %+v", ev)
	}
	for _, tbl := range e.fhTables(t) {
		if out, _ := e.host.Run("nft", "list", "set", "netdev", tbl, dev+"-temp"); strings.Contains(out, "2001:db8:78::20") {
			t.Fatalf("vm-sa's port still binds vm-sv's address:\n%s", out)
		}
	}
	if got := list(obj(list(e.getVM("vm-sa")["networkStatus"])[0])["temporaryAddresses"]); slices.Contains(got, any("2001:db8:78::20")) {
		t.Fatalf("GetVm temporaryAddresses %v", got)
	}
	// Its override NA for the address no longer leaves its port.
	got := e.sniffWhile(t, "vm-sv", "icmp6 and ip6[40] == 136", func() {
		if out, err := e.scapy("vm-sa", `
sendp(Ether(src=get_if_hwaddr("eth0"), dst="33:33:00:00:00:01")/IPv6(src="2001:db8:78::20", dst="ff02::1", hlim=255)/ICMPv6ND_NA(tgt="2001:db8:78::20", R=0, S=0, O=1)/ICMPv6NDOptDstLLAddr(lladdr=get_if_hwaddr("eth0")), iface="eth0")`); err != nil {
			t.Fatalf("send NA: %v\n%s", err, out)
		}
	})
	if got != 0 {
		t.Fatalf("%d NAs for vm-sv's address from vm-sa reached vm-sv", got)
	}
}

// An operator deletes the first-hop table of a privacy guest's port: the
// repair rewrites it, and the guest's learned temporary address is bound
// again (for the time it had left), so its connections from it go on.
func TestRepairRestoresTemporaryAddresses(t *testing.T) {
	e := newEnvWith(t, func(o *daemon.Options) { o.TempAddrInterval = 300 * time.Millisecond })
	for _, v := range []struct {
		id, addr string
		privacy  bool
	}{{"vm-ra", "2001:db8:79::10/64", true}, {"vm-rp", "2001:db8:79::11/64", false}} {
		n := map[string]any{"id": "eth0", "bridge_name": "br-rt", "ipv6": map[string]any{
			"address": v.addr, "gateway": "2001:db8:79::1", "enable_privacy_extensions": v.privacy, "temp_valid_lifetime": 600}}
		cfg := vmConfig("t1", n)
		cfg["security_profile"] = map[string]any{"profile_name": "high"}
		e.mustCall("CreateVm", map[string]any{"vm_id": v.id, "config": cfg})
		e.mustCall("BootVm", map[string]any{"vm_id": v.id})
		e.waitDAD(v.id)
	}
	temp := e.tempAddr(t, "vm-ra")
	e.startListener(t, "vm-rp", "80")
	connect := func() string {
		out, _ := e.inVM("vm-ra", "python3", "-c", connectFromScript, "2001:db8:79::11", "80", temp)
		return out
	}
	if out := connect(); !strings.Contains(out, "connected hi") {
		t.Fatalf("from %s before the repair: %s", temp, out)
	}
	// metald has read the binding (GetVm shows it) before the table goes.
	deadline := time.Now().Add(5 * time.Second)
	for !slices.Contains(list(obj(list(e.getVM("vm-ra")["networkStatus"])[0])["temporaryAddresses"]), any(temp)) {
		if time.Now().After(deadline) {
			t.Fatal("metald never read the binding")
		}
		time.Sleep(50 * time.Millisecond)
	}
	dev := str(obj(list(e.getVM("vm-ra")["networkStatus"])[0]), "hostDevice")
	var table string
	for _, tbl := range e.fhTables(t) {
		if out, _ := e.host.Run("nft", "list", "set", "netdev", tbl, dev+"-temp"); strings.Contains(out, temp) {
			table = tbl
		}
	}
	if table == "" {
		t.Fatal("no table binds the temporary address")
	}
	e.host.MustRun(t, "nft", "delete", "table", "netdev", table)
	deadline = time.Now().Add(10 * time.Second)
	for {
		out, _ := e.host.Run("nft", "list", "set", "netdev", table, dev+"-temp")
		if strings.Contains(out, temp) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the repair %s-temp lacks %s:\n%s", dev, temp, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if out := connect(); !strings.Contains(out, "connected hi") {
		t.Fatalf("from %s after the repair: %s", temp, out)
	}
}
