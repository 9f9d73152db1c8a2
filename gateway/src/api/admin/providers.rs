//! `/api/admin/providers…` and `/api/admin/quality-levels`: the provider list, approval and
//! suspension, quality levels, and what each provider has earned.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use bytes::Bytes;
use openapi::platform::ProviderInfo;
use serde::Serialize;
use sqlx::Row;
use utoipa::ToSchema;

use crate::edge::error::ApiError;
use crate::edge::extract;
use crate::inference::providers::ProviderStatus;
use crate::money::ledger;
use crate::money::units::usd;
use crate::state::AppState;
use crate::store::now_ms;

#[utoipa::path(
    get,
    path = "/api/admin/providers",
    tag = "admin",
    summary = "List providers with health and score",
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Every registered provider, oldest first.", body = crate::api::schemas::ProviderList),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
    ),
)]
pub async fn admin_providers(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let stale_ms = state.config.stale_after_ms();
    let now = now_ms();
    let flags: std::collections::HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT provider_id, COUNT(*) FROM usage_records WHERE usage_source = 'gateway_flagged' AND provider_id IS NOT NULL GROUP BY provider_id",
    )
    .fetch_all(&state.store.pool)
    .await?
    .into_iter()
    .collect();
    let snapshot = state.registry.snapshot();
    let weights = state.config.weights();
    let base = crate::inference::routing::Baseline::of(snapshot.values());
    let mut providers: Vec<ProviderInfo> = snapshot
        .values()
        .map(|p| {
            let flags = flags.get(&p.id).map_or(0, |n| u64::try_from(*n).unwrap_or(0));
            p.info(now, stale_ms, flags, crate::inference::routing::score(p, &weights, &base))
        })
        .collect();
    providers.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok(Json(serde_json::json!({ "object": "list", "data": providers })))
}

#[utoipa::path(
    post,
    path = "/api/admin/providers/{id}/approve",
    tag = "admin",
    summary = "Approve (activate) a provider",
    params(("id" = String, Path, description = "The provider id.")),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Active.", body = crate::api::schemas::ProviderStatusChange),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
        crate::api::schemas::NotFound,
    ),
)]
pub async fn admin_provider_approve(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    // A provider whose stored baseUrl breaks the egress rules stays off line.
    if let Some(p) = state.registry.get(&id).filter(|p| p.connection == openapi::platform::Connection::Direct) {
        crate::inference::egress::check_base_url(&p.base_url, state.config.allow_private_providers)
            .await
            .map_err(|m| ApiError::param(format!("cannot approve: {m}"), "baseUrl"))?;
    }
    state.registry.set_status(&id, ProviderStatus::Active, Some("approved by an admin")).await?;
    Ok(Json(serde_json::json!({ "id": id, "status": "active" })))
}

#[utoipa::path(
    post,
    path = "/api/admin/providers/{id}/suspend",
    tag = "admin",
    summary = "Suspend a provider",
    params(("id" = String, Path, description = "The provider id.")),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Suspended.", body = crate::api::schemas::ProviderStatusChange),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
        crate::api::schemas::NotFound,
    ),
)]
pub async fn admin_provider_suspend(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.registry.set_status(&id, ProviderStatus::Suspended, Some("suspended by an admin")).await?;
    Ok(Json(serde_json::json!({ "id": id, "status": "suspended" })))
}

fn level_json(l: &crate::inference::quality::QualityLevel) -> serde_json::Value {
    serde_json::json!({
        "name": l.name,
        "multiplier": l.multiplier,
        "latencyMultiplier": l.latency_multiplier,
        "costMultiplier": f64::from(l.cost_multiplier_bp) / 10_000.0,
        "maxTokens": l.max_tokens,
        "priority": l.priority,
        "minProviderScore": l.min_score,
        "precision": l.precision.wire(),
        "custom": l.custom,
    })
}

#[utoipa::path(
    get,
    path = "/api/admin/quality-levels",
    tag = "admin",
    summary = "List quality levels",
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Built-in and custom levels.", body = crate::api::schemas::QualityLevelList),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
    ),
)]
pub async fn admin_quality_levels(State(state): State<AppState>) -> Json<serde_json::Value> {
    let levels: Vec<serde_json::Value> = state.qualities.all().iter().map(level_json).collect();
    Json(serde_json::json!({ "object": "list", "data": levels }))
}

/// The seed's `addCustomQualityLevel`: `{name, multiplier, latencyMultiplier, costMultiplier, maxTokens}`.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct NewLevel {
    /// Not a built-in level's name.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,32}$")]
    name: String,
    #[schema(exclusive_minimum = 0, maximum = 100)]
    multiplier: f64,
    #[schema(exclusive_minimum = 0, maximum = 100)]
    latency_multiplier: f64,
    #[schema(exclusive_minimum = 0, maximum = 100)]
    cost_multiplier: f64,
    #[schema(minimum = 1)]
    max_tokens: u32,
}

#[utoipa::path(
    post,
    path = "/api/admin/quality-levels",
    tag = "admin",
    summary = "Add a custom quality level",
    request_body = NewLevel,
    security(("admin_key" = [])),
    responses(
        (status = 201, description = "The new level.", body = crate::api::schemas::QualityLevelInfo),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
        crate::api::schemas::Conflict,
        crate::api::schemas::PayloadTooLarge,
        crate::api::schemas::UnsupportedMediaType,
    ),
)]
pub async fn admin_add_quality_level(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let n: NewLevel = extract::parse(&headers, &body)?;
    let level = crate::inference::quality::custom(&n.name, n.multiplier, n.latency_multiplier, n.cost_multiplier, n.max_tokens);
    let level = state.qualities.add(level).await?;
    Ok((StatusCode::CREATED, Json(level_json(&level))))
}

/// Lifetime earnings per provider id: what usage and reservations credited to its account.
pub(crate) async fn earnings(state: &AppState, provider_id: Option<&str>) -> Result<HashMap<String, i64>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT l.account_id, CAST(SUM(l.amount) AS BIGINT) AS earned FROM ledger_lines l JOIN ledger_entries e ON e.id = l.entry_id \
         WHERE l.account_id LIKE 'provider:%' AND e.kind IN ('usage', 'reservation') AND ($1 IS NULL OR l.account_id = $1) \
         GROUP BY l.account_id",
    )
    .bind(provider_id.map(ledger::provider_account))
    .fetch_all(&state.store.pool)
    .await?;
    rows.iter()
        .map(|r| {
            let account: String = r.try_get("account_id")?;
            let id = account.strip_prefix("provider:").unwrap_or(&account).to_owned();
            Ok((id, r.try_get("earned")?))
        })
        .collect()
}

/// `GET /api/admin/providers/earnings`.
#[derive(Debug, Serialize, ToSchema)]
pub struct EarningsList {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<ProviderEarnings>,
}

/// One provider's money, USD (and the lifetime earnings in micro-USD).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderEarnings {
    pub provider_id: String,
    /// Lifetime credits for tokens and reservations, before withdrawals.
    pub earnings: f64,
    pub earnings_micros: i64,
    /// The account's posted balance now.
    pub balance: f64,
    /// The balance less what withdrawals hold.
    pub available: f64,
}

/// `GET /api/admin/providers/earnings`: lifetime earnings and balance per provider, which
/// the console joins with `GET /api/admin/providers`.
#[utoipa::path(
    get,
    path = "/api/admin/providers/earnings",
    tag = "admin",
    summary = "Earnings and balance per provider",
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Every registered provider's lifetime earnings and balance, by id.", body = EarningsList),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
    ),
)]
pub async fn provider_earnings(State(state): State<AppState>) -> Result<Json<EarningsList>, ApiError> {
    let earned = earnings(&state, None).await?;
    let mut balances: HashMap<String, (i64, i64)> = HashMap::new();
    for r in sqlx::query("SELECT owner_id, posted, held FROM accounts WHERE kind = 'provider'").fetch_all(&state.store.pool).await? {
        if let Some(owner) = r.try_get::<Option<String>, _>("owner_id")? {
            balances.insert(owner, (r.try_get("posted")?, r.try_get("held")?));
        }
    }
    let mut data: Vec<ProviderEarnings> = state
        .registry
        .snapshot()
        .values()
        .map(|p| {
            let (posted, held) = balances.get(&p.id).copied().unwrap_or((0, 0));
            let e = earned.get(&p.id).copied().unwrap_or(0);
            ProviderEarnings { provider_id: p.id.clone(), earnings: usd(e), earnings_micros: e, balance: usd(posted), available: usd(posted - held) }
        })
        .collect();
    data.sort_by(|a, b| a.provider_id.cmp(&b.provider_id));
    Ok(Json(EarningsList { object: "list", data }))
}
