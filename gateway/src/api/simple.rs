//! The seed's simple API, thin over chat: `POST /api/llm/inference`,
//! `GET /api/llm/models`, `GET /api/llm/status`, and a WebSocket (`/api/llm/ws`) for
//! event-style clients with the events `connected`, `stream:token`, `stream:ad` (free
//! tier: the labelled ad, before the end), `stream:end`, `error`. Both doors apply the
//! limits, budgets and ad rules of `/v1/*`: they go through `prepare_chat`, the relay
//! and the ad plan and auction.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use openapi::async_openai::types::chat::CreateChatCompletionRequest;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::{Extension, Json};
use bytes::Bytes;
use openapi::openai::RequestExtensions;
use openapi::platform::{InferenceRequest, InferenceResponse};
use serde_json::{json, Value};

use crate::ads::layer as ad_layer;
use crate::ads::{self, Placement, Selected};
use crate::edge::error::ApiError;
use crate::edge::keys::Tier;
use crate::edge::keys::AuthedKey;
use crate::edge::ratelimit::RateCtx;
use crate::api::openai::{collect, models_for_status, prepare_chat};
use crate::inference::relay::{self, Event};
use crate::store::{new_id, now_ms};
use crate::{edge::extract, state::AppState, edge::extract::RequestId};

/// Free tier: the ad an answer through this API may carry, chosen by the same plan
/// and auction as `/v1/*` (`ads::layer`); the `prompt` placement's sponsor note is
/// added to `chat` here, before the request is sent.
async fn choose_ad(
    state: &AppState,
    key: &AuthedKey,
    headers: &HeaderMap,
    request_id: &str,
    chat: &mut CreateChatCompletionRequest,
    ext: &RequestExtensions,
) -> Result<Option<Selected>, ApiError> {
    if key.tier != Tier::Free || !state.config.ads_enabled {
        return Ok(None);
    }
    let Some(plan) = ad_layer::plan(state, key, ad_layer::Asked::Chat(chat), ext.ad_preferences.as_ref())? else { return Ok(None) };
    let base_url = ad_layer::base_url(state, headers);
    let selected = state.ads.choose(&plan.targeting(&key.user_id, request_id, &base_url)).await;
    if let Some(s) = selected.as_ref().filter(|s| s.placement == Placement::Prompt) {
        ad_layer::add_sponsor_note(chat, s);
    }
    Ok(selected)
}

fn to_chat(request: &InferenceRequest) -> Result<(CreateChatCompletionRequest, RequestExtensions), ApiError> {
    if request.prompt.is_empty() {
        return Err(ApiError::param("`prompt` must not be empty", "prompt"));
    }
    let mut body = json!({
        "model": request.model,
        "messages": [{ "role": "user", "content": request.prompt }],
    });
    if let Some(n) = request.options.max_tokens {
        body["max_tokens"] = json!(n);
    }
    if let Some(t) = request.options.temperature {
        body["temperature"] = json!(t);
    }
    let chat: CreateChatCompletionRequest =
        serde_json::from_value(body).map_err(|e| ApiError::invalid(format!("invalid inference request: {e}"), None))?;
    let ext = RequestExtensions {
        quality: request.options.quality.clone(),
        ad_preferences: request.options.ad_preferences.clone(),
        reservation: None,
        quality_fallback: None,
        max_latency_ms: None,
    };
    Ok((chat, ext))
}

#[utoipa::path(
    post,
    path = "/api/llm/inference",
    tag = "llm",
    summary = "Run one prompt (the seed's simple API)",
    request_body = openapi::platform::InferenceRequest,
    security(("user_key" = [])),
    responses(
        (status = 200, description = "The whole answer.", body = openapi::platform::InferenceResponse),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::NotFound,
        crate::api::schemas::RelayFailures,
    ),
)]
pub async fn inference(
    State(state): State<AppState>,
    Extension(key): Extension<Arc<AuthedKey>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    rate: Option<Extension<Arc<RateCtx>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<InferenceResponse>, ApiError> {
    let started = Instant::now();
    let request: InferenceRequest = extract::parse(&headers, &body)?;
    let (mut chat, ext) = to_chat(&request)?;
    let ad = choose_ad(&state, &key, &headers, &request_id, &mut chat, &ext).await?;
    let (mut dispatch, _, _) = prepare_chat(&state, &key, &request_id, &headers, &mut chat, ext, started)?;
    dispatch.rate = rate.map(|r| r.0);
    let (model, quality) = (dispatch.model.clone(), dispatch.quality.clone());
    let relay = relay::open(&state, dispatch).await?;
    let provider = relay.provider().id.clone();
    let (agg, usage) = collect(relay).await?;
    let completion = agg.chat(&request_id, &model, usage);
    let first = completion.choices.into_iter().next();
    let mut result = first.as_ref().and_then(|c| c.message.content.clone()).unwrap_or_default();
    let shown = ad.map(|s| {
        if s.placement == Placement::Content {
            result.push_str(&ads::content_text(&s.ad));
        }
        let shown = s.ad.clone();
        state.ads.delivered(s, Some(provider));
        shown
    });
    Ok(Json(InferenceResponse {
        result,
        finish_reason: first.and_then(|c| c.finish_reason),
        model,
        quality,
        usage,
        request_id,
        ad: shown,
    }))
}

#[utoipa::path(
    get,
    path = "/api/llm/models",
    tag = "llm",
    summary = "Models on line, with provider counts and quality streams",
    security(("user_key" = [])),
    responses(
        (status = 200, description = "Models on line.", body = crate::api::schemas::LlmModels),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::RateLimited,
    ),
)]
pub async fn models(State(state): State<AppState>) -> Json<Value> {
    let snapshot = state.registry.snapshot();
    let stale_ms = state.config.stale_after_ms();
    let now = now_ms();
    let live: Vec<_> = snapshot.values().filter(|p| p.is_live(now, stale_ms)).collect();
    let models: Vec<Value> = models_for_status(&state)
        .into_iter()
        .map(|m| {
            let providers = live.iter().filter(|p| p.streams.iter().any(|(id, _)| *id == m.id)).count();
            let mut qualities: Vec<String> = live
                .iter()
                .flat_map(|p| p.streams.iter().filter(|(id, _)| *id == m.id).map(|(_, q)| q.clone()))
                .collect();
            qualities.sort();
            qualities.dedup();
            json!({ "id": m.id, "providers": providers, "qualities": qualities })
        })
        .collect();
    Json(json!({ "models": models }))
}

#[utoipa::path(
    get,
    path = "/api/llm/status",
    tag = "llm",
    summary = "Marketplace status",
    security(("user_key" = [])),
    responses(
        (status = 200, description = "Providers, streams, queue and models.", body = crate::api::schemas::LlmStatus),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::RateLimited,
    ),
)]
pub async fn status(State(state): State<AppState>) -> Json<Value> {
    let snapshot = state.registry.snapshot();
    let stale_ms = state.config.stale_after_ms();
    let now = now_ms();
    let online = snapshot.values().filter(|p| p.is_live(now, stale_ms)).count();
    Json(json!({
        "providersOnline": online,
        "providersRegistered": snapshot.len(),
        "activeStreams": state.active_streams.load(Ordering::Relaxed),
        "queue": state.queued.load(Ordering::Relaxed),
        "models": models_for_status(&state).into_iter().map(|m| m.id).collect::<Vec<_>>(),
    }))
}

#[utoipa::path(
    get,
    path = "/api/llm/ws",
    tag = "llm",
    summary = "WebSocket for event-style clients",
    security(("user_key" = [])),
    responses(
        (status = 101, description = "Switched to WebSocket. The server sends `{\"event\":\"connected\",\"data\":{\"models\":[…]}}`; each client message is an inference request (or `{\"event\":\"inference\",\"data\":{…}}`), answered by `stream:token` events and one `stream:end` (or `error`)."),
        (status = 400, description = "Not a WebSocket upgrade request.", body = openapi::error::ErrorBody),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::RateLimited,
    ),
)]
pub async fn websocket(
    ws: WebSocketUpgrade,
    State(state): State<AppState>,
    Extension(key): Extension<Arc<AuthedKey>>,
    Extension(crate::edge::extract::PresentedKey(secret)): Extension<crate::edge::extract::PresentedKey>,
    headers: HeaderMap,
) -> Response {
    // A message is a request body: the same size limit.
    let limit = state.config.max_body_bytes;
    ws.max_message_size(limit).max_frame_size(limit).on_upgrade(move |socket| run_socket(socket, state, key, secret, headers))
}

fn error_event(id: &Value, request_id: &str, error: &ApiError) -> Message {
    let body = serde_json::to_value(error.body()).unwrap_or(Value::Null);
    let mut data = json!({ "id": id, "requestId": request_id });
    data["error"] = body["error"].clone();
    event("error", data)
}

/// Every message on a socket is a request like any other: the key is checked again
/// (a revoked key closes the socket) and the message counts against the key's
/// requests per minute (its tokens are charged by the relay, as for HTTP).
async fn admit(state: &AppState, key: &AuthedKey, secret: &str) -> Result<Arc<RateCtx>, (ApiError, bool)> {
    match state.keys.authenticate(secret).await {
        Ok(Some(_)) => {}
        Ok(None) => return Err((ApiError::InvalidApiKey, true)),
        Err(e) => return Err((ApiError::from(e), false)),
    }
    let rate = crate::edge::ratelimit::admit(&state.limiter, &state.config, key).await.map_err(|e| (e, false))?;
    match rate.refused() {
        Some(refusal) => Err((refusal, false)),
        None => Ok(rate),
    }
}

fn event(name: &str, data: Value) -> Message {
    Message::Text(json!({ "event": name, "data": data }).to_string().into())
}

async fn run_socket(mut socket: WebSocket, state: AppState, key: Arc<AuthedKey>, secret: String, headers: HeaderMap) {
    let models: Vec<String> = models_for_status(&state).into_iter().map(|m| m.id).collect();
    if socket.send(event("connected", json!({ "models": models }))).await.is_err() {
        return;
    }
    let ends = tokio::time::Instant::now() + std::time::Duration::from_secs(state.config.ws_max_session_secs);
    loop {
        let message = match tokio::time::timeout_at(ends, socket.recv()).await {
            Ok(Some(Ok(message))) => message,
            Ok(_) => return,
            Err(_) => {
                let error = ApiError::PermissionDenied(format!(
                    "the session ended after ws_max_session_secs ({} s); open a new one",
                    state.config.ws_max_session_secs
                ));
                let _ = socket.send(error_event(&Value::Null, "", &error)).await;
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
        };
        let text = match message {
            Message::Text(t) => t.to_string(),
            Message::Close(_) => return,
            _ => continue,
        };
        let request_id = new_id("req");
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let id = value.get("id").cloned().unwrap_or(Value::Null);
        let rate = match admit(&state, &key, &secret).await {
            Ok(rate) => rate,
            Err((error, close)) => {
                if socket.send(error_event(&id, &request_id, &error)).await.is_err() || close {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
                continue;
            }
        };
        // Accept either the request itself or `{"event": "inference", "data": {...}}`.
        let payload = value.get("data").cloned().unwrap_or(value);
        let result = match serde_json::from_value::<InferenceRequest>(payload) {
            Ok(request) => match socket_dispatch(&state, &key, &headers, &request_id, &request, rate).await {
                Ok((dispatch, ad)) => stream_one(&mut socket, &state, &request_id, &id, dispatch, ad).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(ApiError::invalid(format!("invalid inference message: {e}"), None)),
        };
        if let Err(error) = result {
            if socket.send(error_event(&id, &request_id, &error)).await.is_err() {
                return;
            }
        }
    }
}

/// One socket message's request, ready for the relay, counted against `rate`.
async fn socket_dispatch(
    state: &AppState,
    key: &Arc<AuthedKey>,
    headers: &HeaderMap,
    request_id: &str,
    request: &InferenceRequest,
    rate: Arc<RateCtx>,
) -> Result<(relay::Dispatch, Option<Selected>), ApiError> {
    let (mut chat, ext) = to_chat(request)?;
    let ad = choose_ad(state, key, headers, request_id, &mut chat, &ext).await?;
    let (mut dispatch, _, _) = prepare_chat(state, key, request_id, headers, &mut chat, ext, Instant::now())?;
    dispatch.rate = Some(rate);
    Ok((dispatch, ad))
}

async fn stream_one(
    socket: &mut WebSocket,
    state: &AppState,
    request_id: &str,
    id: &Value,
    dispatch: relay::Dispatch,
    ad: Option<Selected>,
) -> Result<(), ApiError> {
    let mut relay = relay::open(state, dispatch).await?;
    let mut result = String::new();
    let mut finish_reason = None;
    loop {
        match relay.next().await {
            Event::Chunk { chunk, .. } => {
                for choice in chunk.choices {
                    if let Some(text) = choice.delta.and_then(|d| d.content).filter(|t| !t.is_empty()) {
                        result.push_str(&text);
                        let data = json!({ "id": id, "requestId": request_id, "token": text });
                        if socket.send(event("stream:token", data)).await.is_err() {
                            // Dropping the relay cancels the provider request and records usage.
                            return Ok(());
                        }
                    }
                    if choice.finish_reason.is_some() {
                        finish_reason = choice.finish_reason;
                    }
                }
            }
            Event::Done => {
                // Free tier: a labelled ad event after the answer, before its end.
                let mut shown = None;
                if let Some(s) = ad {
                    let data = json!({ "id": id, "requestId": request_id, "ad": s.ad });
                    if s.placement == Placement::Prompt || socket.send(event("stream:ad", data)).await.is_ok() {
                        shown = Some(s.ad.clone());
                        state.ads.delivered(s, Some(relay.provider().id.clone()));
                    }
                }
                let data = json!({
                    "id": id, "requestId": request_id, "result": result,
                    "finishReason": finish_reason, "usage": relay.usage(), "ad": shown,
                });
                let _ = socket.send(event("stream:end", data)).await;
                return Ok(());
            }
            Event::Failed(message) => return Err(ApiError::ProviderFailed(message)),
        }
    }
}

/// `model` (the cheapest free provider serving it) or `providerId`.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ReservationRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    provider_id: Option<String>,
    /// More than 0, at most 744 (31 days).
    #[schema(exclusive_minimum = 0, maximum = 744)]
    hours: f64,
}

/// `POST /api/llm/reservations`: lease a provider for `hours`, billed per second.
#[utoipa::path(
    post,
    path = "/api/llm/reservations",
    tag = "llm",
    summary = "Reserve a provider for some hours (premium keys)",
    request_body = ReservationRequest,
    security(("user_key" = [])),
    responses(
        (status = 201, description = "The reservation; its whole price is held.", body = crate::money::reservations::Reservation),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        (status = 403, description = "Not allowed.", body = openapi::error::ErrorBody),
        crate::api::schemas::NotFound,
        crate::api::schemas::Conflict,
        crate::api::schemas::PayloadTooLarge,
        crate::api::schemas::UnsupportedMediaType,
        crate::api::schemas::RateLimitedOrNoFunds,
        crate::api::schemas::NoProvider,
    ),
)]
pub async fn create_reservation(
    State(state): State<AppState>,
    Extension(key): Extension<Arc<AuthedKey>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(axum::http::StatusCode, Json<crate::money::reservations::Reservation>), ApiError> {
    let request: ReservationRequest = extract::parse(&headers, &body)?;
    let r = crate::money::reservations::create(&state, &key, request.model, request.provider_id, request.hours).await?;
    Ok((axum::http::StatusCode::CREATED, Json(r)))
}

#[utoipa::path(
    get,
    path = "/api/llm/reservations",
    tag = "llm",
    summary = "The caller's reservations",
    security(("user_key" = [])),
    responses(
        (status = 200, description = "Reservations, newest first.", body = crate::api::schemas::ReservationList),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::RateLimited,
    ),
)]
pub async fn list_reservations(
    State(state): State<AppState>,
    Extension(key): Extension<Arc<AuthedKey>>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "object": "list", "data": crate::money::reservations::list(&state, &key.user_id).await? })))
}

/// `DELETE /api/llm/reservations/{id}`: release early; the unused time is refunded.
#[utoipa::path(
    delete,
    path = "/api/llm/reservations/{id}",
    tag = "llm",
    summary = "Release a reservation early",
    params(("id" = String, Path, description = "The reservation id.")),
    security(("user_key" = [])),
    responses(
        (status = 200, description = "The finished reservation; the unused time is refunded.", body = crate::money::reservations::Reservation),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::NotFound,
        crate::api::schemas::Conflict,
        crate::api::schemas::RateLimited,
    ),
)]
pub async fn release_reservation(
    State(state): State<AppState>,
    Extension(key): Extension<Arc<AuthedKey>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<crate::money::reservations::Reservation>, ApiError> {
    crate::money::reservations::finish(&state, &id, Some(&key.user_id), now_ms()).await?;
    Ok(Json(crate::money::reservations::get(&state, &key.user_id, &id).await?))
}
