//! `/api/analytics/revenue`, `/api/analytics/usage` and `/api/admin/overview`: what the
//! console's dashboards read.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::Row;
use utoipa::ToSchema;

use crate::edge::error::ApiError;
use crate::inference::providers::ProviderStatus;
use crate::money::{analytics, ledger};
use crate::money::units::usd;
use crate::state::AppState;
use crate::store::now_ms;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Range {
    /// Unix milliseconds, inclusive (default: 30 days before `to`).
    #[param(minimum = 0, maximum = 253_402_300_799_999_i64)]
    from: Option<i64>,
    /// Unix milliseconds, exclusive (default: now).
    #[param(minimum = 0, maximum = 253_402_300_799_999_i64)]
    to: Option<i64>,
}

fn window(r: &Range) -> Result<(i64, i64), ApiError> {
    for (v, param) in [(r.from, "from"), (r.to, "to")] {
        if v.is_some_and(|v| !(0..=MAX_MS).contains(&v)) {
            return Err(ApiError::param(format!("`{param}` must be Unix milliseconds between 0 and {MAX_MS}"), param));
        }
    }
    let (from, to) = analytics::window(r.from, r.to);
    if from > to {
        return Err(ApiError::param("`from` must not be after `to`", "from"));
    }
    Ok((from, to))
}

#[utoipa::path(
    get,
    path = "/api/analytics/revenue",
    tag = "analytics",
    summary = "Revenue report",
    params(Range),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Platform income by day, month, model and provider.", body = crate::api::schemas::Revenue),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
    ),
)]
pub async fn revenue(State(state): State<AppState>, Query(r): Query<Range>) -> Result<Json<Value>, ApiError> {
    let (from, to) = window(&r)?;
    Ok(Json(analytics::revenue(&state.store, from, to).await?))
}

#[utoipa::path(
    get,
    path = "/api/analytics/usage",
    tag = "analytics",
    summary = "Usage report",
    params(Range),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Requests and tokens by model and quality, peak hours.", body = crate::api::schemas::UsageReport),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
    ),
)]
pub async fn usage(State(state): State<AppState>, Query(r): Query<Range>) -> Result<Json<Value>, ApiError> {
    let (from, to) = window(&r)?;
    Ok(Json(analytics::usage(&state.store, from, to).await?))
}

/// `GET /api/admin/overview`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Overview {
    /// Unix milliseconds when this was computed.
    pub at: i64,
    pub providers: ProviderCounts,
    /// Streams being relayed now (this replica).
    pub active_streams: u64,
    /// Requests waiting for a provider slot (this replica).
    pub queued: u64,
    /// Model requests per second over the last minute (every replica).
    pub requests_per_second: f64,
    /// Share of model requests that did not end `ok` over the last five minutes.
    pub error_rate: f64,
    /// Model requests over the last five minutes.
    pub recent_requests: i64,
    pub today: Today,
    /// Withdrawals requested or processing.
    pub pending_payouts: i64,
    /// HTTP requests this replica answered since it started.
    pub http: HttpCounts,
    /// Model requests per minute over the last hour (every replica), oldest first;
    /// minutes without requests are left out.
    pub last_hour: Vec<MinutePoint>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MinutePoint {
    /// Start of the minute, Unix milliseconds.
    pub t: i64,
    pub requests: i64,
    /// Requests that did not end `ok`.
    pub errors: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderCounts {
    /// Active, with a fresh heartbeat and a stream on line.
    pub online: u64,
    pub total: u64,
    /// Awaiting approval.
    pub pending: u64,
}

/// Since 00:00 UTC; money in USD.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Today {
    pub requests: i64,
    pub tokens: i64,
    /// What users and the ad-revenue account were charged for tokens.
    pub billed: f64,
    /// Platform fees credited.
    pub fees: f64,
    /// Credits to the ad-revenue account (advertiser spend).
    pub ad_revenue: f64,
    /// `fees + adRevenue`: what the platform earned.
    pub revenue: f64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpCounts {
    pub requests: u64,
    pub client_errors: u64,
    pub server_errors: u64,
}

/// `GET /api/admin/overview`: what the console's first page shows, polled every few
/// seconds. Rates come from the usage records (every replica's requests), so they agree
/// across replicas; stream and queue gauges are this replica's.
#[utoipa::path(
    get,
    path = "/api/admin/overview",
    tag = "admin",
    summary = "Live overview for the console",
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Providers on line, streams, queue, request and error rates, today's revenue.", body = Overview),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
    ),
)]
pub async fn overview(State(state): State<AppState>) -> Result<Json<Overview>, ApiError> {
    let now = now_ms();
    let stale_ms = state.config.stale_after_ms();
    let snapshot = state.registry.snapshot();
    let online = snapshot.values().filter(|p| p.is_live(now, stale_ms)).count();
    let pending = snapshot.values().filter(|p| p.status == ProviderStatus::Pending).count();
    let (day_start, _) = analytics::day_and_month_start(now);
    let pool = &state.store.pool;
    let minute: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_records WHERE created_at >= $1")
        .bind(now - 60_000)
        .fetch_one(pool)
        .await?;
    let recent = sqlx::query(
        "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(CASE WHEN status = 'ok' THEN 0 ELSE 1 END), 0) AS BIGINT) AS errors \
         FROM usage_records WHERE created_at >= $1",
    )
    .bind(now - 300_000)
    .fetch_one(pool)
    .await?;
    let (recent_n, recent_errors): (i64, i64) = (recent.try_get("n")?, recent.try_get("errors")?);
    let today = sqlx::query(
        "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT) AS billed, \
         CAST(COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS BIGINT) AS tokens FROM usage_records WHERE created_at >= $1",
    )
    .bind(day_start)
    .fetch_one(pool)
    .await?;
    // Fees are only ever credited; the ad-revenue account is also debited for free-tier
    // tokens, so only its credits count as income.
    let credits = |account: &'static str| {
        sqlx::query_scalar::<_, i64>(
            "SELECT CAST(COALESCE(SUM(l.amount), 0) AS BIGINT) FROM ledger_lines l JOIN ledger_entries e ON e.id = l.entry_id \
             WHERE l.account_id = $1 AND e.created_at >= $2 AND l.amount > 0",
        )
        .bind(account)
        .bind(day_start)
        .fetch_one(pool)
    };
    let fees = credits(ledger::FEES).await?;
    let ads = credits(ledger::AD_REVENUE).await?;
    let pending_payouts: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM withdrawals WHERE status IN ('requested', 'processing')")
        .fetch_one(pool)
        .await?;
    let hour_start = (now.div_euclid(60_000) - 59) * 60_000;
    let last_hour = sqlx::query(
        "SELECT created_at / 60000 AS m, COUNT(*) AS n, CAST(COALESCE(SUM(CASE WHEN status = 'ok' THEN 0 ELSE 1 END), 0) AS BIGINT) AS errors \
         FROM usage_records WHERE created_at >= $1 GROUP BY created_at / 60000 ORDER BY m",
    )
    .bind(hour_start)
    .fetch_all(pool)
    .await?
    .iter()
    .map(|r| Ok(MinutePoint { t: r.try_get::<i64, _>("m")? * 60_000, requests: r.try_get("n")?, errors: r.try_get("errors")? }))
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let http = state.metrics.http_totals();
    Ok(Json(Overview {
        at: now,
        providers: ProviderCounts { online: online as u64, total: snapshot.len() as u64, pending: pending as u64 },
        active_streams: state.active_streams.load(Ordering::Relaxed),
        queued: state.queued.load(Ordering::Relaxed),
        requests_per_second: minute as f64 / 60.0,
        error_rate: if recent_n > 0 { recent_errors as f64 / recent_n as f64 } else { 0.0 },
        recent_requests: recent_n,
        today: Today {
            requests: today.try_get("n")?,
            tokens: today.try_get("tokens")?,
            billed: usd(today.try_get("billed")?),
            fees: usd(fees),
            ad_revenue: usd(ads),
            revenue: usd(fees + ads),
        },
        pending_payouts,
        http: HttpCounts { requests: http.requests, client_errors: http.client_errors, server_errors: http.server_errors },
        last_hour,
    }))
}

/// 9999-12-31T23:59:59.999Z in Unix milliseconds. Bounds outside `0..=MAX_MS` are
/// mistakes, and refusing them keeps the window arithmetic from overflowing.
const MAX_MS: i64 = 253_402_300_799_999;
