package daemon_test

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// Every metric the shipped Grafana dashboard and Prometheus alerts
// reference is one metald exports.
func TestContribReferencesExportedMetrics(t *testing.T) {
	e := newEnv(t)
	names := e.d.MetricNames()
	exported := func(m string) bool {
		if slices.Contains(names, m) {
			return true
		}
		for _, suf := range []string{"_bucket", "_sum", "_count"} {
			if b, ok := strings.CutSuffix(m, suf); ok && slices.Contains(names, b) {
				return true
			}
		}
		return false
	}
	ref := regexp.MustCompile(`metald_[a-z0-9_]+`)
	for _, f := range []string{"contrib/grafana/metald-security.json", "contrib/prometheus/alerts.yml"} {
		raw, err := os.ReadFile(filepath.Join("..", "..", f))
		if err != nil {
			t.Fatal(err)
		}
		refs := ref.FindAllString(string(raw), -1)
		if len(refs) < 5 {
			t.Fatalf("%s references only %d metrics", f, len(refs))
		}
		for _, m := range refs {
			if !exported(m) {
				t.Errorf("%s references %s, which metald does not export (exports %v)", f, m, names)
			}
		}
	}
}
