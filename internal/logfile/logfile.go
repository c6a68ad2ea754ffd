// Package logfile is an append-only log file that rotates by size, for
// metald's own log (metald.log) and the security log (security.log): when
// a write would take the file past its size limit, the file is renamed to
// <name>.1 (older ones move up: <name>.1 is the newest old file,
// <name>.<max files> the oldest kept) and a new one is started. A write is
// never split across files.
package logfile

import (
	"fmt"
	"os"
	"sync"
)

// Rotation defaults: 100 MiB per file, five old files kept.
const (
	DefaultMaxSize  = 100 << 20
	DefaultMaxFiles = 5
)

// File is a size-rotated log file. It is safe for concurrent use; each
// Write lands whole in one file.
type File struct {
	path     string
	maxSize  int64
	maxFiles int

	mu   sync.Mutex
	f    *os.File
	size int64
}

// Open opens path for appending (creating it, mode 0640). maxSize <= 0 and
// maxFiles <= 0 take the defaults.
func Open(path string, maxSize int64, maxFiles int) (*File, error) {
	if maxSize <= 0 {
		maxSize = DefaultMaxSize
	}
	if maxFiles <= 0 {
		maxFiles = DefaultMaxFiles
	}
	l := &File{path: path, maxSize: maxSize, maxFiles: maxFiles}
	if err := l.open(); err != nil {
		return nil, err
	}
	return l, nil
}

// Path returns the file's path.
func (l *File) Path() string { return l.path }

func (l *File) open() error {
	f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return fmt.Errorf("open log %s: %w", l.path, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("stat log %s: %w", l.path, err)
	}
	l.f, l.size = f, st.Size()
	return nil
}

// rotate moves the file to <name>.1 and opens a new one. When the move
// fails the old file is reopened, so logging goes on past the limit rather
// than stopping; l.f is nil only when no file could be opened.
func (l *File) rotate() error {
	err := l.f.Close()
	l.f = nil
	if err == nil {
		os.Remove(fmt.Sprintf("%s.%d", l.path, l.maxFiles))
		for i := l.maxFiles - 1; i >= 1; i-- {
			os.Rename(fmt.Sprintf("%s.%d", l.path, i), fmt.Sprintf("%s.%d", l.path, i+1))
		}
		err = os.Rename(l.path, l.path+".1")
	}
	if oerr := l.open(); oerr != nil {
		return oerr
	}
	if err != nil {
		return fmt.Errorf("rotate log %s: %w", l.path, err)
	}
	return nil
}

// Room returns how many bytes the file takes before the next rotation.
func (l *File) Room() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.maxSize - l.size
}

// Write appends p as one unit: when p would take the (non-empty) file
// past its size limit, the file is rotated first. A p larger than the
// limit goes whole into a file of its own.
func (l *File) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f == nil {
		return 0, os.ErrClosed
	}
	if l.size > 0 && l.size+int64(len(p)) > l.maxSize {
		if err := l.rotate(); err != nil && l.f == nil {
			return 0, err
		}
	}
	n, err := l.f.Write(p)
	l.size += int64(n)
	if err != nil {
		return n, fmt.Errorf("write log %s: %w", l.path, err)
	}
	return n, nil
}

// Close closes the file; later writes fail with os.ErrClosed.
func (l *File) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f == nil {
		return nil
	}
	err := l.f.Close()
	l.f = nil
	return err
}
