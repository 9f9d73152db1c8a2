//! `/api/admin/advertisers…`, `/api/admin/campaigns…` and `/api/analytics/ads`: advertisers,
//! their credit, campaigns and the ads report.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use openapi::ads::{
    AccountBalance, AdsReport, Advertiser, AdvertiserCredit, AdvertiserList, Campaign, CampaignInput, CampaignList,
    CampaignReport, CategoryStats, FreeTierCost, NewAdvertiser,
};
use serde::Deserialize;
use sqlx::Row;

use crate::ads::ctr;
use crate::edge::error::ApiError;
use crate::edge::extract;
use crate::money::ledger::LedgerError;
use crate::money::{ledger, units};
use crate::state::AppState;
use crate::store::{new_id, now_ms};

const MAX_TITLE: usize = 80;

const MAX_TEXT: usize = 280;

/// $1,000 per thousand impressions or per click, and $1,000,000,000 of budget: far
/// above any real campaign, far below `i64` overflow in the auction's arithmetic.
const MAX_BID: i64 = 1_000_000_000;

/// $1,000,000: a budget in micro-USD sent in a USD field is refused, not taken as millions.
const MAX_BUDGET: i64 = 1_000_000_000_000;

/// The most one advertiser credit adds ($1,000,000, the ledger's limit).
const MAX_CREDIT: i64 = 1_000_000_000_000;

/// Advertisers with their ledger balances in one query: one advertiser, or all of them
/// oldest first.
async fn advertisers(state: &AppState, id: Option<&str>) -> Result<Vec<Advertiser>, sqlx::Error> {
    let filter = if id.is_some() { "WHERE a.id = $1" } else { "" };
    let sql = format!(
        "SELECT a.id, a.name, a.created_at, COALESCE(acc.posted, 0) AS posted, COALESCE(acc.held, 0) AS held \
         FROM advertisers a LEFT JOIN accounts acc ON acc.id = 'advertiser:' || a.id {filter} ORDER BY a.created_at, a.id"
    );
    let mut query = sqlx::query(&sql);
    if let Some(id) = id {
        query = query.bind(id);
    }
    query
        .fetch_all(&state.store.pool)
        .await?
        .iter()
        .map(|r| {
            let (posted, held): (i64, i64) = (r.try_get("posted")?, r.try_get("held")?);
            Ok(Advertiser {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                created_at: r.try_get("created_at")?,
                balance: AccountBalance::of_micros(posted, held),
            })
        })
        .collect()
}

async fn advertiser(state: &AppState, id: &str) -> Result<Advertiser, ApiError> {
    advertisers(state, Some(id))
        .await?
        .pop()
        .ok_or_else(|| ApiError::NotFound(format!("advertiser {id} does not exist")))
}

/// `POST /api/admin/advertisers`
#[utoipa::path(
    post,
    path = "/api/admin/advertisers",
    tag = "ads",
    summary = "Create an advertiser",
    request_body = NewAdvertiser,
    security(("admin_key" = [])),
    responses(
        (status = 201, description = "Created, with an empty prepaid balance.", body = Advertiser),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
        crate::api::schemas::PayloadTooLarge,
        crate::api::schemas::UnsupportedMediaType,
    ),
)]
pub async fn create_advertiser(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Advertiser>), ApiError> {
    let new: NewAdvertiser = extract::parse(&headers, &body)?;
    let name = new.name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(ApiError::param("`name` must be 1 to 200 characters", "name"));
    }
    let id = new_id("adv");
    sqlx::query("INSERT INTO advertisers (id, name, created_at) VALUES ($1, $2, $3)")
        .bind(&id)
        .bind(name)
        .bind(now_ms())
        .execute(&state.store.pool)
        .await?;
    Ok((StatusCode::CREATED, Json(advertiser(&state, &id).await?)))
}

/// `GET /api/admin/advertisers`
#[utoipa::path(
    get,
    path = "/api/admin/advertisers",
    tag = "ads",
    summary = "List advertisers with their balances",
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Every advertiser, oldest first.", body = AdvertiserList),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
    ),
)]
pub async fn list_advertisers(State(state): State<AppState>) -> Result<Json<AdvertiserList>, ApiError> {
    Ok(Json(AdvertiserList { object: "list".to_owned(), data: advertisers(&state, None).await? }))
}

/// `POST /api/admin/advertisers/{id}/credit`: prepaid funds (from outside the ledger).
#[utoipa::path(
    post,
    path = "/api/admin/advertisers/{id}/credit",
    tag = "ads",
    summary = "Add prepaid funds to an advertiser",
    request_body = AdvertiserCredit,
    params(("id" = String, Path, description = "The advertiser or campaign id.")),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "The advertiser with its new balance.", body = Advertiser),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
        crate::api::schemas::NotFound,
        crate::api::schemas::PayloadTooLarge,
        crate::api::schemas::UnsupportedMediaType,
    ),
)]
pub async fn credit_advertiser(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Advertiser>, ApiError> {
    let credit: AdvertiserCredit = extract::parse(&headers, &body)?;
    let field = units::Field { name: "amount", twin: "amountMicros", max_micros: MAX_CREDIT };
    let amount = field
        .micros(credit.amount, credit.amount_micros)?
        .ok_or_else(|| ApiError::param("`amount` (USD) or `amountMicros` is required", "amount"))?;
    advertiser(&state, &id).await?;
    let memo = credit.note.unwrap_or_else(|| "advertiser credit".to_owned());
    state
        .ledger
        .credit(&ledger::advertiser_account(&id), amount, "advertiser_credit", &memo)
        .await
        .map_err(|e| match e {
            LedgerError::NonPositive => ApiError::param("`amount` must be positive", "amount"),
            LedgerError::TooLarge => ApiError::param("one credit may add at most 1,000,000 USD", "amount"),
            LedgerError::Db(e) => e.into(),
        })?;
    if let Err(e) = state.ads.reload().await {
        tracing::warn!(error = %e, "ad inventory reload failed");
    }
    Ok(Json(advertiser(&state, &id).await?))
}

fn campaign_from_row(r: &sqlx::any::AnyRow) -> Result<Campaign, sqlx::Error> {
    let categories: String = r.try_get("categories")?;
    Ok(Campaign {
        id: r.try_get("id")?,
        advertiser_id: r.try_get("advertiser_id")?,
        name: r.try_get("name")?,
        categories: categories.split(',').map(str::to_owned).collect(),
        title: r.try_get("title")?,
        text: r.try_get("body")?,
        url: r.try_get("url")?,
        cpm_bid: 0.0,
        cpm_bid_micros: r.try_get("cpm_bid")?,
        cpc_bid: 0.0,
        cpc_bid_micros: r.try_get("cpc_bid")?,
        daily_budget: 0.0,
        daily_budget_micros: r.try_get("daily_budget")?,
        total_budget: 0.0,
        total_budget_micros: r.try_get("total_budget")?,
        starts_at: r.try_get("starts_at")?,
        ends_at: r.try_get("ends_at")?,
        status: r.try_get("status")?,
        frequency_cap: u32::try_from(r.try_get::<i64, _>("frequency_cap")?).unwrap_or(0),
        created_at: r.try_get("created_at")?,
        stats: Default::default(),
    }
    .with_usd())
}

const CAMPAIGN_COLUMNS: &str = "id, advertiser_id, name, categories, title, body, url, cpm_bid, cpc_bid, daily_budget, \
    total_budget, starts_at, ends_at, status, frequency_cap, created_at";

async fn load_campaign(state: &AppState, id: &str) -> Result<Campaign, ApiError> {
    let row = sqlx::query(&format!("SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE id = $1"))
        .bind(id)
        .fetch_optional(&state.store.pool)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("campaign {id} does not exist")))?;
    let mut c = campaign_from_row(&row)?;
    c.stats = state.ads.campaign_stats(Some(id)).await?.remove(&c.id).unwrap_or_default();
    Ok(c)
}

/// Applies `input` over `c` and checks the result.
fn merge(mut c: Campaign, input: CampaignInput) -> Result<Campaign, ApiError> {
    if let Some(v) = input.advertiser_id {
        c.advertiser_id = v;
    }
    if let Some(v) = input.name {
        c.name = v.trim().to_owned();
    }
    if let Some(v) = input.categories {
        c.categories = v;
    }
    if let Some(v) = input.title {
        c.title = v;
    }
    if let Some(v) = input.text {
        c.text = v;
    }
    if let Some(v) = input.url {
        c.url = v;
    }
    let bid = |name, twin| units::Field { name, twin, max_micros: MAX_BID };
    let budget = |name, twin| units::Field { name, twin, max_micros: MAX_BUDGET };
    if let Some(v) = bid("cpmBid", "cpmBidMicros").micros(input.cpm_bid, input.cpm_bid_micros)? {
        c.cpm_bid_micros = v;
    }
    if let Some(v) = bid("cpcBid", "cpcBidMicros").micros(input.cpc_bid, input.cpc_bid_micros)? {
        c.cpc_bid_micros = v;
    }
    if let Some(v) = budget("dailyBudget", "dailyBudgetMicros").micros(input.daily_budget, input.daily_budget_micros)? {
        c.daily_budget_micros = v;
    }
    if let Some(v) = budget("totalBudget", "totalBudgetMicros").micros(input.total_budget, input.total_budget_micros)? {
        c.total_budget_micros = v;
    }
    if let Some(v) = input.starts_at {
        c.starts_at = v;
    }
    if let Some(v) = input.ends_at {
        c.ends_at = v;
    }
    if let Some(v) = input.status {
        c.status = v;
    }
    if let Some(v) = input.frequency_cap {
        c.frequency_cap = v;
    }
    if c.name.is_empty() || c.name.len() > 200 {
        return Err(ApiError::param("`name` must be 1 to 200 characters", "name"));
    }
    if c.categories.is_empty() {
        return Err(ApiError::param("`categories` must name at least one category", "categories"));
    }
    crate::ads::check_categories(&c.categories, "categories")?;
    c.categories.sort();
    c.categories.dedup();
    if c.title.trim().is_empty() || c.title.chars().count() > MAX_TITLE {
        return Err(ApiError::param(format!("`title` must be 1 to {MAX_TITLE} characters"), "title"));
    }
    if c.text.trim().is_empty() || c.text.chars().count() > MAX_TEXT {
        return Err(ApiError::param(format!("`text` must be 1 to {MAX_TEXT} characters"), "text"));
    }
    if c.title.contains('\n') || c.text.contains('\n') {
        return Err(ApiError::param("`title` and `text` must be one line each", "text"));
    }
    let url_ok = (c.url.starts_with("https://") || c.url.starts_with("http://"))
        && c.url.len() <= 2000
        && !c.url.chars().any(|ch| ch.is_whitespace() || ch.is_control());
    if !url_ok {
        return Err(ApiError::param("`url` must be an http(s) URL without spaces", "url"));
    }
    if c.cpm_bid_micros == 0 && c.cpc_bid_micros == 0 {
        return Err(ApiError::param("give a positive `cpmBid` and/or `cpcBid` (USD)", "cpmBid"));
    }
    if c.daily_budget_micros <= 0 || c.total_budget_micros <= 0 {
        return Err(ApiError::param("`dailyBudget` and `totalBudget` must be positive (USD)", "dailyBudget"));
    }
    if let (Some(s), Some(e)) = (c.starts_at, c.ends_at) {
        if e <= s {
            return Err(ApiError::param("`endsAt` must be after `startsAt`", "endsAt"));
        }
    }
    if !matches!(c.status.as_str(), "active" | "paused" | "ended") {
        return Err(ApiError::param("`status` must be active, paused or ended", "status"));
    }
    Ok(c.with_usd())
}

/// `POST /api/admin/campaigns`
#[utoipa::path(
    post,
    path = "/api/admin/campaigns",
    tag = "ads",
    summary = "Create a campaign",
    request_body = CampaignInput,
    security(("admin_key" = [])),
    responses(
        (status = 201, description = "Created; it competes in auctions at once when `active`.", body = Campaign),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
        crate::api::schemas::PayloadTooLarge,
        crate::api::schemas::UnsupportedMediaType,
    ),
)]
pub async fn create_campaign(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Campaign>), ApiError> {
    let input: CampaignInput = extract::parse(&headers, &body)?;
    let required = [
        ("advertiserId", input.advertiser_id.is_none()),
        ("name", input.name.is_none()),
        ("categories", input.categories.is_none()),
        ("title", input.title.is_none()),
        ("text", input.text.is_none()),
        ("url", input.url.is_none()),
        ("dailyBudget", input.daily_budget.is_none() && input.daily_budget_micros.is_none()),
        ("totalBudget", input.total_budget.is_none() && input.total_budget_micros.is_none()),
    ];
    if let Some((field, _)) = required.iter().find(|(_, missing)| *missing) {
        return Err(ApiError::param(format!("`{field}` is required"), field));
    }
    let now = now_ms();
    let blank = Campaign {
        id: new_id("cmp"),
        advertiser_id: String::new(),
        name: String::new(),
        categories: Vec::new(),
        title: String::new(),
        text: String::new(),
        url: String::new(),
        cpm_bid: 0.0,
        cpm_bid_micros: 0,
        cpc_bid: 0.0,
        cpc_bid_micros: 0,
        daily_budget: 0.0,
        daily_budget_micros: 0,
        total_budget: 0.0,
        total_budget_micros: 0,
        starts_at: None,
        ends_at: None,
        status: "active".to_owned(),
        frequency_cap: 0,
        created_at: now,
        stats: Default::default(),
    };
    let c = merge(blank, input)?;
    advertiser(&state, &c.advertiser_id).await.map_err(|_| {
        ApiError::param(format!("advertiser {} does not exist", c.advertiser_id), "advertiserId")
    })?;
    sqlx::query(&format!(
        "INSERT INTO campaigns ({CAMPAIGN_COLUMNS}, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
    ))
    .bind(&c.id)
    .bind(&c.advertiser_id)
    .bind(&c.name)
    .bind(c.categories.join(","))
    .bind(&c.title)
    .bind(&c.text)
    .bind(&c.url)
    .bind(c.cpm_bid_micros)
    .bind(c.cpc_bid_micros)
    .bind(c.daily_budget_micros)
    .bind(c.total_budget_micros)
    .bind(c.starts_at)
    .bind(c.ends_at)
    .bind(&c.status)
    .bind(i64::from(c.frequency_cap))
    .bind(now)
    .bind(now)
    .execute(&state.store.pool)
    .await?;
    reload(&state).await;
    Ok((StatusCode::CREATED, Json(load_campaign(&state, &c.id).await?)))
}

async fn reload(state: &AppState) {
    if let Err(e) = state.ads.reload().await {
        tracing::warn!(error = %e, "ad inventory reload failed");
    }
}

/// `GET /api/admin/campaigns`
#[utoipa::path(
    get,
    path = "/api/admin/campaigns",
    tag = "ads",
    summary = "List campaigns with their statistics",
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Every campaign, oldest first.", body = CampaignList),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
    ),
)]
pub async fn list_campaigns(State(state): State<AppState>) -> Result<Json<CampaignList>, ApiError> {
    let rows = sqlx::query(&format!("SELECT {CAMPAIGN_COLUMNS} FROM campaigns ORDER BY created_at, id"))
        .fetch_all(&state.store.pool)
        .await?;
    let mut stats = state.ads.campaign_stats(None).await?;
    let mut data = Vec::with_capacity(rows.len());
    for r in &rows {
        let mut c = campaign_from_row(r)?;
        c.stats = stats.remove(&c.id).unwrap_or_default();
        data.push(c);
    }
    Ok(Json(CampaignList { object: "list".to_owned(), data }))
}

/// `GET /api/admin/campaigns/{id}`
#[utoipa::path(
    get,
    path = "/api/admin/campaigns/{id}",
    tag = "ads",
    summary = "One campaign with its statistics",
    params(("id" = String, Path, description = "The advertiser or campaign id.")),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "The campaign.", body = Campaign),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
        crate::api::schemas::NotFound,
    ),
)]
pub async fn get_campaign(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Campaign>, ApiError> {
    Ok(Json(load_campaign(&state, &id).await?))
}

/// `PATCH /api/admin/campaigns/{id}`: any subset of the create fields.
#[utoipa::path(
    patch,
    path = "/api/admin/campaigns/{id}",
    tag = "ads",
    summary = "Change a campaign (any subset of the create fields)",
    request_body = CampaignInput,
    params(("id" = String, Path, description = "The advertiser or campaign id.")),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "The changed campaign.", body = Campaign),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
        crate::api::schemas::NotFound,
        crate::api::schemas::PayloadTooLarge,
        crate::api::schemas::UnsupportedMediaType,
    ),
)]
pub async fn update_campaign(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Campaign>, ApiError> {
    let input: CampaignInput = extract::parse(&headers, &body)?;
    let current = load_campaign(&state, &id).await?;
    let moved = input.advertiser_id.as_ref().is_some_and(|a| *a != current.advertiser_id);
    if moved {
        return Err(ApiError::param("a campaign cannot move to another advertiser", "advertiserId"));
    }
    let c = merge(current, input)?;
    sqlx::query(
        "UPDATE campaigns SET name = $1, categories = $2, title = $3, body = $4, url = $5, cpm_bid = $6, cpc_bid = $7, \
         daily_budget = $8, total_budget = $9, starts_at = $10, ends_at = $11, status = $12, frequency_cap = $13, updated_at = $14 \
         WHERE id = $15",
    )
    .bind(&c.name)
    .bind(c.categories.join(","))
    .bind(&c.title)
    .bind(&c.text)
    .bind(&c.url)
    .bind(c.cpm_bid_micros)
    .bind(c.cpc_bid_micros)
    .bind(c.daily_budget_micros)
    .bind(c.total_budget_micros)
    .bind(c.starts_at)
    .bind(c.ends_at)
    .bind(&c.status)
    .bind(i64::from(c.frequency_cap))
    .bind(now_ms())
    .bind(&id)
    .execute(&state.store.pool)
    .await?;
    reload(&state).await;
    Ok(Json(load_campaign(&state, &id).await?))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Range {
    /// Start, milliseconds since the epoch (inclusive).
    from: Option<i64>,
    /// End, milliseconds since the epoch (exclusive).
    to: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/api/analytics/ads",
    tag = "analytics",
    summary = "Ads report: impressions, clicks, CTR, revenue; free-tier cost against ad revenue",
    params(Range),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "The report over [from, to) (default: the last 30 days).", body = AdsReport),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
    ),
)]
/// `GET /api/analytics/ads`: impressions, clicks, CTR and revenue by category and
/// campaign, and what the free tier cost against what ads brought in.
pub async fn report(State(state): State<AppState>, Query(r): Query<Range>) -> Result<Json<AdsReport>, ApiError> {
    let (from, to) = crate::money::analytics::window(r.from, r.to);
    let pool = &state.store.pool;
    let rows = sqlx::query(
        "SELECT i.campaign_id, c.name, i.category, COUNT(*) AS impressions, COUNT(i.clicked_at) AS clicks, \
         CAST(COALESCE(SUM(i.charged), 0) AS BIGINT) AS spend \
         FROM ad_impressions i JOIN campaigns c ON c.id = i.campaign_id \
         WHERE i.created_at >= $1 AND i.created_at < $2 GROUP BY i.campaign_id, c.name, i.category ORDER BY i.campaign_id, i.category",
    )
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    let mut out = AdsReport { from, to, ..AdsReport::default() };
    for r in &rows {
        let impressions = u64::try_from(r.try_get::<i64, _>("impressions")?).unwrap_or(0);
        let clicks = u64::try_from(r.try_get::<i64, _>("clicks")?).unwrap_or(0);
        let spend: i64 = r.try_get("spend")?;
        let campaign_id: String = r.try_get("campaign_id")?;
        let category: String = r.try_get("category")?;
        out.impressions += impressions;
        out.clicks += clicks;
        out.revenue_micros += spend;
        match out.by_campaign.iter_mut().find(|c| c.campaign_id == campaign_id) {
            Some(c) => {
                c.impressions += impressions;
                c.clicks += clicks;
                c.spend_micros += spend;
            }
            None => out.by_campaign.push(CampaignReport {
                campaign_id,
                name: r.try_get("name")?,
                impressions,
                clicks,
                ctr: 0.0,
                spend: 0.0,
                spend_micros: spend,
            }),
        }
        match out.by_category.iter_mut().find(|c| c.category == category) {
            Some(c) => {
                c.impressions += impressions;
                c.clicks += clicks;
                c.revenue_micros += spend;
            }
            None => out.by_category.push(CategoryStats { category, impressions, clicks, revenue: 0.0, revenue_micros: spend }),
        }
    }
    for c in &mut out.by_campaign {
        c.ctr = ctr(c.clicks, c.impressions);
    }
    out.ctr = ctr(out.clicks, out.impressions);
    // Free-tier tokens are paid out of platform:ad_revenue (usage entries debit it);
    // ad charges credit it.
    let flows = sqlx::query(
        "SELECT e.kind, CAST(COALESCE(SUM(l.amount), 0) AS BIGINT) AS amount FROM ledger_lines l JOIN ledger_entries e ON e.id = l.entry_id \
         WHERE l.account_id = $1 AND e.created_at >= $2 AND e.created_at < $3 GROUP BY e.kind",
    )
    .bind(ledger::AD_REVENUE)
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    let mut free = FreeTierCost::default();
    for f in &flows {
        let kind: String = f.try_get("kind")?;
        let amount: i64 = f.try_get("amount")?;
        match kind.as_str() {
            "usage" => free.provider_cost_micros -= amount,
            "ad_impression" | "ad_click" => free.ad_revenue_micros += amount,
            _ => {}
        }
    }
    out.free_tier = free;
    Ok(Json(out.with_usd()))
}
