// Command benchpool pools the rounds of several `make bench` runs and
// judges each performance target on all of them together.
//
//	go run ./scripts/benchpool docs/bench/*.txt     (make bench-pool)
//
// One run's ratio is the median of a handful of rounds (five to nine), and
// on a shared two-core machine a round's ratio moves by 10-20% (the
// machine's speed changes within seconds), so a single run lands on either
// side of a target that the true ratio is a few percent from. Each run's
// log (build/bench.txt, kept as docs/bench/run-<X>.txt) prints its rounds;
// benchpool reads them back, and for each target reports every run's own
// figure, the median of all rounds of all runs, and a one-sided 95%
// confidence bound for that median from a two-level bootstrap (runs drawn
// with replacement, then rounds within each drawn run: a run's machine
// state is shared by its rounds, so the runs are the independent units).
//
// Verdict, fixed before the figures are read: "met" when the bound is on
// the target's side (for a "≥ t" target the lower bound ≥ t, for "≤ t" the
// upper bound ≤ t); "not met" when the pooled median itself is on the
// wrong side; "undecided" otherwise. Targets whose benchmark prints no
// rounds (latencies, upsert) are judged on every run: "met" when every run
// met it.
package main

import (
	"bufio"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// target is one performance target of an issue.
type target struct {
	Issue int
	Name  string
	// AtMost is true for "≤ Limit" targets, false for "≥ Limit".
	AtMost bool
	Limit  float64
	// Rounds returns a run's per-round ratios; nil when the benchmark
	// prints none (Value is used instead).
	Rounds func(r *run) []float64
	// Value returns a run's figure when the benchmark prints no rounds.
	Value func(r *run) (float64, bool)
	// Reference marks a figure reported beside the targets, not one.
	Reference bool
	// Bench is the benchmark whose log carries the target's figures; a
	// run without it (a narrower make target, or made before the
	// benchmark existed) has no data for the target.
	Bench string
}

// run is what one log holds: per-round arrays by key, and the benchmark
// lines' metrics by "<benchmark> <unit>".
type run struct {
	Name    string
	Arrays  map[string][]float64
	Metrics map[string]float64
}

var (
	benchLine = regexp.MustCompile(`^(Benchmark\S+?)(?:-\d+)?\s+\d+\s+\d+ ns/op\s+(.*)$`)
	header    = regexp.MustCompile(`^--- BENCH: (Benchmark\S+?)(?:-\d+)?$`)
	// Log lines that carry rounds, in the benchmarks' own wording.
	roundsRe = []struct {
		re   *regexp.Regexp
		keys []string
	}{
		{regexp.MustCompile(`each round's p50 ÷ the mean p50 of the 10-VM stops around it: \[([^\]]*)\]`), []string{"paired"}},
		{regexp.MustCompile(`Gbit/s plain \[([^\]]*)\]; controls \[([^\]]*)\]`), []string{"fh.plain", "fh.controls"}},
		{regexp.MustCompile(`Gbit/s at 10: \[([^\]]*)\]; at 1000: \[([^\]]*)\]`), []string{"fh.at10", "fh.at1000"}},
		{regexp.MustCompile(`side by side, Gbit/s: plain \[([^\]]*)\]; controls \[([^\]]*)\]`), []string{"sbs.plain", "sbs.controls"}},
		{regexp.MustCompile(`side by side, Gbit/s: at 10 \[([^\]]*)\]; at 1000 \[([^\]]*)\]`), []string{"sbs.at10", "sbs.at1000"}},
		{regexp.MustCompile(`Gbit/s control \[([^\]]*)\]; flooded \[([^\]]*)\]`), []string{"nd.control", "nd.flooded"}},
		{regexp.MustCompile(`Gbit/s plain \[([^\]]*)\], conntrack only \[([^\]]*)\], 10 VMs \[([^\]]*)\]; 10 VMs \[([^\]]*)\], 1000 VMs \[([^\]]*)\]`),
			[]string{"pol.plain", "pol.conntrack", "pol.with10", "pol.at10", "pol.at1000"}},
	}
)

// parse reads one `make bench` log.
func parse(name string, rd io.Reader) (*run, error) {
	r := &run{Name: name, Arrays: map[string][]float64{}, Metrics: map[string]float64{}}
	sc := bufio.NewScanner(rd)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	current := ""
	for sc.Scan() {
		line := sc.Text()
		if m := benchLine.FindStringSubmatch(line); m != nil {
			f := strings.Fields(m[2])
			for i := 0; i+1 < len(f); i += 2 {
				v, err := strconv.ParseFloat(f[i], 64)
				if err != nil {
					return nil, fmt.Errorf("%s: metric %q of %s: %v", name, f[i+1], m[1], err)
				}
				r.Metrics[m[1]+" "+f[i+1]] = v
			}
			continue
		}
		if m := header.FindStringSubmatch(line); m != nil {
			current = m[1]
			continue
		}
		for _, rr := range roundsRe {
			m := rr.re.FindStringSubmatch(line)
			if m == nil {
				continue
			}
			for i, key := range rr.keys {
				vs, err := floats(m[i+1])
				if err != nil {
					return nil, fmt.Errorf("%s: %s: %v", name, key, err)
				}
				if key == "paired" {
					key = current + " paired"
				}
				r.Arrays[key] = vs
			}
		}
	}
	return r, sc.Err()
}

// ran reports whether the log has a result line of benchmark bench (or
// of one of its sub-benchmarks).
func (r *run) ran(bench string) bool {
	for k := range r.Metrics {
		if k == bench || strings.HasPrefix(k, bench+" ") || strings.HasPrefix(k, bench+"/") {
			return true
		}
	}
	return false
}

func floats(s string) ([]float64, error) {
	var out []float64
	for _, f := range strings.Fields(s) {
		v, err := strconv.ParseFloat(f, 64)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, nil
}

// ratios returns num[i]/den[i] for the rounds both arrays have.
func ratios(num, den []float64) []float64 {
	n := min(len(num), len(den))
	out := make([]float64, 0, n)
	for i := range n {
		if den[i] > 0 {
			out = append(out, num[i]/den[i])
		}
	}
	return out
}

func arrays(num, den string) func(r *run) []float64 {
	return func(r *run) []float64 { return ratios(r.Arrays[num], r.Arrays[den]) }
}

func metric(key string) func(r *run) (float64, bool) {
	return func(r *run) (float64, bool) { v, ok := r.Metrics[key]; return v, ok }
}

// maxMetric is the largest of several metrics of a run (p50 at every
// population).
func maxMetric(keys ...string) func(r *run) (float64, bool) {
	return func(r *run) (float64, bool) {
		best, any := 0.0, false
		for _, k := range keys {
			if v, ok := r.Metrics[k]; ok {
				best, any = max(best, v), true
			}
		}
		return best, any
	}
}

var targets = []target{
	{Issue: 2, Name: "CreateVm+BootVm p50 (ms), every population", AtMost: true, Limit: 30, Bench: "BenchmarkCreateBootLatency",
		Value: maxMetric("BenchmarkCreateBootLatency/existing=10 p50_ms", "BenchmarkCreateBootLatency/existing=500/spread p50_ms", "BenchmarkCreateBootLatency/existing=500/dense p50_ms")},
	{Issue: 2, Name: "CreateVm+BootVm p50 500 (spread) ÷ 10", AtMost: true, Limit: 1.3, Bench: "BenchmarkCreateBootLatency",
		Rounds: func(r *run) []float64 { return r.Arrays["BenchmarkCreateBootLatency/existing=500/spread paired"] }},
	{Issue: 2, Name: "CreateVm+BootVm p50 500 (dense) ÷ 10", AtMost: true, Limit: 1.3, Bench: "BenchmarkCreateBootLatency",
		Rounds: func(r *run) []float64 { return r.Arrays["BenchmarkCreateBootLatency/existing=500/dense paired"] }},
	{Issue: 4, Name: "iperf3 every control ÷ plain bridge", Limit: 0.95, Bench: "BenchmarkIperfControlsOverPlain", Rounds: arrays("fh.controls", "fh.plain")},
	{Issue: 4, Name: "iperf3 with 1000 NICs ÷ with 10", Limit: 0.97, Bench: "BenchmarkIperfAt1000NICs", Rounds: arrays("fh.at1000", "fh.at10")},
	{Issue: 4, Name: "iperf3 every control ÷ plain bridge, side by side", Limit: 0.95, Bench: "BenchmarkSideBySideControlsOverPlain", Rounds: arrays("sbs.controls", "sbs.plain")},
	{Issue: 4, Name: "iperf3 with 1000 NICs ÷ with 10, side by side", Limit: 0.97, Bench: "BenchmarkSideBySideAt1000NICs", Rounds: arrays("sbs.at1000", "sbs.at10")},
	{Issue: 4, Name: "AddNIC p50 at 1000 ÷ at 10", AtMost: true, Limit: 1.3, Bench: "BenchmarkAddNICLatency", Value: metric("BenchmarkAddNICLatency ratio")},
	{Issue: 4, Name: "neighbour iperf3 under ND flood ÷ without", Limit: 0.9, Bench: "BenchmarkNeighbourThroughputUnderNDFlood", Rounds: arrays("nd.flooded", "nd.control")},
	{Issue: 5, Name: "iperf3 Example 1 policy ÷ plain bridge", Limit: 0.95, Bench: "BenchmarkPolicy", Rounds: arrays("pol.with10", "pol.plain")},
	{Issue: 5, Name: "iperf3 with 1000 VMs' policies ÷ with 10", Limit: 0.97, Bench: "BenchmarkPolicy", Rounds: arrays("pol.at1000", "pol.at10")},
	{Issue: 5, Name: "UpdateSecurityPolicy p50 at 1000 VMs (ms)", AtMost: true, Limit: 10, Bench: "BenchmarkPolicy", Value: metric("BenchmarkPolicy upsert-p50-ms")},
}

// reference figures, reported but not targets.
var references = []target{
	{Issue: 5, Name: "(floor) iperf3 conntrack only ÷ plain bridge", Limit: 0.95, Bench: "BenchmarkPolicy", Rounds: arrays("pol.conntrack", "pol.plain"), Reference: true},
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n == 0 {
		return 0
	}
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// bootstrap returns the 5th and 95th percentiles of the pooled median
// over resamples: runs drawn with replacement, then each drawn run's
// rounds with replacement. Seeded: the same logs give the same bounds.
func bootstrap(perRun [][]float64, resamples int) (lo, hi float64) {
	rng := rand.New(rand.NewPCG(1, 2))
	meds := make([]float64, resamples)
	var pool []float64
	for i := range meds {
		pool = pool[:0]
		for range perRun {
			rounds := perRun[rng.IntN(len(perRun))]
			for range rounds {
				pool = append(pool, rounds[rng.IntN(len(rounds))])
			}
		}
		meds[i] = median(pool)
	}
	slices.Sort(meds)
	return meds[resamples*5/100], meds[resamples*95/100]
}

// result is one target judged on a set of runs.
type result struct {
	target
	PerRun  []string
	Pooled  float64
	Lo, Hi  float64
	N       int
	Verdict string
}

func judge(t target, runs []*run) result {
	res := result{target: t}
	if t.Rounds == nil {
		met, seen := true, 0
		for _, r := range runs {
			v, ok := t.Value(r)
			if !ok {
				res.PerRun = append(res.PerRun, "-")
				continue
			}
			seen++
			res.PerRun = append(res.PerRun, fmt.Sprintf("%.3g", v))
			if (t.AtMost && v > t.Limit) || (!t.AtMost && v < t.Limit) {
				met = false
			}
		}
		switch {
		case seen == 0:
			res.Verdict = "no data"
		case met:
			res.Verdict = fmt.Sprintf("met (%d of %d runs)", seen, seen)
		default:
			res.Verdict = "not met in every run"
		}
		return res
	}
	var perRun [][]float64
	var all []float64
	for _, r := range runs {
		rounds := t.Rounds(r)
		if len(rounds) == 0 {
			res.PerRun = append(res.PerRun, "-")
			continue
		}
		res.PerRun = append(res.PerRun, fmt.Sprintf("%.3f", median(rounds)))
		perRun = append(perRun, rounds)
		all = append(all, rounds...)
	}
	if len(all) == 0 {
		res.Verdict = "no data"
		return res
	}
	res.N, res.Pooled = len(all), median(all)
	res.Lo, res.Hi = bootstrap(perRun, 10000)
	bound, pointOK := res.Lo, res.Pooled >= t.Limit
	if t.AtMost {
		bound, pointOK = res.Hi, res.Pooled <= t.Limit
	}
	switch {
	case (t.AtMost && bound <= t.Limit) || (!t.AtMost && bound >= t.Limit):
		res.Verdict = "met"
	case !pointOK:
		res.Verdict = "not met"
	default:
		res.Verdict = "undecided"
	}
	return res
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: benchpool LOG...   (logs of make bench: build/bench.txt)")
		os.Exit(2)
	}
	var runs []*run
	for _, path := range os.Args[1:] {
		f, err := os.Open(path)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		name := strings.TrimSuffix(strings.TrimPrefix(filepath.Base(path), "run-"), ".txt")
		r, err := parse(name, f)
		f.Close()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		runs = append(runs, r)
	}
	write(os.Stdout, runs)
}

// write prints the judgement of every target as a Markdown table.
func write(w io.Writer, runs []*run) {
	names := make([]string, len(runs))
	for i, r := range runs {
		names[i] = r.Name
	}
	fmt.Fprintf(w, "| issue | target | runs %s | pooled median (rounds) | 90%% interval | verdict |\n", strings.Join(names, ", "))
	fmt.Fprintln(w, "|---|---|---|---|---|---|")
	for _, t := range append(slices.Clone(targets), references...) {
		res := judge(t, runs)
		op := "≥"
		if t.AtMost {
			op = "≤"
		}
		pooled, interval := "", ""
		if res.N > 0 {
			pooled = fmt.Sprintf("%.3f (%d)", res.Pooled, res.N)
			interval = fmt.Sprintf("%.3f-%.3f", res.Lo, res.Hi)
		}
		name, verdict := fmt.Sprintf("%s %s %g", t.Name, op, t.Limit), res.Verdict
		if t.Reference {
			name, verdict = t.Name, "reference, not a target"
		}
		fmt.Fprintf(w, "| %d | %s | %s | %s | %s | %s |\n", t.Issue, name,
			strings.Join(res.PerRun, " "), pooled, interval, verdict)
	}
}
