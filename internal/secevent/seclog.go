package secevent

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/metald/metald/internal/logfile"
)

// SecurityLogName is the file name of the security log in the log directory.
const SecurityLogName = "security.log"

// LogFile is <log-dir>/security.log: one JSON object per line per event.
// Violations carry "marker":"IPv6_VIOLATION" as their first field, so
// `grep IPv6_VIOLATION` selects them. When a write would take the file past
// MaxSize bytes the file is rotated (package logfile): security.log.1 is
// the newest old file, security.log.<MaxFiles> the oldest kept.
type LogFile struct {
	mu sync.Mutex
	f  *logfile.File
}

// OpenLogFile opens (appending) dir/security.log. maxSize <= 0 and
// maxFiles <= 0 take logfile's defaults.
func OpenLogFile(dir string, maxSize int64, maxFiles int) (*LogFile, error) {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("create log directory: %w", err)
	}
	f, err := logfile.Open(filepath.Join(dir, SecurityLogName), maxSize, maxFiles)
	if err != nil {
		return nil, err
	}
	return &LogFile{f: f}, nil
}

// Path returns the log file's path.
func (l *LogFile) Path() string { return l.f.Path() }

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

// Write appends events, rotating as needed: lines are written in as few
// writes as fit the current file, and a file ends at a line's end.
func (l *LogFile) Write(events []Event) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	var buf []byte
	flush := func() error {
		if len(buf) == 0 {
			return nil
		}
		_, err := l.f.Write(buf)
		buf = buf[:0]
		return err
	}
	room := l.f.Room()
	for i := range events {
		line := Line(&events[i])
		if len(buf) > 0 && int64(len(buf)+len(line)) > room {
			if err := flush(); err != nil {
				return err
			}
			room = l.f.Room()
		}
		buf = append(buf, line...)
	}
	return flush()
}

// Close closes the file.
func (l *LogFile) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.f.Close()
}
