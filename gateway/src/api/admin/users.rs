//! `/api/admin/users/…`: credit a user, read a user's balance and history.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use bytes::Bytes;
use serde_json::Value;

use crate::edge::error::ApiError;
use crate::edge::extract;
use crate::money::{analytics, ledger};
use crate::api::gpu::balance_json;
use crate::api::wallet::Page;
use crate::state::AppState;

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
    let field = crate::money::units::Field { name: "amount", twin: "amountMicros", max_micros: 1_000_000_000_000 };
    let micros = field
        .micros(amount, micros)?
        .ok_or_else(|| ApiError::param("`amount` (USD) or `amountMicros` is required", "amount"))?;
    if micros <= 0 {
        return Err(ApiError::param("the amount must be positive", "amount"));
    }
    Ok(micros)
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
        (status = 200, description = "The user's balance after the credit.", body = crate::api::schemas::UserBalance),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
        crate::api::schemas::NotFound,
        crate::api::schemas::PayloadTooLarge,
        crate::api::schemas::UnsupportedMediaType,
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
    let account = crate::money::ledger::user_account(&user_id);
    let memo = request.memo.unwrap_or_else(|| "admin credit".to_owned());
    let balance = state.ledger.credit(&account, micros, "credit", &memo).await.map_err(|e| match e {
        crate::money::ledger::LedgerError::NonPositive => ApiError::param("the amount must be positive", "amount"),
        crate::money::ledger::LedgerError::TooLarge => ApiError::param("one credit may add at most $1,000,000", "amount"),
        crate::money::ledger::LedgerError::Db(e) => e.into(),
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
        (status = 200, description = "The balance (zero for an unknown user).", body = crate::api::schemas::UserBalance),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
    ),
)]
pub async fn admin_user_balance(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let account = crate::money::ledger::user_account(&user_id);
    Ok(Json(balance_json(&account, state.ledger.balance(&account).await?)))
}

#[utoipa::path(
    get,
    path = "/api/admin/users/{id}/transactions",
    tag = "admin",
    summary = "A user's ledger history",
    params(("id" = String, Path, description = "The user id."), Page),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Ledger lines, newest first.", body = crate::api::schemas::History),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
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
