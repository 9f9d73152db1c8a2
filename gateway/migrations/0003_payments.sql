-- Provider payouts: withdrawals move money provider → payouts in flight → external
-- (paid) or back to the provider (failed). Idempotency keys make retried requests safe.
CREATE TABLE IF NOT EXISTS withdrawals (
    id TEXT PRIMARY KEY,
    provider_id TEXT NOT NULL REFERENCES providers(id),
    amount BIGINT NOT NULL,
    fee BIGINT NOT NULL,
    status TEXT NOT NULL,
    method TEXT NOT NULL,
    idempotency_key TEXT,
    request_hash TEXT NOT NULL,
    automatic BIGINT NOT NULL DEFAULT 0,
    failure_reason TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS withdrawals_idempotency ON withdrawals (provider_id, idempotency_key);
CREATE INDEX IF NOT EXISTS withdrawals_status ON withdrawals (status, created_at);
ALTER TABLE providers ADD COLUMN payout_method TEXT;
-- Payment-processor events already applied (top-up webhooks are retried by processors).
CREATE TABLE IF NOT EXISTS webhook_events (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
