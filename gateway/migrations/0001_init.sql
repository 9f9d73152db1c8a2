-- Portable SQL: runs unchanged on SQLite and PostgreSQL. Integers are BIGINT (i64),
-- timestamps are Unix milliseconds, ids are application-generated text, money is
-- integer micro-USD.
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    tier TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id),
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    tier TEXT NOT NULL,
    requests_per_minute BIGINT,
    tokens_per_minute BIGINT,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE TABLE IF NOT EXISTS providers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    base_url TEXT NOT NULL,
    status TEXT NOT NULL,
    gpu_info TEXT NOT NULL,
    capabilities TEXT NOT NULL,
    price_per_mtok_micros BIGINT NOT NULL,
    price_per_hour_micros BIGINT NOT NULL,
    minimum_payout_micros BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    last_heartbeat_at BIGINT,
    reported_active_streams BIGINT NOT NULL DEFAULT 0,
    reported_queue_length BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS provider_streams (
    provider_id TEXT NOT NULL REFERENCES providers(id),
    model TEXT NOT NULL,
    quality TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    PRIMARY KEY (provider_id, model, quality)
);
CREATE TABLE IF NOT EXISTS usage_records (
    request_id TEXT PRIMARY KEY,
    key_id TEXT,
    user_id TEXT,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    provider_id TEXT,
    quality TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    ttft_ms BIGINT,
    latency_ms BIGINT NOT NULL,
    status TEXT NOT NULL,
    error_code TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_records_created_at ON usage_records (created_at);
CREATE INDEX IF NOT EXISTS usage_records_key_id ON usage_records (key_id);
