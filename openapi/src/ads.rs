//! The ads admin API and the `ad` object clients see. camelCase like the platform API;
//! money is integer micro-USD.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A ledger account's balance in micro-USD: posted, held by open holds, available.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct AccountBalance {
    pub posted: i64,
    pub held: i64,
    pub available: i64,
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
    /// Micro-USD, positive.
    pub amount: i64,
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
    /// Micro-USD per thousand impressions.
    #[serde(default)]
    pub cpm_bid: Option<i64>,
    /// Micro-USD per click.
    #[serde(default)]
    pub cpc_bid: Option<i64>,
    #[serde(default)]
    pub daily_budget: Option<i64>,
    #[serde(default)]
    pub total_budget: Option<i64>,
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
    /// Micro-USD charged to the advertiser so far.
    pub spend: i64,
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
    pub cpm_bid: i64,
    pub cpc_bid: i64,
    pub daily_budget: i64,
    pub total_budget: i64,
    pub starts_at: Option<i64>,
    pub ends_at: Option<i64>,
    pub status: String,
    pub frequency_cap: u32,
    pub created_at: i64,
    pub stats: CampaignStats,
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
    pub revenue: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CampaignReport {
    pub campaign_id: String,
    pub name: String,
    pub impressions: u64,
    pub clicks: u64,
    pub ctr: f64,
    pub spend: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FreeTierCost {
    /// What the platform paid providers for free-tier tokens.
    pub provider_cost: i64,
    /// What advertisers paid the platform (after providers' ad shares).
    pub ad_revenue: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdsReport {
    pub from: i64,
    pub to: i64,
    pub impressions: u64,
    pub clicks: u64,
    pub ctr: f64,
    /// Micro-USD charged to advertisers.
    pub revenue: i64,
    pub by_category: Vec<CategoryStats>,
    pub by_campaign: Vec<CampaignReport>,
    pub free_tier: FreeTierCost,
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
