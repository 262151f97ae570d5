-- One outbox row may hold every message of one write (crates/store/src/outbox.rs): `messages`
-- says how many; above 1, `payload` packs them and `id`, `topic`, `msg_key` are the last
-- one's. A commit's several messages were as many rows inserted, indexed and deleted.
ALTER TABLE outbox ADD COLUMN messages BIGINT NOT NULL DEFAULT 1;
