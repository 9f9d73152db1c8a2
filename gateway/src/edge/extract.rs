//! Reading request bodies into wire types with OpenAI-shaped errors: 415 for a body
//! that is not JSON, 413 over the limit (enforced by the body-limit layer), 400 naming
//! the offending field for everything else.

use axum::body::Body;
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use openapi::async_openai::types::chat::CreateChatCompletionRequest;
use openapi::async_openai::types::completions::CreateCompletionRequest;
use openapi::openai::RequestExtensions;
use serde::de::DeserializeOwned;

use crate::edge::error::ApiError;
use crate::ops::config::Config;

pub fn ensure_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else { return Ok(()) };
    let value = value.to_str().unwrap_or("").to_ascii_lowercase();
    if value.starts_with("application/json") || value.contains("+json") {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

/// Parses `body` as `T`; a type error names the JSON path of the bad field as `param`.
pub fn parse<T: DeserializeOwned>(headers: &HeaderMap, body: &Bytes) -> Result<T, ApiError> {
    ensure_json(headers)?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid("The request body is empty; expected a JSON object.", None));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = serde_path_to_error::deserialize::<_, T>(&mut de);
    let parsed = match parsed {
        Ok(v) => match de.end() {
            Ok(()) => return Ok(v),
            Err(e) => return Err(syntax_error(&e)),
        },
        Err(e) => e,
    };
    {
        let e = parsed;
        {
            let inner = e.inner();
            if inner.is_syntax() || inner.is_eof() {
                return Err(syntax_error(inner));
            }
            let path = e.path().to_string();
            let param = (path != "." && !path.is_empty()).then_some(path);
            let message = match &param {
                Some(p) => format!("Invalid value for `{p}`: {inner}"),
                None => format!("Invalid request body: {inner}"),
            };
            Err(ApiError::invalid(message, param))
        }
    }
}

fn syntax_error(inner: &serde_json::Error) -> ApiError {
    ApiError::invalid(format!("We could not parse the JSON body of your request: {inner}"), None)
}

/// The request id of the current request (from `x-request-id` or generated).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The user key a request presented, for handlers that must check it again later (a
/// WebSocket re-checks it on every message, so a revoked key closes the socket).
#[derive(Clone)]
pub struct PresentedKey(pub String);

pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?;
    Some(token.trim())
}

/// The key a request presents: the bearer token, or `?api_key=` on the WebSocket route
/// (browsers cannot set headers there) and elsewhere only with `allow_query_api_key`
/// (a key in a URL ends up in logs and browser history).
pub fn presented_key(config: &Config, request: &Request) -> Option<String> {
    if let Some(b) = bearer(request.headers()) {
        return Some(b.to_owned());
    }
    if request.uri().path() != "/api/llm/ws" && !config.allow_query_api_key {
        return None;
    }
    request.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("api_key="))).map(str::to_owned)
}

/// A model route's body, parsed once at the edge (`parse_model_body`) into the OpenAI
/// request `T` and our extensions. The ad layer reads and edits it in the request's
/// extensions; the handler takes it out (it is an extractor).
#[derive(Clone)]
pub struct ModelBody<T> {
    pub request: T,
    pub ext: RequestExtensions,
}

/// `/v1/chat/completions`.
pub type ChatBody = ModelBody<CreateChatCompletionRequest>;
/// `/v1/completions`.
pub type CompletionBody = ModelBody<CreateCompletionRequest>;

impl<T: DeserializeOwned> ModelBody<T> {
    /// The extensions are a second, shallow serde pass over the same bytes (the OpenAI
    /// type drops fields it does not know).
    fn parse(headers: &HeaderMap, body: &Bytes) -> Result<Self, ApiError> {
        Ok(Self { request: parse(headers, body)?, ext: parse(headers, body)? })
    }
}

/// Parses the body of the two model routes once, before the ad layer and the handler: a
/// body that is not a valid request is answered here (415, or 400 naming the field).
pub async fn parse_model_body(request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    // Already in memory and within `max_body_bytes` (`read_body_in_time`).
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => return ApiError::invalid(format!("The request body could not be read: {e}"), None).into_response(),
    };
    let parsed = if parts.uri.path() == "/v1/completions" {
        CompletionBody::parse(&parts.headers, &bytes).map(|b| {
            parts.extensions.insert(b);
        })
    } else {
        ChatBody::parse(&parts.headers, &bytes).map(|b| {
            parts.extensions.insert(b);
        })
    };
    match parsed {
        Ok(()) => next.run(Request::from_parts(parts, Body::empty())).await,
        Err(e) => e.into_response(),
    }
}

impl<T: Clone + Send + Sync + 'static, S: Send + Sync> FromRequestParts<S> for ModelBody<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts.extensions.remove::<Self>().ok_or_else(|| ApiError::Internal("the request body was not parsed at the edge".into()))
    }
}
