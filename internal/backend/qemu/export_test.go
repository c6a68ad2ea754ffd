package qemu

import (
	"context"
	"encoding/json"
)

// QMPForTest runs one QMP command on the socket at path.
func QMPForTest(ctx context.Context, path, cmd string) (json.RawMessage, error) {
	return qmpDo(ctx, path, cmd, nil)
}
