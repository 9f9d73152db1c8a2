-- How the gateway reaches a provider: 'direct' (it connects to base_url) or 'dialOut'
-- (the provider keeps a link open to the gateway; base_url is empty).
ALTER TABLE providers ADD COLUMN connection TEXT NOT NULL DEFAULT 'direct';
