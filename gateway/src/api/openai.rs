//! The OpenAI surface: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.
//! Handlers validate, resolve the quality tier, build the provider request and hand it
//! to the relay; they answer as SSE or as one JSON body.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use openapi::async_openai::types::chat::{
    ChatCompletionRequestMessage, ChatCompletionRequestUserMessageContent, ChatCompletionStreamOptions,
    CreateChatCompletionRequest, ResponseFormat, ResponseModalities, StopConfiguration,
};
use openapi::async_openai::types::chat::Prompt;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use openapi::openai::{ListModelResponse, Model, RequestExtensions};
use serde::Serialize;

use crate::inference::aggregate::Aggregator;
use crate::edge::error::ApiError;
use crate::edge::keys::AuthedKey;
use crate::inference::quality::{self, QualityLevel};
use crate::edge::ratelimit::RateCtx;
use crate::inference::relay::{self, Dispatch, Endpoint, Event, Relay};
use crate::inference::routing;
use crate::store::now_ms;
use crate::edge::extract::{ChatBody, CompletionBody, RequestId};
use crate::state::AppState;

/// What the provider receives: the client's request with our resolved parameters.
#[derive(Serialize)]
struct Upstream<'a, T: Serialize> {
    #[serde(flatten)]
    request: &'a T,
    /// Worker queue priority from the quality tier.
    priority: i32,
    /// The tier's precision: `full` is required, `reduced` is allowed.
    precision: openapi::platform::Precision,
}

fn check_range(value: Option<f32>, min: f32, max: f32, param: &str) -> Result<(), ApiError> {
    match value {
        Some(v) if !(min..=max).contains(&v) || v.is_nan() => {
            Err(ApiError::param(format!("`{param}` must be between {min} and {max}, got {v}"), param))
        }
        _ => Ok(()),
    }
}

fn check_stop(stop: Option<&StopConfiguration>) -> Result<bool, ApiError> {
    match stop {
        None => Ok(false),
        Some(StopConfiguration::String(s)) => Ok(!s.is_empty()),
        Some(StopConfiguration::StringArray(items)) => {
            if items.len() > 4 {
                return Err(ApiError::param("`stop` takes at most 4 sequences", "stop"));
            }
            Ok(!items.is_empty())
        }
    }
}

/// The sampling knobs chat and completions share.
struct Sampling<'a> {
    temperature: Option<f32>,
    top_p: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    n: Option<u8>,
    seed: bool,
    stop: Option<&'a StopConfiguration>,
}

/// Range checks for the shared knobs, and the optional provider features they use.
fn sampling_features(s: &Sampling<'_>) -> Result<Vec<&'static str>, ApiError> {
    check_range(s.temperature, 0.0, 2.0, "temperature")?;
    check_range(s.top_p, 0.0, 1.0, "top_p")?;
    check_range(s.presence_penalty, -2.0, 2.0, "presence_penalty")?;
    check_range(s.frequency_penalty, -2.0, 2.0, "frequency_penalty")?;
    let mut features = Vec::new();
    match s.n {
        Some(0) => return Err(ApiError::param("`n` must be at least 1", "n")),
        Some(n) if n > 1 => features.push("n"),
        _ => {}
    }
    if s.seed {
        features.push("seed");
    }
    if s.presence_penalty.is_some_and(|v| v != 0.0) || s.frequency_penalty.is_some_and(|v| v != 0.0) {
        features.push("penalties");
    }
    if check_stop(s.stop)? {
        features.push("stop");
    }
    Ok(features)
}

/// Common knobs: quality and the completion-token cap it implies.
fn resolve_limits(
    requested: Option<u32>,
    param: &str,
    level: &QualityLevel,
) -> Result<u32, ApiError> {
    match requested {
        Some(0) => Err(ApiError::param(format!("`{param}` must be at least 1"), param)),
        Some(n) => Ok(n.min(level.max_tokens)),
        None => Ok(level.max_tokens),
    }
}

#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    summary = "Create a chat completion",
    request_body = openapi::openai_schema::ChatCompletionRequest,
    security(("user_key" = [])),
    responses(
        (status = 200, description = "The completion as one JSON body; with `stream: true`, server-sent events: one `data: <ChatCompletionChunk JSON>` per chunk (as the provider sent it), `data: [DONE]` at the end; a failure after the first token is an `error` event.", headers(("x-quality-served" = String, description = "The quality tier that served the request.")), content((openapi::stream::ChatCompletion = "application/json"), (crate::api::schemas::ServerSentEvent = "text/event-stream"))),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::NotFound,
        crate::api::schemas::RelayFailures,
    ),
)]
pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(key): Extension<Arc<AuthedKey>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    rate: Option<Extension<Arc<RateCtx>>>,
    headers: HeaderMap,
    ChatBody { mut request, ext }: ChatBody,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let (mut dispatch, stream, include_usage) = prepare_chat(&state, &key, &request_id, &headers, &mut request, ext, started)?;
    dispatch.rate = rate.map(|r| r.0);
    let model = dispatch.model.clone();
    let quality = dispatch.quality.clone();
    let relay = relay::open(&state, dispatch).await?;
    respond(relay, stream, include_usage, &quality, |agg, usage| {
        Json(agg.chat(&format!("chatcmpl-{request_id}"), &model, usage)).into_response()
    })
    .await
}

/// Validates a chat request and turns it into the provider request.
#[allow(deprecated)] // `max_tokens`, `seed`, `user` are deprecated in OpenAI's spec but still sent by SDKs.
pub fn prepare_chat(
    state: &AppState,
    key: &Arc<AuthedKey>,
    request_id: &str,
    headers: &HeaderMap,
    request: &mut CreateChatCompletionRequest,
    ext: RequestExtensions,
    started: Instant,
) -> Result<(Dispatch, bool, bool), ApiError> {
    let Target { model, asked, explicit } = target(state, &request.model, &ext, headers)?;
    if request.messages.is_empty() {
        return Err(ApiError::param("`messages` must contain at least one message", "messages"));
    }
    let mut features = sampling_features(&Sampling {
        temperature: request.temperature,
        top_p: request.top_p,
        presence_penalty: request.presence_penalty,
        frequency_penalty: request.frequency_penalty,
        n: request.n,
        seed: request.seed.is_some(),
        stop: request.stop.as_ref(),
    })?;
    if let Some(k) = request.top_logprobs {
        if k > 20 {
            return Err(ApiError::param("`top_logprobs` must be between 0 and 20", "top_logprobs"));
        }
        if request.logprobs != Some(true) {
            return Err(ApiError::param("`top_logprobs` requires `logprobs` to be true", "top_logprobs"));
        }
    }
    if request.logprobs == Some(true) {
        features.push("logprobs");
    }
    if let Some(bias) = &request.logit_bias {
        if let Some((token, v)) = bias.iter().find(|(t, v)| t.parse::<u32>().is_err() || !(-100..=100).contains(*v)) {
            return Err(ApiError::param(
                format!("`logit_bias` maps token ids to values in -100..100; got {token}: {v}"),
                "logit_bias",
            ));
        }
        if !bias.is_empty() {
            features.push("logit_bias");
        }
    }
    if matches!(request.response_format, Some(ResponseFormat::JsonObject | ResponseFormat::JsonSchema { .. })) {
        features.push("response_format");
    }
    if request.tools.as_ref().is_some_and(|t| !t.is_empty()) || request.functions.is_some() {
        features.push("tools");
    } else if request.tool_choice.is_some() {
        return Err(ApiError::param("`tool_choice` is only allowed when `tools` are given", "tool_choice"));
    }
    for message in &request.messages {
        if let ChatCompletionRequestMessage::User(user) = message {
            if let ChatCompletionRequestUserMessageContent::Array(parts) = &user.content {
                let text_only = parts.iter().all(|p| {
                    matches!(p, openapi::async_openai::types::chat::ChatCompletionRequestUserMessageContentPart::Text(_))
                });
                if !text_only && !features.contains(&"vision") {
                    features.push("vision");
                }
            }
        }
    }
    if request.audio.is_some() || request.modalities.as_ref().is_some_and(|m| m.contains(&ResponseModalities::Audio)) {
        return Err(ApiError::param("audio output is not supported by any provider", "audio"));
    }
    if request.web_search_options.is_some() {
        return Err(ApiError::param("web search is not supported by any provider", "web_search_options"));
    }
    if request.prediction.is_some() {
        return Err(ApiError::param("predicted outputs are not supported by any provider", "prediction"));
    }
    let reservation = reservation_of(&ext, headers);
    let routing::Route { level, candidates } = route(state, &model, asked, &ext, reservation.as_deref(), &features, explicit);
    let (param, requested) = match request.max_completion_tokens {
        Some(n) => ("max_completion_tokens", Some(n)),
        None => ("max_tokens", request.max_tokens),
    };
    let max_tokens = resolve_limits(requested, param, &level)?;
    let stream = request.stream.unwrap_or(false);
    let include_usage = stream && request.stream_options.and_then(|o| o.include_usage).unwrap_or(false);

    // The provider always streams with usage, sees a pseudonym, never the key or user.
    request.model.clone_from(&model);
    request.stream = Some(true);
    request.stream_options = Some(ChatCompletionStreamOptions { include_usage: Some(true), ..Default::default() });
    request.max_tokens = Some(max_tokens);
    request.max_completion_tokens = None;
    request.user = Some(state.pseudonym(&key.user_id));
    request.safety_identifier = None;
    request.metadata = None;
    request.store = None;
    let body = serde_json::to_vec(&Upstream { request: &*request, priority: level.priority, precision: level.precision.wire() })
        .map_err(|e| ApiError::Internal(format!("encode upstream request: {e}")))?;
    let choices = u32::from(request.n.unwrap_or(1).max(1));
    Ok((
        Dispatch {
            endpoint: Endpoint::Chat,
            request_id: request_id.to_owned(),
            key: key.clone(),
            model,
            quality: level.name.clone(),
            cost_multiplier_bp: level.cost_multiplier_bp,
            level,
            body_bytes: u32::try_from(body.len()).unwrap_or(u32::MAX),
            max_completion_tokens: max_tokens.saturating_mul(choices),
            prompt_tokens: None,
            reservation,
            rate: None,
            body: Bytes::from(body),
            features,
            candidates,
            started,
        },
        stream,
        include_usage,
    ))
}

#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "openai",
    summary = "Create a text completion (legacy)",
    request_body = openapi::openai_schema::CompletionRequest,
    security(("user_key" = [])),
    responses(
        (status = 200, description = "The completion: one JSON body, or with `stream: true` server-sent events of `text_completion` chunks ending with `data: [DONE]`.", headers(("x-quality-served" = String, description = "The quality tier that served the request.")), content((openapi::stream::TextCompletion = "application/json"), (crate::api::schemas::ServerSentEvent = "text/event-stream"))),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::NotFound,
        crate::api::schemas::RelayFailures,
    ),
)]
pub async fn completions(
    State(state): State<AppState>,
    Extension(key): Extension<Arc<AuthedKey>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    rate: Option<Extension<Arc<RateCtx>>>,
    headers: HeaderMap,
    CompletionBody { mut request, ext }: CompletionBody,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let Target { model, asked, explicit } = target(&state, &request.model, &ext, &headers)?;
    match &request.prompt {
        Prompt::String(_) => {}
        Prompt::StringArray(items) if items.len() == 1 => {}
        Prompt::StringArray(_) => {
            return Err(ApiError::param("only one prompt per request is supported", "prompt"));
        }
        Prompt::IntegerArray(_) | Prompt::ArrayOfIntegerArray(_) => {
            return Err(ApiError::param("token-id prompts are not supported; send text", "prompt"));
        }
    }
    let mut features = sampling_features(&Sampling {
        temperature: request.temperature,
        top_p: request.top_p,
        presence_penalty: request.presence_penalty,
        frequency_penalty: request.frequency_penalty,
        n: request.n,
        seed: request.seed.is_some(),
        stop: request.stop.as_ref(),
    })?;
    if request.best_of.is_some_and(|b| b > 1) {
        return Err(ApiError::param("`best_of` is not supported by any provider", "best_of"));
    }
    if request.echo == Some(true) {
        return Err(ApiError::param("`echo` is not supported by any provider", "echo"));
    }
    if request.suffix.is_some() {
        return Err(ApiError::param("`suffix` is not supported by any provider", "suffix"));
    }
    if let Some(lp) = request.logprobs {
        if lp > 5 {
            return Err(ApiError::param("`logprobs` must be between 0 and 5", "logprobs"));
        }
        features.push("logprobs");
    }
    if request.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        features.push("logit_bias");
    }
    let reservation = reservation_of(&ext, &headers);
    let routing::Route { level, candidates } = route(&state, &model, asked, &ext, reservation.as_deref(), &features, explicit);
    let max_tokens = resolve_limits(request.max_tokens, "max_tokens", &level)?;
    let stream = request.stream.unwrap_or(false);
    let include_usage = stream && request.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
    request.model.clone_from(&model);
    request.stream = Some(true);
    request.stream_options = Some(ChatCompletionStreamOptions { include_usage: Some(true), ..Default::default() });
    request.max_tokens = Some(max_tokens);
    request.user = Some(state.pseudonym(&key.user_id));
    let body = serde_json::to_vec(&Upstream { request: &request, priority: level.priority, precision: level.precision.wire() })
        .map_err(|e| ApiError::Internal(format!("encode upstream request: {e}")))?;
    let dispatch = Dispatch {
        endpoint: Endpoint::Completions,
        request_id: request_id.clone(),
        key,
        model: model.clone(),
        quality: level.name.clone(),
        level: level.clone(),
        body_bytes: u32::try_from(body.len()).unwrap_or(u32::MAX),
        max_completion_tokens: max_tokens.saturating_mul(u32::from(request.n.unwrap_or(1).max(1))),
        prompt_tokens: None,
        cost_multiplier_bp: level.cost_multiplier_bp,
        reservation,
        rate: rate.map(|r| r.0),
        body: Bytes::from(body),
        features,
        candidates,
        started,
    };
    let relay = relay::open(&state, dispatch).await?;
    respond(relay, stream, include_usage, &level.name, |agg, usage| {
        Json(agg.text(&format!("cmpl-{request_id}"), &model, usage)).into_response()
    })
    .await
}

/// The model a request names (without a `:tier` suffix) and the level it asks for.
struct Target {
    model: String,
    asked: QualityLevel,
    /// The level was named (body, suffix or header) rather than defaulted.
    explicit: bool,
}

fn target(state: &AppState, model: &str, ext: &RequestExtensions, headers: &HeaderMap) -> Result<Target, ApiError> {
    if model.trim().is_empty() {
        return Err(ApiError::param("`model` must not be empty", "model"));
    }
    let (model, suffix) = quality::split_model_suffix(model, &state.qualities);
    let asked = quality::resolve(&state.qualities, ext.quality.as_deref(), suffix, headers)?;
    let explicit = ext.quality.is_some() || suffix.is_some() || headers.contains_key("x-quality");
    Ok(Target { model: model.to_owned(), asked, explicit })
}

/// Routes the request once: its level (after any ladder) and that level's candidates.
fn route(state: &AppState, model: &str, asked: QualityLevel, ext: &RequestExtensions, reservation: Option<&str>, features: &[&'static str], explicit: bool) -> routing::Route {
    let ladder = routing::Ladder { fallback: ext.quality_fallback.unwrap_or(false), max_latency_ms: ext.max_latency_ms, explicit };
    routing::route(
        &state.registry.snapshot(),
        model,
        asked,
        &ladder,
        features,
        reservation,
        now_ms(),
        state.config.stale_after_ms(),
        &state.config.weights(),
    )
}

/// The reservation named by the body's `reservation` or the `x-reservation-id` header.
fn reservation_of(ext: &RequestExtensions, headers: &HeaderMap) -> Option<String> {
    ext.reservation.clone().or_else(|| headers.get("x-reservation-id").and_then(|v| v.to_str().ok()).map(str::to_owned))
}

/// Answers as SSE or, read to its end, as one JSON body built by `build`; either way
/// the response says the tier that served it.
async fn respond(
    relay: Relay,
    stream: bool,
    include_usage: bool,
    quality: &str,
    build: impl FnOnce(Aggregator, openapi::stream::Usage) -> Response,
) -> Result<Response, ApiError> {
    let served_by = crate::ads::layer::ServedBy(relay.provider().id.clone());
    let mut response = if stream {
        sse_response(relay, include_usage)
    } else {
        let (agg, usage) = collect(relay).await?;
        build(agg, usage)
    };
    if let Ok(v) = HeaderValue::from_str(quality) {
        response.headers_mut().insert("x-quality-served", v);
    }
    response.extensions_mut().insert(served_by);
    Ok(response)
}

/// Reads the relay to its end and assembles one response.
pub async fn collect(mut relay: Relay) -> Result<(Aggregator, openapi::stream::Usage), ApiError> {
    let mut agg = Aggregator::default();
    loop {
        match relay.next().await {
            Event::Chunk { chunk, .. } => agg.push(chunk),
            Event::Done => return Ok((agg, relay.usage())),
            Event::Failed(message) => return Err(ApiError::ProviderFailed(message)),
        }
    }
}

/// Forwards the provider's chunks as they arrive. The usage-only chunk is passed on
/// only when the client asked for it; the stream ends with `[DONE]` or an error event.
pub fn sse_response(relay: Relay, include_usage: bool) -> Response {
    let stream = futures::stream::unfold(Some(relay), move |state| async move {
        let mut relay = state?;
        loop {
            match relay.next().await {
                Event::Chunk { data, chunk } => {
                    if !include_usage && chunk.choices.is_empty() && chunk.usage.is_some() {
                        continue;
                    }
                    let mut out = Vec::with_capacity(data.len() + 8);
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(&data);
                    out.extend_from_slice(b"\n\n");
                    return Some((Ok::<_, Infallible>(Bytes::from(out)), Some(relay)));
                }
                Event::Done => return Some((Ok(Bytes::from_static(b"data: [DONE]\n\n")), None)),
                Event::Failed(message) => {
                    return Some((Ok(relay::error_event(&format!("The provider failed mid-stream: {message}"))), None))
                }
            }
        }
    });
    let mut response = Response::new(Body::from_stream(stream));
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

fn live_models(state: &AppState) -> Vec<Model> {
    let stale_ms = state.config.stale_after_ms();
    let now = now_ms();
    let mut models: Vec<(String, i64)> = Vec::new();
    for p in state.registry.snapshot().values() {
        if !p.is_live(now, stale_ms) {
            continue;
        }
        let chat = p.streams.iter().map(|(model, _)| model);
        for model in chat.chain(&p.capabilities.embedding_models) {
            match models.iter_mut().find(|(m, _)| m == model) {
                Some((_, created)) => *created = (*created).min(p.created_at),
                None => models.push((model.clone(), p.created_at)),
            }
        }
    }
    models.sort();
    models
        .into_iter()
        .map(|(id, created_ms)| Model {
            id,
            object: "model".to_owned(),
            created: u32::try_from(created_ms / 1000).unwrap_or(0),
            owned_by: "gpu-streaming".to_owned(),
            shutdown_date: None,
        })
        .collect()
}

#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    summary = "List the models live providers serve",
    security(("user_key" = [])),
    responses(
        (status = 200, description = "Models some live provider serves.", body = crate::api::schemas::ModelList),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::RateLimited,
    ),
)]
pub async fn list_models(State(state): State<AppState>) -> Json<ListModelResponse> {
    Json(ListModelResponse { object: "list".to_owned(), data: live_models(&state) })
}

#[utoipa::path(
    get,
    path = "/v1/models/{id}",
    tag = "openai",
    summary = "Get a model",
    params(("id" = String, Path, description = "The model id; it may contain `/`.")),
    security(("user_key" = [])),
    responses(
        (status = 200, description = "The model.", body = crate::api::schemas::ModelObject),
        crate::api::schemas::Unauthorized,
        crate::api::schemas::NotFound,
        crate::api::schemas::RateLimited,
    ),
)]
pub async fn get_model(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Model>, ApiError> {
    live_models(&state).into_iter().find(|m| m.id == id).map(Json).ok_or(ApiError::ModelNotFound { model: id })
}

pub fn models_for_status(state: &AppState) -> Vec<Model> {
    live_models(state)
}
