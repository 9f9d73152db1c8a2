//! HTTP edge of payouts, top-ups, history and analytics.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::payments::{PaymentError, PayoutMethod, PayoutSettings, Payments};
use crate::providers::ProviderError;
use crate::{analytics, bearer, extract, ledger, AppState};

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

fn payments(state: &AppState) -> Payments {
    Payments::new(state.store.clone())
}

fn to_micros(usd: f64, param: &'static str) -> Result<i64, ApiError> {
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
        (status = 201, description = "The withdrawal (or, for a repeated Idempotency-Key, the first one).", body = crate::payments::Withdrawal),
        crate::api_spec::BadRequest,
        crate::api_spec::Unauthorized,
        (status = 403, description = "The provider is suspended: its balance is frozen (kept) until an admin approves it again.", body = openapi::error::ErrorBody),
        crate::api_spec::Conflict,
        crate::api_spec::PayloadTooLarge,
        crate::api_spec::UnsupportedMediaType,
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
    let field = crate::money::Field { name: "amount", twin: "amountMicros", max_micros: 1_000_000_000_000_000 };
    let amount = field
        .micros(request.amount, request.amount_micros)?
        .filter(|m| *m > 0)
        .ok_or_else(|| ApiError::param("`amount` must be a positive USD amount (or give `amountMicros`)", "amount"))?;
    let p = payments(&state);
    let w = p.withdraw(&request.provider_id, amount, request.method, key, false).await?;
    if w.status == "requested" && w.updated_at == w.created_at {
        crate::payout_connector::dispatch(state.webhooks.clone(), &state.config, p, w.clone());
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
        (status = 200, description = "Saved: a first method applies at once, a change after `payout_method_delay_secs` (`effectiveAt`).", body = crate::api_spec::MethodSet),
        crate::api_spec::BadRequest,
        crate::api_spec::Unauthorized,
        crate::api_spec::PayloadTooLarge,
        crate::api_spec::UnsupportedMediaType,
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
        (status = 200, description = "Withdrawals, newest first.", body = crate::api_spec::WithdrawalList),
        crate::api_spec::Unauthorized,
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
    before: Option<String>,
    /// Lines per page, 1 to 500 (default 50).
    limit: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/api/payment/transactions/{provider_id}",
    tag = "payments",
    summary = "A provider's ledger history",
    params(("provider_id" = String, Path, description = "The provider id."), Page),
    security(("provider_key" = []), ("admin_key" = [])),
    responses(
        (status = 200, description = "Ledger lines, newest first.", body = crate::api_spec::History),
        crate::api_spec::BadRequest,
        crate::api_spec::Unauthorized,
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

#[utoipa::path(
    get,
    path = "/api/admin/users/{id}/transactions",
    tag = "admin",
    summary = "A user's ledger history",
    params(("id" = String, Path, description = "The user id."), Page),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Ledger lines, newest first.", body = crate::api_spec::History),
        crate::api_spec::BadRequest,
        crate::api_spec::Unauthorized,
        crate::api_spec::AdminDisabled,
    ),
)]
pub async fn user_transactions(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
    Query(page): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    let account = ledger::user_account(&user_id);
    Ok(Json(analytics::history(&state.store, &account, page.before.as_deref(), page.limit.unwrap_or(50)).await?))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatusFilter {
    /// `requested`, `processing`, `paid` or `failed`.
    status: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/admin/payouts",
    tag = "admin",
    summary = "List withdrawals",
    params(StatusFilter),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Withdrawals, newest first.", body = crate::api_spec::WithdrawalList),
        crate::api_spec::BadRequest,
        crate::api_spec::Unauthorized,
        crate::api_spec::AdminDisabled,
    ),
)]
pub async fn admin_payouts(State(state): State<AppState>, Query(f): Query<StatusFilter>) -> Result<Json<Value>, ApiError> {
    let list = payments(&state).list(None, f.status.as_deref()).await?;
    Ok(Json(json!({ "object": "list", "data": list })))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
pub(crate) struct TransitionBody {
    #[serde(default)]
    reason: Option<String>,
}

#[utoipa::path(
    post,
    path = "/api/admin/payouts/{id}/{action}",
    tag = "admin",
    summary = "Move a withdrawal on",
    request_body = Option<TransitionBody>,
    params(("id" = String, Path, description = "The withdrawal id."), ("action" = String, Path, description = "`processing`, `paid` or `failed`.")),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "The withdrawal in its new state.", body = crate::payments::Withdrawal),
        crate::api_spec::BadRequest,
        crate::api_spec::Unauthorized,
        crate::api_spec::AdminDisabled,
        crate::api_spec::NotFound,
        crate::api_spec::Conflict,
        crate::api_spec::PayloadTooLarge,
        crate::api_spec::UnsupportedMediaType,
    ),
)]
pub async fn admin_payout_transition(
    State(state): State<AppState>,
    Path((id, to)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    if !matches!(to.as_str(), "processing" | "paid" | "failed") {
        return Err(ApiError::NotFound(format!("unknown payout action `{to}`; use processing, paid or failed")));
    }
    let reason = if body.is_empty() { None } else { extract::parse::<TransitionBody>(&headers, &body)?.reason };
    let w = payments(&state).transition(&id, &to, reason).await?;
    Ok(Json(serde_json::to_value(w).unwrap_or_default()))
}

#[utoipa::path(
    post,
    path = "/api/admin/payouts/auto",
    tag = "admin",
    summary = "Request payouts for every provider over the threshold",
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "The withdrawals made.", body = crate::api_spec::WithdrawalList),
        crate::api_spec::Unauthorized,
        crate::api_spec::AdminDisabled,
    ),
)]
pub async fn admin_auto_payouts(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let p = payments(&state);
    let made = p.auto_payouts().await?;
    for w in &made {
        crate::payout_connector::dispatch(state.webhooks.clone(), &state.config, p.clone(), w.clone());
    }
    Ok(Json(json!({ "object": "list", "data": made })))
}

fn settings_json(s: PayoutSettings) -> Value {
    json!({
        "minimumWithdrawal": s.minimum_withdrawal_micros as f64 / 1e6,
        "autoPayoutThreshold": s.auto_payout_threshold_micros as f64 / 1e6,
        "processingFee": f64::from(s.processing_fee_bp) / 100.0,
    })
}

#[utoipa::path(
    get,
    path = "/api/admin/settings",
    tag = "admin",
    summary = "Payout settings",
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "The settings.", body = crate::api_spec::PayoutSettingsView),
        crate::api_spec::Unauthorized,
        crate::api_spec::AdminDisabled,
    ),
)]
pub async fn admin_settings(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(settings_json(payments(&state).settings().await?)))
}

/// The seed's `updateSettings`: amounts in USD, `processingFee` in percent.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct SettingsPatch {
    /// USD.
    #[schema(exclusive_minimum = 0, maximum = 1_000_000_000)]
    minimum_withdrawal: Option<f64>,
    /// USD.
    #[schema(exclusive_minimum = 0, maximum = 1_000_000_000)]
    auto_payout_threshold: Option<f64>,
    /// Percent.
    #[schema(minimum = 0, maximum = 50)]
    processing_fee: Option<f64>,
}

#[utoipa::path(
    patch,
    path = "/api/admin/settings",
    tag = "admin",
    summary = "Change payout settings",
    request_body = SettingsPatch,
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "The settings now.", body = crate::api_spec::PayoutSettingsView),
        crate::api_spec::BadRequest,
        crate::api_spec::Unauthorized,
        crate::api_spec::AdminDisabled,
        crate::api_spec::PayloadTooLarge,
        crate::api_spec::UnsupportedMediaType,
    ),
)]
pub async fn admin_update_settings(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Json<Value>, ApiError> {
    let patch: SettingsPatch = extract::parse(&headers, &body)?;
    let p = payments(&state);
    let mut s = p.settings().await?;
    if let Some(v) = patch.minimum_withdrawal {
        s.minimum_withdrawal_micros = to_micros(v, "minimumWithdrawal")?;
    }
    if let Some(v) = patch.auto_payout_threshold {
        s.auto_payout_threshold_micros = to_micros(v, "autoPayoutThreshold")?;
    }
    if let Some(v) = patch.processing_fee {
        if !(0.0..=50.0).contains(&v) {
            return Err(ApiError::param("`processingFee` is a percentage between 0 and 50", "processingFee"));
        }
        s.processing_fee_bp = (v * 100.0).round() as u32;
    }
    Ok(Json(settings_json(p.update_settings(s).await?)))
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
        (status = 200, description = "Applied (or already applied earlier).", body = crate::api_spec::TopUpResult),
        crate::api_spec::BadRequest,
        crate::api_spec::Unauthorized,
        (status = 403, description = "Top-ups are disabled (no webhook secret is configured).", body = openapi::error::ErrorBody),
        crate::api_spec::PayloadTooLarge,
        crate::api_spec::UnsupportedMediaType,
        crate::api_spec::IpRateLimited,
    ),
)]
pub async fn top_up(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Json<Value>, ApiError> {
    let Some(secret) = &state.config.topup_webhook_secret else {
        return Err(ApiError::PermissionDenied("top-ups are disabled: set GATEWAY_TOPUP_WEBHOOK_SECRET".into()));
    };
    let signature = headers.get("x-signature").and_then(|v| v.to_str().ok());
    if !crate::payout_connector::verify(secret.expose(), &body, signature) {
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

/// 9999-12-31T23:59:59.999Z in Unix milliseconds. Bounds outside `0..=MAX_MS` are
/// mistakes, and refusing them keeps the window arithmetic from overflowing.
const MAX_MS: i64 = 253_402_300_799_999;

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
        (status = 200, description = "Platform income by day, month, model and provider.", body = crate::api_spec::Revenue),
        crate::api_spec::BadRequest,
        crate::api_spec::Unauthorized,
        crate::api_spec::AdminDisabled,
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
        (status = 200, description = "Requests and tokens by model and quality, peak hours.", body = crate::api_spec::UsageReport),
        crate::api_spec::BadRequest,
        crate::api_spec::Unauthorized,
        crate::api_spec::AdminDisabled,
    ),
)]
pub async fn usage(State(state): State<AppState>, Query(r): Query<Range>) -> Result<Json<Value>, ApiError> {
    let (from, to) = window(&r)?;
    Ok(Json(analytics::usage(&state.store, from, to).await?))
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
        (status = 200, description = "The withdrawal in its new state.", body = crate::payments::Withdrawal),
        crate::api_spec::BadRequest,
        crate::api_spec::Unauthorized,
        (status = 403, description = "No payout service is configured.", body = openapi::error::ErrorBody),
        crate::api_spec::NotFound,
        crate::api_spec::Conflict,
        crate::api_spec::PayloadTooLarge,
        crate::api_spec::UnsupportedMediaType,
        crate::api_spec::IpRateLimited,
    ),
)]
pub async fn payout_webhook(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Json<Value>, ApiError> {
    let Some(secret) = &state.config.payout_webhook_secret else {
        return Err(ApiError::PermissionDenied("no payout service is configured".into()));
    };
    let signature = headers.get("x-signature").and_then(|v| v.to_str().ok());
    if !crate::payout_connector::verify(secret.expose(), &body, signature) {
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
        (status = 200, description = "USD.", body = crate::api_spec::OwnBalance),
        crate::api_spec::Unauthorized,
        crate::api_spec::RateLimited,
    ),
)]
pub async fn own_balance(
    State(state): State<AppState>,
    axum::Extension(key): axum::Extension<std::sync::Arc<crate::keys::AuthedKey>>,
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
        (status = 200, description = "Ledger lines, newest first.", body = crate::api_spec::History),
        crate::api_spec::BadRequest,
        crate::api_spec::Unauthorized,
        crate::api_spec::RateLimited,
    ),
)]
pub async fn own_transactions(
    State(state): State<AppState>,
    axum::Extension(key): axum::Extension<std::sync::Arc<crate::keys::AuthedKey>>,
    Query(page): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    let account = ledger::user_account(&key.user_id);
    Ok(Json(analytics::history(&state.store, &account, page.before.as_deref(), page.limit.unwrap_or(50)).await?))
}
