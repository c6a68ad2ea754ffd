package vm

import (
	"errors"
	"testing"
)

func TestSpecError(t *testing.T) {
	for in, want := range map[string]string{
		"boot.kernel_path: no such file":           "config.boot.kernel_path",
		"storage[1].path (rootfs): not a file":     "config.storage[1].path",
		`boot.kernel_args: "metald.x" is reserved`: "config.boot.kernel_args",
		"something odd":                            "config",
	} {
		var ve *ValidationError
		if !errors.As(specError(errors.New(in)), &ve) || ve.Violations[0].Field != want {
			t.Errorf("%q → %+v, want field %s", in, ve, want)
		}
	}
}
