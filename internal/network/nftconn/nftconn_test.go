package nftconn

import (
	"os"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"

	"github.com/metald/metald/internal/netnstest"
)

func TestMain(m *testing.M) { os.Exit(netnstest.Main(m)) }

// TestLargeBatchOnLastingConnection: one batch of 5000 acknowledged rules
// commits (the default socket buffers overflow on its acks), and the
// connection stays usable for the next batch and for reads.
func TestLargeBatchOnLastingConnection(t *testing.T) {
	n := netnstest.New(t)
	c, err := Open(Options(n.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseLasting()
	tb := c.AddTable(&nftables.Table{Name: "t", Family: nftables.TableFamilyBridge})
	ch := c.AddChain(&nftables.Chain{Name: "c", Table: tb})
	for range 5000 {
		c.AddRule(&nftables.Rule{Table: tb, Chain: ch, Exprs: []expr.Any{&expr.Counter{}}})
	}
	if err := c.Flush(); err != nil {
		t.Fatalf("5000-rule batch: %v", err)
	}
	c.AddChain(&nftables.Chain{Name: "d", Table: tb})
	if err := c.Flush(); err != nil {
		t.Fatalf("next batch: %v", err)
	}
	rules, err := c.GetRules(tb, ch)
	if err != nil {
		t.Fatal(err)
	}
	if len(rules) != 5000 {
		t.Fatalf("%d rules in the chain, want 5000", len(rules))
	}
}
