-- The inputs of each provider's routing score (`inference::health`), written every few
-- seconds by one replica and read at start-up, so a restart does not forget who was
-- down. The circuit breaker's state is not kept: it cools down within seconds.
CREATE TABLE provider_health (
    provider_id TEXT PRIMARY KEY,
    success DOUBLE PRECISION NOT NULL,
    ttft_ms DOUBLE PRECISION,
    uptime DOUBLE PRECISION NOT NULL,
    honesty DOUBLE PRECISION NOT NULL,
    requests BIGINT NOT NULL,
    failures BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
