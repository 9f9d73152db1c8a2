-- Double-entry ledger. `accounts.posted` caches the sum of the account's lines and
-- `accounts.held` the sum of its open holds, both updated in the same transaction as
-- the rows they summarise; `gateway ledger check` verifies both against the source rows.
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    owner_id TEXT,
    posted BIGINT NOT NULL DEFAULT 0,
    held BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_entries (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    request_id TEXT,
    memo TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_entries_request ON ledger_entries (request_id);
CREATE TABLE IF NOT EXISTS ledger_lines (
    entry_id TEXT NOT NULL REFERENCES ledger_entries(id),
    account_id TEXT NOT NULL REFERENCES accounts(id),
    amount BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_lines_entry ON ledger_lines (entry_id);
CREATE INDEX IF NOT EXISTS ledger_lines_account ON ledger_lines (account_id);
CREATE TABLE IF NOT EXISTS holds (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    amount BIGINT NOT NULL,
    status TEXT NOT NULL,
    request_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    resolved_at BIGINT
);
CREATE INDEX IF NOT EXISTS holds_open ON holds (status, created_at);
ALTER TABLE usage_records ADD COLUMN cost_micros BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN payer TEXT;
ALTER TABLE usage_records ADD COLUMN usage_source TEXT;
