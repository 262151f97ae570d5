-- Durable timers (wait steps, approval deadlines), written in the same transaction as the state
-- change that needs them. The scheduler fires due ones by writing the fired-timer command to the
-- outbox and setting fired_at, in one transaction: each timer fires once.
CREATE TABLE timers (
    id           TEXT PRIMARY KEY NOT NULL,
    partner_id   TEXT NOT NULL,
    instance_id  TEXT NOT NULL,
    step_index   INTEGER NOT NULL,
    step_type    TEXT NOT NULL,
    kind         TEXT NOT NULL,
    due_at       INTEGER NOT NULL,
    fired_at     INTEGER
);
CREATE INDEX timers_due ON timers (due_at) WHERE fired_at IS NULL;
