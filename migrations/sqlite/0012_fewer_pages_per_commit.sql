-- Fewer pages written per commit (docs/benchmarks.md, round 21, item 99: the WAL frames of a
-- run at 1,000 instances/s, counted per b-tree).
--
-- * The partner-prefixed instance indexes go ascending on `id`. Ids are UUIDv7, so a new
--   instance's id is the largest of its partner: with `id DESC` every insert landed at the left
--   end of the partner's range and split pages there, where SQLite's b-tree fills pages best
--   when keys arrive at the right end. `ORDER BY id DESC` reads the same index backwards.
-- * The outbox's `seq` stays the rowid but loses AUTOINCREMENT, which rewrote the
--   `sqlite_sequence` row (a page) in every commit that queued a message. A new row's rowid is
--   still one more than the largest in the table, so the rows in flight keep their commit
--   order; a value may be used again once the rows above it are gone, and nothing keeps a seq
--   past its row (messages are identified by `id`).
DROP INDEX IF EXISTS workflow_instances_partner_id;
DROP INDEX IF EXISTS workflow_instances_partner_status;
DROP INDEX IF EXISTS workflow_instances_partner_template;
CREATE INDEX workflow_instances_partner_id ON workflow_instances (partner_id, id);
CREATE INDEX workflow_instances_partner_status ON workflow_instances (partner_id, status, id);
CREATE INDEX workflow_instances_partner_template ON workflow_instances (partner_id, template_id, id);

CREATE TABLE outbox_next (
    seq      INTEGER PRIMARY KEY,
    id       TEXT NOT NULL UNIQUE,
    topic    TEXT NOT NULL,
    msg_key  TEXT NOT NULL,
    payload  BLOB NOT NULL
);
INSERT INTO outbox_next (seq, id, topic, msg_key, payload)
SELECT seq, id, topic, msg_key, payload FROM outbox ORDER BY seq;
DROP TABLE outbox;
ALTER TABLE outbox_next RENAME TO outbox;
CREATE INDEX outbox_topic_seq ON outbox (topic, seq);
