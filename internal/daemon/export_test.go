package daemon

import (
	"context"

	"github.com/metald/metald/internal/network"
	"github.com/metald/metald/internal/network/secpolicy"
)

// InstallJoint exposes the one-transaction install to tests.
func (d *Daemon) InstallJoint(ctx context.Context, rules []network.NICPlan, policies []secpolicy.NICPolicy) error {
	return d.joint.InstallJoint(ctx, rules, policies)
}
