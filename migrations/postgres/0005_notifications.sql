-- Notification deliveries (notification steps, approval notices) and the per-partner Standard
-- Webhooks secrets. A delivery row is written in the same transaction as the state change that
-- queues it (transactional outbox); the delivery pool claims it, records every attempt, and
-- either delivers it, schedules the next attempt (RETRY_SCHEDULE) or dead-letters it.

-- One signing secret per partner, created on first use. During a rotation the previous secret
-- still signs until previous_expires_at. Stored as is: an HMAC key cannot be hashed.
CREATE TABLE webhook_secrets (
    partner_id           TEXT PRIMARY KEY NOT NULL,
    secret               TEXT NOT NULL,
    previous_secret      TEXT,
    previous_expires_at  BIGINT,
    created_at           BIGINT NOT NULL,
    rotated_at           BIGINT
);

CREATE TABLE notification_deliveries (
    id              TEXT PRIMARY KEY NOT NULL,  -- deterministic; also the webhook-id
    partner_id      TEXT NOT NULL,
    instance_id     TEXT NOT NULL,
    step_index      BIGINT NOT NULL,
    purpose         TEXT NOT NULL,              -- step | approval_requested | approval_reminder | approval_overdue
    channel         TEXT NOT NULL,              -- webhook | email
    target          TEXT NOT NULL,              -- the URL or the address
    request         TEXT NOT NULL,              -- JSON: what is sent, the same bytes on every attempt
    wait            BIGINT NOT NULL CHECK (wait IN (0, 1)),
    status          TEXT NOT NULL,              -- queued | sending | retrying | delivered | dead_lettered
    attempts        BIGINT NOT NULL DEFAULT 0,      -- every attempt ever made
    round_failures  BIGINT NOT NULL DEFAULT 0,      -- failed attempts since queued or redelivered
    next_check_at   BIGINT,                         -- when the pool must look again (NULL: never)
    last_error      TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    delivered_at    BIGINT
);
CREATE INDEX notification_deliveries_instance ON notification_deliveries (partner_id, instance_id, created_at);
CREATE INDEX notification_deliveries_check ON notification_deliveries (next_check_at) WHERE next_check_at IS NOT NULL;

-- The delivery log: one row per attempt.
CREATE TABLE notification_attempts (
    delivery_id       TEXT NOT NULL,
    seq               BIGINT NOT NULL,
    partner_id        TEXT NOT NULL,
    attempted_at      BIGINT NOT NULL,
    status_code       BIGINT,
    latency_ms        BIGINT NOT NULL,
    response_snippet  TEXT NOT NULL,
    error             TEXT,
    succeeded         BIGINT NOT NULL CHECK (succeeded IN (0, 1)),
    PRIMARY KEY (delivery_id, seq)
);
