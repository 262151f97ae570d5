-- The relay's event lane takes the rows of one topic (lifecycle events) in commit order, many
-- times a second. This index lets a pass read just those rows in order; without it each pass
-- scanned the whole table, which a queue's churn keeps many pages long (~10 MB, ~4 ms a pass
-- under load). The planner still picks a scan when its statistics make that look cheaper.
-- Not CONCURRENTLY, for the reason migration 0009 gives; the outbox holds only the rows in flight.
CREATE INDEX outbox_topic_seq ON outbox (topic, seq);
