//! The listener's limits: open connections (and dial-out links) counted per client
//! address, so one address cannot take every socket (a slot is taken before a connection
//! is served and given back when it closes), and the size and time allowed for a
//! request's head.

use std::sync::Arc;
use std::time::Duration;

/// Open connections per client IP (`max_connections_per_ip`): one address cannot hold
/// every file descriptor the gateway has.
#[derive(Clone)]
pub(crate) struct PerIp {
    max: u32,
    open: Arc<parking_lot::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>>,
}

/// One counted connection; dropping it frees the slot.
pub(crate) struct IpSlot {
    ip: std::net::IpAddr,
    open: Arc<parking_lot::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>>,
}

impl PerIp {
    pub(crate) fn new(max: u32) -> Self {
        Self { max, open: Arc::default() }
    }

    pub(crate) fn admit(&self, ip: std::net::IpAddr) -> Option<IpSlot> {
        let mut open = self.open.lock();
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpSlot { ip, open: self.open.clone() })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// `PerIp` for the TLS listener (axum-server's acceptor chain): a connection over the
/// cap is dropped before its handshake; an admitted one holds its slot in its service,
/// which lives as long as the connection.
#[derive(Clone)]
pub(crate) struct PerIpAcceptor(pub(crate) PerIp);

impl<S> axum_server::accept::Accept<tokio::net::TcpStream, S> for PerIpAcceptor {
    type Stream = tokio::net::TcpStream;
    type Service = Counted<S>;
    type Future = std::future::Ready<std::io::Result<(Self::Stream, Self::Service)>>;

    fn accept(&self, stream: tokio::net::TcpStream, service: S) -> Self::Future {
        let _ = stream.set_nodelay(true);
        let admitted = stream.peer_addr().ok().and_then(|a| self.0.admit(a.ip()));
        std::future::ready(match admitted {
            Some(slot) => Ok((stream, Counted { inner: service, _slot: Arc::new(slot) })),
            None => Err(std::io::Error::other("max_connections_per_ip reached")),
        })
    }
}

/// A connection's service carrying its `IpSlot`.
#[derive(Clone)]
pub(crate) struct Counted<S> {
    inner: S,
    _slot: Arc<IpSlot>,
}

impl<S: tower::Service<R>, R> tower::Service<R> for Counted<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        self.inner.call(request)
    }
}

/// How long a client may take to send a request's line and headers.
pub(crate) const HEAD_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The plain listener's read buffer cap, which is also the most a request's line and
/// headers may take: a larger head gets hyper's 431 (documented on every operation).
pub const MAX_HEAD_BYTES: usize = 8192;
