//! The admin web console: static files embedded in the binary (served under `/admin`
//! with a strict Content-Security-Policy) and the few read endpoints that exist only for
//! it — the live overview, provider earnings, and `GET /api/gpu/me` for the provider view.
//!
//! The console is plain HTML, JavaScript modules and CSS in `gateway/console/`; there is
//! no build step, so what is in that folder is exactly what ships.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::providers::ProviderStatus;
use crate::store::now_ms;
use crate::{analytics, bearer, ledger, routing, AppState};
use crate::money::usd;

/// Every console response carries this policy: only our own scripts, styles and API, no
/// inline code or style attributes, never framed. A stored-XSS payload in a provider or
/// campaign name therefore cannot run even if some code path forgot to escape it.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                       connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The console's files: name under `/admin/`, content type, bytes.
const FILES: &[(&str, &str, &[u8])] = &[
    ("index.html", "text/html; charset=utf-8", include_bytes!("../console/index.html")),
    ("app.js", "text/javascript; charset=utf-8", include_bytes!("../console/app.js")),
    ("api.js", "text/javascript; charset=utf-8", include_bytes!("../console/api.js")),
    ("dom.js", "text/javascript; charset=utf-8", include_bytes!("../console/dom.js")),
    ("chart.js", "text/javascript; charset=utf-8", include_bytes!("../console/chart.js")),
    ("pages.js", "text/javascript; charset=utf-8", include_bytes!("../console/pages.js")),
    ("provider.js", "text/javascript; charset=utf-8", include_bytes!("../console/provider.js")),
    ("style.css", "text/css; charset=utf-8", include_bytes!("../console/style.css")),
    ("favicon.svg", "image/svg+xml", include_bytes!("../console/favicon.svg")),
];

/// Strong ETags of the embedded files, computed once.
fn etags() -> &'static [String] {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| FILES.iter().map(|(_, _, bytes)| format!("\"{}\"", hex::encode(&Sha256::digest(bytes)[..12]))).collect())
}

/// `GET /admin` and `GET /admin/`: the console's single page.
pub async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

/// `GET /admin/{file}`: one of the embedded assets.
pub async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    serve(&file, &headers)
}

fn serve(name: &str, request: &HeaderMap) -> Response {
    let Some(i) = FILES.iter().position(|(n, _, _)| *n == name) else {
        return ApiError::NotFound(format!("no console file `{name}`")).into_response();
    };
    let (_, content_type, bytes) = FILES[i];
    let etag = &etags()[i];
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut response = if fresh { StatusCode::NOT_MODIFIED.into_response() } else { bytes.into_response() };
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // File names are not versioned, so browsers revalidate every time (a 304 when unchanged).
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    secure(h);
    response
}

/// The console's security headers.
fn secure(h: &mut HeaderMap) {
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
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
        crate::api_spec::Unauthorized,
        crate::api_spec::AdminDisabled,
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

/// Lifetime earnings per provider id: what usage and reservations credited to its account.
async fn earnings(state: &AppState, provider_id: Option<&str>) -> Result<HashMap<String, i64>, sqlx::Error> {
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
        crate::api_spec::Unauthorized,
        crate::api_spec::AdminDisabled,
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

/// `GET /api/gpu/me`: the provider the key belongs to. Money in USD.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderMe {
    pub id: String,
    pub name: String,
    /// `pending`, `active` or `suspended`.
    pub status: String,
    /// Active, with a fresh heartbeat and a stream on line.
    pub online: bool,
    /// Routing score in [0, 1].
    pub score: f64,
    /// Time to first token (EWMA), null before the first request.
    pub latency_ms: Option<f64>,
    /// Share of passed health checks (EWMA).
    pub uptime: f64,
    pub success_rate: f64,
    /// Requests this replica has sent it.
    pub requests: u64,
    /// Requests in flight on this replica now.
    pub active_requests: u32,
    pub streams: Vec<openapi::platform::StreamControlInfo>,
    pub pricing: openapi::platform::Pricing,
    /// Lifetime credits for tokens and reservations.
    pub earnings: f64,
    pub balance: MeBalance,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MeBalance {
    pub posted: f64,
    pub held: f64,
    pub available: f64,
}

/// `GET /api/gpu/me` with a provider key: the provider's own id, status, score, latency,
/// uptime, streams and earnings — how the console's provider view finds out who it is.
#[utoipa::path(
    get,
    path = "/api/gpu/me",
    tag = "providers",
    summary = "The provider a key belongs to",
    security(("provider_key" = [])),
    responses(
        (status = 200, description = "The provider's id, status, health, streams and earnings.", body = ProviderMe),
        crate::api_spec::Unauthorized,
    ),
)]
pub async fn provider_me(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<ProviderMe>, ApiError> {
    let key = bearer(&headers).filter(|k| k.starts_with("pk-")).ok_or(ApiError::InvalidApiKey)?;
    let id: Option<String> = sqlx::query_scalar("SELECT id FROM providers WHERE key_hash = $1")
        .bind(crate::keys::hash_key(key))
        .fetch_optional(&state.store.pool)
        .await?;
    let id = id.ok_or(ApiError::InvalidApiKey)?;
    // Registered moments ago on another replica: not in this snapshot yet.
    if state.registry.get(&id).is_none() {
        state.registry.reload().await?;
    }
    let p = state.registry.get(&id).ok_or_else(|| ApiError::NotFound(format!("provider {id} does not exist")))?;
    let snapshot = state.registry.snapshot();
    let base = routing::Baseline::of(snapshot.values());
    let health = p.load.health.snapshot();
    let mut streams: Vec<openapi::platform::StreamControlInfo> = p
        .streams
        .iter()
        .map(|(model, quality)| openapi::platform::StreamControlInfo { model: model.clone(), quality: quality.clone() })
        .collect();
    streams.sort_by(|a, b| (&a.model, &a.quality).cmp(&(&b.model, &b.quality)));
    let earned = earnings(&state, Some(&id)).await?.get(&id).copied().unwrap_or(0);
    let balance = state.ledger.balance(&ledger::provider_account(&id)).await?;
    Ok(Json(ProviderMe {
        id: p.id.clone(),
        name: p.name.clone(),
        status: p.status.as_str().to_owned(),
        online: p.is_live(now_ms(), state.config.stale_after_ms()),
        score: routing::score(&p, &state.config.weights(), &base),
        latency_ms: health.ttft_ms,
        uptime: health.uptime,
        success_rate: health.success_rate,
        requests: health.requests,
        active_requests: p.load.in_flight.load(Ordering::Relaxed),
        streams,
        pricing: p.pricing,
        earnings: usd(earned),
        balance: MeBalance { posted: usd(balance.posted), held: usd(balance.held), available: usd(balance.available) },
    }))
}
