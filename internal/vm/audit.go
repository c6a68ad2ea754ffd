package vm

import (
	"context"

	"github.com/metald/metald/internal/store"
)

type callerKey struct{}

// WithCaller records who makes a request (the API layer sets it), for the
// audit log.
func WithCaller(ctx context.Context, caller string) context.Context {
	return context.WithValue(ctx, callerKey{}, caller)
}

func callerOf(ctx context.Context) string {
	c, _ := ctx.Value(callerKey{}).(string)
	return c
}

// audit records a change to a VM whose config asks for an audit log
// (compliance.audit_logging). A failure to record is logged, not returned:
// the change has happened.
func (m *Manager) audit(ctx context.Context, row *store.VM, action, detail string) {
	cfg, err := decodeConfig(row)
	if err != nil || !cfg.GetCompliance().GetAuditLogging() {
		return
	}
	e := store.AuditEntry{VMID: row.ID, At: m.opt.Now().UTC(), Action: action, Caller: callerOf(ctx), Detail: detail}
	if err := m.opt.Store.AppendAudit(context.WithoutCancel(ctx), e); err != nil {
		m.log.Error("record audit entry", "vm_id", row.ID, "action", action, "err", err)
	}
}

// Audit returns a VM's audit entries ("" for every VM).
func (m *Manager) Audit(ctx context.Context, vmID string) ([]store.AuditEntry, error) {
	return m.opt.Store.ListAudit(ctx, vmID)
}
