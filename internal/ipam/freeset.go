package ipam

// freeSet is the set of free offsets 0..max of one subnet, kept as disjoint,
// non-adjacent ranges in a treap ordered by range start. Every operation is
// O(log r) for r ranges (r is at most the number of allocations + 1), so
// finding the next free address never scans allocated ones.
type freeSet struct {
	root *fnode
	seed uint64
}

type fnode struct {
	start, end  uint64 // inclusive range of free offsets
	prio        uint64
	left, right *fnode
}

// newFreeSet returns a set with 0..max free.
func newFreeSet(max uint64) *freeSet {
	f := &freeSet{seed: 0x9e3779b97f4a7c15 ^ max}
	f.root = &fnode{start: 0, end: max, prio: f.rand()}
	return f
}

func (f *freeSet) rand() uint64 {
	// xorshift64*: deterministic so tree shapes are reproducible.
	f.seed ^= f.seed >> 12
	f.seed ^= f.seed << 25
	f.seed ^= f.seed >> 27
	return f.seed * 2685821657736338717
}

// floor returns the range with the greatest start <= x.
func (f *freeSet) floor(x uint64) *fnode {
	var best *fnode
	for n := f.root; n != nil; {
		if n.start <= x {
			best = n
			n = n.right
		} else {
			n = n.left
		}
	}
	return best
}

// ceil returns the range with the smallest start >= x.
func (f *freeSet) ceil(x uint64) *fnode {
	var best *fnode
	for n := f.root; n != nil; {
		if n.start >= x {
			best = n
			n = n.left
		} else {
			n = n.right
		}
	}
	return best
}

// isFree reports whether x is free.
func (f *freeSet) isFree(x uint64) bool {
	n := f.floor(x)
	return n != nil && n.end >= x
}

// firstFrom returns the smallest free offset >= x.
func (f *freeSet) firstFrom(x uint64) (uint64, bool) {
	if n := f.floor(x); n != nil && n.end >= x {
		return x, true
	}
	if n := f.ceil(x); n != nil {
		return n.start, true
	}
	return 0, false
}

// take marks x used; false when it was not free.
func (f *freeSet) take(x uint64) bool {
	n := f.floor(x)
	if n == nil || n.end < x {
		return false
	}
	switch {
	case n.start == x && n.end == x:
		f.root = fdelete(f.root, x)
	case n.start == x:
		n.start++ // order is kept: no other range starts in (x, x+1]
	case n.end == x:
		n.end--
	default:
		right := &fnode{start: x + 1, end: n.end, prio: f.rand()}
		n.end = x - 1
		f.root = finsert(f.root, right)
	}
	return true
}

// release marks x free; false when it already was.
func (f *freeSet) release(x uint64) bool {
	lo := f.floor(x)
	if lo != nil && lo.end >= x {
		return false
	}
	var hi *fnode
	if x != ^uint64(0) {
		if c := f.ceil(x + 1); c != nil && c.start == x+1 {
			hi = c
		}
	}
	joinLo := lo != nil && lo.end == x-1 && x != 0
	switch {
	case joinLo && hi != nil:
		lo.end = hi.end
		f.root = fdelete(f.root, hi.start)
	case joinLo:
		lo.end = x
	case hi != nil:
		hi.start = x // order is kept: x was not free and > lo.end+1
	default:
		f.root = finsert(f.root, &fnode{start: x, end: x, prio: f.rand()})
	}
	return true
}

func fsplit(t *fnode, key uint64) (l, r *fnode) {
	if t == nil {
		return nil, nil
	}
	if t.start < key {
		t.right, r = fsplit(t.right, key)
		return t, r
	}
	l, t.left = fsplit(t.left, key)
	return l, t
}

func fmerge(l, r *fnode) *fnode {
	switch {
	case l == nil:
		return r
	case r == nil:
		return l
	case l.prio > r.prio:
		l.right = fmerge(l.right, r)
		return l
	default:
		r.left = fmerge(l, r.left)
		return r
	}
}

func finsert(t, n *fnode) *fnode {
	if t == nil {
		return n
	}
	if n.prio > t.prio {
		n.left, n.right = fsplit(t, n.start)
		return n
	}
	if n.start < t.start {
		t.left = finsert(t.left, n)
	} else {
		t.right = finsert(t.right, n)
	}
	return t
}

func fdelete(t *fnode, key uint64) *fnode {
	if t == nil {
		return nil
	}
	switch {
	case key < t.start:
		t.left = fdelete(t.left, key)
	case key > t.start:
		t.right = fdelete(t.right, key)
	default:
		return fmerge(t.left, t.right)
	}
	return t
}
