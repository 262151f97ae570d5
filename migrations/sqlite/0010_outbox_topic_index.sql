-- The same index as PostgreSQL's migration 0010, so both schemas stay alike: the relay's event
-- lane reads one topic's rows in commit order by it. The embedded runtime keeps its lifecycle
-- events on the fast path (no lane), so here it serves only a store that runs one.
CREATE INDEX outbox_topic_seq ON outbox (topic, seq);
