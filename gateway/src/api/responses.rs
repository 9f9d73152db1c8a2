//! OpenAI's Responses API: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`.
//!
//! A response is a chat completion underneath: the handler translates the request
//! (stored history, `instructions`, input items, function tools, `text.format`) into a
//! chat request, which goes through `openai::prepare_chat` and `relay::open` like
//! any chat request — the same validation, quality tiers, rate limits, spending limits,
//! holds, routing with failover, settlement and usage record (endpoint `responses`).
//! On the way back a `Builder` turns the provider's chat chunks into the Responses
//! API's output items and typed stream events; the non-stream answer is the same
//! builder's final object, so both carry the same items.
//!
//! Free-tier answers end with the labelled ad as a message item of its own (id
//! `msg_ad_…`), chosen by the same plan and auction as chat (`ads::layer`); never with
//! tools or a JSON format. Ad items and ad blocks are stripped from what is replayed.
//!
//! With `store` (the default) the finished response is kept in the `responses` table:
//! the object as returned, and this turn's part of the conversation as chat messages
//! (input, then the answer without the ad), so `previous_response_id` replays a chain
//! with one recursive query. Only keys of the same user see a stored response; rows
//! older than `responses_retention_days` are neither served nor replayed, and `sweep`
//! deletes them.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use openapi::async_openai::types::chat::CreateChatCompletionRequest;
use openapi::responses::{
    CreateResponseRequest, DeletedResponse, IncompleteDetails, InputTokensDetails, OutputContent, OutputItem,
    OutputTokensDetails, ResponseError, ResponseObject, ResponseUsage, TextConfig, TextFormat,
};
use openapi::stream::{StreamChunk, Usage};
use serde_json::{json, Value};

use crate::ads::layer as ad_layer;
use crate::ads::{self, Placement, Selected};
use crate::edge::error::ApiError;
use crate::edge::keys::{AuthedKey, Tier};
use crate::edge::ratelimit::RateCtx;
use crate::inference::relay::{self, Endpoint, Event, Relay};
use crate::store::now_ms;
use crate::{edge::extract, api::openai, state::AppState, edge::extract::RequestId};

/// Our ad's output item id starts with this; such items are never replayed.
pub const AD_ITEM_PREFIX: &str = "msg_ad_";

/// How many stored responses a `previous_response_id` chain replays at most.
const MAX_CHAIN: u32 = 1_000;

/// OpenAI's limits on `metadata`.
const METADATA_PAIRS: usize = 16;
const METADATA_KEY_CHARS: usize = 64;
const METADATA_VALUE_CHARS: usize = 512;

#[utoipa::path(
    post,
    path = "/v1/responses",
    tag = "openai",
    summary = "Create a model response (the Responses API)",
    request_body = openapi::responses::CreateResponseRequest,
    security(("user_key" = [])),
    responses(
        (status = 200, description = "The response object; with `stream: true`, server-sent events `response.created`, `response.in_progress`, `response.output_item.added`, `response.content_part.added`, `response.output_text.delta`/`.done`, `response.function_call_arguments.delta`/`.done`, `response.content_part.done`, `response.output_item.done`, then `response.completed` (or `response.incomplete` at `max_output_tokens`, `response.failed` when the provider fails after the first token), each with `sequence_number`.", headers(("x-quality-served" = String, description = "The quality tier that served the request.")), content((openapi::responses::ResponseObject = "application/json"), (crate::api::schemas::ServerSentEvent = "text/event-stream"))),
        (status = 400, description = "Invalid request: a bad or missing field, an unsupported input item, content part or tool (`param` names it), or malformed JSON.", body = openapi::error::ErrorBody),
        crate::api::schemas::Unauthorized,
        (status = 404, description = "No such model, or `previous_response_id` names no stored response of this user (`param` names it).", body = openapi::error::ErrorBody),
        crate::api::schemas::RelayFailures,
    ),
)]
pub async fn create_response(
    State(state): State<AppState>,
    Extension(key): Extension<Arc<AuthedKey>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    rate: Option<Extension<Arc<RateCtx>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let request: CreateResponseRequest = extract::parse(&headers, &body)?;
    refuse_unsupported(&request)?;
    let metadata = check_metadata(request.metadata.clone())?;
    let turn = input_messages(&request.input)?;
    if turn.is_empty() {
        return Err(ApiError::param("`input` must contain at least one message or function call output", "input"));
    }
    let history = match &request.previous_response_id {
        Some(id) => load_history(&state, &key.user_id, id).await?,
        None => Vec::new(),
    };
    let mut messages = Vec::with_capacity(history.len() + turn.len() + 1);
    if let Some(instructions) = request.instructions.as_deref().filter(|i| !i.is_empty()) {
        messages.push(json!({ "role": "system", "content": instructions }));
    }
    messages.extend(history);
    messages.extend(turn.iter().cloned());
    let mut chat: CreateChatCompletionRequest = serde_json::from_value(chat_request(&request, messages)?)
        .map_err(|e| ApiError::invalid(format!("The request cannot be turned into a chat completion: {e}"), None))?;

    // Free tier: the same plan as chat decides whether an ad may follow (never with
    // tools or a JSON format); the `prompt` placement must choose before the call.
    let free = key.tier == Tier::Free && state.config.ads_enabled;
    let plan = if free {
        ad_layer::plan(&state, &key, ad_layer::Asked::Chat(&chat), request.extensions.ad_preferences.as_ref())?
    } else {
        None
    };
    let base_url = ad_layer::base_url(&state, &headers);
    let targeting = plan.as_ref().map(|p| p.targeting(&key.user_id, &request_id, &base_url));
    let mut selected = None;
    if let Some(t) = targeting.as_ref().filter(|t| t.placement == Placement::Prompt) {
        selected = state.ads.choose(t).await;
        if let Some(s) = &selected {
            ad_layer::add_sponsor_note(&mut chat, s);
        }
    }

    let (mut dispatch, _, _) =
        openai::prepare_chat(&state, &key, &request_id, &headers, &mut chat, request.extensions.clone(), started)
            .map_err(responses_param)?;
    if usize::try_from(dispatch.body_bytes).unwrap_or(usize::MAX) > state.config.max_body_bytes {
        // Replayed history can make the conversation larger than any body we would take.
        let param = if request.previous_response_id.is_some() { "previous_response_id" } else { "input" };
        return Err(ApiError::param(
            format!(
                "The conversation is larger than the gateway's limit of {} bytes; start a new one without `previous_response_id`",
                state.config.max_body_bytes
            ),
            param,
        ));
    }
    dispatch.endpoint = Endpoint::Responses;
    dispatch.rate = rate.map(|r| r.0);
    let model = dispatch.model.clone();
    let quality = dispatch.quality.clone();
    let relay = relay::open(&state, dispatch).await.map_err(responses_param)?;
    if let (None, Some(t)) = (&selected, &targeting) {
        selected = state.ads.choose(t).await;
    }

    let store = request.store.unwrap_or(true);
    let id = format!("resp_{}", request_id.trim_start_matches("req_"));
    let object = ResponseObject {
        id: id.clone(),
        object: "response".to_owned(),
        created_at: u64::try_from(now_ms() / 1000).unwrap_or(0),
        status: "in_progress".to_owned(),
        error: None,
        incomplete_details: None,
        instructions: request.instructions.clone(),
        max_output_tokens: request.max_output_tokens,
        model,
        output: Vec::new(),
        output_text: String::new(),
        parallel_tool_calls: request.parallel_tool_calls.unwrap_or(true),
        previous_response_id: request.previous_response_id.clone(),
        store,
        temperature: request.temperature,
        top_p: request.top_p,
        text: TextConfig { format: Some(request.text.and_then(|t| t.format).unwrap_or(TextFormat::Text)) },
        tool_choice: request.tool_choice.unwrap_or_else(|| json!("auto")),
        tools: request.tools.unwrap_or_default(),
        truncation: "disabled".to_owned(),
        usage: None,
        user: request.user,
        metadata,
        quality: quality.clone(),
        ad: None,
    };
    let provider = relay.provider().id.clone();
    let session = Session {
        state: state.clone(),
        relay,
        builder: Builder::new(object),
        ad: selected,
        provider,
        stored: store.then(|| Stored { user_id: key.user_id.clone(), turn }),
    };
    let mut response = if request.stream.unwrap_or(false) { session.stream() } else { session.collect().await? };
    if let Ok(v) = HeaderValue::from_str(&quality) {
        response.headers_mut().insert("x-quality-served", v);
    }
    Ok(response)
}

#[utoipa::path(
    get,
    path = "/v1/responses/{id}",
    tag = "openai",
    summary = "Retrieve a stored response",
    params(("id" = String, Path, description = "The response id (`resp_…`).")),
    security(("user_key" = [])),
    responses(
        (status = 200, description = "The response object as it was returned.", body = openapi::responses::ResponseObject),
        crate::api::schemas::Unauthorized,
        (status = 404, description = "No stored response with this id for this user (also one past `responses_retention_days`).", body = openapi::error::ErrorBody),
        crate::api::schemas::RateLimited,
    ),
)]
pub async fn get_response(
    State(state): State<AppState>,
    Extension(key): Extension<Arc<AuthedKey>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let body: Option<String> =
        sqlx::query_scalar("SELECT body FROM responses WHERE id = $1 AND user_id = $2 AND created_at >= $3")
            .bind(&id)
            .bind(&key.user_id)
            .bind(retention_cutoff_ms(&state))
            .fetch_optional(&state.store.pool)
            .await?;
    let body = body.ok_or_else(|| unknown_response(&id, None))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

#[utoipa::path(
    delete,
    path = "/v1/responses/{id}",
    tag = "openai",
    summary = "Delete a stored response",
    params(("id" = String, Path, description = "The response id (`resp_…`).")),
    security(("user_key" = [])),
    responses(
        (status = 200, description = "Deleted; a later `previous_response_id` naming it is a 404.", body = openapi::responses::DeletedResponse),
        crate::api::schemas::Unauthorized,
        (status = 404, description = "No stored response with this id for this user.", body = openapi::error::ErrorBody),
        crate::api::schemas::RateLimited,
    ),
)]
pub async fn delete_response(
    State(state): State<AppState>,
    Extension(key): Extension<Arc<AuthedKey>>,
    Path(id): Path<String>,
) -> Result<Json<DeletedResponse>, ApiError> {
    let deleted = sqlx::query("DELETE FROM responses WHERE id = $1 AND user_id = $2")
        .bind(&id)
        .bind(&key.user_id)
        .execute(&state.store.pool)
        .await?;
    if deleted.rows_affected() == 0 {
        return Err(unknown_response(&id, None));
    }
    Ok(Json(DeletedResponse { id, object: "response".to_owned(), deleted: true }))
}

/// Deletes stored responses past `responses_retention_days`; the server runs it hourly.
pub async fn sweep(state: &AppState) -> Result<u64, sqlx::Error> {
    let done = sqlx::query("DELETE FROM responses WHERE created_at < $1")
        .bind(retention_cutoff_ms(state))
        .execute(&state.store.pool)
        .await?;
    Ok(done.rows_affected())
}

fn retention_cutoff_ms(state: &AppState) -> i64 {
    now_ms().saturating_sub(i64::from(state.config.responses_retention_days).saturating_mul(86_400_000))
}

fn unknown_response(id: &str, param: Option<&str>) -> ApiError {
    ApiError::NotFoundParam {
        message: format!("No response with id '{id}' was found."),
        param: param.map(str::to_owned),
    }
}

/// The stored conversation up to and including `id`, oldest turn first.
async fn load_history(state: &AppState, user_id: &str, id: &str) -> Result<Vec<Value>, ApiError> {
    // Each link must belong to the same user and be within retention; the chain stops
    // at a deleted or expired one.
    let sql = format!(
        "WITH RECURSIVE chain (id, previous_id, messages, depth) AS ( \
             SELECT id, previous_id, messages, 0 FROM responses WHERE id = $1 AND user_id = $2 AND created_at >= $3 \
             UNION ALL \
             SELECT r.id, r.previous_id, r.messages, chain.depth + 1 FROM responses r JOIN chain ON r.id = chain.previous_id \
             WHERE r.user_id = $2 AND r.created_at >= $3 AND chain.depth < {MAX_CHAIN} \
         ) SELECT messages FROM chain ORDER BY depth DESC"
    );
    let rows: Vec<String> = sqlx::query_scalar(&sql)
        .bind(id)
        .bind(user_id)
        .bind(retention_cutoff_ms(state))
        .fetch_all(&state.store.pool)
        .await?;
    if rows.is_empty() {
        return Err(unknown_response(id, Some("previous_response_id")));
    }
    let mut messages = Vec::new();
    for row in rows {
        let turn: Vec<Value> =
            serde_json::from_str(&row).map_err(|e| ApiError::Internal(format!("stored response {id} is unreadable: {e}")))?;
        messages.extend(turn);
    }
    Ok(messages)
}

/// Fields of OpenAI's request that no provider of ours can honour.
fn refuse_unsupported(request: &CreateResponseRequest) -> Result<(), ApiError> {
    if request.background == Some(true) {
        return Err(ApiError::param("background responses are not supported; the response runs while you wait", "background"));
    }
    if request.conversation.as_ref().is_some_and(|c| !c.is_null()) {
        return Err(ApiError::param("server-side conversations are not supported; use `previous_response_id`", "conversation"));
    }
    if request.prompt.as_ref().is_some_and(|p| !p.is_null()) {
        return Err(ApiError::param("stored prompts are not supported; send `instructions` and `input`", "prompt"));
    }
    if request.include.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(ApiError::param("`include` is not supported: no extra output data is available", "include"));
    }
    if let Some(t) = request.truncation.as_deref().filter(|t| *t != "disabled") {
        return Err(ApiError::param(format!("`truncation` must be `disabled`, got {t:?}"), "truncation"));
    }
    Ok(())
}

fn check_metadata(metadata: Option<HashMap<String, String>>) -> Result<HashMap<String, String>, ApiError> {
    let metadata = metadata.unwrap_or_default();
    if metadata.len() > METADATA_PAIRS {
        return Err(ApiError::param(format!("`metadata` takes at most {METADATA_PAIRS} pairs"), "metadata"));
    }
    for (k, v) in &metadata {
        if k.chars().count() > METADATA_KEY_CHARS || v.chars().count() > METADATA_VALUE_CHARS {
            return Err(ApiError::param(
                format!("`metadata` keys are at most {METADATA_KEY_CHARS} and values at most {METADATA_VALUE_CHARS} characters"),
                "metadata",
            ));
        }
    }
    Ok(metadata)
}

/// The chat request for `messages`, with the request's sampling, tools and format.
fn chat_request(request: &CreateResponseRequest, messages: Vec<Value>) -> Result<Value, ApiError> {
    let mut chat = json!({ "model": request.model, "messages": messages });
    if let Some(n) = request.max_output_tokens {
        chat["max_completion_tokens"] = json!(n);
    }
    if let Some(t) = request.temperature {
        chat["temperature"] = json!(t);
    }
    if let Some(p) = request.top_p {
        chat["top_p"] = json!(p);
    }
    let tools = match &request.tools {
        Some(tools) => chat_tools(tools)?,
        None => Vec::new(),
    };
    if let Some(choice) = &request.tool_choice {
        let choice = chat_tool_choice(choice)?;
        // `auto` and `none` without tools mean nothing; chat refuses a choice without tools.
        if !tools.is_empty() || !matches!(choice.as_str(), Some("auto" | "none")) {
            chat["tool_choice"] = choice;
        }
    }
    if !tools.is_empty() {
        chat["tools"] = Value::Array(tools);
        if let Some(parallel) = request.parallel_tool_calls {
            chat["parallel_tool_calls"] = json!(parallel);
        }
    }
    match request.text.as_ref().and_then(|t| t.format.as_ref()) {
        None | Some(TextFormat::Text) => {}
        Some(TextFormat::JsonObject) => chat["response_format"] = json!({ "type": "json_object" }),
        Some(TextFormat::JsonSchema { name, description, schema, strict }) => {
            chat["response_format"] = json!({
                "type": "json_schema",
                "json_schema": { "name": name, "description": description, "schema": schema, "strict": strict },
            });
        }
    }
    Ok(chat)
}

/// `input` as chat messages. Our ad items and ad blocks in assistant messages are left
/// out, so a client that sends a whole conversation back never feeds ads to the model.
fn input_messages(input: &Value) -> Result<Vec<Value>, ApiError> {
    let items = match input {
        Value::String(text) => return Ok(vec![json!({ "role": "user", "content": text })]),
        Value::Array(items) => items,
        _ => return Err(ApiError::param("`input` must be a string or a list of input items", "input")),
    };
    let mut messages: Vec<Value> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let Some(obj) = item.as_object() else {
            return Err(ApiError::param(format!("`{at}` must be an object"), &at));
        };
        let kind = match obj.get("type") {
            Some(Value::String(kind)) => kind.as_str(),
            None | Some(Value::Null) if obj.contains_key("role") => "message",
            _ => return Err(ApiError::param(format!("`{at}.type` must be a string"), &format!("{at}.type"))),
        };
        match kind {
            "message" => {
                let role = match string_field(obj, "role", &at)? {
                    "user" => "user",
                    "assistant" => "assistant",
                    "system" | "developer" => "system",
                    other => {
                        return Err(ApiError::param(
                            format!("`{at}.role` must be user, assistant, system or developer, got {other:?}"),
                            &format!("{at}.role"),
                        ))
                    }
                };
                if obj.get("id").and_then(Value::as_str).is_some_and(|id| id.starts_with(AD_ITEM_PREFIX)) {
                    continue;
                }
                let mut text = message_text(obj.get("content"), &at)?;
                if role == "assistant" {
                    if let Some(clean) = ads::strip(&text) {
                        text = clean;
                    }
                    if text.is_empty() {
                        continue;
                    }
                }
                messages.push(json!({ "role": role, "content": text }));
            }
            "function_call" => {
                let call = json!({
                    "id": string_field(obj, "call_id", &at)?,
                    "type": "function",
                    "function": { "name": string_field(obj, "name", &at)?, "arguments": string_field(obj, "arguments", &at)? },
                });
                // Calls the model made together go back as one assistant message.
                match messages.last_mut() {
                    Some(last) if last["role"] == "assistant" && last["tool_calls"].is_array() => {
                        if let Some(calls) = last["tool_calls"].as_array_mut() {
                            calls.push(call);
                        }
                    }
                    _ => messages.push(json!({ "role": "assistant", "content": null, "tool_calls": [call] })),
                }
            }
            "function_call_output" => {
                let call_id = string_field(obj, "call_id", &at)?;
                let output = match obj.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(_)) => message_text(obj.get("output"), &at)?,
                    _ => {
                        return Err(ApiError::param(format!("`{at}.output` must be a string"), &format!("{at}.output")))
                    }
                };
                messages.push(json!({ "role": "tool", "tool_call_id": call_id, "content": output }));
            }
            other => {
                return Err(ApiError::param(
                    format!(
                        "input items of type `{other}` are not supported; send message, function_call and function_call_output items"
                    ),
                    &format!("{at}.type"),
                ))
            }
        }
    }
    Ok(messages)
}

fn string_field<'v>(obj: &'v serde_json::Map<String, Value>, field: &str, at: &str) -> Result<&'v str, ApiError> {
    obj.get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::param(format!("`{at}.{field}` must be a string"), &format!("{at}.{field}")))
}

/// A message's text: a string, or its text parts joined by newlines. Images, files and
/// audio are refused (no provider of ours reads them through this API).
fn message_text(content: Option<&Value>, at: &str) -> Result<String, ApiError> {
    let parts = match content {
        Some(Value::String(text)) => return Ok(text.clone()),
        Some(Value::Array(parts)) => parts,
        _ => {
            return Err(ApiError::param(
                format!("`{at}.content` must be a string or a list of content parts"),
                &format!("{at}.content"),
            ))
        }
    };
    let mut texts = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let here = format!("{at}.content[{j}]");
        match part.get("type").and_then(Value::as_str) {
            Some("input_text" | "output_text" | "text") => match part.get("text").and_then(Value::as_str) {
                Some(text) => texts.push(text),
                None => return Err(ApiError::param(format!("`{here}.text` must be a string"), &format!("{here}.text"))),
            },
            // A refusal the model gave earlier carries nothing to replay.
            Some("refusal") => {}
            Some(other) => {
                return Err(ApiError::param(
                    format!("content parts of type `{other}` are not supported; send input_text parts"),
                    &format!("{here}.type"),
                ))
            }
            None => return Err(ApiError::param(format!("`{here}.type` must be a string"), &format!("{here}.type"))),
        }
    }
    Ok(texts.join("\n"))
}

fn chat_tools(tools: &[Value]) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let at = format!("tools[{i}]");
        match tool.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(other) => {
                return Err(ApiError::param(
                    format!("`{other}` tools are not supported; only function tools are"),
                    &format!("{at}.type"),
                ))
            }
            None => return Err(ApiError::param(format!("`{at}.type` must be a string"), &format!("{at}.type"))),
        }
        let Some(name) = tool.get("name").and_then(Value::as_str).filter(|n| !n.is_empty()) else {
            return Err(ApiError::param(format!("`{at}.name` must be a non-empty string"), &format!("{at}.name")));
        };
        let mut function = json!({ "name": name });
        for field in ["description", "parameters", "strict"] {
            if let Some(v) = tool.get(field).filter(|v| !v.is_null()) {
                function[field] = v.clone();
            }
        }
        out.push(json!({ "type": "function", "function": function }));
    }
    Ok(out)
}

fn chat_tool_choice(choice: &Value) -> Result<Value, ApiError> {
    match choice {
        Value::String(mode) if matches!(mode.as_str(), "none" | "auto" | "required") => Ok(choice.clone()),
        Value::Object(named) if named.get("type").and_then(Value::as_str) == Some("function") => {
            match named.get("name").and_then(Value::as_str) {
                Some(name) => Ok(json!({ "type": "function", "function": { "name": name } })),
                None => Err(ApiError::param("`tool_choice.name` must be a string", "tool_choice.name")),
            }
        }
        _ => Err(ApiError::param(
            "`tool_choice` must be none, auto, required or {\"type\": \"function\", \"name\": …}",
            "tool_choice",
        )),
    }
}

/// Chat's parameter names in an error, as this API calls them.
fn responses_param(error: ApiError) -> ApiError {
    fn rename(param: &str) -> Option<&'static str> {
        match param {
            "messages" => Some("input"),
            "max_tokens" | "max_completion_tokens" => Some("max_output_tokens"),
            "response_format" => Some("text.format"),
            _ => None,
        }
    }
    match error {
        ApiError::InvalidRequest { message, param: Some(param), code } => match rename(&param) {
            Some(new) => ApiError::InvalidRequest {
                message: message.replace(&format!("`{param}`"), &format!("`{new}`")),
                param: Some(new.to_owned()),
                code,
            },
            None => ApiError::InvalidRequest { message, param: Some(param), code },
        },
        ApiError::ProviderRejected { status, message, param: Some(param), code } => {
            let param = rename(&param).map_or(param, str::to_owned);
            ApiError::ProviderRejected { status, message, param: Some(param), code }
        }
        other => other,
    }
}

/// What is kept of a response with `store`.
struct Stored {
    user_id: String,
    /// This turn's input as chat messages.
    turn: Vec<Value>,
}

/// One response on its way: the provider's stream, the builder, and what follows it.
struct Session {
    state: AppState,
    relay: Relay,
    builder: Builder,
    ad: Option<Selected>,
    provider: String,
    stored: Option<Stored>,
}

impl Session {
    /// Reads the provider's stream to its end for a non-stream answer.
    async fn collect(mut self) -> Result<Response, ApiError> {
        loop {
            match self.relay.next().await {
                Event::Chunk { chunk, .. } => {
                    self.builder.push(&chunk);
                }
                Event::Done => break,
                Event::Failed(message) => return Err(ApiError::ProviderFailed(message)),
            }
        }
        self.end(None).await;
        let body = serde_json::to_vec(&self.builder.response)
            .map_err(|e| ApiError::Internal(format!("encode response: {e}")))?;
        // The ad counts as delivered once hyper asks for more after writing the body.
        let (ads, ad, provider) = (self.state.ads.clone(), self.ad.take(), self.provider.clone());
        let once = futures::stream::unfold((Some(Bytes::from(body)), ad), move |(frame, ad)| {
            let (ads, provider) = (ads.clone(), provider.clone());
            async move {
                match frame {
                    Some(f) => Some((Ok::<_, Infallible>(f), (None, ad))),
                    None => {
                        if let Some(s) = ad {
                            ads.delivered(s, Some(provider));
                        }
                        None
                    }
                }
            }
        });
        let mut response = Response::new(Body::from_stream(once));
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(response)
    }

    /// Typed server-sent events as the provider's chunks arrive.
    fn stream(self) -> Response {
        enum Phase {
            Start,
            Relaying,
            /// The last events went out; on the next poll the ad (if any) was delivered.
            Ended,
        }
        let stream = futures::stream::unfold((self, Phase::Start), |(mut session, phase)| async move {
            match phase {
                Phase::Start => {
                    let events = session.builder.start();
                    Some((Ok::<_, Infallible>(sse(&events)), (session, Phase::Relaying)))
                }
                Phase::Relaying => loop {
                    let events = match session.relay.next().await {
                        Event::Chunk { chunk, .. } => session.builder.push(&chunk),
                        Event::Done => session.end(None).await,
                        Event::Failed(message) => session.end(Some(message)).await,
                    };
                    let ended = session.builder.ended;
                    if !events.is_empty() || ended {
                        return Some((Ok(sse(&events)), (session, if ended { Phase::Ended } else { Phase::Relaying })));
                    }
                },
                Phase::Ended => {
                    if let Some(s) = session.ad.take() {
                        session.state.ads.delivered(s, Some(session.provider.clone()));
                    }
                    None
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

    /// Closes the output, adds the ad on success, stores the response, and returns the
    /// last events (`response.completed`, `.incomplete` or `.failed`).
    async fn end(&mut self, failure: Option<String>) -> Vec<Value> {
        let usage = self.relay.usage();
        let failed = failure.is_some();
        let mut events = self.builder.close(failed);
        match failure {
            Some(message) => {
                // No ad after a failure.
                self.ad = None;
                events.extend(self.builder.fail(&message, usage));
            }
            None => {
                if let Some(s) = &self.ad {
                    match s.placement {
                        Placement::Metadata => self.builder.response.ad = Some(s.ad.clone()),
                        Placement::Content => events.extend(self.builder.ad_item(ads::content_text(&s.ad).trim_start())),
                        // The sponsor note went to the model; it is delivered with the answer.
                        Placement::Prompt => {}
                    }
                }
                events.extend(self.builder.complete(usage));
            }
        }
        if let Some(stored) = self.stored.take() {
            let answer = self.builder.answer_message();
            if let Err(e) = save(&self.state, &self.builder.response, answer, stored).await {
                tracing::error!(error = %e, response = %self.builder.response.id, "storing a response failed");
            }
        }
        events
    }

}

/// Keeps a finished response and this turn's messages (the answer last).
async fn save(state: &AppState, response: &ResponseObject, answer: Option<Value>, stored: Stored) -> Result<(), ApiError> {
    let mut turn = stored.turn;
    turn.extend(answer);
    let messages = serde_json::to_string(&turn).map_err(|e| ApiError::Internal(e.to_string()))?;
    let body = serde_json::to_string(response).map_err(|e| ApiError::Internal(e.to_string()))?;
    sqlx::query("INSERT INTO responses (id, user_id, previous_id, created_at, messages, body) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(&response.id)
        .bind(&stored.user_id)
        .bind(response.previous_response_id.clone())
        .bind(now_ms())
        .bind(messages)
        .bind(body)
        .execute(&state.store.pool)
        .await?;
    Ok(())
}

/// The events as one SSE frame (`event:` line and JSON `data:`).
fn sse(events: &[Value]) -> Bytes {
    let mut out = String::new();
    for e in events {
        let kind = e.get("type").and_then(Value::as_str).unwrap_or("message");
        out.push_str("event: ");
        out.push_str(kind);
        out.push_str("\ndata: ");
        out.push_str(&e.to_string());
        out.push_str("\n\n");
    }
    Bytes::from(out)
}

enum Item {
    Message { id: String, text: String, refusal: Option<String> },
    Call { id: String, call_id: String, name: String, arguments: String },
}

/// Turns chat chunks into output items and the Responses API's stream events.
struct Builder {
    response: ResponseObject,
    seq: u64,
    items: Vec<Item>,
    /// The open message item, by index into `items`.
    message: Option<usize>,
    /// Tool call index in the chat stream → index into `items`.
    calls: BTreeMap<u32, usize>,
    finish_reason: Option<String>,
    ended: bool,
}

impl Builder {
    fn new(response: ResponseObject) -> Self {
        Self { response, seq: 0, items: Vec::new(), message: None, calls: BTreeMap::new(), finish_reason: None, ended: false }
    }

    fn event(&mut self, kind: &str, mut fields: Value) -> Value {
        fields["type"] = json!(kind);
        fields["sequence_number"] = json!(self.seq);
        self.seq += 1;
        fields
    }

    fn snapshot(&self) -> Value {
        serde_json::to_value(&self.response).unwrap_or(Value::Null)
    }

    fn start(&mut self) -> Vec<Value> {
        let r = self.snapshot();
        vec![self.event("response.created", json!({ "response": r.clone() })), self.event("response.in_progress", json!({ "response": r }))]
    }

    fn push(&mut self, chunk: &StreamChunk) -> Vec<Value> {
        let mut out = Vec::new();
        // The Responses API has one answer (no `n`): the first choice.
        for choice in chunk.choices.iter().filter(|c| c.index == 0) {
            if let Some(reason) = &choice.finish_reason {
                self.finish_reason = Some(reason.clone());
            }
            let Some(delta) = &choice.delta else { continue };
            if let Some(text) = delta.content.as_deref().filter(|t| !t.is_empty()) {
                let i = self.open_message(&mut out);
                let id = match &mut self.items[i] {
                    Item::Message { id, text: acc, .. } => {
                        acc.push_str(text);
                        id.clone()
                    }
                    Item::Call { id, .. } => id.clone(),
                };
                let e = self.event(
                    "response.output_text.delta",
                    json!({ "item_id": id, "output_index": i, "content_index": 0, "delta": text, "logprobs": [] }),
                );
                out.push(e);
            }
            if let Some(refusal) = delta.refusal.as_deref().filter(|t| !t.is_empty()) {
                let i = self.open_message(&mut out);
                if let Item::Message { refusal: acc, .. } = &mut self.items[i] {
                    acc.get_or_insert_with(String::new).push_str(refusal);
                }
            }
            for call in delta.tool_calls.iter().flatten() {
                let function = call.function.as_ref();
                let i = match self.calls.get(&call.index) {
                    Some(i) => *i,
                    None => {
                        let i = self.items.len();
                        let id = crate::store::new_id("fc");
                        let call_id = call.id.clone().unwrap_or_else(|| crate::store::new_id("call"));
                        let name = function.and_then(|f| f.name.clone()).unwrap_or_default();
                        let item = json!({
                            "type": "function_call", "id": id, "call_id": call_id, "name": name,
                            "arguments": "", "status": "in_progress",
                        });
                        self.items.push(Item::Call { id, call_id, name, arguments: String::new() });
                        self.calls.insert(call.index, i);
                        let e = self.event("response.output_item.added", json!({ "output_index": i, "item": item }));
                        out.push(e);
                        if let Some(f) = function {
                            if let Some(args) = f.arguments.as_deref().filter(|a| !a.is_empty()) {
                                out.extend(self.arguments(i, args));
                            }
                        }
                        continue;
                    }
                };
                if let Some(f) = function {
                    if let (Some(part), Item::Call { name, .. }) = (&f.name, &mut self.items[i]) {
                        name.push_str(part);
                    }
                    if let Some(args) = f.arguments.as_deref().filter(|a| !a.is_empty()) {
                        out.extend(self.arguments(i, args));
                    }
                }
            }
        }
        out
    }

    fn arguments(&mut self, i: usize, delta: &str) -> Option<Value> {
        let Item::Call { id, arguments, .. } = &mut self.items[i] else { return None };
        arguments.push_str(delta);
        let id = id.clone();
        Some(self.event("response.function_call_arguments.delta", json!({ "item_id": id, "output_index": i, "delta": delta })))
    }

    fn open_message(&mut self, out: &mut Vec<Value>) -> usize {
        if let Some(i) = self.message {
            return i;
        }
        let i = self.items.len();
        let id = crate::store::new_id("msg");
        out.extend(self.message_added(i, &id));
        self.items.push(Item::Message { id, text: String::new(), refusal: None });
        self.message = Some(i);
        i
    }

    /// A message item at output index `i` begins, with an empty text part.
    fn message_added(&mut self, i: usize, id: &str) -> [Value; 2] {
        let item = json!({ "type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": [] });
        let part = json!({ "type": "output_text", "text": "", "annotations": [] });
        [
            self.event("response.output_item.added", json!({ "output_index": i, "item": item })),
            self.event("response.content_part.added", json!({ "item_id": id, "output_index": i, "content_index": 0, "part": part })),
        ]
    }

    /// A message item's text part is done: its `.done` events and the finished item.
    fn message_done(&mut self, i: usize, id: String, text: String, refusal: Option<String>, status: &str) -> ([Value; 2], OutputItem) {
        let part = OutputContent::OutputText { text: text.clone(), annotations: Vec::new() };
        let events = [
            self.event(
                "response.output_text.done",
                json!({ "item_id": id, "output_index": i, "content_index": 0, "text": text, "logprobs": [] }),
            ),
            self.event("response.content_part.done", json!({ "item_id": id, "output_index": i, "content_index": 0, "part": part })),
        ];
        let mut content = vec![part];
        content.extend(refusal.map(|refusal| OutputContent::Refusal { refusal }));
        (events, OutputItem::Message { id, status: status.to_owned(), role: "assistant".to_owned(), content })
    }

    /// An item is finished: it joins the response's output.
    fn item_done(&mut self, i: usize, item: OutputItem) -> Value {
        let e = self.event("response.output_item.done", json!({ "output_index": i, "item": item }));
        self.response.output.push(item);
        e
    }

    /// Finishes every open item in output order: `incomplete` after a failure or at the
    /// token limit, else `completed`.
    fn close(&mut self, failed: bool) -> Vec<Value> {
        let status = if failed || self.finish_reason.as_deref() == Some("length") {
            "incomplete"
        } else {
            "completed"
        };
        let mut out = Vec::new();
        for (i, item) in std::mem::take(&mut self.items).into_iter().enumerate() {
            let output = match item {
                Item::Message { id, text, refusal } => {
                    let (events, item) = self.message_done(i, id, text, refusal, status);
                    out.extend(events);
                    item
                }
                Item::Call { id, call_id, name, arguments } => {
                    let e = self.event(
                        "response.function_call_arguments.done",
                        json!({ "item_id": id, "output_index": i, "name": name, "arguments": arguments }),
                    );
                    out.push(e);
                    OutputItem::FunctionCall { id, call_id, name, arguments, status: status.to_owned() }
                }
            };
            let e = self.item_done(i, output);
            out.push(e);
        }
        self.message = None;
        self.calls.clear();
        out
    }

    /// Our ad as a message item of its own, after the answer.
    fn ad_item(&mut self, text: &str) -> Vec<Value> {
        let i = self.response.output.len();
        let id = format!("{AD_ITEM_PREFIX}{}", uuid::Uuid::now_v7().simple());
        let mut out = Vec::from(self.message_added(i, &id));
        out.push(self.event(
            "response.output_text.delta",
            json!({ "item_id": id, "output_index": i, "content_index": 0, "delta": text, "logprobs": [] }),
        ));
        let (events, item) = self.message_done(i, id, text.to_owned(), None, "completed");
        out.extend(events);
        out.push(self.item_done(i, item));
        out
    }

    fn finalize(&mut self, status: &str, usage: Usage) {
        self.ended = true;
        self.response.status = status.to_owned();
        self.response.usage = Some(ResponseUsage {
            input_tokens: usage.prompt_tokens,
            input_tokens_details: InputTokensDetails::default(),
            output_tokens: usage.completion_tokens,
            output_tokens_details: OutputTokensDetails::default(),
            total_tokens: usage.prompt_tokens + usage.completion_tokens,
            cost: usage.cost.unwrap_or(0.0),
        });
        self.response.output_text = self
            .response
            .output
            .iter()
            .filter_map(|item| match item {
                OutputItem::Message { content, .. } => Some(content),
                OutputItem::FunctionCall { .. } => None,
            })
            .flatten()
            .filter_map(|part| match part {
                OutputContent::OutputText { text, .. } => Some(text.as_str()),
                OutputContent::Refusal { .. } => None,
            })
            .collect();
    }

    fn complete(&mut self, usage: Usage) -> Vec<Value> {
        let incomplete = self.finish_reason.as_deref() == Some("length");
        if incomplete {
            self.response.incomplete_details = Some(IncompleteDetails { reason: "max_output_tokens".to_owned() });
        }
        self.finalize(if incomplete { "incomplete" } else { "completed" }, usage);
        let r = self.snapshot();
        vec![self.event(if incomplete { "response.incomplete" } else { "response.completed" }, json!({ "response": r }))]
    }

    fn fail(&mut self, message: &str, usage: Usage) -> Vec<Value> {
        self.response.error = Some(ResponseError {
            code: "server_error".to_owned(),
            message: format!("The provider failed mid-stream: {message}"),
        });
        self.finalize("failed", usage);
        let r = self.snapshot();
        vec![self.event("response.failed", json!({ "response": r }))]
    }

    /// The answer as a chat message for replay: the model's text and tool calls,
    /// without our ad item.
    fn answer_message(&self) -> Option<Value> {
        let mut text = String::new();
        let mut calls = Vec::new();
        for item in &self.response.output {
            match item {
                OutputItem::Message { id, content, .. } if !id.starts_with(AD_ITEM_PREFIX) => {
                    for part in content {
                        if let OutputContent::OutputText { text: t, .. } = part {
                            text.push_str(t);
                        }
                    }
                }
                OutputItem::Message { .. } => {}
                OutputItem::FunctionCall { call_id, name, arguments, .. } => calls.push(json!({
                    "id": call_id, "type": "function", "function": { "name": name, "arguments": arguments },
                })),
            }
        }
        if text.is_empty() && calls.is_empty() {
            return None;
        }
        let mut message = json!({ "role": "assistant", "content": if text.is_empty() { Value::Null } else { json!(text) } });
        if !calls.is_empty() {
            message["tool_calls"] = Value::Array(calls);
        }
        Some(message)
    }
}
