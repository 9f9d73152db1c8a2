-- Custom quality levels added at run time (the seed's addCustomQualityLevel).
CREATE TABLE IF NOT EXISTS quality_levels (
    name TEXT PRIMARY KEY,
    multiplier DOUBLE PRECISION NOT NULL,
    latency_multiplier DOUBLE PRECISION NOT NULL,
    cost_multiplier DOUBLE PRECISION NOT NULL,
    max_tokens BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
