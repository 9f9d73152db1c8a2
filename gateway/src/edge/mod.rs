//! The HTTP edge: the router, built in `app()` with its ordered middleware stack, and
//! the pieces every request passes through on its way to a handler — the one error type
//! (`error`), body extractors (`extract`), key authentication (`keys`), rate limits
//! (`ratelimit`) and the listener's limits on connections (`listener`).

pub mod error;
pub mod extract;
pub mod keys;
pub mod listener;
pub mod ratelimit;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::ads;
use crate::api::{ad_choices, admin, console, embeddings, gpu, openai, operations, responses, simple, spec, wallet};
use crate::edge::error::ApiError;
use crate::edge::extract::{presented_key, PresentedKey, RequestId};
use crate::ops::metrics;
use crate::state::AppState;

/// Builds the router with every route and the middleware stack. A request meets the
/// layers in this order (the last `.layer` below is the outermost):
/// 1. `request_id`: our id (UUIDv7) in the span and on every response, errors included.
/// 2. `observe`: request counts and latency by path and status, for `/metrics`.
/// 3. sensitive headers: `Authorization` never reaches logs.
/// 4. `openai_error_shape`: framework rejections (413, 405, bad paths) in OpenAI's shape.
/// 5. `read_body_in_time`: the whole body within `body_read_timeout_secs` (408) and
///    `max_body_bytes` (413).
/// 6. the body limit for extractors (413).
/// 7. per route group: `require_user_key` (key, then `ratelimit::admit`),
///    `require_admin_key`, or `ratelimit::limit_by_ip` on the open doors.
/// 8. on the two model routes: `extract::parse_model_body` (the body parsed once), then
///    the ad layer; then the handler.
pub fn app(state: AppState) -> Router {
    // The ad layer works on these two routes' parsed requests and response streams.
    let model_routes = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route_layer(ads::layer::AdLayer::new(state.clone()))
        // Outside the ad layer: the body is parsed once, for the ad layer and the handler.
        .route_layer(middleware::from_fn(extract::parse_model_body));
    let user_routes = Router::new()
        .merge(model_routes)
        .route("/api/llm/ad-preferences", axum::routing::put(ad_choices::set_preferences))
        .route("/v1/responses", post(responses::create_response))
        .route("/v1/embeddings", post(embeddings::create_embeddings))
        .route("/v1/responses/{id}", get(responses::get_response).delete(responses::delete_response))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{*id}", get(openai::get_model))
        .route("/api/llm/inference", post(simple::inference))
        .route("/api/llm/models", get(simple::models))
        .route("/api/llm/status", get(simple::status))
        .route("/api/llm/ws", get(simple::websocket))
        .route("/api/llm/reservations", post(simple::create_reservation).get(simple::list_reservations))
        .route("/api/llm/reservations/{id}", axum::routing::delete(simple::release_reservation))
        .route("/api/llm/balance", get(wallet::own_balance))
        .route("/api/llm/transactions", get(wallet::own_transactions))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_user_key));
    let admin_routes = Router::new()
        .route("/api/admin/keys", post(admin::keys::admin_create_key).get(admin::keys::admin_list_keys))
        .route("/api/admin/keys/{id}/revoke", post(admin::keys::admin_revoke_key))
        .route("/api/admin/keys/{id}", axum::routing::delete(admin::keys::admin_delete_key))
        .route("/api/admin/providers", get(admin::providers::admin_providers))
        .route("/api/admin/users/{id}/credit", post(admin::users::admin_credit_user))
        .route("/api/admin/users/{id}/balance", get(admin::users::admin_user_balance))
        .route("/api/admin/users/{id}/transactions", get(admin::users::user_transactions))
        .route("/api/admin/payouts", get(admin::payouts::admin_payouts))
        .route("/api/admin/payouts/auto", post(admin::payouts::admin_auto_payouts))
        .route("/api/admin/payouts/{id}/{action}", post(admin::payouts::admin_payout_transition))
        .route("/api/admin/settings", get(admin::payouts::admin_settings).patch(admin::payouts::admin_update_settings))
        .route("/api/analytics/revenue", get(admin::reports::revenue))
        .route("/api/analytics/usage", get(admin::reports::usage))
        .route("/api/admin/quality-levels", get(admin::providers::admin_quality_levels).post(admin::providers::admin_add_quality_level))
        .route("/api/admin/providers/{id}/approve", post(admin::providers::admin_provider_approve))
        .route("/api/admin/providers/{id}/suspend", post(admin::providers::admin_provider_suspend))
        .route("/api/admin/advertisers", post(admin::ads::create_advertiser).get(admin::ads::list_advertisers))
        .route("/api/admin/advertisers/{id}/credit", post(admin::ads::credit_advertiser))
        .route("/api/admin/campaigns", post(admin::ads::create_campaign).get(admin::ads::list_campaigns))
        .route("/api/admin/campaigns/{id}", get(admin::ads::get_campaign).patch(admin::ads::update_campaign))
        .route("/api/analytics/ads", get(admin::ads::report))
        .route("/api/admin/providers/earnings", get(admin::providers::provider_earnings))
        .route("/api/admin/overview", get(admin::reports::overview))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin_key));
    let open_routes = Router::new()
        .route("/health", get(operations::health))
        .route("/metrics", get(operations::metrics_text))
        .route("/openapi.json", get(spec::serve))
        .route("/r/{impression}", get(ad_choices::click))
        .route("/api/gpu/register", post(gpu::register))
        .route("/api/gpu/stream/start", post(gpu::stream_start))
        .route("/api/gpu/stream/stop", post(gpu::stream_stop))
        .route("/api/gpu/heartbeat", post(gpu::heartbeat))
        .route("/api/gpu/keys/rotate", post(gpu::rotate_key))
        .route("/api/gpu/link", get(crate::inference::links::accept))
        .route("/api/replica/link", post(crate::inference::links::forwarded))
        .route("/api/gpu/me", get(console::provider_me))
        .route("/admin", get(console::index))
        .route("/admin/", get(console::index))
        .route("/admin/{file}", get(console::asset))
        .route("/api/payment/balance/{provider_id}", get(gpu::provider_balance))
        .route("/api/payment/withdraw", post(wallet::withdraw))
        .route("/api/payment/method", axum::routing::put(wallet::set_method))
        .route("/api/payment/withdrawals/{provider_id}", get(wallet::provider_withdrawals))
        .route("/api/payment/transactions/{provider_id}", get(wallet::provider_transactions))
        .route("/api/payment/topup", post(wallet::top_up))
        .route("/api/payment/payout-webhook", post(wallet::payout_webhook))
        .route_layer(middleware::from_fn_with_state((state.limiter.clone(), u64::from(state.config.ip_requests_per_minute)), ratelimit::limit_by_ip));
    let max_body = state.config.max_body_bytes;
    let metrics_state = state.metrics.clone();
    let body_state = (max_body, Duration::from_secs(state.config.body_read_timeout_secs));
    // Listed innermost first: the request meets them from the bottom up (see above).
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


async fn require_user_key(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let Some(secret) = presented_key(&state.config, &request) else { return ApiError::InvalidApiKey.into_response() };
    let key = match state.keys.authenticate(&secret).await {
        Ok(Some(key)) => key,
        Ok(None) => return ApiError::InvalidApiKey.into_response(),
        Err(e) => return ApiError::from(e).into_response(),
    };
    let rate = match ratelimit::admit(&state.limiter, &state.config, &key).await {
        Ok(rate) => rate,
        Err(e) => return e.into_response(),
    };
    let mut response = match rate.refused() {
        Some(refusal) => refusal.into_response(),
        None => {
            request.extensions_mut().insert(PresentedKey(secret));
            request.extensions_mut().insert(key);
            request.extensions_mut().insert(rate.clone());
            next.run(request).await
        }
    };
    rate.write_headers(response.headers_mut()).await;
    response
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

