package ns_test

import (
	"os"
	"testing"

	"github.com/metald/metald/internal/netnstest"
	"github.com/metald/metald/internal/network/ns"
)

func TestMain(m *testing.M) { os.Exit(netnstest.Main(m)) }

// A Thread's sysctls and work happen in its namespace, not the caller's.
func TestThreadSysctlsInItsNamespace(t *testing.T) {
	a, b := netnstest.New(t), netnstest.New(t)
	th, err := ns.NewThread(a.Fd())
	if err != nil {
		t.Fatal(err)
	}
	defer th.Close()
	const key = "net/ipv6/conf/lo/hop_limit"
	for _, v := range []string{"17", "23"} {
		if err := th.WriteSysctl(key, v); err != nil {
			t.Fatal(err)
		}
		got, err := th.ReadSysctl(key)
		if err != nil || got != v {
			t.Fatalf("read back %q, %v; want %q", got, err, v)
		}
		if other, err := ns.ReadSysctl(a.Fd(), key); err != nil || other != v {
			t.Fatalf("namespace a has %q, %v; want %q", other, err, v)
		}
	}
	if other, err := ns.ReadSysctl(b.Fd(), key); err != nil || other != "64" {
		t.Fatalf("namespace b has %q, %v; want its default 64", other, err)
	}
	// A key outside net/ is opened by its full path.
	if _, err := th.ReadSysctl("kernel/ostype"); err != nil {
		t.Fatal(err)
	}
	if err := th.WriteSysctl("net/ipv6/conf/nosuchdev/hop_limit", "1"); !os.IsNotExist(err) {
		t.Fatalf("missing key: %v, want not-exist", err)
	}
	// Work runs on the thread, in a's namespace.
	var ino uint64
	if err := th.Run(func() error {
		f, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			return err
		}
		defer f.Close()
		ino, err = ns.Inode(f)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if want, _ := ns.Inode(a.File); ino != want {
		t.Fatalf("work ran in namespace %d, want %d", ino, want)
	}
}

// WriteSysctlsIn writes every key of one directory from a thread in the
// namespace.
func TestWriteSysctlsIn(t *testing.T) {
	a := netnstest.New(t)
	err := ns.Do(a.Fd(), func() error {
		return ns.WriteSysctlsIn("net/ipv6/conf/lo", [][2]string{{"hop_limit", "9"}, {"mtu", "1400"}})
	})
	if err != nil {
		t.Fatal(err)
	}
	for k, want := range map[string]string{"hop_limit": "9", "mtu": "1400"} {
		if got, err := ns.ReadSysctl(a.Fd(), "net/ipv6/conf/lo/"+k); err != nil || got != want {
			t.Errorf("%s = %q, %v; want %q", k, got, err, want)
		}
	}
	err = ns.Do(a.Fd(), func() error {
		return ns.WriteSysctlsIn("net/ipv6/conf/lo", [][2]string{{"nosuchkey", "1"}})
	})
	if err == nil {
		t.Fatal("a missing key was not an error")
	}
}
