//! The worker's OpenAI-compatible HTTP API.
//!
//! `/v1/chat/completions` and `/v1/completions` (streaming with SSE, or one JSON
//! body), `/v1/embeddings` when an embedding model is loaded (`embeddings`),
//! `/v1/models`, `/health` (load, for the gateway's routing) and `/metrics`.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use serde::Deserialize;
use llguidance::Matcher;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::grammar::Grammars;
use crate::tools::{Piece, ToolChoice, ToolParser, Tools};
use crate::engine::{Engine, Event, FinishReason, GenRequest, TokenLogprob};
use crate::quant::Precision;
use crate::sampling::SamplingParams;

/// The optional OpenAI request parameters this worker honours (announced to the gateway).
pub const FEATURES: &[&str] = &["logit_bias", "seed", "penalties", "stop", "logprobs", "response_format", "tools", "n"];

/// Who may call `/v1/*`: the bearer tokens accepted (the gateway's relay secret, an
/// `--api-key`), or anyone (`--open`). `/health` and `/metrics` stay open: they show
/// load, never a model's output.
#[derive(Debug, Default)]
pub struct Access {
    tokens: parking_lot::RwLock<Vec<String>>,
    open: bool,
}

impl Access {
    /// Anyone may call (`worker serve --open`, and the in-process test servers).
    pub fn open() -> Arc<Access> {
        Arc::new(Access { open: true, ..Access::default() })
    }

    /// Only callers that present one of `tokens`.
    pub fn tokens(tokens: Vec<String>) -> Arc<Access> {
        Arc::new(Access { tokens: parking_lot::RwLock::new(tokens), open: false })
    }

    /// Accepts `token` from now on (the relay secret, once registration gave it).
    pub fn allow(&self, token: String) {
        self.tokens.write().push(token);
    }

    fn admits(&self, presented: Option<&str>) -> bool {
        if self.open {
            return true;
        }
        let Some(presented) = presented else { return false };
        // Every token is compared in full, so timing tells nothing about which is close.
        self.tokens.read().iter().fold(false, |ok, t| ok | constant_time_eq(t.as_bytes(), presented.as_bytes()))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Refuses `/v1/*` calls that do not present an accepted bearer token (401, OpenAI shape).
async fn require_token(
    State(access): State<Arc<Access>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if access.admits(presented) {
        return next.run(request).await;
    }
    let body = json!({"error": {
        "message": "This worker serves only its gateway (or holders of its API key): send `Authorization: Bearer <key>`.",
        "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}});
    (StatusCode::UNAUTHORIZED, Json(body)).into_response()
}

#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub model_id: String,
    pub template: Option<Arc<ChatTemplate>>,
    /// Set on SIGTERM: new requests are refused while open streams finish.
    pub draining: Arc<AtomicBool>,
    pub created: u64,
    /// Who may call `/v1/*` (open unless `with_access` says otherwise).
    pub access: Arc<Access>,
    /// The sentence encoder behind `/v1/embeddings`, when one is loaded.
    pub embedder: Option<Arc<crate::embeddings::Embedder>>,
    /// The chat model's grammar builder (`response_format`), made on first use.
    grammars: Arc<std::sync::OnceLock<Result<crate::grammar::Grammars, String>>>,
    /// `(engine, weights)` when the device serves `reduced` precision only; read once
    /// (`DeviceInfo::precisions` does not change, and reading the device costs I/O).
    reduced_only: Option<(&'static str, &'static str)>,
}

impl AppState {
    pub fn new(engine: Engine, model_id: String) -> AppState {
        let m = &engine.model;
        let tok = &m.tokenizer;
        let template = m.chat_template.as_deref().and_then(|src| {
            let bos = tok.bos.map(|b| tok.token_str(b).to_string()).unwrap_or_default();
            let eos = tok.token_str(tok.eos).to_string();
            match ChatTemplate::new(src, &bos, &eos) {
                Ok(t) => Some(Arc::new(t)),
                Err(e) => {
                    tracing::warn!("chat template unusable, /v1/chat/completions disabled: {e}");
                    None
                }
            }
        });
        let device = engine.forward.device();
        let reduced_only = (!device.serves_full()).then_some((device.engine, device.weights));
        AppState {
            reduced_only,
            engine,
            model_id,
            template,
            draining: Arc::new(AtomicBool::new(false)),
            created: now(),
            access: Access::open(),
            embedder: None,
            grammars: Arc::default(),
        }
    }

    /// The same state, also serving `/v1/embeddings` with `embedder`.
    pub fn with_embedder(self, embedder: Arc<crate::embeddings::Embedder>) -> AppState {
        AppState { embedder: Some(embedder), ..self }
    }

    /// The same state, serving `/v1/*` only to callers `access` admits.
    pub fn with_access(self, access: Arc<Access>) -> AppState {
        AppState { access, ..self }
    }
}

pub fn app(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route_layer(axum::middleware::from_fn_with_state(state.access.clone(), require_token));
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(state)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The OpenAI error `code` of a request whose engine step failed.
pub const ENGINE_ERROR_CODE: &str = "engine_error";

/// Errors at the HTTP edge, shaped like OpenAI's.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidRequest { message: String, param: Option<&'static str>, code: Option<&'static str> },
    #[error("This model's maximum context length is {limit} tokens. However, your request has {requested} prompt tokens.")]
    ContextTooLong { limit: usize, requested: usize },
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    #[error("The worker is shutting down and takes no new requests.")]
    Draining,
    #[error("{0}")]
    Internal(String),
    /// The engine step this request was in failed; the worker goes on serving.
    #[error("{0}")]
    Engine(String),
}

impl ApiError {
    fn bad(message: impl Into<String>, param: &'static str) -> ApiError {
        ApiError::InvalidRequest { message: message.into(), param: Some(param), code: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, ty, param, code) = match &self {
            ApiError::InvalidRequest { param, code, .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", *param, *code)
            }
            ApiError::ContextTooLong { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", Some("messages"), Some("context_length_exceeded"))
            }
            ApiError::ModelNotFound(_) => {
                (StatusCode::NOT_FOUND, "invalid_request_error", Some("model"), Some("model_not_found"))
            }
            ApiError::Draining => (StatusCode::SERVICE_UNAVAILABLE, "server_error", None, Some("worker_draining")),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, None),
            ApiError::Engine(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, Some(ENGINE_ERROR_CODE)),
        };
        match &self {
            ApiError::Internal(_) | ApiError::Engine(_) => tracing::error!("{self}"),
            _ => tracing::debug!("{self}"),
        }
        let body = json!({"error": {"message": self.to_string(), "type": ty, "param": param, "code": code}});
        (status, Json(body)).into_response()
    }
}

/// Parses a JSON body, turning any problem into an OpenAI-shaped 400.
fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::InvalidRequest {
        message: format!("Invalid request body: {e}"),
        param: None,
        code: None,
    })
}

#[derive(Debug, Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Parameters shared by chat and legacy completions.
#[derive(Debug, Deserialize, Default)]
struct CommonParams {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u64>,
    seed: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias: Option<HashMap<String, f32>>,
    stop: Option<Value>,
    n: Option<u64>,
    logprobs: Option<Value>,
    top_logprobs: Option<Value>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    /// The deprecated `functions`/`function_call`: refused, naming `tools` instead.
    functions: Option<Value>,
    response_format: Option<Value>,
    priority: Option<i32>,
    /// `full` or `reduced` (an extension the gateway sends from the quality tier).
    precision: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    messages: Vec<MessageIn>,
    #[serde(flatten)]
    common: CommonParams,
}

#[derive(Debug, Deserialize)]
struct MessageIn {
    role: String,
    #[serde(default)]
    content: Value,
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
    #[serde(default)]
    tool_call_id: Option<String>,
}

/// An assistant turn's calls as templates read them (`chat::ChatMessage::tool_calls`):
/// arguments parsed from OpenAI's JSON string.
fn template_calls(calls: &[Value]) -> Result<Vec<Value>, ApiError> {
    calls
        .iter()
        .map(|c| {
            let f = c.get("function").ok_or_else(|| ApiError::bad("a tool call is missing `function`", "messages"))?;
            let arguments = match f.get("arguments") {
                Some(Value::String(a)) => serde_json::from_str(a).unwrap_or_else(|_| Value::String(a.clone())),
                Some(v) => v.clone(),
                None => json!({}),
            };
            Ok(json!({"id": c.get("id"), "type": "function",
                "function": {"name": f.get("name").cloned().unwrap_or(Value::Null), "arguments": arguments}}))
        })
        .collect()
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    prompt: Value,
    #[serde(flatten)]
    common: CommonParams,
}

fn content_text(v: &Value) -> Result<String, ApiError> {
    match v {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for p in parts {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => out.push_str(p.get("text").and_then(Value::as_str).unwrap_or_default()),
                    Some(other) => {
                        return Err(ApiError::bad(format!("Content part type `{other}` is not supported"), "messages"))
                    }
                    None => return Err(ApiError::bad("Content part without a type", "messages")),
                }
            }
            Ok(out)
        }
        _ => Err(ApiError::bad("Message content must be a string or an array of parts", "messages")),
    }
}

impl AppState {
    fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        let Some(m) = model else { return Ok(()) };
        // A `:quality` suffix (the gateway's tier notation) names the same model.
        let base = m.split(':').next().unwrap_or(m);
        if base.is_empty() || base == self.model_id {
            Ok(())
        } else {
            Err(ApiError::ModelNotFound(m.to_string()))
        }
    }

    /// The engine request for a validated body, with the grammar its output must follow
    /// when it asks for structured output.
    fn request(&self, prompt: Vec<u32>, p: &CommonParams, kind: Kind, tools: Option<&Tools>) -> Result<(GenRequest, Option<Matcher>), ApiError> {
        if self.draining.load(Relaxed) {
            return Err(ApiError::Draining);
        }
        let most = MAX_CHOICES.min(self.engine.config.max_seqs);
        if p.n.is_some_and(|n| n == 0 || n > most as u64) {
            return Err(ApiError::bad(format!("n must be between 1 and {most} on this worker"), "n"));
        }
        let logprobs = match (kind, &p.logprobs, &p.top_logprobs) {
            (Kind::Chat, Some(Value::Bool(true)), top) => {
                let top = match top {
                    None => 0,
                    Some(v) => v.as_u64().filter(|&n| n <= 20).ok_or_else(|| {
                        ApiError::bad("top_logprobs must be an integer between 0 and 20", "top_logprobs")
                    })? as usize,
                };
                Some(top)
            }
            (Kind::Chat, None | Some(Value::Bool(false)), Some(_)) => {
                return Err(ApiError::bad("top_logprobs requires logprobs to be true", "top_logprobs"))
            }
            (Kind::Chat, None | Some(Value::Bool(false)), None) => None,
            (Kind::Text, None, _) => None,
            _ => return Err(ApiError::bad("logprobs are supported on chat completions only (true/false)", "logprobs")),
        };
        if p.functions.is_some() {
            return Err(ApiError::bad("functions is deprecated and not served here: send tools", "functions"));
        }
        if kind != Kind::Chat && p.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::bad("tools are supported on chat completions only", "tools"));
        }
        let schema = Grammars::schema(p.response_format.as_ref()).map_err(|e| ApiError::bad(e, "response_format"))?;
        if schema.is_some() && kind != Kind::Chat {
            return Err(ApiError::bad("response_format is supported on chat completions only", "response_format"));
        }
        let constraint = match (tools, &schema) {
            (None, None) => None,
            (tools, schema) => {
                let grammars = self.grammars.get_or_init(|| Grammars::new(&self.engine.model.tokenizer));
                let grammars = grammars.as_ref().map_err(|e| ApiError::Internal(format!("cannot build this model's token trie: {e}")))?;
                match tools {
                    // Under `tool_choice: none` the answer is text, as `response_format` says.
                    Some(t) if t.choice != ToolChoice::None => {
                        grammars.tool_constraint(t, schema.as_ref()).map_err(|e| ApiError::bad(e, "tools"))?
                    }
                    _ => grammars.constraint(p.response_format.as_ref()).map_err(|e| ApiError::bad(e, "response_format"))?,
                }
            }
        };
        let limit = self.engine.context_length();
        if prompt.len() >= limit {
            return Err(ApiError::ContextTooLong { limit, requested: prompt.len() });
        }
        let room = limit - prompt.len();
        let max_tokens = p.max_completion_tokens.or(p.max_tokens).map_or(room, |m| (m as usize).min(room));
        if max_tokens == 0 {
            return Err(ApiError::bad("max_tokens must be at least 1", "max_tokens"));
        }
        let temperature = p.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad("temperature must be between 0 and 2", "temperature"));
        }
        let top_p = p.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad("top_p must be in (0, 1]", "top_p"));
        }
        for (name, v) in [("presence_penalty", p.presence_penalty), ("frequency_penalty", p.frequency_penalty)] {
            if v.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
                return Err(ApiError::bad(format!("{name} must be between -2 and 2"), if name == "presence_penalty" { "presence_penalty" } else { "frequency_penalty" }));
            }
        }
        let vocab = self.engine.model.tokenizer.vocab_size();
        let mut logit_bias = HashMap::new();
        for (k, v) in p.logit_bias.iter().flatten() {
            let id: u32 = k.parse().ok().filter(|&i: &u32| (i as usize) < vocab).ok_or_else(|| {
                ApiError::bad(format!("logit_bias key `{k}` is not a token id of this model"), "logit_bias")
            })?;
            logit_bias.insert(id, v.clamp(-100.0, 100.0));
        }
        let stop = match &p.stop {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) if a.len() <= 4 => {
                a.iter().map(|s| s.as_str().map(str::to_string)).collect::<Option<Vec<_>>>().ok_or_else(|| {
                    ApiError::bad("stop must be a string or an array of up to 4 strings", "stop")
                })?
            }
            Some(_) => return Err(ApiError::bad("stop must be a string or an array of up to 4 strings", "stop")),
        };
        let precision = match p.precision.as_ref().filter(|v| !v.is_null()) {
            None if self.reduced_only.is_some() => Precision::Fast,
            None => self.engine.config.default_precision,
            Some(v) => match (v.as_str().and_then(Precision::from_api_name), self.reduced_only) {
                (None, _) => return Err(ApiError::bad("precision must be \"full\" or \"reduced\"", "precision")),
                (Some(Precision::Exact), Some((engine, weights))) => {
                    return Err(ApiError::bad(format!("this worker ({engine}, {weights}) serves \"reduced\" precision only"), "precision"))
                }
                (Some(p), _) => p,
            },
        };
        let req = GenRequest {
            prompt,
            params: SamplingParams {
                temperature,
                top_p,
                top_k: p.top_k.unwrap_or(0) as usize,
                seed: p.seed.map(|s| s as u64),
                presence_penalty: p.presence_penalty.unwrap_or(0.0),
                frequency_penalty: p.frequency_penalty.unwrap_or(0.0),
                logit_bias,
                max_tokens,
                stop,
                ignore_eos: false,
                logprobs,
            },
            priority: p.priority.unwrap_or(0),
            precision,
        };
        Ok((req, constraint))
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

async fn chat_completions(State(st): State<AppState>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let body: ChatBody = parse(&body)?;
    st.check_model(body.common.model.as_deref())?;
    let template = st.template.clone().ok_or_else(|| ApiError::bad("This model has no chat template", "messages"))?;
    if body.messages.is_empty() {
        return Err(ApiError::bad("messages must not be empty", "messages"));
    }
    let c = &body.common;
    let tools = Tools::parse(c.tools.as_deref(), c.tool_choice.as_ref(), c.parallel_tool_calls)
        .map_err(|r| ApiError::bad(r.message, r.param))?;
    let mut msgs = Vec::with_capacity(body.messages.len());
    for m in &body.messages {
        let role = if m.role == "developer" { "system".to_string() } else { m.role.clone() };
        let tool_calls = m.tool_calls.as_deref().map(template_calls).transpose()?;
        msgs.push(ChatMessage { role, content: content_text(&m.content)?, tool_calls, tool_call_id: m.tool_call_id.clone() });
    }
    let text = template.render_with(&msgs, tools.as_ref()).map_err(|e| ApiError::bad(e.to_string(), "messages"))?;
    let prompt = st.engine.model.tokenizer.encode(&text);
    let (req, constraint) = st.request(prompt, c, Kind::Chat, tools.as_ref())?;
    respond(&st, req, constraint, c, Kind::Chat, tools.as_ref()).await
}

async fn completions(State(st): State<AppState>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let body: CompletionBody = parse(&body)?;
    st.check_model(body.common.model.as_deref())?;
    let text = match &body.prompt {
        Value::String(s) => s.clone(),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or_default().to_string(),
        _ => return Err(ApiError::bad("prompt must be a string (batches are not supported)", "prompt")),
    };
    let prompt = st.engine.model.tokenizer.encode(&text);
    let (req, constraint) = st.request(prompt, &body.common, Kind::Text, None)?;
    respond(&st, req, constraint, &body.common, Kind::Text, None).await
}

async fn embeddings(State(st): State<AppState>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let body: crate::embeddings::EmbeddingsBody = parse(&body)?;
    let model = body.model.as_deref().unwrap_or_default();
    let Some(e) = st.embedder.as_ref().filter(|e| model.split(':').next() == Some(e.model_id.as_str())) else {
        return Err(ApiError::ModelNotFound(model.to_string()));
    };
    if st.draining.load(Relaxed) {
        return Err(ApiError::Draining);
    }
    let format = body.encoding_format.as_deref().unwrap_or("float");
    if !matches!(format, "float" | "base64") {
        return Err(ApiError::bad("encoding_format must be \"float\" or \"base64\"", "encoding_format"));
    }
    let hidden = e.encoder.config.hidden;
    if body.dimensions.is_some_and(|d| d != hidden as u64) {
        return Err(ApiError::bad(format!("{} does not support `dimensions`: its vectors have {hidden}", e.model_id), "dimensions"));
    }
    let ids = e.inputs(&body).map_err(|r| ApiError::bad(r.message, r.param))?;
    let tokens: usize = ids.iter().map(Vec::len).sum();
    let inputs = ids.len();
    let vectors = e.embed(ids).await.ok_or_else(|| ApiError::Internal("the embeddings thread stopped".into()))?;
    e.stats.requests.fetch_add(1, Relaxed);
    e.stats.inputs.fetch_add(inputs as u64, Relaxed);
    e.stats.tokens.fetch_add(tokens as u64, Relaxed);
    Ok(Json(crate::embeddings::response(&e.model_id, &vectors, tokens, format)).into_response())
}

fn logprob_json(lp: &TokenLogprob) -> Value {
    let top: Vec<Value> =
        lp.top.iter().map(|(t, b, p)| json!({"token": t, "logprob": p, "bytes": b})).collect();
    json!({"token": lp.token, "logprob": lp.logprob, "bytes": lp.bytes, "top_logprobs": top})
}

/// Choices one request may ask for (`n`), at most; fewer when the engine runs fewer
/// sequences at once.
pub const MAX_CHOICES: usize = 16;

async fn respond(
    st: &AppState,
    req: GenRequest,
    constraint: Option<Matcher>,
    p: &CommonParams,
    kind: Kind,
    tools: Option<&Tools>,
) -> Result<Response, ApiError> {
    let want_logprobs = req.params.logprobs.is_some();
    let n = p.n.unwrap_or(1) as usize;
    let constraints = (0..n).map(|_| constraint.as_ref().map(Matcher::deep_clone)).collect();
    let rxs = st.engine.submit_choices(req, constraints);
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        Kind::Text => format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
    };
    let meta = Meta { id, created: now(), model: st.model_id.clone(), kind };
    let choices: Vec<ChoiceState> = (0..n).map(|_| ChoiceState::new(tools)).collect();
    let events = merged(rxs);
    if p.stream {
        let include_usage = p.stream_options.as_ref().is_some_and(|o| o.include_usage);
        return Ok(Sse::new(sse_stream(events, choices, meta, include_usage)).into_response());
    }
    whole_answer(events, choices, meta, want_logprobs).await
}

/// Every choice's events on one stream, tagged with the choice's index; a choice
/// whose channel closes without `Done` or `Error` says so with an error.
fn merged(rxs: Vec<UnboundedReceiver<Event>>) -> impl Stream<Item = (usize, Event)> + Send + Unpin {
    let streams = rxs.into_iter().enumerate().map(|(i, rx)| {
        Box::pin(futures::stream::unfold(Some(rx), move |rx| async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(ev @ (Event::Done { .. } | Event::Error { .. })) => Some(((i, ev), None)),
                Some(ev) => Some(((i, ev), Some(rx))),
                None => Some(((i, Event::Error { message: "the engine stopped before finishing the request".into() }), None)),
            }
        }))
    });
    futures::stream::select_all(streams)
}

/// The answer of a request that did not ask for a stream.
async fn whole_answer(
    mut events: impl Stream<Item = (usize, Event)> + Unpin,
    mut choices: Vec<ChoiceState>,
    meta: Meta,
    want_logprobs: bool,
) -> Result<Response, ApiError> {
    use futures::StreamExt;
    let mut answers: Vec<Answer> = choices.iter().map(|_| Answer::default()).collect();
    let mut tally = Tally::new(choices.len());
    while let Some((i, ev)) = events.next().await {
        let (c, a) = (&mut choices[i], &mut answers[i]);
        match ev {
            Event::Text(t) => c.pieces(&t).into_iter().for_each(|p| a.take(p)),
            Event::Logprob(lp) => a.logprobs.push(logprob_json(&lp)),
            Event::Done { reason, prompt_tokens, completion_tokens } => {
                c.finish().into_iter().for_each(|p| a.take(p));
                a.finish = Some(c.finish_reason(reason));
                if tally.done(prompt_tokens, completion_tokens) {
                    break;
                }
            }
            Event::Error { message } => return Err(ApiError::Engine(message)),
        }
    }
    let choices: Vec<Value> = answers.into_iter().enumerate().map(|(i, a)| a.json(i, meta.kind, want_logprobs)).collect();
    let object = if meta.kind == Kind::Chat { "chat.completion" } else { "text_completion" };
    Ok(Json(json!({"id": meta.id, "object": object, "created": meta.created, "model": meta.model,
        "choices": choices, "usage": tally.usage()}))
    .into_response())
}

/// One choice's whole answer, put together from its pieces.
#[derive(Default)]
struct Answer {
    content: String,
    /// `(id, name, arguments)` of each call.
    calls: Vec<(String, String, String)>,
    logprobs: Vec<Value>,
    finish: Option<&'static str>,
}

impl Answer {
    fn take(&mut self, piece: Piece) {
        match piece {
            Piece::Content(t) => self.content.push_str(&t),
            Piece::CallStart { id, name, .. } => self.calls.push((id, name, String::new())),
            Piece::Arguments { index, text } => {
                if let Some(call) = self.calls.get_mut(index) {
                    call.2.push_str(&text);
                }
            }
        }
    }

    fn json(self, index: usize, kind: Kind, want_logprobs: bool) -> Value {
        let finish = self.finish.unwrap_or("stop");
        if kind == Kind::Text {
            return json!({"index": index, "text": self.content, "logprobs": null, "finish_reason": finish});
        }
        let mut message = json!({"role": "assistant", "content": self.content});
        if !self.calls.is_empty() {
            if self.content.is_empty() {
                message["content"] = Value::Null;
            }
            let calls: Vec<Value> = self
                .calls
                .into_iter()
                .map(|(id, name, arguments)| json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}))
                .collect();
            message["tool_calls"] = json!(calls);
        }
        json!({"index": index, "message": message,
            "logprobs": if want_logprobs { json!({"content": self.logprobs}) } else { Value::Null },
            "finish_reason": finish})
    }
}

/// What one choice's text becomes on its way to the client: content, or tool calls
/// when the request has tools (`tools::ToolParser`).
struct ChoiceState {
    tools: Option<ToolParser>,
    /// Logprobs of tokens whose text has not been sent yet (streams).
    logprobs: Vec<Value>,
}

impl ChoiceState {
    fn new(tools: Option<&Tools>) -> ChoiceState {
        ChoiceState { tools: tools.map(ToolParser::new), logprobs: Vec::new() }
    }

    fn pieces(&mut self, text: &str) -> Vec<Piece> {
        match &mut self.tools {
            Some(parser) => parser.push(text),
            None => vec![Piece::Content(text.to_string())],
        }
    }

    fn finish(&mut self) -> Vec<Piece> {
        self.tools.as_mut().map(ToolParser::finish).unwrap_or_default()
    }

    /// `tool_calls` when the answer ended after calling tools.
    fn finish_reason(&self, reason: FinishReason) -> &'static str {
        match reason {
            FinishReason::Stop if self.tools.as_ref().is_some_and(|t| t.calls() > 0) => "tool_calls",
            r => r.as_str(),
        }
    }
}

/// A request's usage as its choices end: the prompt once, every choice's tokens.
struct Tally {
    prompt: usize,
    completion: usize,
    open: usize,
}

impl Tally {
    fn new(choices: usize) -> Tally {
        Tally { prompt: 0, completion: 0, open: choices }
    }

    /// Counts one choice's end; true when it was the last.
    fn done(&mut self, prompt: usize, completion: usize) -> bool {
        self.prompt = prompt;
        self.completion += completion;
        self.open = self.open.saturating_sub(1);
        self.open == 0
    }

    fn usage(&self) -> Value {
        json!({"prompt_tokens": self.prompt, "completion_tokens": self.completion, "total_tokens": self.prompt + self.completion})
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Meta {
    fn chunk(&self, choices: Value, usage: Option<Value>, include_usage: bool) -> SseEvent {
        let object = if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
        let mut v = json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices});
        if include_usage {
            v["usage"] = usage.unwrap_or(Value::Null);
        }
        SseEvent::default().data(v.to_string())
    }

    /// Choice `index`'s chunk entry: a delta (chat) or text (completions).
    fn choice(&self, index: usize, delta: Value, finish: Option<&str>, lps: Vec<Value>) -> Value {
        let logprobs = if lps.is_empty() { Value::Null } else { json!({"content": lps}) };
        match self.kind {
            Kind::Chat => json!([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]),
            Kind::Text => {
                let text = delta.get("content").and_then(Value::as_str).unwrap_or_default();
                json!([{"index": index, "text": text, "logprobs": null, "finish_reason": finish}])
            }
        }
    }
}

/// A piece as a chat delta.
fn delta(piece: Piece) -> Value {
    match piece {
        Piece::Content(t) => json!({"content": t}),
        Piece::CallStart { index, id, name } => json!({"tool_calls": [{"index": index, "id": id, "type": "function",
            "function": {"name": name, "arguments": ""}}]}),
        Piece::Arguments { index, text } => json!({"tool_calls": [{"index": index, "function": {"arguments": text}}]}),
    }
}

struct StreamState<E> {
    events: E,
    choices: Vec<ChoiceState>,
    meta: Meta,
    include_usage: bool,
    pending: VecDeque<SseEvent>,
    tally: Tally,
    done: bool,
}

/// SSE events for one request. Dropping the stream (client gone) drops the receivers,
/// which cancels the request in the engine at its next step.
fn sse_stream(
    events: impl Stream<Item = (usize, Event)> + Send + Unpin,
    choices: Vec<ChoiceState>,
    meta: Meta,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, std::convert::Infallible>> {
    use futures::StreamExt;
    let mut pending = VecDeque::new();
    for index in 0..choices.len() {
        let first = match meta.kind {
            Kind::Chat => json!({"role": "assistant", "content": ""}),
            Kind::Text => continue,
        };
        pending.push_back(meta.chunk(meta.choice(index, first, None, Vec::new()), None, include_usage));
    }
    let tally = Tally::new(choices.len());
    let st = StreamState { events, choices, meta, include_usage, pending, tally, done: false };
    futures::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(e) = st.pending.pop_front() {
                return Some((Ok(e), st));
            }
            if st.done {
                return None;
            }
            let (m, iu) = (&st.meta, st.include_usage);
            match st.events.next().await {
                Some((i, Event::Logprob(lp))) => st.choices[i].logprobs.push(logprob_json(&lp)),
                Some((i, Event::Text(t))) => {
                    let c = &mut st.choices[i];
                    let pieces = c.pieces(&t);
                    // Logprobs wait for the first piece their text shows in.
                    let mut lps = if pieces.is_empty() { Vec::new() } else { std::mem::take(&mut c.logprobs) };
                    for piece in pieces {
                        st.pending.push_back(m.chunk(m.choice(i, delta(piece), None, std::mem::take(&mut lps)), None, iu));
                    }
                }
                Some((i, Event::Done { reason, prompt_tokens, completion_tokens })) => {
                    let c = &mut st.choices[i];
                    for piece in c.finish() {
                        st.pending.push_back(m.chunk(m.choice(i, delta(piece), None, Vec::new()), None, iu));
                    }
                    let lps = std::mem::take(&mut c.logprobs);
                    st.pending.push_back(m.chunk(m.choice(i, json!({}), Some(c.finish_reason(reason)), lps), None, iu));
                    if st.tally.done(prompt_tokens, completion_tokens) {
                        if iu {
                            st.pending.push_back(m.chunk(json!([]), Some(st.tally.usage()), true));
                        }
                        st.pending.push_back(SseEvent::default().data("[DONE]"));
                        st.done = true;
                    }
                }
                // A failed stream ends with an error event and no `[DONE]`.
                Some((_, Event::Error { message })) => {
                    let err = json!({"error": {"message": message, "type": "server_error", "param": null,
                        "code": ENGINE_ERROR_CODE}});
                    st.pending.push_back(SseEvent::default().data(err.to_string()));
                    st.done = true;
                }
                None => {
                    let err = json!({"error": {"message": "the engine stopped before finishing the request",
                        "type": "server_error", "param": null, "code": null}});
                    st.pending.push_back(SseEvent::default().data(err.to_string()));
                    st.done = true;
                }
            }
        }
    })
}

fn model_card(st: &AppState) -> Value {
    let c = &st.engine.model.model.config;
    json!({"id": st.model_id, "object": "model", "created": st.created, "owned_by": "gpu-streaming",
        "context_length": c.context_length})
}

async fn list_models(State(st): State<AppState>) -> Json<Value> {
    let mut data = vec![model_card(&st)];
    if let Some(e) = &st.embedder {
        data.push(json!({"id": e.model_id, "object": "model", "created": st.created, "owned_by": "gpu-streaming",
            "context_length": e.encoder.config.max_positions}));
    }
    Json(json!({"object": "list", "data": data}))
}

async fn get_model(State(st): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    st.check_model(Some(&id))?;
    Ok(Json(model_card(&st)))
}

async fn health(State(st): State<AppState>) -> Json<Value> {
    let s = st.engine.stats();
    let cfg = &st.engine.config;
    let device = st.engine.forward.device();
    Json(json!({
        "status": if st.draining.load(Relaxed) { "draining" } else { "ok" },
        "model": st.model_id,
        "activeStreams": s.active.load(Relaxed),
        "queueLength": s.queued.load(Relaxed),
        "maxConcurrentStreams": cfg.max_seqs,
        // What computes: never `cuda` for a process on the CPU.
        "backend": {
            "engine": device.engine,
            "kind": device.kind,
            "device": device.name,
            "weights": device.weights,
            "memoryTotalMb": device.memory_total_mb,
            "memoryFreeMb": device.memory_free_mb,
        },
        "failedSteps": s.failed_steps_total.load(Relaxed),
        "memory": {
            "rssMb": crate::host::rss_mb(),
            // The compute device's free memory (host RAM for the CPU).
            "freeMemoryMb": device.memory_free_mb,
            "kvReservedMb": s.kv_reserved_bytes.load(Relaxed) >> 20,
            "kvBudgetMb": cfg.kv_budget_bytes >> 20,
            "weightsMb": st.engine.model.model.weight_bytes >> 20,
        },
    }))
}

async fn metrics(State(st): State<AppState>) -> impl IntoResponse {
    let s = st.engine.stats();
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, v: u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    put("worker_requests_total", "counter", "Generation requests accepted.", s.requests_total.load(Relaxed));
    put("worker_prompt_tokens_total", "counter", "Prompt tokens processed.", s.prompt_tokens_total.load(Relaxed));
    put("worker_completion_tokens_total", "counter", "Tokens generated.", s.completion_tokens_total.load(Relaxed));
    put("worker_cancelled_total", "counter", "Requests cancelled by the client.", s.cancelled_total.load(Relaxed));
    if let Some(e) = &st.embedder {
        let es = &e.stats;
        put("worker_embedding_requests_total", "counter", "Embedding requests answered.", es.requests.load(Relaxed));
        put("worker_embedding_inputs_total", "counter", "Embedding inputs encoded.", es.inputs.load(Relaxed));
        put("worker_embedding_tokens_total", "counter", "Embedding input tokens ([CLS] and [SEP] included).", es.tokens.load(Relaxed));
        put("worker_embedding_batches_total", "counter", "Encoder batches (inputs of concurrent requests share one).", es.batches.load(Relaxed));
    }
    put("worker_engine_steps_total", "counter", "Batched forward passes.", s.steps_total.load(Relaxed));
    put("worker_engine_failed_steps_total", "counter", "Forward passes that failed.", s.failed_steps_total.load(Relaxed));
    put("worker_engine_failed_requests_total", "counter", "Requests failed by a failed forward pass.", s.failed_requests_total.load(Relaxed));
    put("worker_active_streams", "gauge", "Sequences in the running batch.", s.active.load(Relaxed) as u64);
    put("worker_queue_length", "gauge", "Requests waiting to join the batch.", s.queued.load(Relaxed) as u64);
    put("worker_kv_reserved_bytes", "gauge", "KV-cache bytes reserved.", s.kv_reserved_bytes.load(Relaxed) as u64);
    put("worker_resident_memory_bytes", "gauge", "Resident memory.", crate::host::rss_mb() << 20);
    let _ = writeln!(out, "# HELP worker_requests_by_priority_total Requests accepted per queue priority.\n# TYPE worker_requests_by_priority_total counter");
    for (priority, n) in s.requests_by_priority.iter().enumerate() {
        let n = n.load(Relaxed);
        if n > 0 {
            let _ = writeln!(out, "worker_requests_by_priority_total{{priority=\"{priority}\"}} {n}");
        }
    }
    let _ = writeln!(out, "# HELP worker_requests_by_precision_total Requests accepted per precision (full runs exact steps).\n# TYPE worker_requests_by_precision_total counter");
    for precision in [Precision::Exact, Precision::Fast] {
        let n = s.requests_at(precision).load(Relaxed);
        let _ = writeln!(out, "worker_requests_by_precision_total{{precision=\"{}\"}} {n}", precision.api_name());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
