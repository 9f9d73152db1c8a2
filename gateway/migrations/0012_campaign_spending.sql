-- Each campaign's spending as counters the replicas share (`ads`): a charge adds to them
-- in one conditional statement only while both budgets leave room, so a fleet of
-- replicas never overspends a campaign. `spent_day` is the spending of the UTC day that
-- starts at `spent_day_start` (ms); a charge on a later day starts it over.
ALTER TABLE campaigns ADD COLUMN spent_total BIGINT NOT NULL DEFAULT 0;
ALTER TABLE campaigns ADD COLUMN spent_day BIGINT NOT NULL DEFAULT 0;
ALTER TABLE campaigns ADD COLUMN spent_day_start BIGINT NOT NULL DEFAULT 0;
UPDATE campaigns SET
    spent_total = COALESCE((SELECT SUM(i.charged) FROM ad_impressions i WHERE i.campaign_id = campaigns.id), 0),
    spent_day_start = COALESCE((SELECT MAX(i.created_at) FROM ad_impressions i WHERE i.campaign_id = campaigns.id), 0) / 86400000 * 86400000;
UPDATE campaigns SET
    spent_day = COALESCE((SELECT SUM(i.charged) FROM ad_impressions i WHERE i.campaign_id = campaigns.id AND i.created_at >= campaigns.spent_day_start), 0);
