package secevent

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync"
)

// SecurityLogName is the file name of the security log in the log directory.
const SecurityLogName = "security.log"

// LogFile is <log-dir>/security.log: one JSON object per line per event.
// Violations carry "marker":"IPv6_VIOLATION" as their first field, so
// `grep IPv6_VIOLATION` selects them. When a write would take the file past
// MaxSize bytes the file is rotated: security.log.1 is the newest old file,
// security.log.<MaxFiles> the oldest kept.
type LogFile struct {
	path     string
	maxSize  int64
	maxFiles int

	mu   sync.Mutex
	f    *os.File
	size int64
}

// DefaultLogMaxSize and DefaultLogMaxFiles are the rotation defaults.
const (
	DefaultLogMaxSize  = 100 << 20
	DefaultLogMaxFiles = 5
)

// OpenLogFile opens (appending) dir/security.log. maxSize <= 0 and
// maxFiles <= 0 take the defaults.
func OpenLogFile(dir string, maxSize int64, maxFiles int) (*LogFile, error) {
	if maxSize <= 0 {
		maxSize = DefaultLogMaxSize
	}
	if maxFiles <= 0 {
		maxFiles = DefaultLogMaxFiles
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("create log directory: %w", err)
	}
	l := &LogFile{path: filepath.Join(dir, SecurityLogName), maxSize: maxSize, maxFiles: maxFiles}
	if err := l.open(); err != nil {
		return nil, err
	}
	return l, nil
}

// Path returns the log file's path.
func (l *LogFile) Path() string { return l.path }

func (l *LogFile) open() error {
	f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return fmt.Errorf("open security log: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("stat security log: %w", err)
	}
	l.f, l.size = f, st.Size()
	return nil
}

func (l *LogFile) rotate() error {
	if err := l.f.Close(); err != nil {
		return fmt.Errorf("close security log: %w", err)
	}
	os.Remove(fmt.Sprintf("%s.%d", l.path, l.maxFiles))
	for i := l.maxFiles - 1; i >= 1; i-- {
		os.Rename(fmt.Sprintf("%s.%d", l.path, i), fmt.Sprintf("%s.%d", l.path, i+1))
	}
	if err := os.Rename(l.path, l.path+".1"); err != nil {
		return fmt.Errorf("rotate security log: %w", err)
	}
	return l.open()
}

// logLine is the security.log form of an event: the marker first, then the
// event's own fields.
type logLine struct {
	Marker string `json:"marker,omitempty"`
	Event
}

// Line returns the security.log line (with trailing newline) for e.
func Line(e *Event) []byte {
	ln := logLine{Event: *e}
	if e.Type.Violation() {
		ln.Marker = ViolationMarker
	}
	b, _ := json.Marshal(ln)
	return append(b, '\n')
}

// Write appends events, rotating as needed.
func (l *LogFile) Write(events []Event) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f == nil {
		return os.ErrClosed
	}
	var buf []byte
	flush := func() error {
		if len(buf) == 0 {
			return nil
		}
		n, err := l.f.Write(buf)
		l.size += int64(n)
		buf = buf[:0]
		if err != nil {
			return fmt.Errorf("write security log: %w", err)
		}
		return nil
	}
	for i := range events {
		line := Line(&events[i])
		if l.size+int64(len(buf)+len(line)) > l.maxSize && l.size+int64(len(buf)) > 0 {
			if err := flush(); err != nil {
				return err
			}
			if err := l.rotate(); err != nil {
				return err
			}
		}
		buf = append(buf, line...)
	}
	return flush()
}

// Close closes the file.
func (l *LogFile) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f == nil {
		return nil
	}
	err := l.f.Close()
	l.f = nil
	return err
}
