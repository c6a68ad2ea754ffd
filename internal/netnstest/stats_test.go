package netnstest

import (
	"testing"
	"time"
)

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{
		{[]float64{3}, 3},
		{[]float64{5, 1, 3}, 3},
		{[]float64{4, 1, 3, 2}, 2.5},
	} {
		in := append([]float64(nil), c.in...)
		if got := Median(c.in); got != c.want {
			t.Errorf("Median(%v) = %v, want %v", c.in, got, c.want)
		}
		for i := range in {
			if in[i] != c.in[i] {
				t.Errorf("Median reordered its input: %v", c.in)
			}
		}
	}
}

// TestPairedRatio: drift between rounds cancels in the paired ratio; the
// ratio of the medians depends on which rounds the machine was fast in.
func TestPairedRatio(t *testing.T) {
	// test is 0.97 of base in every round; the machine is 30% faster in
	// rounds 2-4 except while base is measured in round 4.
	base := []float64{10, 13, 13, 10, 10}
	test := []float64{9.7, 12.61, 12.61, 12.61, 9.7}
	if got := PairedRatio(base, test); got < 0.9699 || got > 0.9701 {
		t.Errorf("PairedRatio = %v, want 0.97", got)
	}
	if got := Median(test) / Median(base); got < 1.2 {
		t.Errorf("ratio of medians %v: the example does not show the drift", got)
	}
	defer func() {
		if recover() == nil {
			t.Error("PairedRatio of unequal lengths did not panic")
		}
	}()
	PairedRatio(base, test[:2])
}

// TestReadCPUStat: /proc/stat parses, and busy time grows while a CPU
// spins.
func TestReadCPUStat(t *testing.T) {
	c0, err := ReadCPUStat()
	if err != nil {
		t.Fatal(err)
	}
	if c0.Total() == 0 || c0.Steal > c0.Total() {
		t.Fatalf("%+v", c0)
	}
	m := StartSteal()
	for end := time.Now().Add(200 * time.Millisecond); time.Now().Before(end); {
	}
	c1, err := ReadCPUStat()
	if err != nil {
		t.Fatal(err)
	}
	if c1.Busy <= c0.Busy {
		t.Errorf("busy time did not grow over 200 ms of spinning: %+v -> %+v", c0, c1)
	}
	if p := m.Percent(); p < 0 || p > 100 {
		t.Errorf("steal %v%%", p)
	}
}
