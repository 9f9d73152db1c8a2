-- Ads: advertisers (their money lives in the ledger as `advertiser:<id>`), campaigns,
-- and one row per delivered impression (clicks are recorded on it once).
CREATE TABLE IF NOT EXISTS advertisers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS campaigns (
    id TEXT PRIMARY KEY,
    advertiser_id TEXT NOT NULL REFERENCES advertisers (id),
    name TEXT NOT NULL,
    -- Comma-separated categories (technology, finance, health, entertainment, education).
    categories TEXT NOT NULL,
    title TEXT NOT NULL,
    body TEXT NOT NULL,
    url TEXT NOT NULL,
    -- Bids in micro-USD: per thousand impressions and per click; 0 = no such bid.
    cpm_bid BIGINT NOT NULL,
    cpc_bid BIGINT NOT NULL,
    daily_budget BIGINT NOT NULL,
    total_budget BIGINT NOT NULL,
    starts_at BIGINT,
    ends_at BIGINT,
    status TEXT NOT NULL,
    -- Impressions per user per UTC day; 0 = no cap.
    frequency_cap BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS ad_impressions (
    id TEXT PRIMARY KEY,
    campaign_id TEXT NOT NULL REFERENCES campaigns (id),
    request_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    provider_id TEXT,
    category TEXT NOT NULL,
    placement TEXT NOT NULL,
    -- `cpm`: `price` was charged for the impression; `cpc`: `price` is charged per click.
    pricing TEXT NOT NULL,
    price BIGINT NOT NULL,
    -- What the advertiser actually paid for this impression and its click.
    charged BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    clicked_at BIGINT
);
CREATE INDEX IF NOT EXISTS ad_impressions_campaign ON ad_impressions (campaign_id, created_at);
CREATE INDEX IF NOT EXISTS ad_impressions_created ON ad_impressions (created_at);

-- Per-key ad preferences (JSON: categories, blockedCategories, optOut, placement).
ALTER TABLE api_keys ADD COLUMN ad_preferences TEXT;
