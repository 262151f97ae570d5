-- The PayOS SANDBOX's ledger (dev and local runs only; NOT real money, NOT real transfers).
-- `payos-workflows dev` and `payos-workflows sandbox` record every successful call the sandbox
-- answers here, so its idempotency survives a restart: a call whose Idempotency-Key is taken
-- replays the recorded response instead of executing again. Nothing of the engine reads or
-- writes this table; real transfers live in PayOS. Kept in step with ../postgres/.
CREATE TABLE payos_sandbox_transfers (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,  -- recording order
    idempotency_key  TEXT NOT NULL UNIQUE,               -- one recorded call per key
    action           TEXT NOT NULL,                      -- execute_transfer | cancel_transfer | simulate_transfer
    transfer_id      TEXT NOT NULL,
    request          TEXT NOT NULL,                      -- JSON: the body as received
    fingerprint      TEXT NOT NULL,                      -- SHA-256 of action, transfer id and body
    status           INTEGER NOT NULL,                   -- the HTTP status answered
    response         TEXT NOT NULL,                      -- JSON: the body answered (replayed as is)
    recorded_at      INTEGER NOT NULL
);
CREATE INDEX payos_sandbox_transfers_transfer ON payos_sandbox_transfers (transfer_id, seq);
