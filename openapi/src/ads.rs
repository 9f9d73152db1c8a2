//! The ads admin API and the `ad` object clients see. camelCase like the platform API;
//! money as everywhere in the API: USD in the named field (`amount`, `cpmBid`, …) and
//! exact integer micro-USD in its `…Micros` twin, both accepted and both returned.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A ledger account's balance: posted, held by open holds, available (USD, and
/// micro-USD in the `…Micros` twins).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccountBalance {
    pub posted: f64,
    pub held: f64,
    pub available: f64,
    pub posted_micros: i64,
    pub held_micros: i64,
    pub available_micros: i64,
}

impl AccountBalance {
    pub fn of_micros(posted: i64, held: i64) -> Self {
        let available = posted - held;
        Self {
            posted: usd(posted),
            held: usd(held),
            available: usd(available),
            posted_micros: posted,
            held_micros: held,
            available_micros: available,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewAdvertiser {
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Advertiser {
    pub id: String,
    pub name: String,
    pub created_at: i64,
    /// The advertiser's prepaid account (`advertiser:<id>` in the ledger).
    pub balance: AccountBalance,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdvertiserCredit {
    /// USD, positive, at most 1,000,000 (or `amountMicros`).
    #[serde(default)]
    pub amount: Option<f64>,
    /// The same in micro-USD (both given: they must agree).
    #[serde(default)]
    pub amount_micros: Option<i64>,
    #[serde(default)]
    pub note: Option<String>,
}

/// A campaign as created; `PATCH` takes any subset of these fields.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CampaignInput {
    #[serde(default)]
    pub advertiser_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// Any of technology, finance, health, entertainment, education.
    #[serde(default)]
    pub categories: Option<Vec<String>>,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
    /// Where a click goes (http or https).
    #[serde(default)]
    pub url: Option<String>,
    /// USD per thousand impressions, at most 1,000 (or `cpmBidMicros`).
    #[serde(default)]
    pub cpm_bid: Option<f64>,
    #[serde(default)]
    pub cpm_bid_micros: Option<i64>,
    /// USD per click, at most 1,000 (or `cpcBidMicros`).
    #[serde(default)]
    pub cpc_bid: Option<f64>,
    #[serde(default)]
    pub cpc_bid_micros: Option<i64>,
    /// USD per UTC day, at most 1,000,000 (or `dailyBudgetMicros`).
    #[serde(default)]
    pub daily_budget: Option<f64>,
    #[serde(default)]
    pub daily_budget_micros: Option<i64>,
    /// USD over the campaign's life, at most 1,000,000 (or `totalBudgetMicros`).
    #[serde(default)]
    pub total_budget: Option<f64>,
    #[serde(default)]
    pub total_budget_micros: Option<i64>,
    /// Milliseconds since the epoch; null for no bound.
    #[serde(default, with = "double_option")]
    #[schema(value_type = Option<i64>)]
    pub starts_at: Option<Option<i64>>,
    #[serde(default, with = "double_option")]
    #[schema(value_type = Option<i64>)]
    pub ends_at: Option<Option<i64>>,
    /// `active`, `paused` or `ended`.
    #[serde(default)]
    pub status: Option<String>,
    /// Impressions per user per UTC day; 0 = no cap.
    #[serde(default)]
    pub frequency_cap: Option<u32>,
}

/// `Some(None)` for an explicit null, `None` when the field is absent.
mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Option<i64>>, s: S) -> Result<S::Ok, S::Error> {
        v.flatten().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
        Option::<i64>::deserialize(d).map(Some)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CampaignStats {
    pub impressions: u64,
    pub clicks: u64,
    /// Clicks per impression, 0 without impressions.
    pub ctr: f64,
    /// USD charged to the advertiser so far (exact: `spendMicros`).
    pub spend: f64,
    pub spend_micros: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Campaign {
    pub id: String,
    pub advertiser_id: String,
    pub name: String,
    pub categories: Vec<String>,
    pub title: String,
    pub text: String,
    pub url: String,
    /// USD per thousand impressions (exact: `cpmBidMicros`).
    pub cpm_bid: f64,
    pub cpm_bid_micros: i64,
    /// USD per click.
    pub cpc_bid: f64,
    pub cpc_bid_micros: i64,
    pub daily_budget: f64,
    pub daily_budget_micros: i64,
    pub total_budget: f64,
    pub total_budget_micros: i64,
    pub starts_at: Option<i64>,
    pub ends_at: Option<i64>,
    pub status: String,
    pub frequency_cap: u32,
    pub created_at: i64,
    pub stats: CampaignStats,
}

impl Campaign {
    /// Fills the USD fields from the micro-USD ones (which the gateway works with).
    pub fn with_usd(mut self) -> Self {
        self.cpm_bid = usd(self.cpm_bid_micros);
        self.cpc_bid = usd(self.cpc_bid_micros);
        self.daily_budget = usd(self.daily_budget_micros);
        self.total_budget = usd(self.total_budget_micros);
        self
    }
}

/// The ad object of the `metadata` placement (and what `content` renders as text).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Ad {
    /// The impression id.
    pub id: String,
    pub title: String,
    pub text: String,
    /// The click-tracking link (`/r/{id}`), which redirects to the advertiser.
    pub click_url: String,
    pub category: String,
    /// Always `Sponsored`.
    pub label: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CategoryStats {
    pub category: String,
    pub impressions: u64,
    pub clicks: u64,
    /// USD (exact: `revenueMicros`).
    pub revenue: f64,
    pub revenue_micros: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CampaignReport {
    pub campaign_id: String,
    pub name: String,
    pub impressions: u64,
    pub clicks: u64,
    pub ctr: f64,
    /// USD (exact: `spendMicros`).
    pub spend: f64,
    pub spend_micros: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FreeTierCost {
    /// What the platform paid providers for free-tier tokens (USD; exact: `providerCostMicros`).
    pub provider_cost: f64,
    pub provider_cost_micros: i64,
    /// What advertisers paid the platform, after providers' ad shares (USD).
    pub ad_revenue: f64,
    pub ad_revenue_micros: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdsReport {
    pub from: i64,
    pub to: i64,
    pub impressions: u64,
    pub clicks: u64,
    pub ctr: f64,
    /// USD charged to advertisers (exact: `revenueMicros`).
    pub revenue: f64,
    pub revenue_micros: i64,
    pub by_category: Vec<CategoryStats>,
    pub by_campaign: Vec<CampaignReport>,
    pub free_tier: FreeTierCost,
}

#[allow(clippy::cast_precision_loss)]
fn usd(micros: i64) -> f64 {
    micros as f64 / 1e6
}

impl CampaignStats {
    pub fn new(impressions: u64, clicks: u64, ctr: f64, spend_micros: i64) -> Self {
        Self { impressions, clicks, ctr, spend: usd(spend_micros), spend_micros }
    }
}

impl AdsReport {
    /// Fills every USD field from its micro-USD twin (which the report adds up).
    pub fn with_usd(mut self) -> Self {
        self.revenue = usd(self.revenue_micros);
        for c in &mut self.by_category {
            c.revenue = usd(c.revenue_micros);
        }
        for c in &mut self.by_campaign {
            c.spend = usd(c.spend_micros);
        }
        self.free_tier.provider_cost = usd(self.free_tier.provider_cost_micros);
        self.free_tier.ad_revenue = usd(self.free_tier.ad_revenue_micros);
        self
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct AdvertiserList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<Advertiser>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct CampaignList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<Campaign>,
}
