package nft

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/metald/metald/internal/netnstest"
	"github.com/metald/metald/internal/network/ns"
)

// This machine's CPUs change speed by up to 2x within a second, without
// the change showing as stolen time (a CPU-bound loop measured in 250 ms
// slices on one vCPU jumps between two rates, one twice the other, for
// seconds at a time: the hypervisor's other load on the same cores), so
// two transfers made one after the other can meet different machines.
// The side-by-side benchmarks below run both arms at the same time, each
// in its own copy of the topology, so every speed change hits both; the
// copies swap arms every round and take turns starting first.

// iperfSideBySide runs one iperf3 -6 transfer VM1 -> VM2 in every topology
// of tps at the same time (servers on CPU 0, clients on CPU 1, as iperf
// does), secs seconds after one left out (TCP's start, and the clients'
// start a few milliseconds apart), and returns each one's received rate in
// bit/s. Clients start in the order of tps rotated by first.
func iperfSideBySide(t testing.TB, tps []*topo, secs, first int) []float64 {
	t.Helper()
	var last string
	for attempt := range 4 {
		rates, out, err := iperfSideBySideOnce(tps, secs, first)
		if err == nil {
			return rates
		}
		last = fmt.Sprintf("attempt %d: %v\n%s", attempt+1, err, out)
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("iperf3 side by side never measured both transfers:\n%s", last)
	return nil
}

func iperfSideBySideOnce(tps []*topo, secs, first int) ([]float64, string, error) {
	n := len(tps)
	for _, tp := range tps {
		srv, err := startIperfServer(tp.vm2, vm2IP)
		if err != nil {
			return nil, "", err
		}
		defer func() { srv.Process.Kill(); srv.Wait() }()
	}
	clis := make([]*exec.Cmd, n)
	outs := make([]bytes.Buffer, n)
	for k := range n {
		i := (first + k) % n
		clis[i] = exec.Command("iperf3", "-6", "-c", vm2IP, "-t", fmt.Sprint(secs), "-O", "1", "-J", "-A", "1")
		clis[i].Stdout, clis[i].Stderr = &outs[i], &outs[i]
		if err := ns.Start(tps[i].vm1.Fd(), clis[i]); err != nil {
			for _, c := range clis { // the clients already started
				if c != nil && c.Process != nil {
					c.Process.Kill()
					c.Wait()
				}
			}
			return nil, "", fmt.Errorf("iperf3 client: %w", err)
		}
	}
	rates := make([]float64, n)
	var failed error
	var text strings.Builder
	for i, cli := range clis {
		werr := cli.Wait()
		bps, err := iperfResult(outs[i].Bytes(), werr)
		if err != nil {
			failed = fmt.Errorf("copy %d: %w", i, err)
		}
		rates[i] = bps
		text.Write(outs[i].Bytes())
	}
	return rates, text.String(), failed
}

// sideBySide measures rounds rounds of two topologies side by side. Before
// round i, set(tps[a], tps[b]) puts copy a = i%2 in the test arm and copy
// b in the base arm (the copies swap arms every round); clients start
// base first in rounds 0, 1 mod 4 and test first in the others, so every
// combination of copy and start order is measured equally often when
// rounds is a multiple of 4. It returns the base and test arms' rates per
// round (bit/s).
func sideBySide(t testing.TB, tps [2]*topo, rounds int, set func(test, base *topo)) (base, test []float64) {
	t.Helper()
	for i := range rounds {
		a := i % 2
		set(tps[a], tps[1-a])
		first := 1 - a // base first
		if i%4 >= 2 {
			first = a
		}
		r := iperfSideBySide(t, tps[:], 3, first)
		test, base = append(test, r[a]), append(base, r[1-a])
	}
	return base, test
}

// BenchmarkSideBySideControlsOverPlain: method: two copies of the
// benchmark's topology (each a host namespace with bridge br0 and two VM
// namespaces) run iperf3 -6 VM1 -> VM2 at the same time, 3 s after one
// left out, one copy with every control on and the other a plain bridge
// (no metald table: the NICs' state removed); 12 rounds, the copies
// swapping arms every round and taking turns starting first. Both
// transfers share the CPUs at every instant, so the machine's changes of
// speed cancel in each round's ratio controls ÷ plain (ratio: the median
// of the rounds', target >= 0.95; ratio_of_medians too). When the CPUs
// are the limit the ratio is the two paths' cost per byte, which a
// transfer alone, with idle CPU beside it, shows only in part.
func BenchmarkSideBySideControlsOverPlain(b *testing.B) {
	for range b.N {
		steal := netnstest.StartSteal()
		tps := [2]*topo{newTopo(b, allOn()), newTopo(b, allOn())}
		tps[0].setPlain(b)
		on := [2]bool{false, true}
		set := func(test, base *topo) {
			for k, tp := range tps {
				want := tp == test
				switch {
				case want && !on[k]:
					tp.setOn(b)
				case !want && on[k]:
					tp.setPlain(b)
				}
				on[k] = want
			}
		}
		plain, ctl := sideBySide(b, tps, 12, set)
		b.Logf("side by side, Gbit/s: plain %.2f; controls %.2f", scale(plain, 1e-9), scale(ctl, 1e-9))
		reportSideBySide(b, plain, ctl, "plain", "controls", steal)
	}
}

// BenchmarkSideBySideAt1000NICs: method: as
// BenchmarkSideBySideControlsOverPlain, both copies with every control on,
// one with 1000 other NICs programmed in its table and the other with 10
// (Apply switches them before each round; the copies swap every round);
// ratio = the median of the rounds' 1000 ÷ 10 (target >= 0.97).
func BenchmarkSideBySideAt1000NICs(b *testing.B) {
	for range b.N {
		steal := netnstest.StartSteal()
		tps := [2]*topo{newTopo(b, allOn()), newTopo(b, allOn())}
		set := func(test, base *topo) {
			for tp, n := range map[*topo]int{base: 10, test: 1000} {
				if err := tp.fw.Apply(context.Background(), append(otherPlans(n), tp.plans[:]...)); err != nil {
					b.Fatal(err)
				}
			}
		}
		at10, at1000 := sideBySide(b, tps, 12, set)
		b.Logf("side by side, Gbit/s: at 10 %.2f; at 1000 %.2f", scale(at10, 1e-9), scale(at1000, 1e-9))
		reportSideBySide(b, at10, at1000, "at10", "at1000", steal)
	}
}

// reportSideBySide reports both arms' median rates (<name>_Gbit/s), the
// median of the rounds' ratios test ÷ base (ratio), the ratio of the
// medians and the CPU time stolen meanwhile.
func reportSideBySide(b *testing.B, base, test []float64, baseName, testName string, steal netnstest.StealMeter) {
	b.ReportMetric(netnstest.Median(base)/1e9, baseName+"_Gbit/s")
	b.ReportMetric(netnstest.Median(test)/1e9, testName+"_Gbit/s")
	b.ReportMetric(netnstest.PairedRatio(base, test), "ratio")
	b.ReportMetric(netnstest.Median(test)/netnstest.Median(base), "ratio_of_medians")
	b.ReportMetric(steal.Percent(), "steal_%")
}

// setPlain removes the NICs' state and metald's bridge table (only its
// input chain is left, if metald recreated it): a plain bridge. setOn
// programs both NICs again.
func (tp *topo) setPlain(t testing.TB) {
	t.Helper()
	for _, p := range tp.plans {
		if err := tp.fw.RemoveNIC(p.HostDevice); err != nil {
			t.Fatal(err)
		}
	}
	tp.host.Run("nft", "delete", "table", "bridge", TableName)
}

func (tp *topo) setOn(t testing.TB) {
	t.Helper()
	for _, p := range tp.plans {
		if err := tp.fw.AddNIC(p); err != nil {
			t.Fatal(err)
		}
	}
}
