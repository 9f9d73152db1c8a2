//! The platform API: providers (`/api/gpu/*`) and the admin API (`/api/admin/*`).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use bytes::Bytes;
use openapi::platform::{Heartbeat, RegisterProviderRequest, StreamControl};

use crate::ops::config::Registration;
use crate::edge::error::ApiError;
use crate::edge::keys::KeyError;
use crate::inference::providers::{ProviderError, ProviderStatus};
use crate::{edge::extract::bearer, edge::extract, state::AppState};

impl From<ProviderError> for ApiError {
    fn from(e: ProviderError) -> Self {
        match e {
            ProviderError::Invalid { message, param } => ApiError::param(message, param),
            ProviderError::Unknown(id) => ApiError::NotFound(format!("provider {id} does not exist")),
            ProviderError::WrongKey(_) => ApiError::InvalidApiKey,
            ProviderError::Db(e) => e.into(),
        }
    }
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::UnknownUser(id) => ApiError::param(format!("user {id} does not exist"), "userId"),
            KeyError::UnknownKey(id) => ApiError::NotFound(format!("key {id} does not exist")),
            KeyError::Db(e) => e.into(),
        }
    }
}

#[utoipa::path(
    post,
    path = "/api/gpu/register",
    tag = "providers",
    summary = "Register a provider",
    request_body = openapi::platform::RegisterProviderRequest,
    security((), ("admin_key" = [])),
    responses(
        (status = 201, description = "Registered; the provider key is shown once. `active` at once with open registration (or the admin key), else `pending` until an admin approves.", body = openapi::platform::RegisterProviderResponse),
        crate::api::schemas::BadRequest,
        crate::api::schemas::PayloadTooLarge,
        crate::api::schemas::UnsupportedMediaType,
        crate::api::schemas::IpRateLimited,
    ),
)]
pub async fn register(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let mut request: RegisterProviderRequest = extract::parse(&headers, &body)?;
    crate::inference::providers::resolve_pricing(&mut request.pricing)?;
    crate::inference::providers::check_market(&state.config, &request)?;
    // A dial-out provider has no address (registration refuses one it gives).
    if let Some(url) = &request.base_url {
        let checked = crate::inference::egress::check_base_url(url, state.config.allow_private_providers)
            .await
            .map_err(|m| ApiError::param(m, "baseUrl"))?;
        request.base_url = Some(checked);
    }
    let admin = state.is_admin(&headers);
    let status = match state.config.registration {
        Registration::Open => ProviderStatus::Active,
        // An admin may register providers that are active at once.
        Registration::AdminApproved if admin => ProviderStatus::Active,
        Registration::AdminApproved => ProviderStatus::Pending,
    };
    // A provider that registers itself is on probation; one an admin registers is not
    // (one that waits for approval leaves probation when it is approved).
    let probation = if admin { 0 } else { state.config.probation_requests };
    let (mut created, key_hash) = state.registry.register(request, status, probation).await?;
    created.relay_secret = crate::state::relay_secret(&state.relay_key, &created.provider_id, &key_hash);
    tracing::info!(provider = %created.provider_id, status = %created.status, probation, "provider registered");
    Ok((StatusCode::CREATED, Json(created)))
}

/// Reads a provider-keyed body and checks the key belongs to the provider it names.
async fn provider_body<T: serde::de::DeserializeOwned>(
    state: &AppState,
    headers: &HeaderMap,
    body: &Bytes,
    provider_id: impl Fn(&T) -> &str,
) -> Result<T, ApiError> {
    let key = bearer(headers).filter(|k| k.starts_with("pk-")).ok_or(ApiError::InvalidApiKey)?;
    let request: T = extract::parse(headers, body)?;
    state.registry.authenticate(provider_id(&request), key).await.map_err(|e| match e {
        ProviderError::Unknown(_) => ApiError::InvalidApiKey,
        other => other.into(),
    })?;
    Ok(request)
}

#[utoipa::path(
    post,
    path = "/api/gpu/stream/start",
    tag = "providers",
    summary = "Put a (model, quality) stream on line",
    request_body = openapi::platform::StreamControl,
    security(("provider_key" = [])),
    responses(
        (status = 200, description = "The stream is on line.", body = crate::api::schemas::StreamStarted),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::NotFound,
        crate::api::schemas::PayloadTooLarge,
        crate::api::schemas::UnsupportedMediaType,
    ),
)]
pub async fn stream_start(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let c: StreamControl = provider_body(&state, &headers, &body, |c: &StreamControl| &c.provider_id).await?;
    state.registry.start_stream(&c.provider_id, &c.model, &c.quality).await?;
    let status = state.registry.get(&c.provider_id).map(|p| p.status.as_str()).unwrap_or("pending");
    Ok(Json(serde_json::json!({ "providerId": c.provider_id, "model": c.model, "quality": c.quality, "streaming": true, "status": status })))
}

#[utoipa::path(
    post,
    path = "/api/gpu/stream/stop",
    tag = "providers",
    summary = "Take a (model, quality) stream off line",
    request_body = openapi::platform::StreamControl,
    security(("provider_key" = [])),
    responses(
        (status = 200, description = "The stream is off line.", body = crate::api::schemas::StreamStopped),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::NotFound,
        crate::api::schemas::PayloadTooLarge,
        crate::api::schemas::UnsupportedMediaType,
    ),
)]
pub async fn stream_stop(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let c: StreamControl = provider_body(&state, &headers, &body, |c: &StreamControl| &c.provider_id).await?;
    state.registry.stop_stream(&c.provider_id, &c.model, &c.quality).await?;
    Ok(Json(serde_json::json!({ "providerId": c.provider_id, "model": c.model, "quality": c.quality, "streaming": false })))
}

#[utoipa::path(
    post,
    path = "/api/gpu/keys/rotate",
    tag = "providers",
    summary = "Replace the provider key",
    request_body = openapi::platform::RotateKeyRequest,
    security(("provider_key" = [])),
    responses(
        (status = 200, description = "The new key (shown once); the old one no longer works.", body = openapi::platform::RotatedKey),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::PayloadTooLarge,
        crate::api::schemas::UnsupportedMediaType,
    ),
)]
pub async fn rotate_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<openapi::platform::RotatedKey>, ApiError> {
    let r: openapi::platform::RotateKeyRequest =
        provider_body(&state, &headers, &body, |r: &openapi::platform::RotateKeyRequest| &r.provider_id).await?;
    let (provider_key, key_hash) = state.registry.rotate_key(&r.provider_id).await?;
    tracing::info!(provider = %r.provider_id, "provider key rotated");
    let relay_secret = crate::state::relay_secret(&state.relay_key, &r.provider_id, &key_hash);
    Ok(Json(openapi::platform::RotatedKey { provider_id: r.provider_id, provider_key, relay_secret }))
}

#[utoipa::path(
    post,
    path = "/api/gpu/heartbeat",
    tag = "providers",
    summary = "Report liveness and load",
    request_body = openapi::platform::Heartbeat,
    security(("provider_key" = [])),
    responses(
        (status = 200, description = "Recorded.", body = crate::api::schemas::HeartbeatAck),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::NotFound,
        crate::api::schemas::PayloadTooLarge,
        crate::api::schemas::UnsupportedMediaType,
    ),
)]
pub async fn heartbeat(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let h: Heartbeat = provider_body(&state, &headers, &body, |h: &Heartbeat| &h.provider_id).await?;
    state.registry.record_heartbeat(&h.provider_id, h.active_streams, h.queue_length).await?;
    Ok(Json(serde_json::json!({ "providerId": h.provider_id, "ok": true })))
}

pub(crate) fn balance_json(account: &str, b: crate::money::ledger::Balance) -> serde_json::Value {
    serde_json::json!({
        "account": account,
        "balance": b.posted as f64 / 1e6,
        "held": b.held as f64 / 1e6,
        "available": b.available as f64 / 1e6,
        "balanceMicros": b.posted,
        "heldMicros": b.held,
        "availableMicros": b.available,
    })
}

/// `GET /api/payment/balance/{providerId}` with the provider's key (or the admin key).
#[utoipa::path(
    get,
    path = "/api/payment/balance/{provider_id}",
    tag = "payments",
    summary = "A provider's balance",
    params(("provider_id" = String, Path, description = "The provider id.")),
    security(("provider_key" = []), ("admin_key" = [])),
    responses(
        (status = 200, description = "The provider's earnings balance.", body = crate::api::schemas::ProviderBalance),
        crate::api::schemas::Unauthorized,
    ),
)]
pub async fn provider_balance(
    State(state): State<AppState>,
    Path(provider_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    crate::api::wallet::require_provider(&state, &headers, &provider_id).await?;
    let account = crate::money::ledger::provider_account(&provider_id);
    let mut v = balance_json(&account, state.ledger.balance(&account).await?);
    v["providerId"] = serde_json::json!(provider_id);
    Ok(Json(v))
}
