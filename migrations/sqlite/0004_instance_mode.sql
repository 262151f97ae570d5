-- How an instance runs its PayOS operations: 'live', or 'simulate' (transfer actions go to the
-- simulation endpoint instead). Existing instances are live.
ALTER TABLE workflow_instances ADD COLUMN mode TEXT NOT NULL DEFAULT 'live';
