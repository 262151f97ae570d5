-- The audit trail stored one row per commit and stream instead of one per event. A transition
-- writes 1–5 events of its instance's stream (15 per seed instance): as rows, each was a
-- b-tree insert in the writer's commit. A block holds consecutive events of one stream, each
-- as it was (seq, its hash and the previous one): the hash chain and what reads it are
-- unchanged. `(stream, first_seq)` still makes racing appends to one stream fail: both start
-- at the head's seq + 1. `last_seq` and `last_hash` are the head a next append chains onto.
CREATE TABLE audit_blocks (
    stream      TEXT NOT NULL,
    first_seq   INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    partner_id  TEXT NOT NULL,
    last_hash   TEXT NOT NULL,
    events      TEXT NOT NULL,            -- JSON array of the events, ascending seq
    PRIMARY KEY (stream, first_seq)
);
INSERT INTO audit_blocks (stream, first_seq, last_seq, partner_id, last_hash, events)
SELECT stream, seq, seq, partner_id, hash,
       json_array(json_object('seq', seq, 'at', at, 'actor', json(actor),
           'kind', kind, 'before', json(before_doc), 'after', json(after_doc),
           'reason', reason, 'prev_hash', prev_hash, 'hash', hash))
FROM audit_events;
DROP TABLE audit_events;
