package logfile

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

func read(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// Files rotate before a write that would pass the limit, hold whole
// writes only, keep maxFiles old files (newest .1), and a reopened file
// counts what it already holds.
func TestRotation(t *testing.T) {
	path := filepath.Join(t.TempDir(), "metald.log")
	l, err := Open(path, 100, 2)
	if err != nil {
		t.Fatal(err)
	}
	rec := func(i int) string { return fmt.Sprintf("record %03d %s\n", i, strings.Repeat("x", 20)) } // 32 bytes
	for i := range 3 {
		if _, err := l.Write([]byte(rec(i))); err != nil {
			t.Fatal(err)
		}
	}
	if got := read(t, path); got != rec(0)+rec(1)+rec(2) {
		t.Fatalf("before rotation: %q", got)
	}
	if l.Room() != 4 {
		t.Fatalf("room %d, want 4", l.Room())
	}
	if _, err := l.Write([]byte(rec(3))); err != nil {
		t.Fatal(err)
	}
	if got := read(t, path); got != rec(3) {
		t.Fatalf("after rotation: %q", got)
	}
	if got := read(t, path+".1"); got != rec(0)+rec(1)+rec(2) {
		t.Fatalf(".1: %q", got)
	}
	for i := 4; i < 12; i++ {
		l.Write([]byte(rec(i)))
	}
	// 12 records, 3 per file: .2 holds 3-5, .1 6-8, the file 9-11; 0-2 are
	// gone (two old files kept).
	if got := read(t, path+".2"); got != rec(3)+rec(4)+rec(5) {
		t.Fatalf(".2: %q", got)
	}
	if got := read(t, path); got != rec(9)+rec(10)+rec(11) {
		t.Fatalf("file: %q", got)
	}
	if _, err := os.Stat(path + ".3"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf(".3 kept: %v", err)
	}
	// A write larger than the limit goes whole into a file of its own.
	big := bytes.Repeat([]byte("y"), 150)
	l.Write(big)
	if got := read(t, path); got != string(big) {
		t.Fatalf("big write split: %d bytes", len(got))
	}
	l.Write([]byte(rec(12)))
	if got := read(t, path); got != rec(12) {
		t.Fatalf("after the big write: %q", got)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Write([]byte("late\n")); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("write after close: %v", err)
	}

	// Reopened: appends, and rotates by the size already there.
	l, err = Open(path, 100, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if l.Room() != 100-32 {
		t.Fatalf("room after reopen %d", l.Room())
	}
	l.Write([]byte(rec(13)))
	if got := read(t, path); got != rec(12)+rec(13) {
		t.Fatalf("reopened: %q", got)
	}
}

// Concurrent writers (slog's handlers share one file) never interleave
// within a write, and nothing is lost across rotations.
func TestConcurrentWrites(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "metald.log")
	l, err := Open(path, 4096, 100)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 200 {
				l.Write(fmt.Appendf(nil, "writer %d record %03d %s\n", w, i, strings.Repeat("z", 40)))
			}
		}()
	}
	wg.Wait()
	l.Close()
	lines := 0
	files, _ := filepath.Glob(path + "*")
	for _, f := range files {
		for _, ln := range strings.Split(strings.TrimSuffix(read(t, f), "\n"), "\n") {
			if !strings.HasPrefix(ln, "writer ") || !strings.HasSuffix(ln, strings.Repeat("z", 40)) {
				t.Fatalf("%s: torn line %q", f, ln)
			}
			lines++
		}
		if st, _ := os.Stat(f); st.Size() > 4096 {
			t.Fatalf("%s: %d bytes", f, st.Size())
		}
	}
	if lines != 1600 {
		t.Fatalf("%d lines, want 1600", lines)
	}
}
