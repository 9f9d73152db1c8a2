-- Marketplace safeguards: probation for self-registered providers, the reason shown
-- beside a provider's status (an admin's action, or a stored baseUrl that a start-up
-- check refused), and a payout method that takes effect only after a delay.
ALTER TABLE providers ADD COLUMN probation_left BIGINT NOT NULL DEFAULT 0;
ALTER TABLE providers ADD COLUMN status_reason TEXT;
ALTER TABLE providers ADD COLUMN next_payout_method TEXT;
ALTER TABLE providers ADD COLUMN next_payout_method_at BIGINT;
