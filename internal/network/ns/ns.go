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
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

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

// Thread is one OS thread that joined a network namespace and stays there,
// running the functions it is given in turn. Work that would otherwise take
// a fresh thread per call (Do) pays for one channel hand-off instead.
//
// It also keeps the directories of its sysctls open. Each namespace has
// its own /proc/sys/net/ipv6 (and ipv4, ...) and the kernel finds the one
// of the caller's namespace by comparing every namespace's entry in turn:
// measured, opening a key under /proc/sys/net/ipv6 took 19 µs with one
// other namespace on the host and 89 µs with 500. A key opened relative to
// its held directory ("net/ipv6/conf") skips that search (WriteSysctl,
// ReadSysctl); such directories exist as long as the namespace does.
type Thread struct {
	work chan func()
	done chan struct{}
	// dirs holds open sysctl directories by path ("net/ipv6/conf"); only
	// the thread uses it.
	dirs map[string]int
}

// NewThread starts a thread in the namespace open at fd. Close stops it.
func NewThread(fd int) (*Thread, error) {
	t := &Thread{work: make(chan func()), done: make(chan struct{}), dirs: map[string]int{}}
	errc := make(chan error, 1)
	go func() {
		// Never unlocked: the thread leaves with the goroutine.
		runtime.LockOSThread()
		defer close(t.done)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("enter network namespace: %w", err)
			return
		}
		defer func() {
			for _, d := range t.dirs {
				unix.Close(d)
			}
		}()
		errc <- nil
		for f := range t.work {
			f()
		}
	}()
	if err := <-errc; err != nil {
		return nil, err
	}
	return t, nil
}

// Run runs f on the thread and returns its error.
func (t *Thread) Run(f func() error) error {
	errc := make(chan error, 1)
	t.work <- func() { errc <- f() }
	return <-errc
}

// Close stops the thread after the work it was given.
func (t *Thread) Close() {
	close(t.work)
	<-t.done
}

// sysctlAt opens a /proc/sys key ("net/ipv6/conf/all/forwarding"). A key
// under net/ with at least four parts is opened relative to its first
// three ("net/ipv6/conf"), held open after the first use.
func (t *Thread) sysctlAt(key string, flags int) (*os.File, error) {
	dir, rel := unix.AT_FDCWD, filepath.Join("/proc/sys", key)
	if parts := strings.SplitN(key, "/", 4); len(parts) == 4 && parts[0] == "net" {
		name := strings.Join(parts[:3], "/")
		d, ok := t.dirs[name]
		if !ok {
			var err error
			d, err = unix.Open(filepath.Join("/proc/sys", name), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
			if err != nil {
				return nil, &os.PathError{Op: "open", Path: filepath.Join("/proc/sys", name), Err: err}
			}
			t.dirs[name] = d
		}
		dir, rel = d, parts[3]
	}
	fd, err := unix.Openat(dir, rel, flags|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: filepath.Join("/proc/sys", key), Err: err}
	}
	return os.NewFile(uintptr(fd), key), nil
}

// WriteSysctl writes a /proc/sys value in the thread's namespace.
func (t *Thread) WriteSysctl(key, value string) error {
	return t.Run(func() error {
		f, err := t.sysctlAt(key, unix.O_WRONLY)
		if err != nil {
			return err
		}
		_, err = f.WriteString(value)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		return err
	})
}

// ReadSysctl reads a /proc/sys value in the thread's namespace, without
// the trailing newline.
func (t *Thread) ReadSysctl(key string) (string, error) {
	var v []byte
	err := t.Run(func() error {
		f, err := t.sysctlAt(key, unix.O_RDONLY)
		if err != nil {
			return err
		}
		defer f.Close()
		v, err = io.ReadAll(f)
		return err
	})
	return strings.TrimRight(string(v), "\n"), err
}

// WriteSysctlsIn writes several keys of one /proc/sys directory
// ("net/ipv6/conf/eth0") from the calling thread, which must be in the
// target namespace: the directory is looked up once.
func WriteSysctlsIn(dir string, kv [][2]string) error {
	d, err := unix.Open(filepath.Join("/proc/sys", dir), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: filepath.Join("/proc/sys", dir), Err: err}
	}
	defer unix.Close(d)
	for _, p := range kv {
		fd, err := unix.Openat(d, p[0], unix.O_WRONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("set sysctl %s/%s=%s: %w", dir, p[0], p[1], err)
		}
		_, err = unix.Write(fd, []byte(p[1]))
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("set sysctl %s/%s=%s: %w", dir, p[0], p[1], err)
		}
	}
	return nil
}
