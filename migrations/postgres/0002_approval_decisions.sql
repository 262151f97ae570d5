-- The outcome of every approval decision command, so the API that queued a decision can answer
-- its caller with the result the approval pool reached. Accepted decisions are also in the
-- instance's state document; refused ones change nothing else.
CREATE TABLE approval_decisions (
    decision_id  TEXT PRIMARY KEY NOT NULL,
    partner_id   TEXT NOT NULL,
    instance_id  TEXT NOT NULL,
    step_index   INTEGER NOT NULL,
    accepted     BIGINT NOT NULL CHECK (accepted IN (0, 1)),
    code         TEXT,
    message      TEXT,
    decided_at   BIGINT NOT NULL
);
CREATE INDEX approval_decisions_instance ON approval_decisions (partner_id, instance_id);
