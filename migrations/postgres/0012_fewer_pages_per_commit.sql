-- The partner-prefixed instance indexes go ascending on `id`, as on SQLite (its migration 0012
-- says why), so both schemas stay alike. Ids are UUIDv7: a new instance's id is the largest of
-- its partner, and with `id DESC` every insert landed at the left end of the partner's range;
-- `ORDER BY id DESC` reads the ascending index backwards. (The outbox's seq is a sequence here,
-- without SQLite's per-commit `sqlite_sequence` write, and stays as it is.)
-- Not CONCURRENTLY, for the reason migration 0009 gives.
DROP INDEX IF EXISTS workflow_instances_partner_id;
DROP INDEX IF EXISTS workflow_instances_partner_status;
DROP INDEX IF EXISTS workflow_instances_partner_template;
CREATE INDEX workflow_instances_partner_id ON workflow_instances (partner_id, id);
CREATE INDEX workflow_instances_partner_status ON workflow_instances (partner_id, status, id);
CREATE INDEX workflow_instances_partner_template ON workflow_instances (partner_id, template_id, id);
