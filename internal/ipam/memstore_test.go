package ipam_test

import (
	"testing"

	"github.com/metald/metald/internal/ipam"
	"github.com/metald/metald/internal/store/storetest"
)

func TestMemStoreConformance(t *testing.T) {
	storetest.RunIPAM(t, func(t *testing.T) ipam.Store { return ipam.NewMemStore() })
}
