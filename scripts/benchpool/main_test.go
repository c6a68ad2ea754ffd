package main

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// sample is a trimmed `make bench` log in the benchmarks' own wording.
const sample = `BenchmarkCreateBootLatency/existing=10-2         	       1	    323800 ns/op	        13.01 p50_ms	        26.53 p99_ms	         5.091 steal_%
--- BENCH: BenchmarkCreateBootLatency/existing=10-2
    bench_test.go:177: p50 of each stop, in order: [12.71 12.28] ms
BenchmarkCreateBootLatency/existing=500/spread-2 	       1	    243612 ns/op	        14.87 p50_ms	         1.143 p50_ratio_vs_10
--- BENCH: BenchmarkCreateBootLatency/existing=500/spread-2
    bench_test.go:186: each round's p50 ÷ the mean p50 of the 10-VM stops around it: [1.149 1.122 1.084]
BenchmarkCreateBootLatency/existing=500/dense-2  	       1	    266415 ns/op	        31.59 p50_ms	         1.276 p50_ratio_vs_10
--- BENCH: BenchmarkCreateBootLatency/existing=500/dense-2
    bench_test.go:186: each round's p50 ÷ the mean p50 of the 10-VM stops around it: [1.198 1.065 1.671]
BenchmarkIperfControlsOverPlain-2            	       1	73006043458 ns/op	         9.216 controls_Gbit/s
--- BENCH: BenchmarkIperfControlsOverPlain-2
    perf_test.go:175: Gbit/s plain [10 10 10]; controls [9 10 11]
--- BENCH: BenchmarkSideBySideControlsOverPlain-2
    sidebyside_test.go:150: side by side, Gbit/s: plain [7.5 7.25]; controls [7 7.3]
--- BENCH: BenchmarkSideBySideAt1000NICs-2
    sidebyside_test.go:180: side by side, Gbit/s: at 10 [6 6.5]; at 1000 [6.1 6.4]
BenchmarkAddNICLatency-2                     	       1	5878921258 ns/op	      4740 p50_at1000_us	      4201 p50_at10_us	         1.128 ratio
--- BENCH: BenchmarkPolicy-2
    bench_test.go:158: Gbit/s plain [10 10], conntrack only [9 9], 10 VMs [8 9]; 10 VMs [10 10], 1000 VMs [10 11]
BenchmarkPolicy-2   	       1	152570587103 ns/op	         0.9594 1000/10	         2.281 upsert-p50-ms
`

func TestParse(t *testing.T) {
	r, err := parse("X", strings.NewReader(sample))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]float64{
		"BenchmarkCreateBootLatency/existing=500/spread paired": {1.149, 1.122, 1.084},
		"BenchmarkCreateBootLatency/existing=500/dense paired":  {1.198, 1.065, 1.671},
		"fh.plain": {10, 10, 10}, "fh.controls": {9, 10, 11},
		"sbs.plain": {7.5, 7.25}, "sbs.controls": {7, 7.3}, "sbs.at10": {6, 6.5}, "sbs.at1000": {6.1, 6.4},
		"pol.plain": {10, 10}, "pol.conntrack": {9, 9}, "pol.with10": {8, 9}, "pol.at10": {10, 10}, "pol.at1000": {10, 11},
	}
	for k, v := range want {
		if fmt.Sprint(r.Arrays[k]) != fmt.Sprint(v) {
			t.Errorf("%s = %v, want %v", k, r.Arrays[k], v)
		}
	}
	for k, v := range map[string]float64{
		"BenchmarkCreateBootLatency/existing=10 p50_ms": 13.01, "BenchmarkAddNICLatency ratio": 1.128,
		"BenchmarkPolicy upsert-p50-ms": 2.281, "BenchmarkCreateBootLatency/existing=500/dense p50_ms": 31.59,
	} {
		if r.Metrics[k] != v {
			t.Errorf("metric %s = %v, want %v", k, r.Metrics[k], v)
		}
	}
}

func TestJudge(t *testing.T) {
	r, err := parse("X", strings.NewReader(sample))
	if err != nil {
		t.Fatal(err)
	}
	runs := []*run{r}
	byName := func(prefix string) target {
		for _, tg := range targets {
			if strings.HasPrefix(tg.Name, prefix) {
				return tg
			}
		}
		t.Fatalf("no target %q", prefix)
		return target{}
	}
	// A run whose dense p50 is 31.59 ms fails the 30 ms target.
	if v := judge(byName("CreateVm+BootVm p50 (ms)"), runs).Verdict; v != "not met in every run" {
		t.Errorf("p50 verdict %q", v)
	}
	if v := judge(byName("AddNIC"), runs).Verdict; v != "met (1 of 1 runs)" {
		t.Errorf("AddNIC verdict %q", v)
	}
	// Policy rounds 0.8, 0.9: the pooled median 0.85 is below 0.95.
	res := judge(byName("iperf3 Example 1"), runs)
	if res.Verdict != "not met" || math.Abs(res.Pooled-0.85) > 1e-9 || res.N != 2 {
		t.Errorf("policy: %+v", res)
	}
	// Controls rounds 0.9, 1.0, 1.1: median 1.0, but three rounds of one
	// run cannot bound it above 0.95.
	if res := judge(byName("iperf3 every control"), runs); res.Verdict != "undecided" || res.Pooled != 1 {
		t.Errorf("controls: %+v", res)
	}
	// Spread rounds all below 1.3: met.
	if v := judge(byName("CreateVm+BootVm p50 500 (spread)"), runs).Verdict; v != "met" {
		t.Errorf("spread verdict %q", v)
	}
	// No ND flood rounds in the log.
	if v := judge(byName("neighbour"), runs).Verdict; v != "no data" {
		t.Errorf("nd verdict %q", v)
	}
}

func TestBootstrapTightensWithRuns(t *testing.T) {
	mk := func(n int) [][]float64 {
		var out [][]float64
		for i := range n {
			out = append(out, []float64{0.90 + 0.01*float64(i%5), 1.0, 1.05, 0.98, 1.02})
		}
		return out
	}
	lo3, hi3 := bootstrap(mk(3), 2000)
	lo30, hi30 := bootstrap(mk(30), 2000)
	if !(lo3 <= lo30 && hi30 <= hi3 && hi30-lo30 < hi3-lo3) {
		t.Errorf("interval with 3 runs %.3f-%.3f, with 30 %.3f-%.3f: want narrower with more runs", lo3, hi3, lo30, hi30)
	}
	if lo, hi := bootstrap(mk(3), 2000); lo != lo3 || hi != hi3 {
		t.Error("bootstrap is not repeatable")
	}
}

// TestCommittedRuns: every committed run log (before the TCP fast path,
// on it, and on the inline fast path) parses and carries the rounds or value of every target whose
// benchmark it ran (a `make bench-net` run has no CreateVm figures, a
// `make bench-firsthop` run no policy ones, and runs made before the
// side-by-side benchmarks existed none of theirs), and every target's
// benchmark ran in some committed run.
func TestCommittedRuns(t *testing.T) {
	before, err := filepath.Glob("../../docs/bench/run-*.txt")
	after, aerr := filepath.Glob("../../docs/bench/fastpath/run-*.txt")
	inline, ierr := filepath.Glob("../../docs/bench/inline/run-*.txt")
	if err != nil || aerr != nil || ierr != nil || len(before) == 0 || len(after) == 0 || len(inline) == 0 {
		t.Fatalf("no committed runs: %v %v %v", err, aerr, ierr)
	}
	seen := map[string]bool{}
	for _, p := range slices.Concat(before, after, inline) {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		r, err := parse(p, f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		for _, tg := range targets {
			if !r.ran(tg.Bench) {
				continue
			}
			seen[tg.Bench] = true
			if tg.Rounds != nil && len(tg.Rounds(r)) == 0 {
				t.Errorf("%s: no rounds for %q", p, tg.Name)
			}
			if tg.Value != nil {
				if _, ok := tg.Value(r); !ok {
					t.Errorf("%s: no value for %q", p, tg.Name)
				}
			}
		}
	}
	for _, tg := range append(slices.Clone(targets), references...) {
		if tg.Bench == "" || !seen[tg.Bench] {
			t.Errorf("target %q: benchmark %q ran in no committed run", tg.Name, tg.Bench)
		}
	}
}
