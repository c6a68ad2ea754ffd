package config

import (
	"flag"
	"fmt"
)

// flagKeys maps each command-line flag that can override the file to the
// Config field it sets.
var flagKeys = []struct {
	name, key, usage string
	field            func(*Config) *string
}{
	{"listen", "listen", "API listen address host:port", func(c *Config) *string { return &c.Listen }},
	{"metrics-listen", "metrics_listen", "metrics listen address host:port", func(c *Config) *string { return &c.MetricsListen }},
	{"data-dir", "data_dir", "directory for persistent state", func(c *Config) *string { return &c.DataDir }},
	{"backend", "backend", "VM backend: auto, netns, qemu or firecracker", func(c *Config) *string { return &c.Backend }},
	{"log-dir", "log_dir", "directory for log files", func(c *Config) *string { return &c.LogDir }},
}

// RegisterFlags defines on fs the flags that override configuration file
// values: --listen, --metrics-listen, --data-dir, --backend and --log-dir.
// Their flag defaults are empty; the usage text shows the built-in
// default. Apply them with Config.ApplyFlags after fs.Parse.
func RegisterFlags(fs *flag.FlagSet) {
	def := Default()
	for _, f := range flagKeys {
		fs.String(f.name, "", fmt.Sprintf("%s; overrides %s in the config file (built-in default %q)", f.usage, f.key, *f.field(def)))
	}
}

// ApplyFlags copies into c the value of every flag from RegisterFlags that
// was set on the command line (even to ""), leaving file values where the
// flag was not given. Flags that RegisterFlags did not define are ignored.
// It returns an error if fs has not been parsed.
func (c *Config) ApplyFlags(fs *flag.FlagSet) error {
	if !fs.Parsed() {
		return fmt.Errorf("apply flags: flag set %q is not parsed", fs.Name())
	}
	fs.Visit(func(fl *flag.Flag) {
		for _, f := range flagKeys {
			if f.name == fl.Name {
				*f.field(c) = fl.Value.String()
			}
		}
	})
	return nil
}
