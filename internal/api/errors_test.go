package api

import (
	"errors"
	"fmt"
	"testing"

	"connectrpc.com/connect"
	"google.golang.org/genproto/googleapis/rpc/errdetails"

	"github.com/metald/metald/internal/ipam"
	"github.com/metald/metald/internal/vm"
)

// TestFieldDetailOnEveryCode: an error of the caller's that names a field
// carries the BadRequest detail whatever its code; internal errors and
// messages without a field path carry none.
func TestFieldDetailOnEveryCode(t *testing.T) {
	field := func(err error) string {
		var ce *connect.Error
		if !errors.As(err, &ce) {
			return "(not a connect error)"
		}
		for _, d := range ce.Details() {
			if v, err := d.Value(); err == nil {
				if br, ok := v.(*errdetails.BadRequest); ok {
					return br.GetFieldViolations()[0].GetField()
				}
			}
		}
		return ""
	}
	for _, c := range []struct {
		err   error
		code  connect.Code
		field string
	}{
		{fmt.Errorf("config.network[0].ipv6.address: %w", ipam.ErrConflict), connect.CodeAlreadyExists, "config.network[0].ipv6.address"},
		{fmt.Errorf("config.network[1].ipv6.address: %w", ipam.ErrPermission), connect.CodePermissionDenied, "config.network[1].ipv6.address"},
		{fmt.Errorf("create vm x: %w", vm.ErrExists), connect.CodeAlreadyExists, ""},
		{errors.New("config.network[0].bridge_name: boom"), connect.CodeInternal, ""},
	} {
		err := toConnect(c.err)
		if connect.CodeOf(err) != c.code || field(err) != c.field {
			t.Errorf("%v: code %v field %q, want %v %q", c.err, connect.CodeOf(err), field(err), c.code, c.field)
		}
	}
}
