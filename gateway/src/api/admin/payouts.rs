//! `/api/admin/payouts…` and `/api/admin/settings`: the payout queue and the payout settings.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::edge::error::ApiError;
use crate::edge::extract;
use crate::money::payments::PayoutSettings;
use crate::api::wallet::{payments, to_micros};
use crate::state::AppState;

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
        (status = 200, description = "Withdrawals, newest first.", body = crate::api::schemas::WithdrawalList),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
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
        (status = 200, description = "The withdrawal in its new state.", body = crate::money::payments::Withdrawal),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
        crate::api::schemas::NotFound,
        crate::api::schemas::Conflict,
        crate::api::schemas::PayloadTooLarge,
        crate::api::schemas::UnsupportedMediaType,
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
        (status = 200, description = "The withdrawals made.", body = crate::api::schemas::WithdrawalList),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
    ),
)]
pub async fn admin_auto_payouts(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let p = payments(&state);
    let made = p.auto_payouts().await?;
    for w in &made {
        crate::money::payout_connector::dispatch(state.webhooks.clone(), &state.config, p.clone(), w.clone());
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
        (status = 200, description = "The settings.", body = crate::api::schemas::PayoutSettingsView),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
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
        (status = 200, description = "The settings now.", body = crate::api::schemas::PayoutSettingsView),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
        crate::api::schemas::PayloadTooLarge,
        crate::api::schemas::UnsupportedMediaType,
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
