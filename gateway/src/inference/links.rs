//! Dial-out providers' links (the protocol is the `link` crate's): the upgrade handler,
//! probing an open link, requests over a link and forwarding to the replica that holds
//! one. The open links themselves are `open_links`'; `Registry::reload` closes those of
//! providers that were suspended, removed or given a new key.
//!
//! A link is this replica's: a dial-out provider is live here only while its link is
//! open here (`Provider::is_live`). Over its link the gateway probes `/health` every
//! `PROBE_EVERY` (a success is the provider's heartbeat and an uptime check), and
//! relays requests exactly as over HTTP (`relay::send` picks the transport).

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::TryStreamExt;
use openapi::platform::Connection;

use crate::edge::error::ApiError;
use crate::inference::open_links::{reqwest_body, ByteStream, Link};
use crate::inference::providers::{Provider, ProviderError, ProviderStatus};
use crate::store::now_ms;
use crate::state::AppState;

/// How often the gateway asks a linked worker for `/health` (besides HTTP/2 pings).
const PROBE_EVERY: Duration = Duration::from_secs(15);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// `GET /api/gpu/link` with `Upgrade: gs-link`: a dial-out worker opens its link.
#[utoipa::path(
    get,
    path = "/api/gpu/link",
    tag = "providers",
    summary = "Open a dial-out provider's link",
    description = "An HTTP/1.1 `GET` with `Connection: upgrade` and `Upgrade: gs-link` from a provider registered with `connection: dialOut`. After `101 Switching Protocols` the gateway speaks HTTP/2 as the client on this connection and sends the provider's OpenAI calls over it.",
    params(("x-provider-id" = String, Header, description = "The provider whose key is presented.")),
    security(("provider_key" = [])),
    responses(
        (status = 101, description = "Switching to the link; the connection now carries HTTP/2 from the gateway."),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        (status = 403, description = "The provider is suspended.", body = openapi::error::ErrorBody),
        (status = 429, description = "This address holds `max_links_per_ip` links already.", body = openapi::error::ErrorBody),
    ),
)]
pub async fn accept(State(state): State<AppState>, mut request: Request) -> Result<Response, ApiError> {
    let headers = request.headers();
    if !link::wants_link(headers) {
        return Err(ApiError::InvalidRequest {
            message: "this endpoint opens a provider link: an HTTP/1.1 GET with `Connection: upgrade` and `Upgrade: gs-link`".into(),
            param: None,
            code: None,
        });
    }
    let key = crate::edge::extract::bearer(headers).filter(|k| k.starts_with("pk-")).ok_or(ApiError::InvalidApiKey)?.to_owned();
    let provider_id = headers
        .get(link::PROVIDER_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| ApiError::param(format!("the {} header is required", link::PROVIDER_HEADER), link::PROVIDER_HEADER))?;
    state.registry.authenticate(&provider_id, &key).await.map_err(|e| match e {
        ProviderError::Unknown(_) => ApiError::InvalidApiKey,
        other => other.into(),
    })?;
    // Another replica may have registered it moments ago.
    if state.registry.get(&provider_id).is_none() {
        state.registry.reload().await?;
    }
    let provider = state.registry.get(&provider_id).ok_or(ApiError::InvalidApiKey)?;
    if provider.connection != Connection::DialOut {
        return Err(ApiError::param(
            format!("provider {provider_id} registered a baseUrl (connection `direct`); only a `dialOut` provider opens a link"),
            "connection",
        ));
    }
    if provider.status == ProviderStatus::Suspended {
        return Err(ApiError::PermissionDenied(format!("provider {provider_id} is suspended")));
    }
    let ip = request
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
    let slot = state.links.per_ip.admit(ip).ok_or(ApiError::TooManyLinks(state.config.max_links_per_ip))?;
    let upgrade = request.extensions_mut().remove::<hyper::upgrade::OnUpgrade>().ok_or_else(|| ApiError::InvalidRequest {
        message: "this connection cannot be upgraded (links need HTTP/1.1)".into(),
        param: None,
        code: None,
    })?;
    tokio::spawn(establish(state, provider, upgrade, slot));
    Ok(link::switching_protocols::<axum::body::Body>().into_response())
}

/// Takes the upgraded connection as an HTTP/2 client, checks the worker answers on it
/// (within the handshake's 10 s), and puts the link in its provider's `Load`.
async fn establish(state: AppState, provider: Arc<Provider>, upgrade: hyper::upgrade::OnUpgrade, slot: crate::edge::listener::IpSlot) {
    let id = state.links.next_id.fetch_add(1, Ordering::Relaxed);
    let secret = state.relay_secret(&provider);
    let opened = link::within_handshake(async {
        let io = upgrade.await.map_err(|e| e.to_string())?;
        let (sender, connection, kill) = link::client(io).await.map_err(|e| e.to_string())?;
        let driver = Driver { state: state.clone(), provider_id: provider.id.clone(), link_id: id, _slot: slot };
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(provider = %driver.provider_id, error = %e, "link ended with an error");
            }
            drop(driver);
        });
        let link = Link { id, key_hash: provider.key_hash.clone(), opened_at_ms: now_ms(), sender, kill };
        match probe(&link, &secret).await {
            Ok(()) => Ok(link),
            Err(e) => {
                link.kill();
                Err(e)
            }
        }
    })
    .await;
    let link = match opened {
        Ok(Ok(link)) => Arc::new(link),
        Ok(Err(e)) => return tracing::warn!(provider = %provider.id, error = %e, "link refused"),
        Err(e) => return tracing::warn!(provider = %provider.id, error = %e, "link refused"),
    };
    // A second link with the same key replaces the first; the first's open streams
    // finish (dropping its sender closes it gracefully).
    let replaced = provider.load.link.lock().replace(link.clone());
    if replaced.is_some() {
        tracing::info!(provider = %provider.id, "a new link replaced the provider's open one");
    }
    provider.load.last_heartbeat_ms.fetch_max(now_ms(), Ordering::Relaxed);
    announce(&state, &provider.id, true);
    tracing::info!(provider = %provider.id, link = id, "link open");
    tokio::spawn(probe_while_open(state, provider.id.clone(), Arc::downgrade(&link), secret));
}

/// Ends the link's bookkeeping when its connection ends, however it ends.
struct Driver {
    state: AppState,
    provider_id: String,
    link_id: u64,
    _slot: crate::edge::listener::IpSlot,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(provider) = self.state.registry.get(&self.provider_id) {
            let mut current = provider.load.link.lock();
            if current.as_ref().is_some_and(|l| l.id == self.link_id) {
                *current = None;
                announce(&self.state, &self.provider_id, false);
                tracing::info!(provider = %self.provider_id, link = self.link_id, "link closed");
            }
        }
    }
}

async fn probe(link: &Link, secret: &str) -> Result<(), String> {
    let request = link::request(http::Method::GET, "/health", secret, Bytes::new()).map_err(|e| e.to_string())?;
    let (status, _) = tokio::time::timeout(PROBE_TIMEOUT, link.send(request)).await.map_err(|_| "no answer to /health".to_owned())??;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the worker answered /health with {status}"))
    }
}

/// `/health` over the link every `PROBE_EVERY` while it is its provider's: a success is
/// a heartbeat and an uptime check, a failure counts like a failed health check.
async fn probe_while_open(state: AppState, provider_id: String, link: std::sync::Weak<Link>, secret: String) {
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let (Some(link), Some(provider)) = (link.upgrade(), state.registry.get(&provider_id)) else { return };
        if provider.load.link().is_none_or(|current| current.id != link.id) {
            return;
        }
        let ok = probe(&link, &secret).await.is_ok();
        provider.load.health.record_check(ok);
        if ok {
            provider.load.last_heartbeat_ms.fetch_max(now_ms(), Ordering::Relaxed);
            announce(&state, &provider_id, true);
        } else {
            provider.load.health.record_failure(now_ms(), state.config.breaking());
        }
    }
}

/// Sends the relay's request to a dial-out provider: over its link when this replica
/// holds it, else to the replica that does (`forward`).
pub async fn send(state: &AppState, provider: &Provider, path: &'static str, body: Bytes) -> Result<(http::StatusCode, ByteStream), String> {
    if let Some(link) = provider.load.link() {
        let request = link::request(http::Method::POST, path, &state.relay_secret(provider), body).map_err(|e| e.to_string())?;
        return link.send(request).await;
    }
    match &provider.link_elsewhere {
        Some((replica, _)) if provider.forwardable(now_ms(), state.config.stale_after_ms()) => forward(state, provider, replica, path, body).await,
        _ => Err("the provider's link is closed".to_owned()),
    }
}

// --- forwarding between replicas --------------------------------------------------------
//
// A worker behind a load balancer links to whichever replica it reached. Each replica
// with `replica_url` records in the provider's row that it holds the link (refreshed
// with every probe, cleared when the link closes); another replica that gets a request
// for that provider forwards the provider request to `POST {replica}/api/replica/link`,
// signed with the relay secrets' key (shared by the replicas), and reads the answer as
// it would any provider's. Only addresses in `replica_peers` are used. Billing, bounds
// and failover stay with the replica the client called; the holder only pipes.

const FORWARD_PROVIDER: &str = "x-gs-provider";
const FORWARD_PATH: &str = "x-gs-path";
const FORWARD_TIME: &str = "x-gs-timestamp";
const FORWARD_SIGNATURE: &str = "x-gs-signature";
/// A forwarded request signed longer ago (or ahead) than this is refused.
const FORWARD_WINDOW_MS: i64 = 30_000;

fn forward_signature(key: &crate::ops::config::Secret, provider: &str, path: &str, at: i64, body: &[u8]) -> String {
    use hmac::Mac;
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.expose().as_bytes()) else { return String::new() };
    mac.update(format!("gs-forward\0{provider}\0{path}\0{at}\0").as_bytes());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

async fn forward(state: &AppState, provider: &Provider, replica: &str, path: &'static str, body: Bytes) -> Result<(http::StatusCode, ByteStream), String> {
    let at = now_ms();
    let signature = forward_signature(&state.relay_key, &provider.id, path, at, &body);
    let response = state
        .webhooks
        .post(format!("{replica}/api/replica/link"))
        .header(FORWARD_PROVIDER, &provider.id)
        .header(FORWARD_PATH, path)
        .header(FORWARD_TIME, at.to_string())
        .header(FORWARD_SIGNATURE, signature)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("cannot reach the replica holding the provider's link: {e}"))?;
    Ok((response.status(), reqwest_body(response)))
}

/// `POST /api/replica/link`: another replica's request for a provider whose link this
/// replica holds; the link's answer is piped back as it arrives.
#[utoipa::path(
    post,
    path = "/api/replica/link",
    tag = "providers",
    summary = "Forward a request to a dial-out provider's link (between replicas)",
    description = "Sent by another replica of this gateway (one of `replica_peers`) for a provider whose link this replica holds, signed with the relay secrets' key (`x-gs-signature` over the provider, the path, `x-gs-timestamp` and the body). The provider's streamed answer is returned as it is.",
    params(
        ("x-gs-provider" = String, Header, description = "The provider."),
        ("x-gs-path" = String, Header, description = "`/v1/chat/completions` or `/v1/completions`."),
        ("x-gs-timestamp" = i64, Header, description = "Unix milliseconds when signed (30 s window)."),
        ("x-gs-signature" = String, Header, description = "Hex HMAC-SHA256."),
    ),
    request_body(content = String, content_type = "application/json", description = "The provider request."),
    responses(
        (status = 200, description = "The provider's stream.", content_type = "text/event-stream", body = String),
        crate::api::schemas::BadRequest,
        crate::api::schemas::Unauthorized,
        crate::api::schemas::PayloadTooLarge,
        crate::api::schemas::ProviderFailed,
    ),
)]
pub async fn forwarded(State(state): State<AppState>, headers: http::HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(provider_id), Some(path), Some(at), Some(signature)) =
        (header(FORWARD_PROVIDER), header(FORWARD_PATH), header(FORWARD_TIME), header(FORWARD_SIGNATURE))
    else {
        return Err(ApiError::InvalidApiKey);
    };
    let at: i64 = at.parse().map_err(|_| ApiError::InvalidApiKey)?;
    let expected = forward_signature(&state.relay_key, provider_id, path, at, &body);
    if now_ms().abs_diff(at) > FORWARD_WINDOW_MS.unsigned_abs() || !crate::inference::providers::constant_time_eq(expected.as_bytes(), signature.as_bytes()) {
        return Err(ApiError::InvalidApiKey);
    }
    let path = match path {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        _ => return Err(ApiError::param("only /v1/chat/completions and /v1/completions are forwarded", FORWARD_PATH)),
    };
    let provider = state.registry.get(provider_id).ok_or_else(|| ApiError::ProviderFailed("no such provider here".into()))?;
    let link = provider.load.link().ok_or_else(|| ApiError::ProviderFailed("the provider's link is not on this replica".into()))?;
    let request = link::request(http::Method::POST, path, &state.relay_secret(&provider), body).map_err(|e| ApiError::Internal(e.to_string()))?;
    let (status, stream) = link.send(request).await.map_err(ApiError::ProviderFailed)?;
    let mut response = Response::new(axum::body::Body::from_stream(stream.map_err(std::io::Error::other)));
    *response.status_mut() = status;
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/event-stream"));
    Ok(response)
}

/// Records (or clears) that this replica holds a provider's link, when replicas forward.
fn announce(state: &AppState, provider_id: &str, holding: bool) {
    let Some(own) = state.config.replica_url.clone() else { return };
    let (registry, provider_id) = (state.registry.clone(), provider_id.to_owned());
    tokio::spawn(async move {
        let done = if holding {
            registry.record_link_holder(&provider_id, &own).await
        } else {
            registry.forget_link_holder(&provider_id, &own).await
        };
        if let Err(e) = done {
            tracing::warn!(provider = %provider_id, error = %e, "cannot record which replica holds the link");
        }
    });
}

