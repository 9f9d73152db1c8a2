-- How the gateway reaches a provider: 'direct' (it connects to base_url) or 'dialOut'
-- (the provider keeps a link open to the gateway; base_url is empty).
ALTER TABLE providers ADD COLUMN connection TEXT NOT NULL DEFAULT 'direct';
-- With several replicas: the replica (its configured replica_url) holding the
-- provider's link, and when it last saw the link alive.
ALTER TABLE providers ADD COLUMN link_replica TEXT;
ALTER TABLE providers ADD COLUMN link_seen_at BIGINT;
