-- Per-key spending limits, the key behind each hold (for limits), and per-hour reservations.
ALTER TABLE api_keys ADD COLUMN daily_limit_micros BIGINT;
ALTER TABLE api_keys ADD COLUMN monthly_limit_micros BIGINT;
ALTER TABLE holds ADD COLUMN key_id TEXT;
CREATE INDEX IF NOT EXISTS usage_records_key_time ON usage_records (key_id, created_at);
CREATE INDEX IF NOT EXISTS usage_records_user_time ON usage_records (user_id, created_at);
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id),
    key_id TEXT NOT NULL,
    provider_id TEXT NOT NULL REFERENCES providers(id),
    model TEXT NOT NULL,
    hold_id TEXT NOT NULL,
    price_per_hour_micros BIGINT NOT NULL,
    starts_at BIGINT NOT NULL,
    ends_at BIGINT NOT NULL,
    released_at BIGINT,
    charged_micros BIGINT,
    status TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_active ON reservations (status, ends_at);
