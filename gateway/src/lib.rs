//! GPU Streaming's gateway: an OpenAI-compatible HTTP server in front of a marketplace
//! of providers. `app()` builds the router so tests drive it in-process; `server` runs it.

pub mod ads;
pub mod aggregate;
pub mod api_spec;
pub mod analytics;
pub mod config;
pub mod console;
pub mod delivered;
pub mod demo;
pub mod egress;
pub mod error;
pub mod extract;
pub mod free_budget;
pub mod funding;
pub mod health;
pub mod holds;
pub mod keys;
pub mod links;
pub mod ledger;
pub mod metrics;
pub mod money;
pub mod payments;
pub mod payout_connector;
pub mod payments_api;
pub mod openai_api;
pub mod platform_api;
pub mod providers;
pub mod quality;
pub mod ratelimit;
pub mod reservations;
pub mod responses_api;
pub mod relay;
pub mod routing;
pub mod server;
pub mod simple_api;
pub mod store;
pub mod telemetry;
pub mod tokenizers;
pub mod usage;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::{Config, Secret};
use crate::error::ApiError;
use crate::keys::Keys;
use crate::providers::{constant_time_eq, Registry};
use crate::store::Store;
use crate::usage::UsageSink;

/// Everything a handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: Config,
    pub store: Store,
    pub keys: Keys,
    pub registry: Arc<Registry>,
    pub usage: UsageSink,
    pub ledger: ledger::Ledger,
    /// Provider calls (`egress` rules apply).
    pub http: reqwest::Client,
    /// The operator's own services (the payout webhook), which may be private.
    pub webhooks: reqwest::Client,
    /// For providers whose `http://` base URL speaks h2c (`capabilities.http2`): one
    /// multiplexed connection instead of one per open stream.
    pub h2c: reqwest::Client,
    pub user_id_secret: Secret,
    /// Streams being relayed right now (this replica).
    pub active_streams: Arc<AtomicU64>,
    pub limiter: Arc<ratelimit::Limiter>,
    pub metrics: Arc<metrics::Metrics>,
    pub qualities: Arc<quality::Qualities>,
    /// Woken whenever a provider slot frees up (requests queued for capacity wait on it).
    pub capacity_freed: Arc<tokio::sync::Notify>,
    /// Requests waiting for a provider slot right now.
    pub queued: Arc<AtomicU64>,
    /// Per-key locks that serialize spending-limit checks with their holds.
    pub key_locks: moka::sync::Cache<String, Arc<tokio::sync::Mutex<()>>>,
    /// Ad inventory, auction and delivery tracking (the layer is `ads::layer`).
    pub ads: Arc<ads::Ads>,
    /// Model tokenizers, for counting delivered tokens (config `tokenizers`).
    pub tokenizers: Arc<tokenizers::Tokenizers>,
    /// What free keys may still cost the platform today (`free_tier_daily_budget`).
    pub free_budget: Arc<free_budget::FreeBudget>,
    /// Each model's share of requests served by providers on probation.
    pub probation: Arc<routing::Probation>,
    /// Key of the providers' relay secrets (`relay_secret_key`).
    pub relay_key: Secret,
    /// Dial-out links open to this replica, counted per client address.
    pub links: Arc<links::Links>,
    /// Routing's random source when `routing_seed` is set (reproducible choices).
    pub routing_rng: Option<parking_lot::Mutex<rand::rngs::StdRng>>,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

fn pseudonym(secret: &Secret, parts: &[&str]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()) else {
        return "anonymous".to_owned();
    };
    for part in parts {
        mac.update(part.as_bytes());
        mac.update(b"\0");
    }
    let digest = mac.finalize().into_bytes();
    format!("u_{}", hex::encode(&digest[..16]))
}

pub fn relay_secret(key: &Secret, provider_id: &str, key_hash: &str) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key.expose().as_bytes()) else {
        return String::new();
    };
    mac.update(format!("relay\0{provider_id}\0{key_hash}").as_bytes());
    format!("rs-{}", hex::encode(mac.finalize().into_bytes()))
}

impl AppState {
    pub fn new(inner: Inner) -> Self {
        Self(Arc::new(inner))
    }

    /// The user id written into a provider request before routing: an HMAC of the
    /// account id, replaced by `pseudonym_for` the chosen provider when it is sent.
    pub fn pseudonym(&self, user_id: &str) -> String {
        pseudonym(&self.user_id_secret, &[user_id])
    }

    /// The pseudonymous user id one provider sees: an HMAC of the account and the
    /// provider, so colluding providers cannot link a user by comparing ids.
    pub fn pseudonym_for(&self, user_id: &str, provider_id: &str) -> String {
        pseudonym(&self.user_id_secret, &[user_id, provider_id])
    }

    /// The secret a provider's worker requires on every call: an HMAC of its id under
    /// `relay_secret_key` and of its key's hash, so rotating the key rotates it.
    pub fn relay_secret(&self, provider: &providers::Provider) -> String {
        relay_secret(&self.relay_key, &provider.id, &provider.key_hash)
    }

    pub fn is_admin(&self, headers: &HeaderMap) -> bool {
        match (&self.config.admin_key, bearer(headers)) {
            (Some(admin), Some(given)) => constant_time_eq(admin.expose().as_bytes(), given.as_bytes()),
            _ => false,
        }
    }

    pub fn webhook_client(config: &Config) -> Result<reqwest::Client, reqwest::Error> {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.provider_connect_timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .build()
    }

    pub fn http_client(config: &Config) -> Result<reqwest::Client, reqwest::Error> {
        Self::provider_client(config).pool_max_idle_per_host(1024).build()
    }

    /// HTTP/2 with prior knowledge. Each open stream then costs the gateway a few
    /// hundred bytes of HTTP/2 stream state instead of an HTTP/1.1 connection (~25 KB
    /// of hyper buffers and a file descriptor); BENCHMARKS.md has the measurement.
    pub fn h2c_client(config: &Config) -> Result<reqwest::Client, reqwest::Error> {
        Self::provider_client(config)
            .http2_prior_knowledge()
            // A dead connection would take every stream on it along; pings find it.
            .http2_keep_alive_interval(Duration::from_secs(20))
            .http2_keep_alive_while_idle(false)
            .build()
    }

    /// What both provider clients share: the connect timeout, idle pooling, no Nagle; no
    /// redirects and no proxy from the environment (a provider must not steer the
    /// gateway elsewhere), and, unless `allow_private_providers`, names resolved to
    /// public addresses only (`egress`).
    fn provider_client(config: &Config) -> reqwest::ClientBuilder {
        let builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.provider_connect_timeout_ms))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        if config.allow_private_providers {
            builder
        } else {
            builder.dns_resolver(Arc::new(egress::PublicOnly))
        }
    }

    /// The client for a provider: h2c when its plain-HTTP server declares it.
    pub fn client_for(&self, provider: &crate::providers::Provider) -> &reqwest::Client {
        if provider.capabilities.http2 && provider.base_url.starts_with("http://") {
            &self.h2c
        } else {
            &self.http
        }
    }
}

/// The request id of the current request (from `x-request-id` or generated).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The user key a request presented, for handlers that must check it again later (a
/// WebSocket re-checks it on every message, so a revoked key closes the socket).
#[derive(Clone)]
pub struct PresentedKey(pub String);

pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?;
    Some(token.trim())
}

/// Builds the router with every route and the middleware stack.
pub fn app(state: AppState) -> Router {
    // The ad layer works on these two routes' request bodies and response streams.
    let model_routes = Router::new()
        .route("/v1/chat/completions", post(openai_api::chat_completions))
        .route("/v1/completions", post(openai_api::completions))
        .route_layer(ads::layer::AdLayer::new(state.clone()));
    let user_routes = Router::new()
        .merge(model_routes)
        .route("/api/llm/ad-preferences", axum::routing::put(ads::api::set_preferences))
        .route("/v1/responses", post(responses_api::create_response))
        .route("/v1/responses/{id}", get(responses_api::get_response).delete(responses_api::delete_response))
        .route("/v1/models", get(openai_api::list_models))
        .route("/v1/models/{*id}", get(openai_api::get_model))
        .route("/api/llm/inference", post(simple_api::inference))
        .route("/api/llm/models", get(simple_api::models))
        .route("/api/llm/status", get(simple_api::status))
        .route("/api/llm/ws", get(simple_api::websocket))
        .route("/api/llm/reservations", post(simple_api::create_reservation).get(simple_api::list_reservations))
        .route("/api/llm/reservations/{id}", axum::routing::delete(simple_api::release_reservation))
        .route("/api/llm/balance", get(payments_api::own_balance))
        .route("/api/llm/transactions", get(payments_api::own_transactions))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_user_key));
    let admin_routes = Router::new()
        .route("/api/admin/keys", post(platform_api::admin_create_key).get(platform_api::admin_list_keys))
        .route("/api/admin/keys/{id}/revoke", post(platform_api::admin_revoke_key))
        .route("/api/admin/keys/{id}", axum::routing::delete(platform_api::admin_delete_key))
        .route("/api/admin/providers", get(platform_api::admin_providers))
        .route("/api/admin/users/{id}/credit", post(platform_api::admin_credit_user))
        .route("/api/admin/users/{id}/balance", get(platform_api::admin_user_balance))
        .route("/api/admin/users/{id}/transactions", get(payments_api::user_transactions))
        .route("/api/admin/payouts", get(payments_api::admin_payouts))
        .route("/api/admin/payouts/auto", post(payments_api::admin_auto_payouts))
        .route("/api/admin/payouts/{id}/{action}", post(payments_api::admin_payout_transition))
        .route("/api/admin/settings", get(payments_api::admin_settings).patch(payments_api::admin_update_settings))
        .route("/api/analytics/revenue", get(payments_api::revenue))
        .route("/api/analytics/usage", get(payments_api::usage))
        .route("/api/admin/quality-levels", get(platform_api::admin_quality_levels).post(platform_api::admin_add_quality_level))
        .route("/api/admin/providers/{id}/approve", post(platform_api::admin_provider_approve))
        .route("/api/admin/providers/{id}/suspend", post(platform_api::admin_provider_suspend))
        .route("/api/admin/advertisers", post(ads::api::create_advertiser).get(ads::api::list_advertisers))
        .route("/api/admin/advertisers/{id}/credit", post(ads::api::credit_advertiser))
        .route("/api/admin/campaigns", post(ads::api::create_campaign).get(ads::api::list_campaigns))
        .route("/api/admin/campaigns/{id}", get(ads::api::get_campaign).patch(ads::api::update_campaign))
        .route("/api/analytics/ads", get(ads::api::report))
        .route("/api/admin/providers/earnings", get(console::provider_earnings))
        .route("/api/admin/overview", get(console::overview))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin_key));
    let open_routes = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(api_spec::serve))
        .route("/r/{impression}", get(ads::api::click))
        .route("/api/gpu/register", post(platform_api::register))
        .route("/api/gpu/stream/start", post(platform_api::stream_start))
        .route("/api/gpu/stream/stop", post(platform_api::stream_stop))
        .route("/api/gpu/heartbeat", post(platform_api::heartbeat))
        .route("/api/gpu/keys/rotate", post(platform_api::rotate_key))
        .route("/api/gpu/link", get(links::accept))
        .route("/api/replica/link", post(links::forwarded))
        .route("/api/gpu/me", get(console::provider_me))
        .route("/admin", get(console::index))
        .route("/admin/", get(console::index))
        .route("/admin/{file}", get(console::asset))
        .route("/api/payment/balance/{provider_id}", get(platform_api::provider_balance))
        .route("/api/payment/withdraw", post(payments_api::withdraw))
        .route("/api/payment/method", axum::routing::put(payments_api::set_method))
        .route("/api/payment/withdrawals/{provider_id}", get(payments_api::provider_withdrawals))
        .route("/api/payment/transactions/{provider_id}", get(payments_api::provider_transactions))
        .route("/api/payment/topup", post(payments_api::top_up))
        .route("/api/payment/payout-webhook", post(payments_api::payout_webhook))
        .route_layer(middleware::from_fn_with_state(state.clone(), limit_by_ip));
    let max_body = state.config.max_body_bytes;
    let metrics_state = state.metrics.clone();
    let body_state = (max_body, Duration::from_secs(state.config.body_read_timeout_secs));
    // Layers run top to bottom on the request (the last `.layer` is the outermost).
    Router::new()
        .merge(user_routes)
        .merge(admin_routes)
        .merge(open_routes)
        .fallback(not_found)
        .with_state(state)
        // Bounds every body before it is buffered; over the limit is a 413.
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        // A body must arrive within `body_read_timeout_secs` (408), at most `max_body_bytes`.
        .layer(middleware::from_fn_with_state(body_state, read_body_in_time))
        // Turns framework rejections (413, 405, bad paths) into OpenAI-shaped errors.
        .layer(middleware::from_fn(openai_error_shape))
        // Keys and provider bodies never reach logs; the span carries the request id.
        .layer(tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer::new([header::AUTHORIZATION]))
        // Request counts and latency by path and status, for /metrics.
        .layer(middleware::from_fn_with_state(metrics_state, observe))
        // Outermost: every response, errors included, carries `x-request-id`.
        .layer(middleware::from_fn(request_id))
}

/// Every request gets our own id (UUIDv7): it keys the usage record and the ledger
/// entry, so it must be unique and cannot come from the client. A client's own id
/// (`x-client-request-id`, or an `x-request-id` from a proxy) is logged with ours and
/// echoed back as `x-client-request-id`.
async fn request_id(mut request: Request, next: Next) -> Response {
    let id = format!("req_{}", uuid::Uuid::now_v7().simple());
    let client_id = ["x-client-request-id", "x-request-id"]
        .iter()
        .find_map(|h| request.headers().get(*h))
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned);
    request.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        client_request_id = client_id.as_deref().unwrap_or(""),
        method = %request.method(),
        path = %request.uri().path()
    );
    let mut response = tracing::Instrument::instrument(next.run(request), span).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    if let Some(v) = client_id.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().insert("x-client-request-id", v);
    }
    response
}

/// Reads a request's body in full within its time limit, so a client that trickles a
/// body a byte at a time cannot hold a connection and a task for as long as it likes
/// (hyper already bounds the time to read the head).
async fn read_body_in_time(State((limit, timeout)): State<(usize, Duration)>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    if !headers.contains_key(header::CONTENT_LENGTH) && !headers.contains_key(header::TRANSFER_ENCODING) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => ApiError::RequestTimeout(timeout.as_secs()).into_response(),
        Ok(Err(e)) => {
            let too_large = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
                .any(|e| e.is::<http_body_util::LengthLimitError>());
            if too_large {
                ApiError::PayloadTooLarge { limit }.into_response()
            } else {
                ApiError::invalid(format!("The request body could not be read: {e}"), None).into_response()
            }
        }
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
    }
}

async fn openai_error_shape(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024).await.unwrap_or_default();
    let message = String::from_utf8_lossy(&text).trim().to_owned();
    let error = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge { limit: 0 },
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType,
        StatusCode::NOT_FOUND => ApiError::NotFound(if message.is_empty() { "not found".into() } else { message }),
        s if s.is_client_error() => ApiError::InvalidRequest {
            message: if message.is_empty() { s.to_string() } else { message },
            param: None,
            code: None,
        },
        _ => ApiError::Internal(message),
    };
    let mut body = error.body();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        body.error.message = "The request body is too large.".to_owned();
    }
    let mut out = (status, Json(body)).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

async fn not_found(request: Request<Body>) -> ApiError {
    ApiError::NotFound(format!("Unknown path: {} {}", request.method(), request.uri().path()))
}

/// The key a request presents: the bearer token, or `?api_key=` on the WebSocket route
/// (browsers cannot set headers there) and elsewhere only with `allow_query_api_key`
/// (a key in a URL ends up in logs and browser history).
pub fn presented_key(config: &Config, request: &Request) -> Option<String> {
    if let Some(b) = bearer(request.headers()) {
        return Some(b.to_owned());
    }
    if request.uri().path() != "/api/llm/ws" && !config.allow_query_api_key {
        return None;
    }
    request.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("api_key="))).map(str::to_owned)
}

/// A key's requests and tokens per minute: its own, else its tier's.
pub fn rate_limits(config: &Config, key: &keys::AuthedKey) -> (u64, u64) {
    let (rpm, tpm) = match key.tier {
        keys::Tier::Free => (config.free_requests_per_minute, config.free_tokens_per_minute),
        keys::Tier::Premium => (config.premium_requests_per_minute, config.premium_tokens_per_minute),
    };
    (u64::from(key.requests_per_minute.unwrap_or(rpm)), u64::from(key.tokens_per_minute.unwrap_or(tpm)))
}

async fn require_user_key(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let Some(secret) = presented_key(&state.config, &request) else { return ApiError::InvalidApiKey.into_response() };
    match state.keys.authenticate(&secret).await {
        Ok(Some(key)) => {
            let (rpm, tpm) = rate_limits(&state.config, &key);
            let requests = match state.limiter.apply(&format!("k:{}:r", key.key_id), 1, rpm).await {
                Ok(d) => d,
                Err(e) => return ApiError::Internal(e.to_string()).into_response(),
            };
            let ctx = Arc::new(ratelimit::RateCtx {
                requests,
                tokens: parking_lot::Mutex::new(None),
                tokens_key: format!("k:{}:t", key.key_id),
                tokens_limit: tpm,
            });
            let mut response = if requests.allowed {
                request.extensions_mut().insert(PresentedKey(secret));
                request.extensions_mut().insert(key);
                request.extensions_mut().insert(ctx.clone());
                next.run(request).await
            } else {
                ApiError::RateLimited { what: "requests", retry_after: requests.retry_after }.into_response()
            };
            let tokens = ctx.tokens.lock().take();
            let tokens = match tokens {
                Some(d) => Some(d),
                None => state.limiter.apply(&ctx.tokens_key, 0, tpm).await.ok(),
            };
            ratelimit::headers(response.headers_mut(), "requests", &requests);
            if let Some(t) = tokens {
                ratelimit::headers(response.headers_mut(), "tokens", &t);
            }
            response
        }
        Ok(None) => ApiError::InvalidApiKey.into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Per client IP on unauthenticated endpoints, so registration and webhooks cannot be flooded.
async fn limit_by_ip(State(state): State<AppState>, request: Request, next: Next) -> Response {
    // Provider-key routes (streams, heartbeats, payouts) are authenticated; only the
    // open doors are limited per IP.
    if !matches!(request.uri().path(), "/api/gpu/register" | "/api/payment/topup" | "/api/payment/payout-webhook") {
        return next.run(request).await;
    }
    let ip = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |c| c.0.ip().to_string());
    let limit = u64::from(state.config.ip_requests_per_minute);
    match state.limiter.apply(&format!("ip:{ip}"), 1, limit).await {
        Ok(d) if d.allowed => {
            let mut response = next.run(request).await;
            ratelimit::headers(response.headers_mut(), "requests", &d);
            response
        }
        Ok(d) => {
            let mut response = ApiError::RateLimited { what: "requests", retry_after: d.retry_after }.into_response();
            ratelimit::headers(response.headers_mut(), "requests", &d);
            response
        }
        Err(e) => ApiError::Internal(e.to_string()).into_response(),
    }
}

async fn require_admin_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state.config.admin_key.is_none() {
        return ApiError::PermissionDenied("the admin API is disabled: set GATEWAY_ADMIN_KEY".into()).into_response();
    }
    if !state.is_admin(request.headers()) {
        return ApiError::InvalidApiKey.into_response();
    }
    next.run(request).await
}

async fn observe(State(metrics): State<Arc<metrics::Metrics>>, request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    metrics.record_http(&path, response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    summary = "Prometheus metrics",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4.", body = String, content_type = "text/plain; version=0.0.4; charset=utf-8")),
)]
async fn metrics_text(State(state): State<AppState>) -> Response {
    let stale_ms = state.config.stale_after_ms();
    let now = store::now_ms();
    let snapshot = state.registry.snapshot();
    let weights = state.config.weights();
    let base = routing::Baseline::of(snapshot.values());
    let online = snapshot.values().filter(|p| p.is_live(now, stale_ms)).count();
    let mut scores = Vec::new();
    let mut breakers = Vec::new();
    let mut in_flight = Vec::new();
    for p in snapshot.values() {
        let label = format!("provider=\"{}\"", p.id);
        scores.push((label.clone(), routing::score(p, &weights, &base)));
        let open = p.load.health.snapshot().breaker != health::Breaker::Closed;
        breakers.push((label.clone(), if open { 1.0 } else { 0.0 }));
        in_flight.push((label, f64::from(p.load.in_flight.load(std::sync::atomic::Ordering::Relaxed))));
    }
    let gauges = [
        ("gs_active_streams", "Streams being relayed now.", vec![(String::new(), state.active_streams.load(std::sync::atomic::Ordering::Relaxed) as f64)]),
        ("gs_queued_requests", "Requests waiting for a provider slot.", vec![(String::new(), state.queued.load(std::sync::atomic::Ordering::Relaxed) as f64)]),
        ("gs_providers_online", "Providers on line (active, fresh heartbeat, a stream up).", vec![(String::new(), online as f64)]),
        ("gs_provider_score", "Routing score in [0, 1].", scores),
        ("gs_provider_breaker_open", "1 while the provider's circuit breaker is open or half-open.", breakers),
        ("gs_provider_in_flight", "Requests in flight per provider (this replica).", in_flight),
    ];
    let mut body = state.metrics.render(&gauges);
    state.ads.counters.render(&mut body);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

/// `GET /health`: 200 while the database answers, 503 otherwise.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    summary = "Liveness and database health",
    responses(
        (status = 200, description = "Healthy.", body = api_spec::Health),
        (status = 503, description = "The database does not answer.", body = api_spec::Health),
    ),
)]
async fn health(State(state): State<AppState>) -> Response {
    let db_ok = sqlx::query("SELECT 1").execute(&state.store.pool).await.is_ok();
    let body = serde_json::json!({
        "status": if db_ok { "ok" } else { "degraded" },
        "database": if db_ok { "ok" } else { "unreachable" },
        "activeStreams": state.active_streams.load(std::sync::atomic::Ordering::Relaxed),
        "providers": state.registry.snapshot().len(),
    });
    let status = if db_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}
