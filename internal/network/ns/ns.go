// Package ns owns metald's access to Linux network namespaces: creating them
// (anonymous or bind-mounted under a name), and running code or commands
// inside one without disturbing any other goroutine.
//
// Every function that enters a namespace does so on a dedicated OS thread
// that is locked and never unlocked, so the Go runtime discards the thread
// when the goroutine ends and no other goroutine ever runs in a foreign
// namespace.
package ns

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"

	"golang.org/x/sys/unix"
)

// ErrNotExist reports a named namespace that does not exist.
var ErrNotExist = errors.New("network namespace does not exist")

// Do runs f on a fresh OS thread that has joined the network namespace open
// at fd. The thread dies with the call. Commands started from f (exec.Cmd)
// inherit the namespace.
func Do(fd int, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		// Never unlocked: the thread is tainted and must exit with us.
		runtime.LockOSThread()
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("enter network namespace: %w", err)
			return
		}
		errc <- f()
	}()
	return <-errc
}

// New creates an anonymous network namespace and returns an open file for
// it. The namespace lives as long as the file (or anything in it) does.
func New() (*os.File, error) {
	type result struct {
		f   *os.File
		err error
	}
	rc := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			rc <- result{err: fmt.Errorf("unshare network namespace: %w", err)}
			return
		}
		f, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			rc <- result{err: fmt.Errorf("open new network namespace: %w", err)}
			return
		}
		rc <- result{f: f}
	}()
	r := <-rc
	return r.f, r.err
}

// CreateNamed creates a network namespace bind-mounted at path (as
// `ip netns add` does under /run/netns) and returns an open file for it.
// It fails if path already exists.
func CreateNamed(path string) (*os.File, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create namespace directory: %w", err)
	}
	mark, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return nil, fmt.Errorf("create namespace file: %w", err)
	}
	mark.Close()
	f, err := New()
	if err != nil {
		os.Remove(path)
		return nil, err
	}
	src := fmt.Sprintf("/proc/self/fd/%d", f.Fd())
	if err := unix.Mount(src, path, "none", unix.MS_BIND, ""); err != nil {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("bind-mount network namespace at %s: %w", path, err)
	}
	return f, nil
}

// OpenNamed opens a bind-mounted namespace. It returns ErrNotExist when the
// path is absent or is not a mounted network namespace.
func OpenNamed(path string) (*os.File, error) {
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, ErrNotExist
		}
		return nil, err
	}
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, err
	}
	if st.Type != unix.NSFS_MAGIC {
		f.Close()
		return nil, fmt.Errorf("%s: %w (not mounted)", path, ErrNotExist)
	}
	return f, nil
}

// RemoveNamed unmounts and removes a named namespace. A missing path is not
// an error. The namespace itself lives on while anything still uses it.
func RemoveNamed(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove %s: %w", path, err)
	}
	return nil
}

// Inode returns the namespace identity (inode number) of an open namespace.
func Inode(f *os.File) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// Command runs cmd to completion inside the namespace at fd and returns its
// combined output.
func Command(fd int, cmd *exec.Cmd) ([]byte, error) {
	var out []byte
	err := Do(fd, func() error {
		var err error
		out, err = cmd.CombinedOutput()
		return err
	})
	return out, err
}

// Start starts cmd inside the namespace at fd without waiting for it.
func Start(fd int, cmd *exec.Cmd) error {
	return Do(fd, cmd.Start)
}

// WriteSysctl writes a /proc/sys value (e.g. "net/ipv6/conf/all/forwarding")
// as seen from inside the namespace at fd.
func WriteSysctl(fd int, key, value string) error {
	return Do(fd, func() error {
		return os.WriteFile(filepath.Join("/proc/sys", key), []byte(value), 0o644)
	})
}

// ReadSysctl reads a /proc/sys value inside the namespace at fd.
func ReadSysctl(fd int, key string) (string, error) {
	var v []byte
	err := Do(fd, func() error {
		var err error
		v, err = os.ReadFile(filepath.Join("/proc/sys", key))
		return err
	})
	if err != nil {
		return "", err
	}
	for len(v) > 0 && (v[len(v)-1] == '\n') {
		v = v[:len(v)-1]
	}
	return string(v), nil
}
