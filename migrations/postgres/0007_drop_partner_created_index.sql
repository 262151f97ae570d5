-- The (partner_id, created_at) index let the planner answer "this partner's instance with this
-- id" by scanning every instance of the partner (a new partner is rare in the statistics, so
-- every partner_id-prefixed index looks equally cheap): under load, half of the single-instance
-- lookups read thousands of rows. Created-range filters use (partner_id, id DESC) instead: ids
-- are UUIDv7, ordered by creation time.
DROP INDEX IF EXISTS workflow_instances_partner_created;
