//! `/api/admin/keys`: create, list, revoke and delete user keys.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use bytes::Bytes;
use openapi::platform::CreateKeyRequest;

use crate::edge::error::ApiError;
use crate::edge::extract;
use crate::edge::keys::{NewKey, Tier};
use crate::state::AppState;

#[utoipa::path(
    post,
    path = "/api/admin/keys",
    tag = "admin",
    summary = "Create a user API key",
    request_body = openapi::platform::CreateKeyRequest,
    security(("admin_key" = [])),
    responses(
        (status = 201, description = "The key; its secret is shown once.", body = openapi::platform::CreatedKey),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
        crate::api::schemas::PayloadTooLarge,
        crate::api::schemas::UnsupportedMediaType,
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
        (status = 200, description = "Every key (no secrets), oldest first.", body = crate::api::schemas::KeyList),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
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
        (status = 200, description = "Revoked (again, if it already was).", body = crate::api::schemas::KeyRevoked),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
        crate::api::schemas::NotFound,
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
        (status = 200, description = "Revoked (again, if it already was).", body = crate::api::schemas::KeyRevoked),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::AdminDisabled,
        crate::api::schemas::NotFound,
    ),
)]
pub async fn admin_delete_key(state: State<AppState>, id: Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    admin_revoke_key(state, id).await
}
