//! The platform API: providers (`/api/gpu/*`) and the admin API (`/api/admin/*`).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use bytes::Bytes;
use openapi::platform::{CreateKeyRequest, Heartbeat, ProviderInfo, RegisterProviderRequest, StreamControl};

use crate::config::Registration;
use crate::error::ApiError;
use crate::keys::{KeyError, NewKey, Tier};
use crate::providers::{ProviderError, ProviderStatus};
use crate::store::now_ms;
use crate::{bearer, extract, AppState};

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
        crate::api_spec::BadRequest,
        crate::api_spec::PayloadTooLarge,
        crate::api_spec::UnsupportedMediaType,
        crate::api_spec::IpRateLimited,
    ),
)]
pub async fn register(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let mut request: RegisterProviderRequest = extract::parse(&headers, &body)?;
    crate::providers::resolve_pricing(&mut request.pricing)?;
    crate::providers::check_market(&state.config, &request)?;
    // A dial-out provider has no address (registration refuses one it gives).
    if let Some(url) = &request.base_url {
        let checked = crate::egress::check_base_url(url, state.config.allow_private_providers)
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
    created.relay_secret = crate::relay_secret(&state.relay_key, &created.provider_id, &key_hash);
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
        (status = 200, description = "The stream is on line.", body = crate::api_spec::StreamStarted),
        crate::api_spec::BadRequest,
        crate::api_spec::Unauthorized,
        crate::api_spec::NotFound,
        crate::api_spec::PayloadTooLarge,
        crate::api_spec::UnsupportedMediaType,
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
        (status = 200, description = "The stream is off line.", body = crate::api_spec::StreamStopped),
        crate::api_spec::BadRequest,
        crate::api_spec::Unauthorized,
        crate::api_spec::NotFound,
        crate::api_spec::PayloadTooLarge,
        crate::api_spec::UnsupportedMediaType,
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
        crate::api_spec::BadRequest,
        crate::api_spec::Unauthorized,
        crate::api_spec::PayloadTooLarge,
        crate::api_spec::UnsupportedMediaType,
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
    let relay_secret = crate::relay_secret(&state.relay_key, &r.provider_id, &key_hash);
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
        (status = 200, description = "Recorded.", body = crate::api_spec::HeartbeatAck),
        crate::api_spec::BadRequest,
        crate::api_spec::Unauthorized,
        crate::api_spec::NotFound,
        crate::api_spec::PayloadTooLarge,
        crate::api_spec::UnsupportedMediaType,
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

#[utoipa::path(
    get,
    path = "/api/admin/providers",
    tag = "admin",
    summary = "List providers with health and score",
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Every registered provider, oldest first.", body = crate::api_spec::ProviderList),
        crate::api_spec::Unauthorized,
        crate::api_spec::AdminDisabled,
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
    let base = crate::routing::Baseline::of(snapshot.values());
    let mut providers: Vec<ProviderInfo> = snapshot
        .values()
        .map(|p| {
            let flags = flags.get(&p.id).map_or(0, |n| u64::try_from(*n).unwrap_or(0));
            p.info(now, stale_ms, flags, crate::routing::score(p, &weights, &base))
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
        (status = 200, description = "Active.", body = crate::api_spec::ProviderStatusChange),
        crate::api_spec::Unauthorized,
        crate::api_spec::AdminDisabled,
        crate::api_spec::NotFound,
    ),
)]
pub async fn admin_provider_approve(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    // A provider whose stored baseUrl breaks the egress rules stays off line.
    if let Some(p) = state.registry.get(&id).filter(|p| p.connection == openapi::platform::Connection::Direct) {
        crate::egress::check_base_url(&p.base_url, state.config.allow_private_providers)
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
        (status = 200, description = "Suspended.", body = crate::api_spec::ProviderStatusChange),
        crate::api_spec::Unauthorized,
        crate::api_spec::AdminDisabled,
        crate::api_spec::NotFound,
    ),
)]
pub async fn admin_provider_suspend(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.registry.set_status(&id, ProviderStatus::Suspended, Some("suspended by an admin")).await?;
    Ok(Json(serde_json::json!({ "id": id, "status": "suspended" })))
}

#[utoipa::path(
    post,
    path = "/api/admin/keys",
    tag = "admin",
    summary = "Create a user API key",
    request_body = openapi::platform::CreateKeyRequest,
    security(("admin_key" = [])),
    responses(
        (status = 201, description = "The key; its secret is shown once.", body = openapi::platform::CreatedKey),
        crate::api_spec::BadRequest,
        crate::api_spec::Unauthorized,
        crate::api_spec::AdminDisabled,
        crate::api_spec::PayloadTooLarge,
        crate::api_spec::UnsupportedMediaType,
    ),
)]
pub async fn admin_create_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let request: CreateKeyRequest = extract::parse(&headers, &body)?;
    if request.name.trim().is_empty() {
        return Err(ApiError::param("`name` must not be empty", "name"));
    }
    let tier = Tier::parse(&request.tier)
        .ok_or_else(|| ApiError::param(format!("unknown tier `{}`; expected free or premium", request.tier), "tier"))?;
    let created = state
        .keys
        .create(NewKey {
            name: request.name,
            tier: Some(tier),
            user_id: request.user_id,
            requests_per_minute: request.requests_per_minute,
            tokens_per_minute: request.tokens_per_minute,
            daily_limit_micros: limit_micros(request.daily_limit, "dailyLimit")?,
            monthly_limit_micros: limit_micros(request.monthly_limit, "monthlyLimit")?,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(created)))
}

fn limit_micros(usd: Option<f64>, param: &str) -> Result<Option<i64>, ApiError> {
    match usd {
        None => Ok(None),
        Some(v) if (0.0..1e9).contains(&v) => Ok(Some((v * 1e6).round() as i64)),
        Some(_) => Err(ApiError::param(format!("`{param}` must be a non-negative USD amount"), param)),
    }
}

#[utoipa::path(
    get,
    path = "/api/admin/keys",
    tag = "admin",
    summary = "List API keys",
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Every key (no secrets), oldest first.", body = crate::api_spec::KeyList),
        crate::api_spec::Unauthorized,
        crate::api_spec::AdminDisabled,
    ),
)]
pub async fn admin_list_keys(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let keys = state.keys.list().await?;
    Ok(Json(serde_json::json!({ "object": "list", "data": keys })))
}

#[utoipa::path(
    post,
    path = "/api/admin/keys/{id}/revoke",
    tag = "admin",
    summary = "Revoke an API key",
    params(("id" = String, Path, description = "The key id.")),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Revoked (again, if it already was).", body = crate::api_spec::KeyRevoked),
        crate::api_spec::Unauthorized,
        crate::api_spec::AdminDisabled,
        crate::api_spec::NotFound,
    ),
)]
pub async fn admin_revoke_key(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.keys.revoke(&id).await?;
    Ok(Json(serde_json::json!({ "id": id, "revoked": true })))
}

/// `amount` (USD) or `amountMicros`, positive.
/// `DELETE /api/admin/keys/{id}`: the same as `POST …/revoke` (each route has its own
/// operation in the OpenAPI document).
#[utoipa::path(
    delete,
    path = "/api/admin/keys/{id}",
    tag = "admin",
    summary = "Revoke an API key",
    params(("id" = String, Path, description = "The key id.")),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Revoked (again, if it already was).", body = crate::api_spec::KeyRevoked),
        crate::api_spec::Unauthorized,
        crate::api_spec::AdminDisabled,
        crate::api_spec::NotFound,
    ),
)]
pub async fn admin_delete_key(state: State<AppState>, id: Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    admin_revoke_key(state, id).await
}

#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CreditRequest {
    /// USD, as the seed's API speaks; stored as micro-USD.
    #[serde(default)]
    #[schema(exclusive_minimum = 0, maximum = 1_000_000)]
    amount: Option<f64>,
    /// The same in micro-USD (both given: they must agree).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1_000_000_000_000_i64)]
    amount_micros: Option<i64>,
    #[serde(default)]
    memo: Option<String>,
}

fn usd_amount(amount: Option<f64>, micros: Option<i64>) -> Result<i64, ApiError> {
    // One credit adds at most $1,000,000 (the ledger's limit).
    let field = crate::money::Field { name: "amount", twin: "amountMicros", max_micros: 1_000_000_000_000 };
    let micros = field
        .micros(amount, micros)?
        .ok_or_else(|| ApiError::param("`amount` (USD) or `amountMicros` is required", "amount"))?;
    if micros <= 0 {
        return Err(ApiError::param("the amount must be positive", "amount"));
    }
    Ok(micros)
}

fn balance_json(account: &str, b: crate::ledger::Balance) -> serde_json::Value {
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

/// `POST /api/admin/users/{id}/credit`: grants prepaid credit to a user.
#[utoipa::path(
    post,
    path = "/api/admin/users/{id}/credit",
    tag = "admin",
    summary = "Grant prepaid credit to a user",
    request_body = CreditRequest,
    params(("id" = String, Path, description = "The user id.")),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "The user's balance after the credit.", body = crate::api_spec::UserBalance),
        crate::api_spec::BadRequest,
        crate::api_spec::Unauthorized,
        crate::api_spec::AdminDisabled,
        crate::api_spec::NotFound,
        crate::api_spec::PayloadTooLarge,
        crate::api_spec::UnsupportedMediaType,
    ),
)]
pub async fn admin_credit_user(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request: CreditRequest = extract::parse(&headers, &body)?;
    let micros = usd_amount(request.amount, request.amount_micros)?;
    let exists: Option<String> = sqlx::query_scalar("SELECT id FROM users WHERE id = $1")
        .bind(&user_id)
        .fetch_optional(&state.store.pool)
        .await?;
    if exists.is_none() {
        return Err(ApiError::NotFound(format!("user {user_id} does not exist")));
    }
    let account = crate::ledger::user_account(&user_id);
    let memo = request.memo.unwrap_or_else(|| "admin credit".to_owned());
    let balance = state.ledger.credit(&account, micros, "credit", &memo).await.map_err(|e| match e {
        crate::ledger::LedgerError::NonPositive => ApiError::param("the amount must be positive", "amount"),
        crate::ledger::LedgerError::TooLarge => ApiError::param("one credit may add at most $1,000,000", "amount"),
        crate::ledger::LedgerError::Db(e) => e.into(),
    })?;
    Ok(Json(balance_json(&account, balance)))
}

#[utoipa::path(
    get,
    path = "/api/admin/users/{id}/balance",
    tag = "admin",
    summary = "A user's balance",
    params(("id" = String, Path, description = "The user id.")),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "The balance (zero for an unknown user).", body = crate::api_spec::UserBalance),
        crate::api_spec::Unauthorized,
        crate::api_spec::AdminDisabled,
    ),
)]
pub async fn admin_user_balance(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let account = crate::ledger::user_account(&user_id);
    Ok(Json(balance_json(&account, state.ledger.balance(&account).await?)))
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
        (status = 200, description = "The provider's earnings balance.", body = crate::api_spec::ProviderBalance),
        crate::api_spec::Unauthorized,
    ),
)]
pub async fn provider_balance(
    State(state): State<AppState>,
    Path(provider_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    crate::payments_api::require_provider(&state, &headers, &provider_id).await?;
    let account = crate::ledger::provider_account(&provider_id);
    let mut v = balance_json(&account, state.ledger.balance(&account).await?);
    v["providerId"] = serde_json::json!(provider_id);
    Ok(Json(v))
}

fn level_json(l: &crate::quality::QualityLevel) -> serde_json::Value {
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
        (status = 200, description = "Built-in and custom levels.", body = crate::api_spec::QualityLevelList),
        crate::api_spec::Unauthorized,
        crate::api_spec::AdminDisabled,
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
        (status = 201, description = "The new level.", body = crate::api_spec::QualityLevelInfo),
        crate::api_spec::BadRequest,
        crate::api_spec::Unauthorized,
        crate::api_spec::AdminDisabled,
        crate::api_spec::Conflict,
        crate::api_spec::PayloadTooLarge,
        crate::api_spec::UnsupportedMediaType,
    ),
)]
pub async fn admin_add_quality_level(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let n: NewLevel = extract::parse(&headers, &body)?;
    let level = crate::quality::custom(&n.name, n.multiplier, n.latency_multiplier, n.cost_multiplier, n.max_tokens);
    let level = state.qualities.add(level).await?;
    Ok((StatusCode::CREATED, Json(level_json(&level))))
}
