-- Initial schema (PostgreSQL). Kept in step with ../sqlite/0001_init.sql: same tables, same
-- columns, same numbering. Portable types only, because one sqlx `Any` implementation serves
-- both backends: ids and JSON as TEXT, timestamps as BIGINT milliseconds since the epoch,
-- booleans as BIGINT 0/1, bytes as BYTEA.

CREATE TABLE partners (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

-- Only the SHA-256 of a key is stored; the key itself never is.
CREATE TABLE api_keys (
    key_hash    TEXT PRIMARY KEY NOT NULL,
    id          TEXT NOT NULL UNIQUE,
    partner_id  TEXT NOT NULL REFERENCES partners (id),
    actor_id    TEXT NOT NULL,
    actor_type  TEXT NOT NULL,
    roles       TEXT NOT NULL,            -- JSON array of strings
    created_at  BIGINT NOT NULL
);
CREATE INDEX api_keys_partner ON api_keys (partner_id);

-- One row per template: what is shared by all its versions.
CREATE TABLE workflow_template_heads (
    id              TEXT PRIMARY KEY NOT NULL,
    partner_id      TEXT NOT NULL,
    latest_version  BIGINT NOT NULL,
    active          BIGINT NOT NULL CHECK (active IN (0, 1)),
    created_at      BIGINT NOT NULL
);
CREATE INDEX workflow_template_heads_partner_id ON workflow_template_heads (partner_id, id DESC);

-- Immutable template versions.
CREATE TABLE workflow_templates (
    id            TEXT NOT NULL REFERENCES workflow_template_heads (id),
    version       BIGINT NOT NULL,
    partner_id    TEXT NOT NULL,
    name          TEXT NOT NULL,
    trigger_type  TEXT NOT NULL,
    doc           TEXT NOT NULL,          -- JSON
    created_at    BIGINT NOT NULL,
    created_by    TEXT NOT NULL,
    PRIMARY KEY (id, version)
);
CREATE INDEX workflow_templates_partner ON workflow_templates (partner_id, id);

CREATE TABLE workflow_instances (
    id                TEXT PRIMARY KEY NOT NULL,
    partner_id        TEXT NOT NULL,
    template_id       TEXT NOT NULL,
    template_version  BIGINT NOT NULL,
    status            TEXT NOT NULL,
    current_step      BIGINT,
    idempotency_key   TEXT,
    created_by        TEXT NOT NULL,      -- JSON actor
    trigger_data      TEXT NOT NULL,      -- JSON
    state             TEXT NOT NULL,      -- JSON InstanceState: the source of truth
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    version           BIGINT NOT NULL,
    CONSTRAINT workflow_instances_idempotency UNIQUE (partner_id, idempotency_key)
);
CREATE INDEX workflow_instances_partner_id ON workflow_instances (partner_id, id DESC);
CREATE INDEX workflow_instances_partner_status ON workflow_instances (partner_id, status, id DESC);
CREATE INDEX workflow_instances_partner_template ON workflow_instances (partner_id, template_id, id DESC);
CREATE INDEX workflow_instances_partner_created ON workflow_instances (partner_id, created_at);
CREATE INDEX workflow_instances_status_id ON workflow_instances (status, id);

-- A mirror of `state.steps`, upserted on every commit, for queries and analytics. The state
-- document stays the source of truth.
CREATE TABLE workflow_step_executions (
    instance_id  TEXT NOT NULL REFERENCES workflow_instances (id),
    step_index   BIGINT NOT NULL,
    partner_id   TEXT NOT NULL,
    name         TEXT NOT NULL,
    step_type    TEXT NOT NULL,
    status       TEXT NOT NULL,
    started_at   BIGINT,
    finished_at  BIGINT,
    actor        TEXT,                    -- JSON actor
    input        TEXT,                    -- JSON
    output       TEXT,                    -- JSON
    error        TEXT,
    PRIMARY KEY (instance_id, step_index)
);
CREATE INDEX workflow_step_executions_partner ON workflow_step_executions (partner_id, step_type, status);

-- Transactional outbox: messages written with the change that caused them, published later.
CREATE TABLE outbox (
    seq      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id       TEXT NOT NULL UNIQUE,
    topic    TEXT NOT NULL,
    msg_key  TEXT NOT NULL,
    payload  BYTEA NOT NULL
);

-- Hash-chained audit trail; (stream, seq) makes racing appends to one stream fail.
CREATE TABLE audit_events (
    stream      TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    partner_id  TEXT NOT NULL,
    at          BIGINT NOT NULL,
    actor       TEXT NOT NULL,            -- JSON actor
    kind        TEXT NOT NULL,
    before_doc  TEXT NOT NULL,            -- JSON
    after_doc   TEXT NOT NULL,            -- JSON
    reason      TEXT,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL,
    PRIMARY KEY (stream, seq)
);
CREATE INDEX audit_events_partner_stream ON audit_events (partner_id, stream, seq);
