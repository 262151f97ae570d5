-- The audit trail stored one row per commit and stream instead of one per event. A transition
-- writes 1–5 events of its instance's stream (15 per seed instance): as rows, each was a tuple,
-- a primary-key entry and a JSON decode in the commit's statement, the largest share of
-- PostgreSQL's work per instance. A block holds consecutive events of one stream, each as it
-- was (seq, its hash and the previous one): the hash chain and what reads it are unchanged.
-- `(stream, first_seq)` still makes racing appends to one stream fail: both start at the
-- head's seq + 1. `last_seq` and `last_hash` are the head a next append chains onto.
CREATE TABLE audit_blocks (
    stream      TEXT NOT NULL,
    first_seq   BIGINT NOT NULL,
    last_seq    BIGINT NOT NULL,
    partner_id  TEXT NOT NULL,
    last_hash   TEXT NOT NULL,
    events      TEXT NOT NULL,            -- JSON array of the events, ascending seq
    PRIMARY KEY (stream, first_seq)
);
INSERT INTO audit_blocks (stream, first_seq, last_seq, partner_id, last_hash, events)
SELECT stream, seq, seq, partner_id, hash,
       json_build_array(json_build_object('seq', seq, 'at', at, 'actor', actor::json,
           'kind', kind, 'before', before_doc::json, 'after', after_doc::json,
           'reason', reason, 'prev_hash', prev_hash, 'hash', hash))::text
FROM audit_events;
DROP TABLE audit_events;
-- A block is ~2 KB (5 events), an instance's state document 2–4 KB: past PostgreSQL's 2 KB
-- threshold about half of each are compressed on every write, by default with pglz, which
-- cost ~13 µs per block here (an `INSERT` of 36,000 blocks: 860–910 ms with pglz, 410–470 ms
-- with lz4, the same size; uncompressed, 380–420 ms but 60 % larger). lz4 where this server
-- was built with it; the default otherwise. Applies to values written from now on.
DO $$
BEGIN
    ALTER TABLE audit_blocks ALTER COLUMN events SET COMPRESSION lz4;
    ALTER TABLE workflow_instances ALTER COLUMN state SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'lz4 is not available: the tables keep the default compression';
END $$;
