-- The relay's event lane takes the rows of one topic (lifecycle events) in commit order, many
-- times a second: by this index, instead of a scan of the whole outbox table, which a queue's
-- churn keeps many pages long (a scan read ~10 MB and took ~4 ms under load).
-- Not CONCURRENTLY, for the reason migration 0009 gives; the outbox holds only the rows in flight.
CREATE INDEX outbox_topic_seq ON outbox (topic, seq);
