// Package guestcfg owns the wire format of the guest configuration that
// metald hands to metald-init: one kernel command line parameter,
// metald.net=<base64url(JSON)>, plus the small set of other metald.*
// parameters metald-init understands.
//
// The format is shared by the qemu backend (kernel command line) and the
// firecracker backend (kernel command line and MMDS), and decoded by
// metald-init inside the guest. Decoding is strict: unknown JSON fields,
// trailing data and invalid values are errors, so a guest never runs with a
// configuration it half understood.
//
// The JSON document (before base64url encoding, without padding) is
//
//	{"v":1,"nics":[{"mac":"02:00:00:00:00:10",
//	                "address":"2001:db8:1::10/64",
//	                "gateway":"2001:db8:1::1",
//	                "dns":["2001:4860:4860::8888"],
//	                "privacy":true,
//	                "stable_secret":"2001:db8::1",
//	                "temp_valid_lft":3600}]}
//
// Every NIC field but mac is optional. temp_valid_lft is in seconds.
package guestcfg

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/metald/metald/internal/backend"
)

// Kernel command line parameter names.
const (
	// ParamNet carries the encoded Config.
	ParamNet = "metald.net"
	// ParamInit names the real init metald-init execs after configuring
	// the network (e.g. /sbin/init); absent, metald-init stays PID 1.
	ParamInit = "metald.init"
	// ParamTest selects a test mode of metald-init (TestRogueRA).
	ParamTest = "metald.test"
)

// TestRogueRA makes metald-init send rogue Router Advertisements after the
// network is up: the first-hop attack tests use it.
const TestRogueRA = "rogue-ra"

// Version is the current format version.
const Version = 1

// MaxEncodedLen bounds an encoded Config: the x86 kernel command line holds
// 2048 bytes and the rest of the line needs room.
const MaxEncodedLen = 1536

// ErrInvalid reports a configuration that cannot be decoded or applied.
var ErrInvalid = errors.New("invalid guest config")

// Config is the guest's network configuration.
type Config struct {
	V    int   `json:"v"`
	NICs []NIC `json:"nics"`
}

// NIC configures one guest interface, found by its MAC address.
type NIC struct {
	MAC          string       `json:"mac"`
	Address      netip.Prefix `json:"address,omitzero"`
	Gateway      netip.Addr   `json:"gateway,omitzero"`
	DNS          []netip.Addr `json:"dns,omitempty"`
	Privacy      bool         `json:"privacy,omitempty"`
	StableSecret string       `json:"stable_secret,omitempty"`
	TempValidLft uint32       `json:"temp_valid_lft,omitempty"`
}

// HardwareAddr parses MAC.
func (n NIC) HardwareAddr() (net.HardwareAddr, error) {
	m, err := net.ParseMAC(n.MAC)
	if err != nil || len(m) != 6 {
		return nil, fmt.Errorf("%w: mac %q", ErrInvalid, n.MAC)
	}
	return m, nil
}

// FromSpec builds the Config for a backend spec's NICs.
func FromSpec(nics []backend.NIC) Config {
	c := Config{V: Version, NICs: make([]NIC, 0, len(nics))}
	for _, n := range nics {
		g := NIC{
			MAC:          n.MAC.String(),
			Address:      n.Address,
			Gateway:      n.Gateway,
			DNS:          append([]netip.Addr(nil), n.DNS...),
			Privacy:      n.PrivacyExtensions,
			StableSecret: n.StableSecret,
		}
		if n.TempValidLifetime > 0 {
			g.TempValidLft = uint32(min(n.TempValidLifetime/time.Second, 1<<32-1))
		}
		c.NICs = append(c.NICs, g)
	}
	return c
}

// Validate checks every field.
func (c Config) Validate() error {
	if c.V != Version {
		return fmt.Errorf("%w: version %d, want %d", ErrInvalid, c.V, Version)
	}
	seen := map[string]bool{}
	for i, n := range c.NICs {
		m, err := n.HardwareAddr()
		if err != nil {
			return fmt.Errorf("nic %d: %w", i, err)
		}
		if seen[m.String()] {
			return fmt.Errorf("%w: nic %d: duplicate mac %s", ErrInvalid, i, m)
		}
		seen[m.String()] = true
		if a := n.Address; a.IsValid() && (!a.Addr().Is6() || a.Addr().Is4In6() || a.Addr().Zone() != "" || a.Addr().IsUnspecified() || a.Addr().IsMulticast()) {
			return fmt.Errorf("%w: nic %d: address %s", ErrInvalid, i, a)
		}
		if g := n.Gateway; g.IsValid() && (!g.Is6() || g.Is4In6() || g.IsUnspecified() || g.IsMulticast()) {
			return fmt.Errorf("%w: nic %d: gateway %s", ErrInvalid, i, g)
		}
		for _, d := range n.DNS {
			if !d.IsValid() || d.IsUnspecified() || d.IsMulticast() {
				return fmt.Errorf("%w: nic %d: dns %s", ErrInvalid, i, d)
			}
		}
		if s := n.StableSecret; s != "" {
			a, err := netip.ParseAddr(s)
			if err != nil || !a.Is6() || a.Is4In6() || a.Zone() != "" {
				return fmt.Errorf("%w: nic %d: stable_secret %q is not an IPv6 address", ErrInvalid, i, s)
			}
		}
	}
	return nil
}

// Encode validates c and returns its parameter value (base64url JSON).
func (c Config) Encode() (string, error) {
	if err := c.Validate(); err != nil {
		return "", err
	}
	b, err := json.Marshal(c)
	if err != nil {
		return "", fmt.Errorf("encode guest config: %w", err)
	}
	s := base64.RawURLEncoding.EncodeToString(b)
	if len(s) > MaxEncodedLen {
		return "", fmt.Errorf("%w: encoded config is %d bytes, limit %d", ErrInvalid, len(s), MaxEncodedLen)
	}
	return s, nil
}

// KernelArg returns "metald.net=<encoded>".
func (c Config) KernelArg() (string, error) {
	s, err := c.Encode()
	if err != nil {
		return "", err
	}
	return ParamNet + "=" + s, nil
}

// Decode parses a parameter value made by Encode (padding tolerated).
func Decode(s string) (Config, error) {
	if len(s) > MaxEncodedLen+4 {
		return Config{}, fmt.Errorf("%w: %d bytes", ErrInvalid, len(s))
	}
	b, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(s, "="))
	if err != nil {
		return Config{}, fmt.Errorf("%w: base64: %v", ErrInvalid, err)
	}
	return DecodeJSON(b)
}

// DecodeJSON parses the JSON document (as carried in MMDS).
func DecodeJSON(b []byte) (Config, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var c Config
	if err := dec.Decode(&c); err != nil {
		return Config{}, fmt.Errorf("%w: json: %v", ErrInvalid, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return Config{}, fmt.Errorf("%w: trailing data", ErrInvalid)
	}
	if err := c.Validate(); err != nil {
		return Config{}, err
	}
	return c, nil
}

// Cmdline is what metald-init reads from /proc/cmdline.
type Cmdline struct {
	// Net is the network configuration; nil when metald.net is absent.
	Net *Config
	// Init is the real init to exec, or "".
	Init string
	// Test is the test mode, or "".
	Test string
}

// ParseCmdline extracts the metald.* parameters from a kernel command line.
// Other parameters are ignored; a metald.* parameter given twice, an
// unknown metald.* parameter and a bad value are errors.
func ParseCmdline(line string) (Cmdline, error) {
	var c Cmdline
	seen := map[string]bool{}
	for _, f := range strings.Fields(line) {
		if f == "--" {
			break // the rest goes to init as arguments
		}
		k, v, _ := strings.Cut(f, "=")
		if !strings.HasPrefix(k, "metald.") {
			continue
		}
		if seen[k] {
			return Cmdline{}, fmt.Errorf("%w: %s given twice", ErrInvalid, k)
		}
		seen[k] = true
		switch k {
		case ParamNet:
			cfg, err := Decode(v)
			if err != nil {
				return Cmdline{}, fmt.Errorf("%s: %w", ParamNet, err)
			}
			c.Net = &cfg
		case ParamInit:
			if !strings.HasPrefix(v, "/") {
				return Cmdline{}, fmt.Errorf("%w: %s=%q is not an absolute path", ErrInvalid, k, v)
			}
			c.Init = v
		case ParamTest:
			if _, _, err := parseTestModes(v); err != nil {
				return Cmdline{}, err
			}
			c.Test = v
		default:
			return Cmdline{}, fmt.Errorf("%w: unknown parameter %s", ErrInvalid, k)
		}
	}
	return c, nil
}

// TestPing6Prefix starts a test mode token "ping6=<address>": once the
// network is up, the guest pings the address and reports the result on its
// console ("metald-init: ping6 <address> ok").
const TestPing6Prefix = "ping6="

// TestModes splits the test-mode value (comma-separated tokens: rogue-ra,
// ping6=<address>).
func (c Cmdline) TestModes() (rogueRA bool, ping []netip.Addr) {
	rogueRA, ping, _ = parseTestModes(c.Test)
	return rogueRA, ping
}

func parseTestModes(v string) (rogueRA bool, ping []netip.Addr, err error) {
	if v == "" {
		return false, nil, nil
	}
	for _, tok := range strings.Split(v, ",") {
		switch {
		case tok == TestRogueRA:
			rogueRA = true
		case strings.HasPrefix(tok, TestPing6Prefix):
			a, perr := netip.ParseAddr(strings.TrimPrefix(tok, TestPing6Prefix))
			if perr != nil || !a.Is6() {
				return false, nil, fmt.Errorf("%w: test mode %q: not an IPv6 address", ErrInvalid, tok)
			}
			ping = append(ping, a)
		default:
			return false, nil, fmt.Errorf("%w: unknown test mode %q", ErrInvalid, tok)
		}
	}
	return rogueRA, ping, nil
}
