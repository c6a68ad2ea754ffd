package vm

import (
	"crypto/sha1"
	"encoding/binary"
	"testing"
)

// sha1Block is SHA-1's compression function: on a message that fits one
// block with its padding, it gives crypto/sha1's digest.
func TestSHA1Block(t *testing.T) {
	for _, msg := range []string{"", "abc", "metald stable privacy 0123456789abcdef0123456789abcde"} {
		var block [64]byte
		copy(block[:], msg)
		block[len(msg)] = 0x80
		binary.BigEndian.PutUint64(block[56:], uint64(len(msg))*8)
		got := sha1Block(block)
		want := sha1.Sum([]byte(msg))
		for i := range got {
			if got[i] != binary.BigEndian.Uint32(want[i*4:]) {
				t.Fatalf("%q: word %d = %08x, want %08x", msg, i, got[i], binary.BigEndian.Uint32(want[i*4:]))
			}
		}
	}
}
