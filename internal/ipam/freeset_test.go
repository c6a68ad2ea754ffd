package ipam

import (
	"math/rand/v2"
	"testing"
)

// TestFreeSetModel checks the range set against a plain map in random
// order.
func TestFreeSetModel(t *testing.T) {
	const max = 300
	r := rand.New(rand.NewPCG(1, 2))
	f := newFreeSet(max)
	used := map[uint64]bool{}
	for i := 0; i < 20000; i++ {
		x := r.Uint64N(max + 1)
		if r.IntN(2) == 0 {
			if got := f.take(x); got == used[x] {
				t.Fatalf("step %d take(%d) = %v with used=%v", i, x, got, used[x])
			}
			used[x] = true
		} else {
			if got := f.release(x); got != used[x] {
				t.Fatalf("step %d release(%d) = %v with used=%v", i, x, got, used[x])
			}
			delete(used, x)
		}
		from := r.Uint64N(max + 1)
		want, wantOK := uint64(0), false
		for y := from; y <= max; y++ {
			if !used[y] {
				want, wantOK = y, true
				break
			}
		}
		if got, ok := f.firstFrom(from); ok != wantOK || got != want {
			t.Fatalf("step %d firstFrom(%d) = %d,%v want %d,%v", i, from, got, ok, want, wantOK)
		}
	}
}

func TestFreeSetFull64(t *testing.T) {
	f := newFreeSet(^uint64(0))
	if !f.take(^uint64(0)) || f.take(^uint64(0)) {
		t.Fatal("take max")
	}
	if !f.release(^uint64(0)) || !f.isFree(^uint64(0)) {
		t.Fatal("release max")
	}
	if x, ok := f.firstFrom(^uint64(0) - 1); !ok || x != ^uint64(0)-1 {
		t.Fatal("firstFrom near max")
	}
}
