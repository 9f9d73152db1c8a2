//! The ads' routes a user meets: the click redirect (`GET /r/{impression}`) and a key's
//! standing ad preferences (`PUT /api/llm/ad-preferences`).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use openapi::openai::AdPreferences;

use crate::edge::error::ApiError;
use crate::edge::keys::AuthedKey;
use crate::{edge::extract, state::AppState};

/// `GET /r/{impression}`: records the click once and redirects to the advertiser.
#[utoipa::path(
    get,
    path = "/r/{impression}",
    tag = "ads",
    summary = "Follow an ad's click-tracking link",
    params(("impression" = String, Path, description = "The impression id from the ad's link.")),
    security(()),
    responses(
        (status = 302, description = "To the advertiser's URL (`location`); the first click is recorded (and charged for a CPC ad)."),
        crate::api::schemas::NotFound,
    ),
)]
pub async fn click(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    match state.ads.click(&id).await? {
        Some(url) => Ok((StatusCode::FOUND, [(header::LOCATION, url), (header::CACHE_CONTROL, "no-store".to_owned())]).into_response()),
        None => Err(ApiError::NotFound(format!("ad impression {id} does not exist"))),
    }
}

/// `PUT /api/llm/ad-preferences`: the calling key's standing preferences.
#[utoipa::path(
    put,
    path = "/api/llm/ad-preferences",
    tag = "llm",
    summary = "Set the calling key's standing ad preferences",
    request_body = AdPreferences,
    security(("user_key" = [])),
    responses(
        (status = 200, description = "The stored preferences; a request's own `ad_preferences` add to them.", body = AdPreferences),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        (status = 429, description = "Rate limit reached (`retry-after`).", body = openapi::error::ErrorBody),
        crate::api::schemas::PayloadTooLarge,
        crate::api::schemas::UnsupportedMediaType,
    ),
)]
pub async fn set_preferences(
    State(state): State<AppState>,
    Extension(key): Extension<Arc<AuthedKey>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<AdPreferences>, ApiError> {
    let prefs: AdPreferences = extract::parse(&headers, &body)?;
    crate::ads::check_categories(prefs.categories.iter().chain(&prefs.blocked_categories), "categories")?;
    if let Some(p) = prefs.placement.as_deref() {
        if crate::ads::Placement::parse(p).is_none() {
            return Err(ApiError::param("`placement` must be content, metadata or prompt", "placement"));
        }
    }
    state.keys.set_ad_preferences(&key.key_id, &prefs).await.map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(prefs))
}
