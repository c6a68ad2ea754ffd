package netnstest

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
)

// Median returns the median of v (for an even count the mean of the two
// middle ones, as scripts/benchpool computes it). It panics on an empty v.
func Median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n%2 == 0 {
		return (s[n/2-1] + s[n/2]) / 2
	}
	return s[n/2]
}

// PairedRatio returns the median over rounds i of test[i] / base[i], for
// benchmarks that measure both sides back to back in each round (in
// alternating order). A shared 2-core host drifts by ±20% over a minute;
// within one round both sides see nearly the same machine, so each round's
// ratio cancels the drift that a ratio of the two sides' medians keeps.
// It panics when the lengths differ or are zero.
func PairedRatio(base, test []float64) float64 {
	if len(base) != len(test) || len(base) == 0 {
		panic("netnstest.PairedRatio: need equal, non-zero numbers of rounds")
	}
	r := make([]float64, len(base))
	for i := range base {
		r[i] = test[i] / base[i]
	}
	return Median(r)
}

// CPUStat is the machine's CPU time from /proc/stat, in USER_HZ ticks
// summed over all CPUs.
type CPUStat struct {
	Busy  uint64 // user, nice, system, irq, softirq (guest time is in user)
	Idle  uint64 // idle, iowait
	Steal uint64 // time the hypervisor gave this machine's vCPUs to others
}

// Total is all the CPU time counted.
func (c CPUStat) Total() uint64 { return c.Busy + c.Idle + c.Steal }

// ReadCPUStat reads the first line of /proc/stat.
func ReadCPUStat() (CPUStat, error) {
	var c CPUStat
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return c, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return c, fmt.Errorf("/proc/stat: unexpected first line %q", line)
	}
	for i, s := range f[1:9] {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return c, fmt.Errorf("/proc/stat field %d: %w", i+1, err)
		}
		switch i {
		case 0, 1, 2, 5, 6:
			c.Busy += v
		case 3, 4:
			c.Idle += v
		case 7:
			c.Steal += v
		}
	}
	return c, nil
}

// StealMeter measures the stolen share of CPU time since it was started:
// benchmarks report it, as how far their machine was from a quiet one.
type StealMeter struct{ start CPUStat }

// StartSteal starts a StealMeter (one that reports 0 when /proc/stat
// cannot be read).
func StartSteal() StealMeter {
	c, _ := ReadCPUStat()
	return StealMeter{c}
}

// Percent returns the stolen percentage of all CPU time since the start.
func (m StealMeter) Percent() float64 {
	c, err := ReadCPUStat()
	if err != nil || c.Total() <= m.start.Total() {
		return 0
	}
	return 100 * float64(c.Steal-m.start.Steal) / float64(c.Total()-m.start.Total())
}
