package nftgen

import (
	"os"
	"testing"

	"github.com/metald/metald/internal/netnstest"
)

func TestMain(m *testing.M) { os.Exit(netnstest.Main(m)) }

func TestTellsOwnCommitsFromForeignOnes(t *testing.T) {
	n := netnstest.New(t)
	tr, err := New(n.Fd())
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if tr.Unchanged() {
		t.Fatal("Unchanged before any comparison")
	}
	if !tr.Due(0) {
		t.Fatal("not Due before any comparison")
	}
	if _, err := tr.Gen(); err != nil {
		t.Fatal(err)
	}
	tr.BeginCompare()
	if !tr.Unchanged() {
		t.Fatal("changed right after BeginCompare")
	}
	g0, err := tr.Gen()
	if err != nil {
		t.Fatal(err)
	}
	// A commit followed by Note is metald's own.
	n.MustRun(t, "nft", "add", "table", "bridge", "t1")
	tr.Note()
	if !tr.Unchanged() {
		t.Fatal("own commit counted as foreign")
	}
	if g, _ := tr.Gen(); g != g0+1 {
		t.Fatalf("generation %d after one commit from %d", g, g0)
	}
	// A commit nobody notes is foreign, and stays so until a comparison.
	n.MustRun(t, "nft", "add", "table", "bridge", "t2")
	if tr.Unchanged() {
		t.Fatal("foreign commit not seen")
	}
	n.MustRun(t, "nft", "add", "table", "bridge", "t3")
	tr.Note()
	if tr.Unchanged() {
		t.Fatal("a Note after a foreign commit hid it")
	}
	tr.BeginCompare()
	if !tr.Unchanged() {
		t.Fatal("changed after a new comparison")
	}
	// Two commits and one Note: the other commit is not attributable.
	n.MustRun(t, "nft", "add", "table", "bridge", "t4")
	n.MustRun(t, "nft", "add", "table", "bridge", "t5")
	tr.Note()
	if tr.Unchanged() {
		t.Fatal("two commits with one Note counted as own")
	}
	tr.BeginCompare()
	tr.Abandon()
	if tr.Unchanged() {
		t.Fatal("Unchanged after an abandoned comparison")
	}
	if tr.Due(1 << 40) {
		t.Fatal("Due right after a comparison")
	}
}
