//! Contextual ads for the free tier: inventory (advertisers and campaigns), targeting,
//! the auction, delivery tracking and the money.
//!
//! The request path never touches the database for an ad: `select` runs the auction
//! over an in-memory snapshot of the inventory (reloaded every few seconds and after
//! every admin change) plus the charges this replica made since the snapshot. Only a
//! delivered impression (and a click) writes: one transaction that records it and
//! moves the money in the ledger, spawned off the response path. The layer that puts
//! ads into responses is `layer`.
//!
//! Budgets hold across replicas at the charge: a charge is taken only when the
//! campaign's shared counters (`campaigns.spent_total`, `spent_day`), updated by one
//! conditional statement in the charge's transaction, leave room for it, so the fleet
//! never spends more than a campaign's daily or total budget (an impression whose
//! charge does not fit is delivered free). The auction's view of spending (for
//! eligibility and pacing) is the counters at the last reload plus this replica's
//! charges since. Frequency caps are counted when an ad is chosen: with Redis in one
//! counter per (user, campaign, UTC day) shared by the replicas (`Views`), else in
//! this process.

pub mod auction;
pub mod classify;
pub mod layer;

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use openapi::ads::{Ad, CampaignStats};
use parking_lot::{Mutex, RwLock};
use sqlx::Row;

use crate::ops::config::Config;
use crate::money::ledger;
use crate::money::units::Micros;
use crate::store::{new_id, now_ms, Store};

use auction::{Bidder, Pricing};

const DAY_MS: i64 = 86_400_000;

/// The label every ad carries, in text and in the `ad` object.
pub const LABEL: &str = "Sponsored";

/// Where an ad goes in a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// A labelled last content delta after the answer.
    Content,
    /// An `ad` object on the final chunk; the content is untouched.
    Metadata,
    /// A labelled sponsor note in the system prompt.
    Prompt,
}

impl Placement {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "content" => Some(Self::Content),
            "metadata" => Some(Self::Metadata),
            "prompt" => Some(Self::Prompt),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Content => "content",
            Self::Metadata => "metadata",
            Self::Prompt => "prompt",
        }
    }
}

#[derive(Debug, Clone)]
struct Creative {
    title: String,
    text: String,
}

/// What this replica added to one campaign since the reload.
#[derive(Default)]
struct Live {
    spent: AtomicI64,
    impressions: AtomicU64,
    clicks: AtomicU64,
    /// A charge found no room (budget spent fleet-wide, or the advertiser cannot pay):
    /// out of the auction until the next reload says otherwise.
    exhausted: std::sync::atomic::AtomicBool,
}

/// The inventory as of one reload, plus this replica's charges since (atomics, so
/// `select` reads them without a lock or a copy of the charge log).
#[derive(Default)]
struct Inventory {
    /// Live campaigns (active status), sorted by id.
    bidders: Vec<Bidder>,
    live: Vec<Live>,
    /// Positions in `bidders` by category (`classify::CATEGORIES` order).
    by_category: [Vec<usize>; 5],
    index: HashMap<Arc<str>, usize>,
    creatives: Vec<Creative>,
    /// Advertisers' available balance at the reload, and what this replica charged since.
    available: HashMap<Arc<str>, (Micros, AtomicI64)>,
}

impl Inventory {
    fn apply(&self, l: &Local) {
        if let Some(live) = self.index.get(l.campaign_id.as_str()).and_then(|i| self.live.get(*i)) {
            live.spent.fetch_add(l.amount, Relaxed);
            live.impressions.fetch_add(l.impressions, Relaxed);
            live.clicks.fetch_add(l.clicks, Relaxed);
        }
        if let Some((_, spent)) = self.available.get(l.advertiser_id.as_str()) {
            spent.fetch_add(l.amount, Relaxed);
        }
    }
}

/// A charge (or impression, or click) this replica recorded after the snapshot.
#[derive(Debug, Clone)]
struct Local {
    at: i64,
    campaign_id: String,
    advertiser_id: String,
    amount: Micros,
    impressions: u64,
    clicks: u64,
}

/// Takes one view of a capped campaign for a user today: 1 when under the cap
/// (`ARGV[1]`) and counted, 0 when the cap is reached.
const TAKE_VIEW: &str = r"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n >= tonumber(ARGV[1]) then return 0 end
redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], 172800000)
return 1
";

/// How many times `choose` runs the auction again when winners are capped out.
const CHOOSE_ROUNDS: usize = 4;

/// Impressions per (user, campaign, UTC day), counted against frequency caps: in
/// this process, and in Redis (`{redis_prefix}views:…`) when the replicas share one.
struct Views {
    local: moka::sync::Cache<u64, u32>,
    hasher: std::collections::hash_map::RandomState,
    shared: Option<(redis::aio::ConnectionManager, String, redis::Script)>,
}

impl Views {
    fn key(&self, user_id: &str, campaign_id: &str, day: i64) -> u64 {
        self.hasher.hash_one((user_id, campaign_id, day))
    }

    fn seen(&self, user_id: &str, campaign_id: &str, day: i64) -> u32 {
        self.local.get(&self.key(user_id, campaign_id, day)).unwrap_or(0)
    }

    /// Counts one view if the cap allows it. The fleet's counter decides when Redis
    /// answers; else this replica's count (already checked by the auction).
    async fn take(&self, user_id: &str, campaign_id: &str, day: i64, cap: u32) -> bool {
        let key = self.key(user_id, campaign_id, day);
        let seen = self.local.get(&key).unwrap_or(0);
        if let Some((conn, prefix, script)) = &self.shared {
            let mut conn = conn.clone();
            let mut call = script.key(format!("{prefix}views:{day}:{campaign_id}:{user_id}"));
            call.arg(cap);
            match crate::store::redis_answer(call.invoke_async::<i64>(&mut conn)).await {
                Ok(1) => {}
                Ok(_) => {
                    // Capped out on another replica: remember it here too.
                    self.local.insert(key, cap);
                    return false;
                }
                Err(error) => tracing::warn!(error, "frequency cap counter unreachable: counting on this replica"),
            }
        }
        self.local.insert(key, seen + 1);
        true
    }
}

/// Who a charge is for.
struct Charge<'a> {
    campaign_id: &'a str,
    advertiser_id: &'a str,
    provider_id: Option<&'a str>,
    impression_id: &'a str,
}

/// The ad chosen for one response, not yet delivered.
#[derive(Debug, Clone)]
pub struct Selected {
    pub impression_id: String,
    pub campaign_id: String,
    pub advertiser_id: String,
    pub category: &'static str,
    pub pricing: Pricing,
    pub price: Micros,
    pub placement: Placement,
    pub request_id: String,
    pub user_id: String,
    pub ad: Ad,
    /// The campaign's impressions per user per day (0: no cap).
    pub frequency_cap: u32,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Counters {
    pub auctions: AtomicU64,
    pub no_fill: AtomicU64,
    pub impressions: AtomicU64,
    pub clicks: AtomicU64,
    pub charged_micros: AtomicU64,
}

impl Counters {
    /// Appends the ad counters to a Prometheus text body.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let lines = [
            ("gs_ad_auctions_total", "Ad auctions run (free-tier requests that could carry an ad).", self.auctions.load(Relaxed)),
            ("gs_ad_no_fill_total", "Auctions without an eligible campaign.", self.no_fill.load(Relaxed)),
            ("gs_ad_impressions_total", "Ads delivered to clients.", self.impressions.load(Relaxed)),
            ("gs_ad_clicks_total", "First clicks on delivered ads.", self.clicks.load(Relaxed)),
        ];
        for (name, help, v) in lines {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let usd = self.charged_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "# HELP gs_ad_charged_usd_total USD charged to advertisers.\n# TYPE gs_ad_charged_usd_total counter\ngs_ad_charged_usd_total {usd}");
    }
}

/// What targeting knows about one request.
pub struct Targeting<'a> {
    pub category: &'static str,
    pub blocked: &'a [String],
    pub user_id: &'a str,
    pub request_id: &'a str,
    pub placement: Placement,
    /// `https://host` for the click link.
    pub base_url: &'a str,
}

pub struct Ads {
    store: Store,
    provider_share_bp: u32,
    reserve_cpm: Micros,
    inventory: RwLock<Arc<Inventory>>,
    local: Mutex<Vec<Local>>,
    views: Views,
    pub counters: Counters,
}

fn day_start(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS) * DAY_MS
}

impl Ads {
    /// The inventory; with `redis` (a connection and the key prefix) frequency caps
    /// are counted fleet-wide.
    pub async fn load(store: Store, config: &Config, redis: Option<redis::aio::ConnectionManager>) -> Result<Arc<Self>, sqlx::Error> {
        let ads = Arc::new(Self {
            store,
            provider_share_bp: config.ads_provider_share_bp,
            reserve_cpm: config.ads_reserve_cpm_micros,
            inventory: RwLock::new(Arc::new(Inventory::default())),
            local: Mutex::new(Vec::new()),
            views: Views {
                local: moka::sync::Cache::builder().max_capacity(1_000_000).time_to_live(std::time::Duration::from_secs(2 * 86_400)).build(),
                hasher: std::collections::hash_map::RandomState::new(),
                shared: redis.map(|conn| (conn, config.redis_prefix.clone(), redis::Script::new(TAKE_VIEW))),
            },
            counters: Counters::default(),
        });
        ads.reload().await?;
        Ok(ads)
    }

    /// Reads campaigns, their spend and stats, and advertisers' balances.
    pub async fn reload(&self) -> Result<(), sqlx::Error> {
        let taken_at = now_ms();
        let today = day_start(taken_at);
        let rows = sqlx::query(
            "SELECT c.id, c.advertiser_id, c.categories, c.title, c.body, c.cpm_bid, c.cpc_bid, c.daily_budget, c.total_budget, \
             c.starts_at, c.ends_at, c.frequency_cap, c.spent_total, \
             CASE WHEN c.spent_day_start = $1 THEN c.spent_day ELSE 0 END AS spent_today, \
             (SELECT COUNT(*) FROM ad_impressions i WHERE i.campaign_id = c.id) AS impressions, \
             (SELECT COUNT(*) FROM ad_impressions i WHERE i.campaign_id = c.id AND i.clicked_at IS NOT NULL) AS clicks \
             FROM campaigns c WHERE c.status = 'active' ORDER BY c.id",
        )
        .bind(today)
        .fetch_all(&self.store.pool)
        .await?;
        let mut inv = Inventory::default();
        for r in &rows {
            let id: Arc<str> = r.try_get::<String, _>("id")?.into();
            let categories: String = r.try_get("categories")?;
            let categories: Vec<&str> = categories.split(',').collect();
            let position = inv.bidders.len();
            for (i, c) in classify::CATEGORIES.iter().enumerate() {
                if categories.contains(c) {
                    inv.by_category[i].push(position);
                }
            }
            inv.index.insert(id.clone(), position);
            inv.live.push(Live::default());
            inv.bidders.push(Bidder {
                id,
                advertiser_id: r.try_get::<String, _>("advertiser_id")?.into(),
                categories: classify::mask(&categories),
                cpm_bid: r.try_get("cpm_bid")?,
                cpc_bid: r.try_get("cpc_bid")?,
                daily_budget: r.try_get("daily_budget")?,
                total_budget: r.try_get("total_budget")?,
                starts_at: r.try_get("starts_at")?,
                ends_at: r.try_get("ends_at")?,
                active: true,
                frequency_cap: u32::try_from(r.try_get::<i64, _>("frequency_cap")?).unwrap_or(0),
                spent_total: r.try_get("spent_total")?,
                spent_today: r.try_get("spent_today")?,
                impressions: u64::try_from(r.try_get::<i64, _>("impressions")?).unwrap_or(0),
                clicks: u64::try_from(r.try_get::<i64, _>("clicks")?).unwrap_or(0),
            });
            inv.creatives.push(Creative { title: r.try_get("title")?, text: r.try_get("body")? });
        }
        let balances = sqlx::query("SELECT id, posted - held AS available FROM accounts WHERE kind = 'advertiser'")
            .fetch_all(&self.store.pool)
            .await?;
        for r in &balances {
            let account: String = r.try_get("id")?;
            if let Some(id) = account.strip_prefix("advertiser:") {
                inv.available.insert(id.into(), (r.try_get("available")?, AtomicI64::new(0)));
            }
        }
        // Charges recorded before the reload began are in what it read; later ones are
        // replayed onto the new snapshot. `note` takes the same lock, so none is missed.
        let mut local = self.local.lock();
        local.retain(|l| l.at >= taken_at);
        for l in local.iter() {
            inv.apply(l);
        }
        *self.inventory.write() = Arc::new(inv);
        Ok(())
    }

    /// Chooses the ad for one request: the auction's winner, once its frequency cap
    /// (the fleet's, with Redis) lets this user see it once more; a capped-out winner
    /// is left out and the auction runs again. `None` when no campaign is eligible.
    pub async fn choose(&self, t: &Targeting<'_>) -> Option<Selected> {
        self.counters.auctions.fetch_add(1, Relaxed);
        let day = now_ms().div_euclid(DAY_MS);
        let mut capped: Vec<String> = Vec::new();
        for _ in 0..CHOOSE_ROUNDS {
            let Some(selected) = self.auction(t, &capped) else { break };
            if selected.frequency_cap == 0 || self.views.take(t.user_id, &selected.campaign_id, day, selected.frequency_cap).await {
                return Some(selected);
            }
            capped.push(selected.campaign_id);
        }
        self.counters.no_fill.fetch_add(1, Relaxed);
        None
    }

    /// Runs the auction for one request without counting a view (the cost of the
    /// auction alone, for `bench-ads`); `None` when no campaign is eligible.
    pub fn select(&self, t: &Targeting<'_>) -> Option<Selected> {
        self.counters.auctions.fetch_add(1, Relaxed);
        let selected = self.auction(t, &[]);
        if selected.is_none() {
            self.counters.no_fill.fetch_add(1, Relaxed);
        }
        selected
    }

    /// The auction over the inventory, leaving out the campaigns in `capped`.
    fn auction(&self, t: &Targeting<'_>, capped: &[String]) -> Option<Selected> {
        let inv = self.inventory.read().clone();
        let now = now_ms();
        let today = day_start(now);
        let slot = classify::CATEGORIES.iter().position(|c| *c == t.category)?;
        // Snapshot plus this replica's charges; cheap copies (no heap allocation).
        // Within a reload interval after midnight, local spend still counts as today's.
        let candidates: Vec<Bidder> = inv.by_category[slot]
            .iter()
            .map(|&i| {
                let mut b = inv.bidders[i].clone();
                let live = &inv.live[i];
                let spent = live.spent.load(Relaxed);
                b.spent_total += spent;
                b.spent_today += spent;
                b.impressions += live.impressions.load(Relaxed);
                b.clicks += live.clicks.load(Relaxed);
                b.active &= !live.exhausted.load(Relaxed);
                b
            })
            .collect();
        let request = auction::Request {
            category: t.category,
            now_ms: now,
            day_fraction: (now - today) as f64 / DAY_MS as f64,
            blocked_categories: t.blocked,
            reserve_cpm: self.reserve_cpm,
        };
        let day = now.div_euclid(DAY_MS);
        let outcome = auction::run(
            &candidates,
            &request,
            |campaign| if capped.iter().any(|c| c == campaign) { u32::MAX } else { self.views.seen(t.user_id, campaign, day) },
            |advertiser| inv.available.get(advertiser).map_or(0, |(a, spent)| a - spent.load(Relaxed)),
        )?;
        let position = *inv.index.get(outcome.campaign_id.as_str())?;
        let (winner, creative) = (&inv.bidders[position], inv.creatives.get(position)?);
        let impression_id = new_id("imp");
        Some(Selected {
            campaign_id: winner.id.to_string(),
            advertiser_id: winner.advertiser_id.to_string(),
            category: t.category,
            pricing: outcome.pricing,
            price: outcome.price,
            placement: t.placement,
            request_id: t.request_id.to_owned(),
            user_id: t.user_id.to_owned(),
            frequency_cap: winner.frequency_cap,
            ad: Ad {
                click_url: format!("{}/r/{impression_id}", t.base_url.trim_end_matches('/')),
                id: impression_id.clone(),
                title: creative.title.clone(),
                text: creative.text.clone(),
                category: t.category.to_owned(),
                label: LABEL.to_owned(),
            },
            impression_id,
        })
    }

    /// Records a delivered impression and charges a CPM one, off the response path.
    pub fn delivered(self: &Arc<Self>, selected: Selected, provider_id: Option<String>) {
        let ads = self.clone();
        tokio::spawn(async move {
            let recorded = crate::store::retrying_conflicts(|| ads.record_impression(&selected, provider_id.as_deref())).await;
            if let Err(e) = recorded {
                tracing::error!(error = %e, impression = %selected.impression_id, "recording an ad impression failed");
            }
        });
    }

    pub async fn record_impression(&self, s: &Selected, provider_id: Option<&str>) -> Result<Micros, sqlx::Error> {
        let now = now_ms();
        let mut tx = self.store.pool.begin().await?;
        sqlx::query(
            "INSERT INTO ad_impressions (id, campaign_id, request_id, user_id, provider_id, category, placement, pricing, price, charged, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, $10)",
        )
        .bind(&s.impression_id)
        .bind(&s.campaign_id)
        .bind(&s.request_id)
        .bind(&s.user_id)
        .bind(provider_id)
        .bind(s.category)
        .bind(s.placement.as_str())
        .bind(s.pricing.as_str())
        .bind(s.price)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let charged = match s.pricing {
            Pricing::Cpm => {
                let to = Charge { campaign_id: &s.campaign_id, advertiser_id: &s.advertiser_id, provider_id, impression_id: &s.impression_id };
                self.charge(&mut tx, &to, s.price, "ad_impression", now).await?
            }
            Pricing::Cpc => 0,
        };
        if charged > 0 {
            sqlx::query("UPDATE ad_impressions SET charged = $1 WHERE id = $2").bind(charged).bind(&s.impression_id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        if s.pricing == Pricing::Cpm && charged == 0 {
            self.exhausted(&s.campaign_id);
        }
        self.note(Local { at: now, campaign_id: s.campaign_id.clone(), advertiser_id: s.advertiser_id.clone(), amount: charged, impressions: 1, clicks: 0 });
        self.counters.impressions.fetch_add(1, Relaxed);
        Ok(charged)
    }

    /// Takes a campaign whose charge found no room out of this replica's auctions
    /// until the next reload (other replicas learn it from the counters then).
    fn exhausted(&self, campaign_id: &str) {
        let inv = self.inventory.read().clone();
        if let Some(live) = inv.index.get(campaign_id).and_then(|i| inv.live.get(*i)) {
            live.exhausted.store(true, Relaxed);
        }
    }

    /// A charge, impression or click this replica just committed: counted at once in
    /// the current snapshot and kept for the next reload to replay.
    fn note(&self, local: Local) {
        self.counters.charged_micros.fetch_add(u64::try_from(local.amount).unwrap_or(0), Relaxed);
        let mut log = self.local.lock();
        self.inventory.read().apply(&local);
        log.push(local);
    }

    /// Debits the advertiser, credits the platform's ad revenue and the provider's
    /// share, and adds the charge to the campaign's spending. Charges nothing when the
    /// campaign's daily or total budget has no room left for it (whatever replica spent
    /// it: the check and the addition are one conditional statement, which on
    /// PostgreSQL holds the campaign's row until the transaction ends) or when the
    /// advertiser cannot pay (its campaigns drop out of the next auctions).
    async fn charge(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        c: &Charge<'_>,
        amount: Micros,
        kind: &str,
        now: i64,
    ) -> Result<Micros, sqlx::Error> {
        let today = day_start(now);
        let within_budget = sqlx::query(
            "UPDATE campaigns SET spent_total = spent_total + $1, \
             spent_day = CASE WHEN spent_day_start = $2 THEN spent_day + $1 ELSE $1 END, spent_day_start = $2 \
             WHERE id = $3 AND spent_total + $1 <= total_budget \
             AND CASE WHEN spent_day_start = $2 THEN spent_day ELSE 0 END + $1 <= daily_budget",
        )
        .bind(amount)
        .bind(today)
        .bind(c.campaign_id)
        .execute(&mut **tx)
        .await?
        .rows_affected()
            == 1;
        if !within_budget {
            tracing::debug!(campaign = c.campaign_id, amount, "the campaign's budget has no room for this charge: delivered free");
            return Ok(0);
        }
        let share = if c.provider_id.is_some() { ledger::fee(amount, self.provider_share_bp) } else { 0 };
        let provider = c.provider_id.map(ledger::provider_account);
        let mut to: Vec<(&str, Micros)> = vec![(ledger::AD_REVENUE, amount - share)];
        if let Some(p) = &provider {
            to.push((p.as_str(), share));
        }
        let from = ledger::advertiser_account(c.advertiser_id);
        let memo = format!("{kind} {}", c.impression_id);
        if ledger::pay_out_of(tx, &from, &to, kind, Some(c.impression_id), &memo).await? {
            return Ok(amount);
        }
        // Not paid: the campaign did not spend it either.
        sqlx::query("UPDATE campaigns SET spent_total = spent_total - $1, spent_day = spent_day - $1 WHERE id = $2")
            .bind(amount)
            .bind(c.campaign_id)
            .execute(&mut **tx)
            .await?;
        Ok(0)
    }

    /// Records a click on an impression once (charging a CPC one) and returns where
    /// it goes; `None` for an unknown impression.
    pub async fn click(&self, impression_id: &str) -> Result<Option<String>, sqlx::Error> {
        crate::store::retrying_conflicts(|| self.click_once(impression_id)).await
    }

    async fn click_once(&self, impression_id: &str) -> Result<Option<String>, sqlx::Error> {
        let mut tx = self.store.pool.begin().await?;
        let row = sqlx::query(
            "SELECT i.campaign_id, i.pricing, i.price, i.provider_id, c.url, c.advertiser_id FROM ad_impressions i \
             JOIN campaigns c ON c.id = i.campaign_id WHERE i.id = $1",
        )
        .bind(impression_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let url: String = row.try_get("url")?;
        let now = now_ms();
        let first = sqlx::query("UPDATE ad_impressions SET clicked_at = $1 WHERE id = $2 AND clicked_at IS NULL")
            .bind(now)
            .bind(impression_id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if !first {
            tx.rollback().await?;
            return Ok(Some(url));
        }
        let campaign_id: String = row.try_get("campaign_id")?;
        let advertiser_id: String = row.try_get("advertiser_id")?;
        let pricing: String = row.try_get("pricing")?;
        let provider_id: Option<String> = row.try_get("provider_id")?;
        let charged = if pricing == "cpc" {
            let price: i64 = row.try_get("price")?;
            let to = Charge { campaign_id: &campaign_id, advertiser_id: &advertiser_id, provider_id: provider_id.as_deref(), impression_id };
            self.charge(&mut tx, &to, price, "ad_click", now).await?
        } else {
            0
        };
        if charged > 0 {
            sqlx::query("UPDATE ad_impressions SET charged = charged + $1 WHERE id = $2")
                .bind(charged)
                .bind(impression_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        if pricing == "cpc" && charged == 0 {
            self.exhausted(&campaign_id);
        }
        self.note(Local { at: now, campaign_id, advertiser_id, amount: charged, impressions: 0, clicks: 1 });
        self.counters.clicks.fetch_add(1, Relaxed);
        Ok(Some(url))
    }

    /// Impressions, clicks and spend (all time) of one campaign, or of every one.
    pub async fn campaign_stats(&self, campaign: Option<&str>) -> Result<HashMap<String, CampaignStats>, sqlx::Error> {
        let filter = if campaign.is_some() { "WHERE campaign_id = $1" } else { "" };
        let sql = format!(
            "SELECT campaign_id, COUNT(*) AS impressions, COUNT(clicked_at) AS clicks, CAST(COALESCE(SUM(charged), 0) AS BIGINT) AS spend \
             FROM ad_impressions {filter} GROUP BY campaign_id"
        );
        let mut query = sqlx::query(&sql);
        if let Some(id) = campaign {
            query = query.bind(id);
        }
        let rows = query.fetch_all(&self.store.pool).await?;
        let mut out = HashMap::new();
        for r in &rows {
            let impressions = u64::try_from(r.try_get::<i64, _>("impressions")?).unwrap_or(0);
            let clicks = u64::try_from(r.try_get::<i64, _>("clicks")?).unwrap_or(0);
            out.insert(
                r.try_get("campaign_id")?,
                CampaignStats::new(impressions, clicks, ctr(clicks, impressions), r.try_get("spend")?),
            );
        }
        Ok(out)
    }
}

/// A 400 naming `param` when any of `names` is not one of `classify::CATEGORIES`.
pub fn check_categories<'a>(names: impl IntoIterator<Item = &'a String>, param: &str) -> Result<(), crate::edge::error::ApiError> {
    match names.into_iter().find(|c| !classify::CATEGORIES.contains(&c.as_str())) {
        Some(bad) => Err(crate::edge::error::ApiError::param(
            format!("unknown ad category {bad:?}; known: {}", classify::CATEGORIES.join(", ")),
            param,
        )),
        None => Ok(()),
    }
}

pub fn ctr(clicks: u64, impressions: u64) -> f64 {
    if impressions == 0 {
        0.0
    } else {
        clicks as f64 / impressions as f64
    }
}

/// The text of the `content` placement: a rule, the label, the creative and the link.
/// `strip` recognises it by `MARKER`.
pub fn content_text(ad: &Ad) -> String {
    format!("{MARKER}{}: {} {}", ad.title, ad.text, ad.click_url)
}

/// How a content ad starts; everything from it to the end of a message is ours.
pub const MARKER: &str = "\n\n---\n[Sponsored] ";

/// Removes ad blocks we appended to an assistant message earlier. Also catches a
/// block whose leading blank lines a client trimmed.
pub fn strip(content: &str) -> Option<String> {
    let core = MARKER.trim_start_matches('\n');
    let at = content.find(core)?;
    Some(content[..at].trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_removes_our_block_only() {
        let ad = Ad {
            id: "imp_1".into(),
            title: "T".into(),
            text: "x".into(),
            click_url: "http://h/r/imp_1".into(),
            category: "technology".into(),
            label: LABEL.into(),
        };
        let answer = format!("The answer is 4.{}", content_text(&ad));
        assert_eq!(strip(&answer).as_deref(), Some("The answer is 4."));
        assert_eq!(strip(&answer.replace("\n\n---", "---")).as_deref(), Some("The answer is 4."));
        assert_eq!(strip("No ads here --- at all"), None);
    }
}
