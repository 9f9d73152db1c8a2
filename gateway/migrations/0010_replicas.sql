-- The gateway replicas running on this database: each one upserts its row every few
-- seconds (`ops::replicas`). `redis` says whether it shares state through Redis; a
-- replica is live while `seen_at` is recent.
CREATE TABLE replicas (
    id TEXT PRIMARY KEY,
    started_at BIGINT NOT NULL,
    seen_at BIGINT NOT NULL,
    redis BIGINT NOT NULL
);
