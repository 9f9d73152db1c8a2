//! Dial-out provider links: a worker behind NAT opens the connection, and the gateway
//! sends requests over it.
//!
//! The protocol is two established ones in a row, nothing home-made:
//! 1. The worker opens TCP (through an HTTP CONNECT proxy when one is configured), TLS
//!    when the gateway's URL is `https` (ALPN `http/1.1`), and sends an HTTP/1.1
//!    `GET /api/gpu/link` with `Upgrade: gs-link`, its provider id (`x-provider-id`)
//!    and its provider key (`Authorization: Bearer pk-…`).
//! 2. The gateway answers `101 Switching Protocols` and the roles turn around: on that
//!    connection the gateway is the HTTP/2 *client* and the worker the HTTP/2 *server*
//!    (reverse HTTP/2). Every request is an HTTP/2 stream with its own flow control
//!    window; a stream the gateway resets (its client left) is dropped by the worker's
//!    server, which cancels the generation as a closed HTTP connection would. Only the
//!    client opens streams in HTTP/2 and the gateway does not accept pushes, so the
//!    worker cannot open a stream the gateway did not.
//!
//! Both ends ping every `PING_INTERVAL` and close a link whose ping went unanswered
//! for `PING_TIMEOUT` (three intervals): a dead peer or a middlebox that silently
//! dropped the connection is noticed, and the pings keep idle-cutting middleboxes from
//! cutting it. The worker reconnects with jittered exponential backoff (`backoff`).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONNECTION, HOST, UPGRADE};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

pub use hyper::upgrade::Upgraded;
pub use rustls::pki_types::CertificateDer;

/// The gateway's route for links (under the gateway URL's path).
pub const PATH: &str = "/api/gpu/link";
/// The `Upgrade` token.
pub const PROTOCOL: &str = "gs-link";
/// The header that names the provider whose key is presented.
pub const PROVIDER_HEADER: &str = "x-provider-id";
/// Connecting, the upgrade and the gateway's first request over the link must finish
/// within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const PING_INTERVAL: Duration = Duration::from_secs(15);
/// Three missed pings.
pub const PING_TIMEOUT: Duration = Duration::from_secs(45);
/// Concurrent streams a worker allows on its link (the floor is 1,000).
pub const MAX_STREAMS: u32 = 1024;
/// The gateway's receive window per stream: what one slow client can leave unread
/// before its worker pauses that stream (and only that stream).
const STREAM_WINDOW: u32 = 256 * 1024;
/// The gateway's receive window for the whole link: 64 streams' windows, so up to 64
/// stalled clients never hold up the others.
const CONNECTION_WINDOW: u32 = 64 * STREAM_WINDOW;
/// A link that stayed up this long was healthy: the next reconnect starts the backoff over.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// Bytes of a refusal's body or a proxy's answer that are read.
const MAX_HEAD: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("invalid URL {0}")]
    Url(String),
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("proxy: {0}")]
    Proxy(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("the gateway refused the link ({status}): {body}")]
    Refused { status: StatusCode, body: String },
    #[error("the link handshake did not finish within {}s", HANDSHAKE_TIMEOUT.as_secs())]
    Timeout,
}

/// Whether a request asks for a link (`Upgrade: gs-link`).
pub fn wants_link(headers: &HeaderMap) -> bool {
    headers
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case(PROTOCOL)))
}

/// The gateway's answer that turns the connection into a link.
pub fn switching_protocols<B: Default>() -> Response<B> {
    let mut response = Response::new(B::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    response.headers_mut().insert(CONNECTION, http::HeaderValue::from_static("upgrade"));
    response.headers_mut().insert(UPGRADE, http::HeaderValue::from_static(PROTOCOL));
    response
}

/// The gateway's end of a link: sends requests to the worker. Dropping every clone
/// closes the link gracefully (open streams finish first).
pub type Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;
type LinkIo = TokioIo<Killable<TokioIo<Upgraded>>>;
/// Resolves when the gateway's end of the link has closed.
pub type ClientConnection = hyper::client::conn::http2::Connection<LinkIo, Full<Bytes>, TokioExecutor>;

/// Closes a link's connection at once, failing its open streams (a revoked key).
/// hyper runs the HTTP/2 connection on a task of its own, so this cuts its I/O.
#[derive(Clone, Default, Debug)]
pub struct KillSwitch(Arc<KillState>);

#[derive(Default, Debug)]
struct KillState {
    killed: std::sync::atomic::AtomicBool,
    read: futures::task::AtomicWaker,
    write: futures::task::AtomicWaker,
}

impl KillSwitch {
    pub fn kill(&self) {
        self.0.killed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.0.read.wake();
        self.0.write.wake();
    }

    fn check(&self, waker: &futures::task::AtomicWaker, cx: &std::task::Context<'_>) -> Option<std::io::Error> {
        waker.register(cx.waker());
        self.0.killed.load(std::sync::atomic::Ordering::SeqCst).then(|| std::io::ErrorKind::ConnectionAborted.into())
    }
}

/// I/O that fails from the moment its `KillSwitch` is thrown.
pub struct Killable<T> {
    io: T,
    switch: KillSwitch,
}

impl<T: AsyncRead + Unpin> AsyncRead for Killable<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.switch.check(&this.switch.0.read, cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Killable<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.switch.check(&this.switch.0.write, cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.switch.check(&this.switch.0.write, cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The gateway's HTTP/2 client on an upgraded connection, and the switch that kills it.
pub async fn client(io: Upgraded) -> Result<(Sender, ClientConnection, KillSwitch), hyper::Error> {
    let switch = KillSwitch::default();
    let io = TokioIo::new(Killable { io: TokioIo::new(io), switch: switch.clone() });
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(PING_INTERVAL)
        .keep_alive_timeout(PING_TIMEOUT)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake(io)
        .await?;
    Ok((sender, connection, switch))
}

/// A request the gateway sends over a link (HTTP/2 wants a scheme and an authority;
/// the worker ignores them).
pub fn request(method: http::Method, path: &str, bearer: &str, body: Bytes) -> Result<Request<Full<Bytes>>, http::Error> {
    Request::builder()
        .method(method)
        .uri(format!("http://link{path}"))
        .header(AUTHORIZATION, format!("Bearer {bearer}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "text/event-stream")
        .body(Full::new(body))
}

/// Where and how a worker dials its gateway.
#[derive(Clone, Debug)]
pub struct Dial {
    /// The gateway's base URL (`http://` or `https://`).
    pub gateway: String,
    pub provider_id: String,
    pub provider_key: String,
    /// An `http://[user:pass@]host:port` proxy to tunnel through with CONNECT.
    pub proxy: Option<String>,
    /// Certificates trusted besides the Mozilla roots (a private gateway's CA).
    pub extra_roots: Vec<CertificateDer<'static>>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

impl Dial {
    /// Opens one link: TCP (through the proxy), TLS for `https`, the upgrade.
    pub async fn connect(&self) -> Result<Upgraded, DialError> {
        let url: Uri = self.gateway.parse().map_err(|_| DialError::Url(self.gateway.clone()))?;
        let https = match url.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(DialError::Url(format!("{} (http:// or https://)", self.gateway))),
        };
        let authority = url.authority().ok_or_else(|| DialError::Url(self.gateway.clone()))?.clone();
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = match &self.proxy {
            Some(proxy) => via_proxy(proxy, &host, port).await?,
            None => TcpStream::connect((host.as_str(), port)).await?,
        };
        tcp.set_nodelay(true)?;
        let io: Box<dyn Io> = if https { Box::new(tls(&host, tcp, &self.extra_roots).await?) } else { Box::new(tcp) };
        let path = format!("{}{PATH}", url.path().trim_end_matches('/'));
        self.upgrade(io, authority.as_str(), &path).await
    }

    async fn upgrade(&self, io: Box<dyn Io>, authority: &str, path: &str) -> Result<Upgraded, DialError> {
        let (mut sender, connection) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(io)).await?;
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        let request = Request::get(path)
            .header(HOST, authority)
            .header(CONNECTION, "upgrade")
            .header(UPGRADE, PROTOCOL)
            .header(AUTHORIZATION, format!("Bearer {}", self.provider_key))
            .header(PROVIDER_HEADER, &self.provider_id)
            .body(Empty::new())
            .map_err(|e| DialError::Url(e.to_string()))?;
        let response = sender.send_request(request).await?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = response.status();
            let body = read_some(response.into_body()).await;
            return Err(DialError::Refused { status, body });
        }
        Ok(hyper::upgrade::on(response).await?)
    }
}

/// Up to `MAX_HEAD` bytes of a body, as text.
async fn read_some(mut body: Incoming) -> String {
    let mut buf = Vec::new();
    while buf.len() < MAX_HEAD {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    buf.extend_from_slice(&data[..data.len().min(MAX_HEAD - buf.len())]);
                }
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// A tunnel to `host:port` through an HTTP proxy (`CONNECT`).
async fn via_proxy(proxy: &str, host: &str, port: u16) -> Result<TcpStream, DialError> {
    let uri: Uri = proxy.parse().map_err(|_| DialError::Url(proxy.to_owned()))?;
    if uri.scheme_str() != Some("http") {
        return Err(DialError::Proxy(format!("only http:// proxies are supported, got {proxy}")));
    }
    let authority = uri.authority().ok_or_else(|| DialError::Url(proxy.to_owned()))?;
    let user = authority.as_str().rsplit_once('@').map(|(user, _)| user.to_owned());
    let mut tcp = TcpStream::connect((authority.host(), authority.port_u16().unwrap_or(80))).await?;
    let target = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(user) = user {
        use base64::Engine;
        head.push_str(&format!("Proxy-Authorization: Basic {}\r\n", base64::engine::general_purpose::STANDARD.encode(user)));
    }
    head.push_str("\r\n");
    tcp.write_all(head.as_bytes()).await?;
    // Byte by byte: nothing may be read past the proxy's head (the tunnel's first bytes
    // belong to TLS or to the upgrade).
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\n") {
        if answer.len() >= MAX_HEAD {
            return Err(DialError::Proxy("the proxy's answer is too long".into()));
        }
        let byte = tcp.read_u8().await.map_err(|e| DialError::Proxy(format!("the proxy closed the connection: {e}")))?;
        answer.push(byte);
    }
    let text = String::from_utf8_lossy(&answer);
    let status_line = text.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(DialError::Proxy(format!("CONNECT {target} refused: {status_line}")));
    }
    Ok(tcp)
}

async fn tls(
    host: &str,
    tcp: TcpStream,
    extra_roots: &[CertificateDer<'static>],
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, DialError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_roots {
        roots.add(cert.clone()).map_err(|e| DialError::Tls(e.to_string()))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| DialError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // The upgrade is HTTP/1.1 (HTTP/2 has no Upgrade).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| DialError::Tls(e.to_string()))?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?)
}

/// PEM certificates to trust besides the Mozilla roots.
pub fn load_roots(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, DialError> {
    use rustls::pki_types::pem::PemObject;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path).map_err(|e| DialError::Tls(format!("{}: {e}", path.display())))?.collect();
    certs.map_err(|e| DialError::Tls(format!("{}: {e}", path.display())))
}

/// The proxy for `gateway` from the environment, as curl reads it: `HTTPS_PROXY` for an
/// `https` gateway, `HTTP_PROXY` for an `http` one, else `ALL_PROXY`; none for a host
/// `NO_PROXY` names (a name, a `.suffix`, or `*`).
pub fn proxy_from_env(gateway: &str) -> Option<String> {
    let url: Uri = gateway.parse().ok()?;
    let host = url.host()?.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    let var = |names: &[&str]| names.iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()));
    let no_proxy = var(&["NO_PROXY", "no_proxy"]).unwrap_or_default();
    let exempt = no_proxy.split(',').map(|e| e.trim().to_ascii_lowercase()).any(|e| {
        let bare = e.trim_start_matches('.');
        e == "*" || (!bare.is_empty() && (host == bare || host.ends_with(&format!(".{bare}"))))
    });
    if exempt {
        return None;
    }
    let names: &[&str] = if url.scheme_str() == Some("https") { &["HTTPS_PROXY", "https_proxy"] } else { &["HTTP_PROXY", "http_proxy"] };
    var(names).or_else(|| var(&["ALL_PROXY", "all_proxy"]))
}

/// The wait before reconnect attempt `failures + 1`: 1 s doubling up to 60 s, each
/// drawn between half and all of that (so a gateway restart is not met by every
/// worker at the same instant).
pub fn backoff(failures: u32) -> Duration {
    let ceiling = 2f64.powi(i32::try_from(failures.min(6)).unwrap_or(6)).min(60.0);
    Duration::from_secs_f64(ceiling * rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..=1.0))
}

/// Serves `service` over one link until the gateway closes it, it fails, or `stop`
/// turns true: then no new streams are accepted (GOAWAY) and the open ones finish.
pub async fn serve<S, B>(io: Upgraded, service: S, mut stop: watch::Receiver<bool>) -> Result<(), hyper::Error>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .keep_alive_interval(PING_INTERVAL)
        .keep_alive_timeout(PING_TIMEOUT)
        .serve_connection(io, service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => result,
        () = stopped(&mut stop) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    }
}

fn stopping(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow()
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopping| *stopping).await;
}

/// Keeps a link open until `stop` turns true: dials, serves, and after a failure or a
/// closed link dials again after `backoff`. On `stop` the open link drains (see `serve`).
pub async fn run<S, B>(dial: Dial, service: S, mut stop: watch::Receiver<bool>)
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut failures = 0u32;
    loop {
        if stopping(&stop) {
            return;
        }
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, dial.connect()).await {
            Ok(Ok(io)) => {
                tracing::info!(gateway = %dial.gateway, "link up");
                let up = Instant::now();
                match serve(io, service.clone(), stop.clone()).await {
                    Ok(()) => tracing::info!("link closed"),
                    Err(e) => tracing::warn!(error = %e, "link dropped"),
                }
                if stopping(&stop) {
                    return;
                }
                if up.elapsed() >= STABLE_AFTER {
                    failures = 0;
                }
            }
            Ok(Err(e)) => tracing::warn!(gateway = %dial.gateway, error = %e, "cannot open the link"),
            Err(_) => tracing::warn!(gateway = %dial.gateway, error = %DialError::Timeout, "cannot open the link"),
        }
        let wait = backoff(failures);
        failures = failures.saturating_add(1);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stopped(&mut stop) => return,
        }
    }
}

/// Runs `work` no longer than the handshake allows.
pub async fn within_handshake<T>(work: impl Future<Output = T>) -> Result<T, DialError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, work).await.map_err(|_| DialError::Timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_minute_with_jitter() {
        for (failures, ceiling) in [(0, 1.0), (1, 2.0), (3, 8.0), (6, 60.0), (40, 60.0)] {
            let wait = backoff(failures).as_secs_f64();
            assert!(wait >= ceiling / 2.0 && wait <= ceiling, "{failures}: {wait}");
        }
    }

    #[test]
    fn upgrade_header_is_matched_as_a_token() {
        let mut headers = HeaderMap::new();
        assert!(!wants_link(&headers));
        headers.insert(UPGRADE, http::HeaderValue::from_static("websocket"));
        assert!(!wants_link(&headers));
        headers.insert(UPGRADE, http::HeaderValue::from_static("h2c, GS-Link"));
        assert!(wants_link(&headers));
    }
}
