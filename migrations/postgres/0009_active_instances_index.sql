-- The instances a restarted engine resumes (`Store::list_active_instances`) are the running and
-- waiting ones: a partial index of those replaces (status, id) over every instance. An
-- instance's last update (to a terminal status) no longer adds an index entry, and the index
-- holds only the instances in flight instead of every one ever run.
-- Not CONCURRENTLY: every process migrates at start, serialised by an advisory lock, and a
-- concurrent build would wait for the snapshots of processes blocked on that lock (which can deadlock).
-- The build holds a SHARE lock, so instance writes wait while it scans the table.
DROP INDEX IF EXISTS workflow_instances_status_id;
CREATE INDEX workflow_instances_active ON workflow_instances (id)
    WHERE status IN ('running', 'waiting');
