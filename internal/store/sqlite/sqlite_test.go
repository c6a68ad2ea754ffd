package sqlite

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/metald/metald/internal/store"
	"github.com/metald/metald/internal/store/storetest"
)

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store {
		s, err := Open(context.Background(), filepath.Join(t.TempDir(), "metald.db"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	})
}

func TestReopenKeepsDataAndSchema(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "metald.db")
	s, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.CreateVM(ctx, &store.VM{ID: "vm-x", TenantID: "t", State: store.StateCreated, Config: []byte("{}"), Backend: "netns"}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err = Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var v int
	if err := s.DB().QueryRow("PRAGMA user_version").Scan(&v); err != nil || v != len(migrations) {
		t.Fatalf("user_version %d (%v), want %d", v, err, len(migrations))
	}
	var mode string
	s.DB().QueryRow("PRAGMA journal_mode").Scan(&mode)
	if mode != "wal" {
		t.Fatalf("journal_mode %q, want wal", mode)
	}
	if _, err := s.GetVM(ctx, "vm-x"); err != nil {
		t.Fatalf("row lost across reopen: %v", err)
	}
}

// TestInstanceID: a database draws its instance id once; reopening keeps
// it, and another database has another.
func TestInstanceID(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	open := func(name string) string {
		s, err := Open(ctx, filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		id, err := s.InstanceID(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	a := open("a.db")
	if len(a) != 16 {
		t.Fatalf("instance id %q, want 16 hex digits", a)
	}
	if again := open("a.db"); again != a {
		t.Errorf("reopened: instance id %q, want %q", again, a)
	}
	if b := open("b.db"); b == a {
		t.Errorf("two databases share instance id %q", a)
	}
}
