//! The admin web console: static files embedded in the binary (served under `/admin`
//! with a strict Content-Security-Policy) and the few read endpoints that exist only for
//! it — the live overview, provider earnings, and `GET /api/gpu/me` for the provider view.
//!
//! The console is plain HTML, JavaScript modules and CSS in `admin/` (top level); there is
//! no build step, so what is in that folder is exactly what ships.

use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use crate::edge::error::ApiError;
use crate::store::now_ms;
use crate::{edge::extract::bearer, money::ledger, inference::routing, state::AppState};
use crate::api::admin::providers::earnings;
use crate::money::units::usd;

/// Every console response carries this policy: only our own scripts, styles and API, no
/// inline code or style attributes, never framed. A stored-XSS payload in a provider or
/// campaign name therefore cannot run even if some code path forgot to escape it.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                       connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The console's files: name under `/admin/`, content type, bytes.
const FILES: &[(&str, &str, &[u8])] = &[
    ("index.html", "text/html; charset=utf-8", include_bytes!("../../../admin/index.html")),
    ("app.js", "text/javascript; charset=utf-8", include_bytes!("../../../admin/app.js")),
    ("api.js", "text/javascript; charset=utf-8", include_bytes!("../../../admin/api.js")),
    ("dom.js", "text/javascript; charset=utf-8", include_bytes!("../../../admin/dom.js")),
    ("chart.js", "text/javascript; charset=utf-8", include_bytes!("../../../admin/chart.js")),
    ("pages.js", "text/javascript; charset=utf-8", include_bytes!("../../../admin/pages.js")),
    ("provider.js", "text/javascript; charset=utf-8", include_bytes!("../../../admin/provider.js")),
    ("style.css", "text/css; charset=utf-8", include_bytes!("../../../admin/style.css")),
    ("favicon.svg", "image/svg+xml", include_bytes!("../../../admin/favicon.svg")),
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
        crate::api::schemas::Unauthorized,
    ),
)]
pub async fn provider_me(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<ProviderMe>, ApiError> {
    let key = bearer(&headers).filter(|k| k.starts_with("pk-")).ok_or(ApiError::InvalidApiKey)?;
    let id: Option<String> = sqlx::query_scalar("SELECT id FROM providers WHERE key_hash = $1")
        .bind(crate::edge::keys::hash_key(key))
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
