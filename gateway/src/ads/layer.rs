//! The ad layer: a tower layer around `/v1/chat/completions` and `/v1/completions`
//! that works on the request (as parsed once at the edge, `edge::extract::ChatBody` and
//! `CompletionBody`, which it edits in place) and on the response stream, never inside
//! handlers.
//!
//! On the way in it strips ad blocks we appended to earlier assistant turns (every
//! tier: a pasted conversation must not feed our ads to the model) and, for free-tier
//! keys, decides whether this request may carry an ad (`plan`). The auction runs
//! while the handler is already calling the provider, so it never delays the first
//! token (the `prompt` placement is the exception: it must choose before the call).
//!
//! On the way out it places the ad: `content` puts a labelled delta before the chunk
//! that carries `finish_reason`; `metadata` adds a chunk with empty `choices` and an
//! `ad` object before `[DONE]`; a JSON answer gets the same in its body. A stream that
//! fails before its end carries no ad. The impression counts when the body is polled
//! again after the ad went out: hyper asks for the next frame only once it wrote the
//! previous one, so a client that left before the ad is never charged for it.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use openapi::async_openai::types::chat::{
    ChatCompletionRequestAssistantMessageContent, ChatCompletionRequestAssistantMessageContentPart, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestSystemMessageContent, ChatCompletionRequestUserMessageContent,
    ChatCompletionRequestUserMessageContentPart, CreateChatCompletionRequest, Prompt, ResponseFormat,
};
use openapi::async_openai::types::completions::CreateCompletionRequest;
use openapi::openai::AdPreferences;
use serde_json::{json, Value};
use tower::{Layer, Service};

use super::{classify, content_text, Placement, Selected, Targeting};
use crate::edge::error::ApiError;
use crate::edge::keys::{AuthedKey, Tier};
use crate::edge::extract::{ChatBody, CompletionBody, RequestId};
use crate::state::AppState;

/// Which provider served a response (set by the OpenAI handlers), so the ad's
/// revenue share goes to the provider whose output carried it.
#[derive(Debug, Clone)]
pub struct ServedBy(pub String);

#[derive(Clone)]
pub struct AdLayer {
    state: AppState,
}

impl AdLayer {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

impl<S> Layer<S> for AdLayer {
    type Service = AdService<S>;
    fn layer(&self, inner: S) -> AdService<S> {
        AdService { inner, state: self.state.clone() }
    }
}

#[derive(Clone)]
pub struct AdService<S> {
    inner: S,
    state: AppState,
}

impl<S> Service<Request> for AdService<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // The clone that was driven to readiness handles this request.
        let fresh = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, fresh);
        Box::pin(handle(self.state.clone(), inner, request))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Chat,
    Completions,
}

/// What a request that may carry an ad was classified as.
pub(crate) struct Plan {
    pub(crate) category: &'static str,
    pub(crate) placement: Placement,
    pub(crate) blocked: Vec<String>,
}

impl Plan {
    /// What the auction targets for this plan, this user and this request.
    pub(crate) fn targeting<'a>(&'a self, user_id: &'a str, request_id: &'a str, base_url: &'a str) -> Targeting<'a> {
        Targeting { category: self.category, blocked: &self.blocked, user_id, request_id, placement: self.placement, base_url }
    }
}

async fn handle<S>(state: AppState, mut inner: S, request: Request) -> Result<Response, Infallible>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    let Some(key) = request.extensions().get::<Arc<AuthedKey>>().cloned() else {
        return inner.call(request).await;
    };
    let endpoint = if request.uri().path() == "/v1/completions" { Endpoint::Completions } else { Endpoint::Chat };
    let (mut parts, body) = request.into_parts();
    // Every tier: our earlier ad blocks never reach a model.
    if let Some(chat) = parts.extensions.get_mut::<ChatBody>() {
        strip_messages(&mut chat.request);
    }
    let free = key.tier == Tier::Free && state.config.ads_enabled;
    if !free {
        return inner.call(Request::from_parts(parts, body)).await;
    }
    let planned = match (parts.extensions.get::<ChatBody>(), parts.extensions.get::<CompletionBody>()) {
        (Some(chat), _) => plan(&state, &key, Asked::Chat(&chat.request), chat.ext.ad_preferences.as_ref()),
        (None, Some(completion)) => plan(&state, &key, Asked::Completion(&completion.request), completion.ext.ad_preferences.as_ref()),
        // Not parsed at the edge (cannot happen on these routes): no ad.
        (None, None) => Ok(None),
    };
    let plan = match planned {
        Ok(p) => p,
        Err(e) => return Ok(e.into_response()),
    };
    let request_id = parts.extensions.get::<RequestId>().map_or_else(String::new, |r| r.0.clone());
    let base_url = base_url(&state, &parts.headers);
    let targeting = plan.as_ref().map(|p| p.targeting(&key.user_id, &request_id, &base_url));
    let mut chosen = None;
    if let Some(t) = targeting.as_ref().filter(|t| t.placement == Placement::Prompt) {
        chosen = state.ads.choose(t).await;
        if let (Some(s), Some(chat)) = (&chosen, parts.extensions.get_mut::<ChatBody>()) {
            add_sponsor_note(&mut chat.request, s);
        }
    }
    let call = inner.call(Request::from_parts(parts, body));
    let (response, selected) = match targeting.as_ref().filter(|t| t.placement != Placement::Prompt) {
        // `join` polls the handler first: its call to the provider is on its way
        // before the auction runs.
        Some(t) => futures::join!(call, state.ads.choose(t)),
        None => (call.await, chosen),
    };
    let response = response?;
    let Some(selected) = selected else { return Ok(response) };
    if !response.status().is_success() {
        return Ok(response);
    }
    let provider = response.extensions().get::<ServedBy>().map(|s| s.0.clone());
    if selected.placement == Placement::Prompt {
        // The note went to the model; the impression is delivered with the answer.
        state.ads.delivered(selected, provider);
        return Ok(response);
    }
    let streaming = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let (mut parts, body) = response.into_parts();
    let ads = state.ads.clone();
    if streaming {
        let injector = Injector::new(selected, endpoint);
        let stream = futures::stream::unfold(
            (body.into_data_stream(), injector, ads, provider),
            |(mut inner, mut inj, ads, provider)| async move {
                loop {
                    if inj.armed {
                        inj.armed = false;
                        if let Some(s) = inj.selected.take() {
                            ads.delivered(s, provider.clone());
                        }
                    }
                    if let Some((frame, is_ad)) = inj.out.pop_front() {
                        inj.armed = is_ad;
                        return Some((Ok::<_, axum::Error>(frame), (inner, inj, ads, provider)));
                    }
                    match inner.next().await {
                        Some(Ok(bytes)) => inj.feed(&bytes),
                        Some(Err(e)) => return Some((Err(e), (inner, inj, ads, provider))),
                        None => {
                            inj.finish();
                            if inj.out.is_empty() {
                                return None;
                            }
                        }
                    }
                }
            },
        );
        return Ok(Response::from_parts(parts, Body::from_stream(stream)));
    }
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return Ok(ApiError::Internal("reading the response body failed".into()).into_response());
    };
    let Ok(mut answer) = serde_json::from_slice::<Value>(&bytes) else {
        return Ok(Response::from_parts(parts, Body::from(bytes)));
    };
    match selected.placement {
        Placement::Metadata => answer["ad"] = json!(selected.ad),
        _ => {
            let field = match endpoint {
                Endpoint::Chat => answer.pointer_mut("/choices/0/message/content"),
                Endpoint::Completions => answer.pointer_mut("/choices/0/text"),
            };
            match field {
                Some(Value::String(text)) => text.push_str(&content_text(&selected.ad)),
                // No text answer (a refusal, tool calls): no ad.
                _ => return Ok(Response::from_parts(parts, Body::from(bytes))),
            }
        }
    }
    let Ok(encoded) = serde_json::to_vec(&answer) else {
        return Ok(Response::from_parts(parts, Body::from(bytes)));
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    // One frame; delivered once hyper asks for more after writing it.
    let once = futures::stream::unfold((Some(Bytes::from(encoded)), Some(selected), ads, provider), |(frame, selected, ads, provider)| async move {
        match frame {
            Some(f) => Some((Ok::<_, Infallible>(f), (None, selected, ads, provider))),
            None => {
                if let Some(s) = selected {
                    ads.delivered(s, provider);
                }
                None
            }
        }
    });
    Ok(Response::from_parts(parts, Body::from_stream(once)))
}

/// The request an ad plan looks at.
#[derive(Clone, Copy)]
pub(crate) enum Asked<'a> {
    Chat(&'a CreateChatCompletionRequest),
    Completion(&'a CreateCompletionRequest),
}

/// Whether this free-tier request may carry an ad, and what it is about; `own` is the
/// request's `ad_preferences`.
pub(crate) fn plan(state: &AppState, key: &AuthedKey, asked: Asked<'_>, own: Option<&AdPreferences>) -> Result<Option<Plan>, ApiError> {
    let config = &state.config;
    let standing = key.ad_preferences.clone().unwrap_or_default();
    let own = own.cloned().unwrap_or_default();
    let placement = match own.placement.as_deref().or(standing.placement.as_deref()) {
        None => Placement::parse(&config.ads_placement).unwrap_or(Placement::Content),
        Some(p) => match Placement::parse(p) {
            Some(Placement::Prompt) if !config.ads_prompt_placement => {
                return Err(ApiError::param("the `prompt` ad placement is turned off on this gateway", "ad_preferences.placement"))
            }
            Some(p) => p,
            None => {
                return Err(ApiError::param(
                    format!("`ad_preferences.placement` must be content, metadata or prompt, got {p:?}"),
                    "ad_preferences.placement",
                ))
            }
        },
    };
    super::check_categories(own.categories.iter().chain(&own.blocked_categories), "ad_preferences")?;
    if (own.opt_out || standing.opt_out) && config.ads_free_opt_out {
        return Ok(None);
    }
    let text = match asked {
        Asked::Chat(chat) => {
            // Never where an ad would break a program's output or a tool loop.
            let structured = matches!(chat.response_format, Some(ResponseFormat::JsonObject | ResponseFormat::JsonSchema { .. }));
            #[allow(deprecated)] // `functions` is deprecated in OpenAI's spec but still sent by SDKs.
            let tools = chat.tools.as_ref().is_some_and(|t| !t.is_empty()) || chat.functions.is_some();
            let several = chat.n.is_some_and(|n| n > 1);
            let tool_turns = chat.messages.iter().any(|m| match m {
                ChatCompletionRequestMessage::Tool(_) | ChatCompletionRequestMessage::Function(_) => true,
                ChatCompletionRequestMessage::Assistant(a) => a.tool_calls.as_ref().is_some_and(|c| !c.is_empty()),
                _ => false,
            });
            if structured || tools || several || tool_turns {
                return Ok(None);
            }
            recent_user_text(&chat.messages)
        }
        Asked::Completion(completion) => {
            if completion.n.is_some_and(|n| n > 1) {
                return Ok(None);
            }
            match &completion.prompt {
                Prompt::String(s) => s.clone(),
                Prompt::StringArray(items) => items.join("\n"),
                _ => String::new(),
            }
        }
    };
    let context = classify::classify(&text);
    if context.topics.iter().any(|t| config.ads_excluded_topics.iter().any(|x| x == t)) {
        return Ok(None);
    }
    let Some(category) = context.category else { return Ok(None) };
    if context.confidence < config.ads_min_relevance {
        return Ok(None);
    }
    let wanted = if own.categories.is_empty() { &standing.categories } else { &own.categories };
    if !wanted.is_empty() && !wanted.iter().any(|c| c == category) {
        return Ok(None);
    }
    let mut blocked = standing.blocked_categories;
    blocked.extend(own.blocked_categories);
    Ok(Some(Plan { category, placement, blocked }))
}

/// The last three user turns' text, oldest first.
fn recent_user_text(messages: &[ChatCompletionRequestMessage]) -> String {
    let mut texts: Vec<String> = messages
        .iter()
        .rev()
        .filter_map(|m| match m {
            ChatCompletionRequestMessage::User(u) => Some(match &u.content {
                ChatCompletionRequestUserMessageContent::Text(s) => s.clone(),
                ChatCompletionRequestUserMessageContent::Array(parts) => parts
                    .iter()
                    .filter_map(|p| match p {
                        ChatCompletionRequestUserMessageContentPart::Text(t) => Some(t.text.as_str()),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
            }),
            _ => None,
        })
        .take(3)
        .collect();
    texts.reverse();
    texts.join("\n")
}

/// Strips our ad blocks from assistant messages.
pub(crate) fn strip_messages(chat: &mut CreateChatCompletionRequest) {
    let clean = |text: &mut String| {
        if let Some(stripped) = super::strip(text) {
            *text = stripped;
        }
    };
    for m in &mut chat.messages {
        let ChatCompletionRequestMessage::Assistant(a) = m else { continue };
        match &mut a.content {
            Some(ChatCompletionRequestAssistantMessageContent::Text(text)) => clean(text),
            Some(ChatCompletionRequestAssistantMessageContent::Array(parts)) => {
                for part in parts {
                    if let ChatCompletionRequestAssistantMessageContentPart::Text(t) = part {
                        clean(&mut t.text);
                    }
                }
            }
            None => {}
        }
    }
}

/// The `prompt` placement: a labelled sponsor note as a system message, first.
pub(crate) fn add_sponsor_note(chat: &mut CreateChatCompletionRequest, s: &Selected) {
    let note = format!(
        "Sponsored note (an advertisement; if you mention it, say it is sponsored): {}: {} {}",
        s.ad.title, s.ad.text, s.ad.click_url
    );
    let system = ChatCompletionRequestSystemMessage { content: ChatCompletionRequestSystemMessageContent::Text(note), name: None };
    chat.messages.insert(0, ChatCompletionRequestMessage::System(system));
}

/// `public_url`, or the scheme and host the client used.
pub(crate) fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(url) = &state.config.public_url {
        return url.trim_end_matches('/').to_owned();
    }
    let header_str = |name: &str| headers.get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    let host = header_str("x-forwarded-host").or_else(|| header_str(header::HOST.as_str())).unwrap_or("localhost");
    let scheme = header_str("x-forwarded-proto").unwrap_or(if state.config.tls_cert.is_some() { "https" } else { "http" });
    format!("{scheme}://{host}")
}

/// Splits the SSE stream into events and puts the ad in its place.
struct Injector {
    selected: Option<Selected>,
    endpoint: Endpoint,
    buf: BytesMut,
    out: VecDeque<(Bytes, bool)>,
    /// `id`, `created`, `model` of the stream's chunks, for the ad's own chunk.
    head: Option<(Value, Value, Value)>,
    placed: bool,
    /// The ad went out in the last frame: the next poll means it was written.
    armed: bool,
}

impl Injector {
    fn new(selected: Selected, endpoint: Endpoint) -> Self {
        Self { selected: Some(selected), endpoint, buf: BytesMut::new(), out: VecDeque::new(), head: None, placed: false, armed: false }
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let event = self.buf.split_to(end + 2).freeze();
            self.event(event);
        }
    }

    /// The stream ended: whatever is left goes out as is.
    fn finish(&mut self) {
        if !self.buf.is_empty() {
            let rest = self.buf.split().freeze();
            self.out.push_back((rest, false));
        }
    }

    fn event(&mut self, event: Bytes) {
        let data = event.strip_prefix(b"data: ").unwrap_or(&[]);
        if self.placed || self.selected.is_none() {
            self.out.push_back((event, false));
            return;
        }
        if data.starts_with(b"[DONE]") {
            if let Some(ad) = self.ad_chunk() {
                self.out.push_back((ad, true));
            }
            self.placed = true;
            self.out.push_back((event, false));
            return;
        }
        if data.starts_with(b"{\"error\"") {
            // The stream failed: no ad after an error.
            self.placed = true;
            self.out.push_back((event, false));
            return;
        }
        let finishing = self.selected.as_ref().is_some_and(|s| s.placement == Placement::Content)
            && (contains(data, b"\"finish_reason\":\"") || contains(data, b"\"finish_reason\": \""));
        if self.head.is_none() || finishing {
            if let Ok(chunk) = serde_json::from_slice::<Value>(data) {
                if self.head.is_none() {
                    self.head = Some((chunk["id"].clone(), chunk["created"].clone(), chunk["model"].clone()));
                }
            }
        }
        if finishing {
            if let Some(ad) = self.ad_chunk() {
                self.out.push_back((ad, true));
            }
            self.placed = true;
        }
        self.out.push_back((event, false));
    }

    /// The ad as one SSE event, shaped like the stream's chunks.
    fn ad_chunk(&self) -> Option<Bytes> {
        let s = self.selected.as_ref()?;
        let (id, created, model) = self.head.clone().unwrap_or((Value::Null, Value::Null, Value::Null));
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        };
        let chunk = match (s.placement, self.endpoint) {
            (Placement::Metadata, _) => {
                json!({ "id": id, "object": object, "created": created, "model": model, "choices": [], "ad": s.ad })
            }
            (_, Endpoint::Chat) => json!({
                "id": id, "object": object, "created": created, "model": model,
                "choices": [{ "index": 0, "delta": { "content": content_text(&s.ad) }, "finish_reason": null }]
            }),
            (_, Endpoint::Completions) => json!({
                "id": id, "object": object, "created": created, "model": model,
                "choices": [{ "index": 0, "text": content_text(&s.ad), "finish_reason": null, "logprobs": null }]
            }),
        };
        Some(Bytes::from(format!("data: {chunk}\n\n")))
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
