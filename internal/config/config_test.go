package config

import (
	"flag"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

// writeFile writes content to name in a fresh directory and returns its path.
func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestConfigDefault(t *testing.T) {
	c := Default()
	if err := c.Validate(); err != nil {
		t.Fatalf("Default().Validate() = %v", err)
	}
	want := &Config{
		Listen:        "127.0.0.1:8080",
		MetricsListen: "127.0.0.1:9464",
		DataDir:       "/var/lib/metald",
		LogDir:        "/var/log/metald",
		Backend:       "auto",
		LogLevel:      "info",
		Netns:         NetnsConfig{Dir: "/run/netns", EtcDir: "/etc/netns", GuestCommand: []string{"sleep", "infinity"}},
		VM:            VMConfig{ShutdownTimeout: Duration(10 * time.Second), ReconcileInterval: Duration(5 * time.Second)},
		Store:         StoreConfig{Driver: "sqlite"},
		IPAM:          IPAMConfig{AutoSubnetNames: true, CleanupInterval: Duration(10 * time.Minute), CleanupGrace: Duration(time.Hour)},
		QEMU:          QEMUConfig{Binary: "qemu-system-x86_64", Accelerator: "auto"},
		Isolation:     IsolationConfig{ManagementAccess: []string{}},
	}
	if !reflect.DeepEqual(c, want) {
		t.Errorf("Default() = %+v\nwant %+v", c, want)
	}
	if got := c.StorePath(); got != "/var/lib/metald/metald.db" {
		t.Errorf("StorePath() = %q", got)
	}
	if got := c.ResolvedBackend(); got != "auto" {
		t.Errorf("ResolvedBackend() = %q", got)
	}
	// Each call returns an independent value.
	c.Netns.GuestCommand[0] = "changed"
	if Default().Netns.GuestCommand[0] != "sleep" {
		t.Error("Default() shares its GuestCommand slice")
	}
}

func TestConfigDerived(t *testing.T) {
	c := Default()
	c.Backend = "auto"
	c.DataDir = "/srv/metald"
	c.LogLevel = "debug"
	if got := c.ResolvedBackend(); got != "auto" {
		t.Errorf("auto resolved to %q, want it left for the daemon's probe", got)
	}
	if got := c.StorePath(); got != "/srv/metald/metald.db" {
		t.Errorf("StorePath() = %q", got)
	}
	c.Store.Path = "/db/m.db"
	if got := c.StorePath(); got != "/db/m.db" {
		t.Errorf("StorePath() = %q", got)
	}
	if got := c.SlogLevel().String(); got != "DEBUG" {
		t.Errorf("SlogLevel() = %s", got)
	}
	if err := c.Validate(); err != nil {
		t.Errorf("Validate() = %v", err)
	}
}

func TestConfigLoadEmptyPath(t *testing.T) {
	c, err := Load("")
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(c, Default()) {
		t.Errorf("Load(\"\") = %+v, want Default()", c)
	}
}

// TestConfigExample loads contrib/metald.example.yaml, which must mention
// every key, and compares it with Default.
func TestConfigExample(t *testing.T) {
	const path = "../../contrib/metald.example.yaml"
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatalf("example does not validate: %v", err)
	}
	// Deliberate difference: the example spells out the store path that
	// the default leaves empty; both resolve to the same file.
	want := Default()
	want.Store.Path = "/var/lib/metald/metald.db"
	if !reflect.DeepEqual(c, want) {
		t.Errorf("example = %+v\nwant      %+v", c, want)
	}
	if c.StorePath() != Default().StorePath() {
		t.Errorf("example store path %q, default %q", c.StorePath(), Default().StorePath())
	}

	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		t.Fatal(err)
	}
	inFile := map[string]bool{}
	collectKeys(doc.Content[0], "", inFile)
	for _, k := range allKeys(reflect.TypeFor[Config](), "") {
		if !inFile[k] {
			t.Errorf("example does not mention key %q", k)
		}
	}
}

func collectKeys(n *yaml.Node, prefix string, out map[string]bool) {
	if n.Kind != yaml.MappingNode {
		return
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k := n.Content[i].Value
		if prefix != "" {
			k = prefix + "." + k
		}
		out[k] = true
		collectKeys(n.Content[i+1], k, out)
	}
}

// allKeys lists the dotted key path of every field of struct type t.
func allKeys(t reflect.Type, prefix string) []string {
	var keys []string
	for i := range t.NumField() {
		f := t.Field(i)
		k, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if prefix != "" {
			k = prefix + "." + k
		}
		keys = append(keys, k)
		if f.Type.Kind() == reflect.Struct {
			keys = append(keys, allKeys(f.Type, k)...)
		}
	}
	return keys
}

func TestConfigKeysAreSnakeCase(t *testing.T) {
	re := regexp.MustCompile(`^[a-z][a-z0-9]*(_[a-z0-9]+)*$`)
	for _, k := range allKeys(reflect.TypeFor[Config](), "") {
		for _, part := range strings.Split(k, ".") {
			if !re.MatchString(part) {
				t.Errorf("key %q is not snake_case", k)
			}
		}
	}
}

// TestConfigFieldDocs checks that every configuration field has a doc
// comment, and that the doc states the default.
func TestConfigFieldDocs(t *testing.T) {
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, "config.go", nil, parser.ParseComments)
	if err != nil {
		t.Fatal(err)
	}
	structs := map[string]bool{"Config": true, "NetnsConfig": true, "VMConfig": true, "StoreConfig": true, "MetricsConfig": true, "IsolationConfig": true}
	ast.Inspect(f, func(n ast.Node) bool {
		ts, ok := n.(*ast.TypeSpec)
		if !ok || !structs[ts.Name.Name] {
			return true
		}
		delete(structs, ts.Name.Name)
		for _, field := range ts.Type.(*ast.StructType).Fields.List {
			name := field.Names[0].Name
			doc := field.Doc.Text()
			if doc == "" {
				t.Errorf("%s.%s has no doc comment", ts.Name.Name, name)
				continue
			}
			// Sections document their own fields.
			if _, isSection := field.Type.(*ast.Ident); isSection && strings.HasSuffix(field.Type.(*ast.Ident).Name, "Config") {
				continue
			}
			if !strings.Contains(doc, "Default") {
				t.Errorf("%s.%s doc does not state its default: %q", ts.Name.Name, name, doc)
			}
		}
		return true
	})
	if len(structs) != 0 {
		t.Errorf("struct types not found: %v", structs)
	}
}

func TestConfigLoadOverrides(t *testing.T) {
	p := writeFile(t, "metald.yaml", `
listen: "[::1]:18080"
backend: auto
netns:
  dir: /tmp/netns   # etc_dir and guest_command keep their defaults
vm:
  shutdown_timeout: 1m30s
store:          # null section: defaults
metrics:
  per_vm_labels: true
log_level: ~    # null value: default
`)
	c, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	want := Default()
	want.Listen = "[::1]:18080"
	want.Backend = "auto"
	want.Netns.Dir = "/tmp/netns"
	want.VM.ShutdownTimeout = Duration(90 * time.Second)
	want.Metrics.PerVMLabels = true
	if !reflect.DeepEqual(c, want) {
		t.Errorf("got  %+v\nwant %+v", c, want)
	}
	if err := c.Validate(); err != nil {
		t.Errorf("Validate() = %v", err)
	}
}

func TestConfigLoadListReplaces(t *testing.T) {
	p := writeFile(t, "metald.yml", "netns:\n  guest_command:\n    - /usr/bin/env\n")
	c, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"/usr/bin/env"}; !slices.Equal(c.Netns.GuestCommand, want) {
		t.Errorf("guest_command = %q, want %q", c.Netns.GuestCommand, want)
	}
}

func TestConfigLoadJSON(t *testing.T) {
	p := writeFile(t, "metald.json", `{
  "data_dir": "/srv/metald",
  "netns": {"guest_command": ["sh", "-c", "sleep 1d"]},
  "vm": {"reconcile_interval": "250ms"}
}`)
	c, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	want := Default()
	want.DataDir = "/srv/metald"
	want.Netns.GuestCommand = []string{"sh", "-c", "sleep 1d"}
	want.VM.ReconcileInterval = Duration(250 * time.Millisecond)
	if !reflect.DeepEqual(c, want) {
		t.Errorf("got  %+v\nwant %+v", c, want)
	}
}

func TestConfigLoadEmptyAndCommentOnly(t *testing.T) {
	for _, content := range []string{"", "# nothing here\n", "---\n"} {
		c, err := Load(writeFile(t, "metald.yaml", content))
		if err != nil {
			t.Errorf("%q: %v", content, err)
			continue
		}
		if !reflect.DeepEqual(c, Default()) {
			t.Errorf("%q: got %+v", content, c)
		}
	}
}

func TestConfigLoadAnchors(t *testing.T) {
	p := writeFile(t, "metald.yaml", "log_dir: &d /srv/log\ndata_dir: *d\n")
	c, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if c.DataDir != "/srv/log" || c.LogDir != "/srv/log" {
		t.Errorf("got data_dir %q log_dir %q", c.DataDir, c.LogDir)
	}
}

func TestConfigLoadErrors(t *testing.T) {
	tests := []struct {
		name, file, content string
		want                string // the error after "config file <path>: "
	}{
		{"unknown top-level key", "metald.yaml", "listen: \":1\"\nlisten_addr: x\n",
			`line 2: unknown key "listen_addr"`},
		{"unknown nested key", "metald.yaml", "backend: netns\nnetns:\n  guest_comand: [sh]\n",
			`line 3: unknown key "netns.guest_comand"`},
		{"unknown key in null-free section", "metald.yaml", "vm:\n  shutdown_timeout: 1s\n  restart_policy: always\n",
			`line 3: unknown key "vm.restart_policy"`},
		{"unknown key in JSON", "metald.json", "{\n  \"store\": {\n    \"dsn\": \"x\"\n  }\n}\n",
			`line 3: unknown key "store.dsn"`},
		{"camelCase key", "metald.yaml", "metricsListen: \":1\"\n",
			`line 1: unknown key "metricsListen"`},
		{"merge key", "metald.yaml", "base: &b {dir: /x}\n",
			`line 1: unknown key "base"`},
		{"duplicate key", "metald.yaml", "listen: \":1\"\nlisten: \":2\"\n",
			`line 2: duplicate key "listen" (first at line 1)`},
		{"number for string", "metald.yaml", "listen: 8080\n",
			`line 1: listen: want a string, got number 8080 (quote it to make it a string)`},
		{"bool for string", "metald.yaml", "log_level: true\n",
			`line 1: log_level: want a string, got boolean true (quote it to make it a string)`},
		{"list for string", "metald.yaml", "data_dir: [/a]\n",
			`line 1: data_dir: want a string, got a list`},
		{"string for bool", "metald.yaml", "metrics:\n  per_vm_labels: \"yes\"\n",
			`line 2: metrics.per_vm_labels: want true or false, got string "yes"`},
		{"string for list", "metald.yaml", "netns:\n  guest_command: sleep infinity\n",
			`line 2: netns.guest_command: want a list of strings, got string "sleep infinity"`},
		{"number in list", "metald.yaml", "netns:\n  guest_command: [sleep, 10]\n",
			`line 2: netns.guest_command[1]: want a string, got number 10 (quote it to make it a string)`},
		{"scalar for section", "metald.yaml", "vm: fast\n",
			`line 1: vm: want a mapping of keys, got string "fast"`},
		{"list at root", "metald.yaml", "- listen\n",
			`line 1: the configuration: want a mapping of keys, got a list`},
		{"duration without unit", "metald.yaml", "vm:\n  shutdown_timeout: \"10\"\n",
			`line 2: vm.shutdown_timeout: invalid duration "10": time: missing unit in duration "10"`},
		{"duration as number", "metald.yaml", "vm:\n  reconcile_interval: 5\n",
			`line 2: vm.reconcile_interval: want a duration string such as "10s", got number 5`},
		{"duration words", "metald.yaml", "vm:\n  reconcile_interval: five seconds\n",
			`line 2: vm.reconcile_interval: invalid duration "five seconds": time: invalid duration "five seconds"`},
		{"two documents", "metald.yaml", "listen: \":1\"\n---\nlisten: \":2\"\n",
			`line 2: more than one YAML document`},
		{"syntax error", "metald.yaml", "listen: [\n",
			`yaml: line 1: did not find expected node content`},
		{"invalid JSON", "metald.json", "listen: \":1\"\n",
			`invalid JSON: invalid character 'l' looking for beginning of value`},
		{"TOML", "metald.toml", "listen = \":1\"\n",
			`unsupported format ".toml"; use .yaml, .yml or .json`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := writeFile(t, tt.file, tt.content)
			c, err := Load(p)
			if err == nil {
				t.Fatalf("no error; got %+v", c)
			}
			if want := "config file " + p + ": " + tt.want; err.Error() != want {
				t.Errorf("error:\n got %s\nwant %s", err, want)
			}
		})
	}
}

func TestConfigLoadMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "absent.yaml"))
	if err == nil || !os.IsNotExist(unwrapAll(err)) {
		t.Errorf("err = %v, want a not-exist error", err)
	}
}

func unwrapAll(err error) error {
	for {
		u, ok := err.(interface{ Unwrap() error })
		if !ok || u.Unwrap() == nil {
			return err
		}
		err = u.Unwrap()
	}
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name string
		mut  func(*Config)
		want string // whole error; "" means valid
	}{
		{"metrics_listen no port", func(c *Config) { c.MetricsListen = "x" },
			`metrics_listen: invalid address "x": address x: missing port in address`},
		{"listen empty", func(c *Config) { c.Listen = "" },
			`listen: invalid address "": missing port in address`},
		{"listen port too large", func(c *Config) { c.Listen = "127.0.0.1:65536" },
			`listen: invalid address "127.0.0.1:65536": port "65536" is not a number 0..65535`},
		{"listen named port", func(c *Config) { c.Listen = "127.0.0.1:http" },
			`listen: invalid address "127.0.0.1:http": port "http" is not a number 0..65535`},
		{"listen bad host", func(c *Config) { c.Listen = "my host:80" },
			`listen: invalid address "my host:80": host "my host" is neither an IP address nor a host name`},
		{"listen IPv6 without brackets", func(c *Config) { c.Listen = "::1:8080" },
			`listen: invalid address "::1:8080": address ::1:8080: too many colons in address`},
		{"listen all addresses", func(c *Config) { c.Listen = ":8080" }, ""},
		{"listen IPv6", func(c *Config) { c.Listen = "[::1]:8080" }, ""},
		{"listen zone", func(c *Config) { c.Listen = "[fe80::1%eth0]:8080" }, ""},
		{"listen host name", func(c *Config) { c.Listen = "localhost:8080" }, ""},
		{"listen port 0", func(c *Config) { c.Listen = "127.0.0.1:0"; c.MetricsListen = "127.0.0.1:0" }, ""},
		{"same address", func(c *Config) { c.MetricsListen = "127.0.0.1:8080" },
			`metrics_listen: "127.0.0.1:8080" is the same address as listen`},
		{"wildcard overlaps", func(c *Config) { c.MetricsListen = "[::]:8080" },
			`metrics_listen: "[::]:8080" is the same address as listen`},
		{"different hosts same port", func(c *Config) { c.MetricsListen = "127.0.0.2:8080" }, ""},
		{"data_dir relative", func(c *Config) { c.DataDir = "var/lib/metald" },
			`data_dir: path "var/lib/metald" is not absolute`},
		{"log_dir empty", func(c *Config) { c.LogDir = "" }, `log_dir: must not be empty`},
		{"netns.dir relative", func(c *Config) { c.Netns.Dir = "netns" }, `netns.dir: path "netns" is not absolute`},
		{"netns.etc_dir relative", func(c *Config) { c.Netns.EtcDir = "./etc" }, `netns.etc_dir: path "./etc" is not absolute`},
		{"backend auto", func(c *Config) { c.Backend = "auto" }, ""},
		{"backend firecracker without binary", func(c *Config) { c.Backend = "firecracker" },
			`firecracker.binary: required for backend "firecracker"`},
		{"qemu accelerator", func(c *Config) { c.QEMU.Accelerator = "hvf" },
			`qemu.accelerator: unknown accelerator "hvf"; want auto, kvm or tcg`},
		{"backend unknown", func(c *Config) { c.Backend = "docker" },
			`backend: unknown backend "docker"; want auto, netns, qemu or firecracker`},
		{"log_level", func(c *Config) { c.LogLevel = "verbose" },
			`log_level: unknown level "verbose"; want debug, info, warn or error`},
		{"guest_command empty", func(c *Config) { c.Netns.GuestCommand = nil }, `netns.guest_command: must name a program`},
		{"guest_command blank program", func(c *Config) { c.Netns.GuestCommand = []string{" "} },
			`netns.guest_command: program name " " is empty`},
		{"shutdown_timeout zero", func(c *Config) { c.VM.ShutdownTimeout = 0 },
			`vm.shutdown_timeout: must be greater than zero, got "0s"`},
		{"reconcile_interval negative", func(c *Config) { c.VM.ReconcileInterval = Duration(-time.Second) },
			`vm.reconcile_interval: must be greater than zero, got "-1s"`},
		{"store driver", func(c *Config) { c.Store.Driver = "postgres" }, `store.driver: unknown driver "postgres"; want sqlite`},
		{"store path relative", func(c *Config) { c.Store.Path = "metald.db" }, `store.path: path "metald.db" is not absolute`},
		{"several problems", func(c *Config) {
			c.Listen = "x"
			c.Backend = "firecracker"
			c.VM.ShutdownTimeout = 0
		}, `listen: invalid address "x": address x: missing port in address
firecracker.binary: required for backend "firecracker"
vm.shutdown_timeout: must be greater than zero, got "0s"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := Default()
			tt.mut(c)
			err := c.Validate()
			switch {
			case tt.want == "" && err != nil:
				t.Errorf("want valid, got %v", err)
			case tt.want != "" && err == nil:
				t.Errorf("want %q, got nil", tt.want)
			case tt.want != "" && err.Error() != tt.want:
				t.Errorf("error:\n got %s\nwant %s", err, tt.want)
			}
		})
	}
}

// TestConfigLoadThenValidate checks that a file with a bad value loads and
// Validate names its key.
func TestConfigLoadThenValidate(t *testing.T) {
	c, err := Load(writeFile(t, "metald.yaml", "metrics_listen: x\nvm:\n  shutdown_timeout: 0s\n"))
	if err != nil {
		t.Fatal(err)
	}
	err = c.Validate()
	want := "metrics_listen: invalid address \"x\": address x: missing port in address\nvm.shutdown_timeout: must be greater than zero, got \"0s\""
	if err == nil || err.Error() != want {
		t.Errorf("got %v, want %s", err, want)
	}
}

func TestConfigApplyFlags(t *testing.T) {
	fileCfg := func() *Config {
		c, err := Load(writeFile(t, "metald.yaml", "listen: \"127.0.0.1:1000\"\ndata_dir: /file/data\nbackend: auto\n"))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	newFlags := func() *flag.FlagSet {
		fs := flag.NewFlagSet("metald", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		fs.String("config", "", "")
		RegisterFlags(fs)
		return fs
	}

	// No flags: file values stay.
	fs := newFlags()
	if err := fs.Parse(nil); err != nil {
		t.Fatal(err)
	}
	c := fileCfg()
	if err := c.ApplyFlags(fs); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(c, fileCfg()) {
		t.Errorf("ApplyFlags without flags changed the config: %+v", c)
	}

	// Set flags override; unset ones do not.
	fs = newFlags()
	args := []string{"--config", "/etc/x.yaml", "--listen", "[::1]:2000", "--metrics-listen=[::1]:2001",
		"--data-dir", "/flag/data", "--backend", "netns", "--log-dir", "/flag/log"}
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	c = fileCfg()
	if err := c.ApplyFlags(fs); err != nil {
		t.Fatal(err)
	}
	want := fileCfg()
	want.Listen = "[::1]:2000"
	want.MetricsListen = "[::1]:2001"
	want.DataDir = "/flag/data"
	want.Backend = "netns"
	want.LogDir = "/flag/log"
	if !reflect.DeepEqual(c, want) {
		t.Errorf("got  %+v\nwant %+v", c, want)
	}

	// Only --data-dir.
	fs = newFlags()
	if err := fs.Parse([]string{"-data-dir", "/only"}); err != nil {
		t.Fatal(err)
	}
	c = fileCfg()
	if err := c.ApplyFlags(fs); err != nil {
		t.Fatal(err)
	}
	want = fileCfg()
	want.DataDir = "/only"
	if !reflect.DeepEqual(c, want) {
		t.Errorf("got  %+v\nwant %+v", c, want)
	}

	// Unparsed flag set.
	if err := Default().ApplyFlags(newFlags()); err == nil {
		t.Error("ApplyFlags on an unparsed flag set: no error")
	}
}

func TestConfigFlagUsage(t *testing.T) {
	fs := flag.NewFlagSet("metald", flag.ContinueOnError)
	RegisterFlags(fs)
	for _, name := range []string{"listen", "metrics-listen", "data-dir", "backend", "log-dir"} {
		f := fs.Lookup(name)
		if f == nil {
			t.Errorf("flag --%s not registered", name)
			continue
		}
		if f.DefValue != "" {
			t.Errorf("--%s default %q, want empty so that only set flags override", name, f.DefValue)
		}
	}
	if u := fs.Lookup("listen").Usage; !strings.Contains(u, `"127.0.0.1:8080"`) {
		t.Errorf("--listen usage %q does not show the built-in default", u)
	}
}

// TestConfigMarshalRoundTrip checks that a Config marshalled with yaml.v3
// (as a --print-config would) loads back unchanged.
// Pools load from the file with every field, and bad pools name their key.
func TestConfigIPAMPools(t *testing.T) {
	p := writeFile(t, "m.yaml", `
ipam:
  auto_subnet_names: false
  pools:
    - id: web
      prefixes: ["2600:BEEF:1000::/48", "2600:beef:1000:web::/64"]
      description: web tier
      tenant_ids: [t1]
      rate_limit: 100
      max_allocations: 5000
`)
	c, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if c.IPAM.AutoSubnetNames || len(c.IPAM.Pools) != 1 || c.IPAM.Pools[0].ID != "web" || len(c.IPAM.Pools[0].Prefixes) != 2 ||
		c.IPAM.Pools[0].RateLimit != 100 || c.IPAM.Pools[0].MaxAllocations != 5000 || c.IPAM.Pools[0].TenantIDs[0] != "t1" {
		t.Fatalf("pools: %+v", c.IPAM)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ body, want string }{
		{"ipam:\n  pools:\n    - id: x\n      prefixes: [zz]\n", "ipam.pools[0].prefixes[0]:"},
		{"ipam:\n  pools:\n    - prefixes: [\"2001:db8::/48\"]\n", "ipam.pools[0].id: required"},
		{"ipam:\n  pools:\n    - id: x\n      prefix: [\"2001:db8::/48\"]\n", `unknown key "ipam.pools[0].prefix"`},
		{"ipam:\n  pools:\n    - id: x\n      prefixes: [\"2001:db8::/48\"]\n      rate_limit: lots\n", "ipam.pools[0].rate_limit: want an integer"},
	} {
		c, err := Load(writeFile(t, "m.yaml", tc.body))
		if err == nil {
			err = c.Validate()
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got %v, want %q", tc.body, err, tc.want)
		}
	}
}

func TestConfigMarshalRoundTrip(t *testing.T) {
	c := Default()
	c.VM.ShutdownTimeout = Duration(1500 * time.Millisecond)
	c.Metrics.PerVMLabels = true
	b, err := yaml.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "shutdown_timeout: 1.5s") {
		t.Errorf("durations should marshal as strings:\n%s", b)
	}
	got, err := Load(writeFile(t, "metald.yaml", string(b)))
	if err != nil {
		t.Fatalf("%v\n%s", err, b)
	}
	if !reflect.DeepEqual(got, c) {
		t.Errorf("round trip: got %+v\nwant %+v", got, c)
	}
}

func TestConfigDurationText(t *testing.T) {
	var d Duration
	if err := d.UnmarshalText([]byte("2m")); err != nil || d.Std() != 2*time.Minute {
		t.Errorf("UnmarshalText(2m) = %v, %v", d, err)
	}
	if err := d.UnmarshalText([]byte("2")); err == nil {
		t.Error("UnmarshalText(2): no error")
	}
	if b, _ := Duration(time.Second).MarshalText(); string(b) != "1s" {
		t.Errorf("MarshalText = %q", b)
	}
}

func FuzzConfigLoad(f *testing.F) {
	example, err := os.ReadFile("../../contrib/metald.example.yaml")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(example)
	f.Add([]byte("netns:\n  guest_comand: [sh]\n"))
	f.Add([]byte("a: &a [*a]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c := Default()
		if err := decode(data, ".yaml", c); err != nil {
			return
		}
		_ = c.Validate()
	})
}
