//! HTTP edge of payouts, top-ups, history and analytics.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::edge::error::ApiError;
use crate::money::payments::{PaymentError, PayoutMethod, Payments};
use crate::inference::providers::ProviderError;
use crate::{money::analytics, edge::extract::bearer, edge::extract, money::ledger, state::AppState};

impl From<PaymentError> for ApiError {
    fn from(e: PaymentError) -> Self {
        match e {
            PaymentError::Invalid(message, param) => ApiError::param(message, param),
            PaymentError::Insufficient => ApiError::param("insufficient available balance for this withdrawal", "amount"),
            PaymentError::IdempotencyConflict => ApiError::Conflict("this Idempotency-Key was used with a different request".into()),
            PaymentError::UnknownWithdrawal(id) => ApiError::NotFound(format!("withdrawal {id} does not exist")),
            e @ PaymentError::Frozen(_) => ApiError::PermissionDenied(e.to_string()),
            e @ PaymentError::BadTransition { .. } => ApiError::Conflict(e.to_string()),
            PaymentError::Db(e) => e.into(),
        }
    }
}

/// The provider's own key (or the admin key) for provider-scoped calls.
pub async fn require_provider(state: &AppState, headers: &HeaderMap, provider_id: &str) -> Result<(), ApiError> {
    if state.is_admin(headers) {
        return Ok(());
    }
    let key = bearer(headers).filter(|k| k.starts_with("pk-")).ok_or(ApiError::InvalidApiKey)?;
    state.registry.authenticate(provider_id, key).await.map_err(|e| match e {
        ProviderError::Unknown(_) | ProviderError::WrongKey(_) => ApiError::InvalidApiKey,
        other => other.into(),
    })
}

pub(crate) fn payments(state: &AppState) -> Payments {
    Payments::new(state.store.clone())
}

pub(crate) fn to_micros(usd: f64, param: &'static str) -> Result<i64, ApiError> {
    if !usd.is_finite() || usd <= 0.0 || usd > 1e9 {
        return Err(ApiError::param(format!("`{param}` must be a positive USD amount"), param));
    }
    Ok((usd * 1e6).round() as i64)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WithdrawRequest {
    provider_id: String,
    /// USD; at least the minimum withdrawal and at most the available balance (or
    /// `amountMicros`; both given, they must agree).
    #[serde(default)]
    #[schema(exclusive_minimum = 0, maximum = 1_000_000_000)]
    amount: Option<f64>,
    #[serde(default)]
    #[schema(minimum = 1)]
    amount_micros: Option<i64>,
    #[serde(default)]
    method: Option<PayoutMethod>,
}

#[utoipa::path(
    post,
    path = "/api/payment/withdraw",
    tag = "payments",
    summary = "Request a payout",
    request_body = WithdrawRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Retrying with the same key returns the first result; 1 to 255 visible characters.")),
    security(("provider_key" = []), ("admin_key" = [])),
    responses(
        (status = 201, description = "The withdrawal (or, for a repeated Idempotency-Key, the first one).", body = crate::money::payments::Withdrawal),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        (status = 403, description = "The provider is suspended: its balance is frozen (kept) until an admin approves it again.", body = openapi::error::ErrorBody),
        crate::api::schemas::Conflict,
        crate::api::schemas::PayloadTooLarge,
        crate::api::schemas::UnsupportedMediaType,
    ),
)]
pub async fn withdraw(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<impl IntoResponse, ApiError> {
    let request: WithdrawRequest = extract::parse(&headers, &body)?;
    require_provider(&state, &headers, &request.provider_id).await?;
    let key = match headers.get("idempotency-key") {
        Some(v) => Some(v.to_str().ok().filter(|k| !k.is_empty() && k.len() <= 255).ok_or_else(|| {
            ApiError::param("Idempotency-Key must be 1 to 255 visible characters", "Idempotency-Key")
        })?),
        None => None,
    };
    let field = crate::money::units::Field { name: "amount", twin: "amountMicros", max_micros: 1_000_000_000_000_000 };
    let amount = field
        .micros(request.amount, request.amount_micros)?
        .filter(|m| *m > 0)
        .ok_or_else(|| ApiError::param("`amount` must be a positive USD amount (or give `amountMicros`)", "amount"))?;
    let p = payments(&state);
    let w = p.withdraw(&request.provider_id, amount, request.method, key, false).await?;
    if w.status == "requested" && w.updated_at == w.created_at {
        crate::money::payout_connector::dispatch(state.webhooks.clone(), &state.config, p, w.clone());
    }
    Ok((StatusCode::CREATED, Json(w)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MethodRequest {
    provider_id: String,
    method: PayoutMethod,
}

#[utoipa::path(
    put,
    path = "/api/payment/method",
    tag = "payments",
    summary = "Set the payout method",
    request_body = MethodRequest,
    security(("provider_key" = []), ("admin_key" = [])),
    responses(
        (status = 200, description = "Saved: a first method applies at once, a change after `payout_method_delay_secs` (`effectiveAt`).", body = crate::api::schemas::MethodSet),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::PayloadTooLarge,
        crate::api::schemas::UnsupportedMediaType,
    ),
)]
pub async fn set_method(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Json<Value>, ApiError> {
    let request: MethodRequest = extract::parse(&headers, &body)?;
    require_provider(&state, &headers, &request.provider_id).await?;
    // A provider's change waits `payout_method_delay_secs`, so a stolen provider key
    // cannot send the earnings elsewhere at once; an admin's applies at once.
    let delay_ms = if state.is_admin(&headers) { 0 } else { i64::try_from(state.config.payout_method_delay_secs.saturating_mul(1000)).unwrap_or(i64::MAX) };
    let effective_at = payments(&state).set_method(&request.provider_id, &request.method, delay_ms).await?;
    Ok(Json(json!({ "providerId": request.provider_id, "method": request.method, "effectiveAt": effective_at })))
}

#[utoipa::path(
    get,
    path = "/api/payment/withdrawals/{provider_id}",
    tag = "payments",
    summary = "A provider's withdrawals",
    params(("provider_id" = String, Path, description = "The provider id.")),
    security(("provider_key" = []), ("admin_key" = [])),
    responses(
        (status = 200, description = "Withdrawals, newest first.", body = crate::api::schemas::WithdrawalList),
        crate::api::schemas::Unauthorized,
    ),
)]
pub async fn provider_withdrawals(
    State(state): State<AppState>,
    Path(provider_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    require_provider(&state, &headers, &provider_id).await?;
    let list = payments(&state).list(Some(&provider_id), None).await?;
    Ok(Json(json!({ "object": "list", "data": list })))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// `nextCursor` of the previous page.
    pub(crate) before: Option<String>,
    /// Lines per page, 1 to 500 (default 50).
    pub(crate) limit: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/api/payment/transactions/{provider_id}",
    tag = "payments",
    summary = "A provider's ledger history",
    params(("provider_id" = String, Path, description = "The provider id."), Page),
    security(("provider_key" = []), ("admin_key" = [])),
    responses(
        (status = 200, description = "Ledger lines, newest first.", body = crate::api::schemas::History),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
    ),
)]
pub async fn provider_transactions(
    State(state): State<AppState>,
    Path(provider_id): Path<String>,
    Query(page): Query<Page>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    require_provider(&state, &headers, &provider_id).await?;
    let account = ledger::provider_account(&provider_id);
    Ok(Json(analytics::history(&state.store, &account, page.before.as_deref(), page.limit.unwrap_or(50)).await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TopUp {
    event_id: String,
    user_id: String,
    /// USD.
    #[schema(exclusive_minimum = 0, maximum = 1_000_000_000)]
    amount: f64,
}

/// `POST /api/payment/topup`: a payment processor's webhook, signed with HMAC-SHA256
/// over the raw body (`x-signature: sha256=<hex>`); each event applies once.
#[utoipa::path(
    post,
    path = "/api/payment/topup",
    tag = "payments",
    summary = "Top-up webhook from the payment processor",
    request_body = TopUp,
    security(("signature" = [])),
    responses(
        (status = 200, description = "Applied (or already applied earlier).", body = crate::api::schemas::TopUpResult),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        (status = 403, description = "Top-ups are disabled (no webhook secret is configured).", body = openapi::error::ErrorBody),
        crate::api::schemas::PayloadTooLarge,
        crate::api::schemas::UnsupportedMediaType,
        crate::api::schemas::IpRateLimited,
    ),
)]
pub async fn top_up(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Json<Value>, ApiError> {
    let Some(secret) = &state.config.topup_webhook_secret else {
        return Err(ApiError::PermissionDenied("top-ups are disabled: set GATEWAY_TOPUP_WEBHOOK_SECRET".into()));
    };
    let signature = headers.get("x-signature").and_then(|v| v.to_str().ok());
    if !crate::money::payout_connector::verify(secret.expose(), &body, signature) {
        return Err(ApiError::InvalidApiKey);
    }
    let t: TopUp = extract::parse(&headers, &body)?;
    let exists: Option<String> = sqlx::query_scalar("SELECT id FROM users WHERE id = $1").bind(&t.user_id).fetch_optional(&state.store.pool).await?;
    if exists.is_none() {
        return Err(ApiError::param(format!("user {} does not exist", t.user_id), "userId"));
    }
    let applied = payments(&state).top_up(&t.event_id, &t.user_id, to_micros(t.amount, "amount")?).await?;
    let balance = state.ledger.balance(&ledger::user_account(&t.user_id)).await?;
    Ok(Json(json!({ "eventId": t.event_id, "applied": applied, "balance": balance.posted as f64 / 1e6 })))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PayoutOutcome {
    withdrawal_id: String,
    #[schema(pattern = "^(paid|failed)$")]
    status: String,
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /api/payment/payout-webhook`: the payout service reports `paid` or `failed`.
/// Signed like the outgoing webhook; a repeated report of the same outcome is a no-op.
#[utoipa::path(
    post,
    path = "/api/payment/payout-webhook",
    tag = "payments",
    summary = "Payout service reports an outcome",
    request_body = PayoutOutcome,
    security(("signature" = [])),
    responses(
        (status = 200, description = "The withdrawal in its new state.", body = crate::money::payments::Withdrawal),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        (status = 403, description = "No payout service is configured.", body = openapi::error::ErrorBody),
        crate::api::schemas::NotFound,
        crate::api::schemas::Conflict,
        crate::api::schemas::PayloadTooLarge,
        crate::api::schemas::UnsupportedMediaType,
        crate::api::schemas::IpRateLimited,
    ),
)]
pub async fn payout_webhook(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Json<Value>, ApiError> {
    let Some(secret) = &state.config.payout_webhook_secret else {
        return Err(ApiError::PermissionDenied("no payout service is configured".into()));
    };
    let signature = headers.get("x-signature").and_then(|v| v.to_str().ok());
    if !crate::money::payout_connector::verify(secret.expose(), &body, signature) {
        return Err(ApiError::InvalidApiKey);
    }
    let outcome: PayoutOutcome = extract::parse(&headers, &body)?;
    if !matches!(outcome.status.as_str(), "paid" | "failed") {
        return Err(ApiError::param("`status` must be paid or failed", "status"));
    }
    let p = payments(&state);
    let current = p.get(&outcome.withdrawal_id).await?;
    let w = if current.status == outcome.status { current } else { p.transition(&outcome.withdrawal_id, &outcome.status, outcome.reason).await? };
    Ok(Json(serde_json::to_value(w).unwrap_or_default()))
}

/// `GET /api/llm/balance`: the caller's own prepaid balance.
#[utoipa::path(
    get,
    path = "/api/llm/balance",
    tag = "llm",
    summary = "The caller's prepaid balance",
    security(("user_key" = [])),
    responses(
        (status = 200, description = "USD.", body = crate::api::schemas::OwnBalance),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::RateLimited,
    ),
)]
pub async fn own_balance(
    State(state): State<AppState>,
    axum::Extension(key): axum::Extension<std::sync::Arc<crate::edge::keys::AuthedKey>>,
) -> Result<Json<Value>, ApiError> {
    let b = state.ledger.balance(&ledger::user_account(&key.user_id)).await?;
    Ok(Json(json!({ "userId": key.user_id, "balance": b.posted as f64 / 1e6, "held": b.held as f64 / 1e6, "available": b.available as f64 / 1e6 })))
}

/// `GET /api/llm/transactions`: the caller's own ledger history, paginated.
#[utoipa::path(
    get,
    path = "/api/llm/transactions",
    tag = "llm",
    summary = "The caller's ledger history",
    params(Page),
    security(("user_key" = [])),
    responses(
        (status = 200, description = "Ledger lines, newest first.", body = crate::api::schemas::History),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::RateLimited,
    ),
)]
pub async fn own_transactions(
    State(state): State<AppState>,
    axum::Extension(key): axum::Extension<std::sync::Arc<crate::edge::keys::AuthedKey>>,
    Query(page): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    let account = ledger::user_account(&key.user_id);
    Ok(Json(analytics::history(&state.store, &account, page.before.as_deref(), page.limit.unwrap_or(50)).await?))
}
