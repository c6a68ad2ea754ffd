package guestcfg

import (
	"encoding/base64"
	"errors"
	"net"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/metald/metald/internal/backend"
)

func sample() Config {
	return FromSpec([]backend.NIC{{
		ID: "eth0", HostDevice: "tap0", MAC: net.HardwareAddr{2, 0, 0, 0, 0, 0x10},
		Address:           netip.MustParsePrefix("2001:db8:1::10/64"),
		Gateway:           netip.MustParseAddr("2001:db8:1::1"),
		DNS:               []netip.Addr{netip.MustParseAddr("2001:4860:4860::8888")},
		PrivacyExtensions: true, StableSecret: "2001:db8:aaaa::1", TempValidLifetime: time.Hour,
	}, {ID: "eth1", HostDevice: "tap1", MAC: net.HardwareAddr{2, 0, 0, 0, 0, 0x11}}})
}

func TestRoundTrip(t *testing.T) {
	c := sample()
	if c.NICs[0].TempValidLft != 3600 || c.NICs[0].MAC != "02:00:00:00:00:10" {
		t.Fatalf("FromSpec: %+v", c.NICs[0])
	}
	arg, err := c.KernelArg()
	if err != nil {
		t.Fatal(err)
	}
	val, ok := strings.CutPrefix(arg, "metald.net=")
	if !ok || strings.ContainsAny(val, " +/=\"") {
		t.Fatalf("arg %q", arg)
	}
	cl, err := ParseCmdline("console=ttyS0 " + arg + " metald.init=/sbin/init metald.test=rogue-ra quiet")
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(*cl.Net, c) || cl.Init != "/sbin/init" || cl.Test != TestRogueRA {
		t.Fatalf("got %+v %+v", cl, *cl.Net)
	}
	// Empty NIC fields are omitted.
	raw, _ := base64.RawURLEncoding.DecodeString(val)
	if want := `{"mac":"02:00:00:00:00:11"}`; !strings.Contains(string(raw), want) {
		t.Errorf("json %s lacks %s", raw, want)
	}
}

func TestDecodeRejects(t *testing.T) {
	enc := func(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }
	for name, in := range map[string]string{
		"not base64":    "!!!",
		"unknown field": enc(`{"v":1,"nics":[],"x":1}`),
		"unknown nic":   enc(`{"v":1,"nics":[{"mac":"02:00:00:00:00:01","mtu":9000}]}`),
		"version":       enc(`{"v":2,"nics":[]}`),
		"bad mac":       enc(`{"v":1,"nics":[{"mac":"zz"}]}`),
		"eui64 mac":     enc(`{"v":1,"nics":[{"mac":"02:00:00:00:00:00:00:01"}]}`),
		"dup mac":       enc(`{"v":1,"nics":[{"mac":"02:00:00:00:00:01"},{"mac":"02:00:00:00:00:01"}]}`),
		"ipv4 address":  enc(`{"v":1,"nics":[{"mac":"02:00:00:00:00:01","address":"10.0.0.1/24"}]}`),
		"bad gateway":   enc(`{"v":1,"nics":[{"mac":"02:00:00:00:00:01","gateway":"ff02::1"}]}`),
		"bad secret":    enc(`{"v":1,"nics":[{"mac":"02:00:00:00:00:01","stable_secret":"nope"}]}`),
		"trailing":      enc(`{"v":1,"nics":[]} {}`),
		"negative lft":  enc(`{"v":1,"nics":[{"mac":"02:00:00:00:00:01","temp_valid_lft":-1}]}`),
		"too long":      strings.Repeat("A", MaxEncodedLen+8),
	} {
		if _, err := Decode(in); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: err = %v, want ErrInvalid", name, err)
		}
	}
}

func TestParseCmdline(t *testing.T) {
	good, _ := sample().Encode()
	for _, tc := range []struct {
		line    string
		wantErr bool
		want    Cmdline
	}{
		{line: "console=ttyS0 reboot=k panic=1"},
		{line: "metald.init=/sbin/init", want: Cmdline{Init: "/sbin/init"}},
		{line: "metald.init=sbin/init", wantErr: true},
		{line: "metald.test=bogus", wantErr: true},
		{line: "metald.frob=1", wantErr: true},
		{line: "metald.net=" + good + " metald.net=" + good, wantErr: true},
		{line: "metald.net=", wantErr: true},
		{line: "-- metald.frob=1", want: Cmdline{}},
	} {
		got, err := ParseCmdline(tc.line)
		if (err != nil) != tc.wantErr {
			t.Errorf("%q: err = %v", tc.line, err)
			continue
		}
		if err == nil && !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%q: got %+v", tc.line, got)
		}
	}
}

func TestEncodeRejectsInvalid(t *testing.T) {
	c := Config{V: Version, NICs: []NIC{{MAC: "bad"}}}
	if _, err := c.Encode(); !errors.Is(err, ErrInvalid) {
		t.Fatalf("err = %v", err)
	}
	// Too many NICs for the kernel command line.
	var nics []backend.NIC
	for i := range 40 {
		nics = append(nics, backend.NIC{MAC: net.HardwareAddr{2, 0, 0, 0, 1, byte(i)},
			Address: netip.MustParsePrefix("2001:db8:1::10/64"), StableSecret: "2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff"})
	}
	if _, err := FromSpec(nics).Encode(); !errors.Is(err, ErrInvalid) {
		t.Fatalf("oversized: err = %v", err)
	}
}

func FuzzDecode(f *testing.F) {
	good, _ := sample().Encode()
	f.Add(good)
	f.Add(base64.RawURLEncoding.EncodeToString([]byte(`{"v":1,"nics":[{"mac":"02:00:00:00:00:01","dns":[""]}]}`)))
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := Decode(s)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
			return
		}
		// Whatever decodes re-encodes to something that decodes the same.
		s2, err := c.Encode()
		if err != nil {
			if len(s) <= MaxEncodedLen {
				t.Fatalf("re-encode: %v", err)
			}
			return
		}
		c2, err := Decode(s2)
		if err != nil || !reflect.DeepEqual(c, c2) {
			t.Fatalf("round trip: %v\n%+v\n%+v", err, c, c2)
		}
	})
}

func FuzzParseCmdline(f *testing.F) {
	good, _ := sample().Encode()
	f.Add("console=ttyS0 metald.net=" + good + " metald.init=/sbin/init")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := ParseCmdline(s)
		if err == nil && c.Net != nil {
			if err := c.Net.Validate(); err != nil {
				t.Fatalf("accepted invalid config: %v", err)
			}
		}
	})
}
