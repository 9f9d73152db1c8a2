//! The dial-out links this replica holds: one `Link` per provider (kept in the
//! provider's per-replica `Load`) and the count of links per client address.

use std::pin::Pin;
use std::sync::atomic::AtomicU64;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use http_body_util::BodyStream;

use crate::edge::listener::PerIp;

/// A response body as the relay reads it.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

/// One open link.
pub struct Link {
    pub id: u64,
    /// The provider key's hash when it opened: a new key closes it.
    pub key_hash: String,
    pub opened_at_ms: i64,
    pub(crate) sender: link::Sender,
    pub(crate) kill: link::KillSwitch,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("id", &self.id).field("opened_at_ms", &self.opened_at_ms).finish_non_exhaustive()
    }
}

impl Link {
    /// Closes it at once: open streams fail (and are billed for what was delivered).
    pub fn kill(&self) {
        self.kill.kill();
    }

    /// Sends one request; the response body is read as it arrives.
    pub async fn send(&self, request: http::Request<http_body_util::Full<Bytes>>) -> Result<(http::StatusCode, ByteStream), String> {
        let mut sender = self.sender.clone();
        sender.ready().await.map_err(|e| format!("link closed: {e}"))?;
        let response = sender.send_request(request).await.map_err(|e| format!("link: {e}"))?;
        let status = response.status();
        let body = BodyStream::new(response.into_body())
            .try_filter_map(|frame| futures::future::ready(Ok(frame.into_data().ok())))
            .map_err(|e| format!("link: {e}"));
        Ok((status, Box::pin(body)))
    }
}

/// This replica's links per client address (`max_links_per_ip`), and their ids.
pub struct Links {
    pub(crate) per_ip: PerIp,
    pub(crate) next_id: AtomicU64,
}

impl Links {
    pub fn new(max_per_ip: u32) -> Self {
        Self { per_ip: PerIp::new(max_per_ip), next_id: AtomicU64::new(1) }
    }
}

/// Bytes of a reqwest response body, as the relay reads any provider's body.
pub fn reqwest_body(response: reqwest::Response) -> ByteStream {
    Box::pin(response.bytes_stream().map(|r| r.map_err(|e| e.to_string())))
}
