-- Indexes no query needed, each written on every insert (audit events: ~15 per instance):
-- * audit_events (partner_id, stream, seq): streams are read by (stream, seq), the primary key,
--   with the partner checked on the row. Dropping it: +6 % embedded instances/s.
-- * approval_decisions (partner_id, instance_id): outcomes are read by decision id. A
--   partner-prefixed index is also the planner trap 0007 describes.
-- * workflow_step_executions (partner_id, step_type, status) becomes a partial index of the
--   one query it served, GET /v1/workflows/pending: only waiting approval steps are in it (so
--   other steps' upserts never touch it), in the query's order.
DROP INDEX IF EXISTS audit_events_partner_stream;
DROP INDEX IF EXISTS approval_decisions_instance;
DROP INDEX IF EXISTS workflow_step_executions_partner;
CREATE INDEX workflow_step_executions_waiting_approvals
    ON workflow_step_executions (partner_id, started_at, instance_id)
    WHERE step_type = 'approval' AND status = 'waiting';
