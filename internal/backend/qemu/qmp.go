package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"time"
)

// qmpError is an error QEMU returned for a command.
type qmpError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *qmpError) Error() string { return fmt.Sprintf("qmp: %s: %s", e.Class, e.Desc) }

// qmpConn is one QMP session on QEMU's unix socket. QEMU serves one client
// at a time, so sessions are short: open, negotiate, run commands, close.
type qmpConn struct {
	c  net.Conn
	rd *bufio.Reader
}

// dialQMP connects to path and leaves capabilities negotiation mode.
func dialQMP(ctx context.Context, path string) (*qmpConn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("connect qmp %s: %w", path, err)
	}
	q := &qmpConn{c: c, rd: bufio.NewReader(c)}
	deadline := time.Now().Add(10 * time.Second)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	c.SetDeadline(deadline)
	var greeting struct {
		QMP json.RawMessage `json:"QMP"`
	}
	line, err := q.rd.ReadBytes('\n')
	if err != nil || json.Unmarshal(line, &greeting) != nil || greeting.QMP == nil {
		c.Close()
		return nil, fmt.Errorf("qmp %s: no greeting: %v", path, err)
	}
	if _, err := q.run("qmp_capabilities", nil); err != nil {
		c.Close()
		return nil, err
	}
	return q, nil
}

func (q *qmpConn) Close() error { return q.c.Close() }

// run executes one command and returns its "return" value; events that
// arrive in between are skipped.
func (q *qmpConn) run(cmd string, args any) (json.RawMessage, error) {
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, _ := json.Marshal(req)
	if _, err := q.c.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("qmp %s: %w", cmd, err)
	}
	for {
		line, err := q.rd.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("qmp %s: %w", cmd, err)
		}
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *qmpError       `json:"error"`
			Event  string          `json:"event"`
		}
		if err := json.Unmarshal(line, &resp); err != nil {
			return nil, fmt.Errorf("qmp %s: bad reply %q: %w", cmd, line, err)
		}
		switch {
		case resp.Event != "":
			continue
		case resp.Error != nil:
			return nil, fmt.Errorf("qmp %s: %w", cmd, resp.Error)
		default:
			return resp.Return, nil
		}
	}
}

// qmpDo opens a session on path, runs cmd and closes the session.
func qmpDo(ctx context.Context, path, cmd string, args any) (json.RawMessage, error) {
	q, err := dialQMP(ctx, path)
	if err != nil {
		return nil, err
	}
	defer q.Close()
	return q.run(cmd, args)
}

// qmpStatus returns query-status's "status" ("running", "paused", ...).
func qmpStatus(ctx context.Context, path string) (string, error) {
	r, err := qmpDo(ctx, path, "query-status", nil)
	if err != nil {
		return "", err
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := json.Unmarshal(r, &st); err != nil {
		return "", fmt.Errorf("qmp query-status: %w", err)
	}
	if st.Status == "" {
		return "", errors.New("qmp query-status: empty status")
	}
	return st.Status, nil
}
