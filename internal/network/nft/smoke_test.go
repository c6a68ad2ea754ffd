package nft

import (
	"testing"

	"github.com/metald/metald/internal/netnstest"
)

func TestSmoke(t *testing.T) {
	n := netnstest.New(t)
	fw, err := New(n.Fd())
	if err != nil {
		t.Fatal(err)
	}
	if err := fw.AddNIC(vmPlan(1, allOn())); err != nil {
		t.Fatal(err)
	}
	t.Log(n.MustRun(t, "nft", "list", "table", "bridge", "metald"))
	c, err := fw.Counters("tap-vm1")
	t.Log(c, err)
}
