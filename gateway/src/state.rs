//! Shared state: `AppState` is what every handler and background task can reach,
//! built once by `ops::server` and cheap to clone.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::ads;
use crate::edge::extract::bearer;
use crate::edge::keys::Keys;
use crate::edge::ratelimit;
use crate::inference::providers::{self, constant_time_eq, Registry};
use crate::inference::{egress, open_links, quality, routing, tokenizers};
use crate::money::free_budget;
use crate::money::ledger;
use crate::money::usage::UsageSink;
use crate::ops::config::{Config, Secret};
use crate::ops::metrics;
use crate::store::Store;

/// Everything a handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: Config,
    pub store: Store,
    pub keys: Keys,
    pub registry: Arc<Registry>,
    pub usage: UsageSink,
    pub ledger: ledger::Ledger,
    /// Provider calls (`egress` rules apply).
    pub http: reqwest::Client,
    /// The operator's own services (the payout webhook), which may be private.
    pub webhooks: reqwest::Client,
    /// For providers whose `http://` base URL speaks h2c (`capabilities.http2`): one
    /// multiplexed connection instead of one per open stream.
    pub h2c: reqwest::Client,
    pub user_id_secret: Secret,
    /// Streams being relayed right now (this replica).
    pub active_streams: Arc<AtomicU64>,
    pub limiter: Arc<ratelimit::Limiter>,
    pub metrics: Arc<metrics::Metrics>,
    pub qualities: Arc<quality::Qualities>,
    /// Provider slots, fleet-wide with Redis (requests queued for capacity wait on
    /// `capacity.freed`).
    pub capacity: Arc<crate::inference::capacity::Capacity>,
    /// Provider health shared with the other replicas and kept in the database.
    pub fleet_health: Arc<crate::inference::fleet_health::Fleet>,
    /// This replica's id (`replica_id`).
    pub replica: String,
    /// Requests waiting for a provider slot right now.
    pub queued: Arc<AtomicU64>,
    /// Per-key locks that serialize spending-limit checks with their holds.
    pub key_locks: moka::sync::Cache<String, Arc<tokio::sync::Mutex<()>>>,
    /// Ad inventory, auction and delivery tracking (the layer is `ads::layer`).
    pub ads: Arc<ads::Ads>,
    /// Model tokenizers, for counting delivered tokens (config `tokenizers`).
    pub tokenizers: Arc<tokenizers::Tokenizers>,
    /// What free keys may still cost the platform today (`free_tier_daily_budget`).
    pub free_budget: Arc<free_budget::FreeBudget>,
    /// Each model's share of requests served by providers on probation.
    pub probation: Arc<routing::Probation>,
    /// Key of the providers' relay secrets (`relay_secret_key`).
    pub relay_key: Secret,
    /// Dial-out links open to this replica, counted per client address.
    pub links: Arc<open_links::Links>,
    /// Routing's random source when `routing_seed` is set (reproducible choices).
    pub routing_rng: Option<parking_lot::Mutex<rand::rngs::StdRng>>,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

fn pseudonym(secret: &Secret, parts: &[&str]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()) else {
        return "anonymous".to_owned();
    };
    for part in parts {
        mac.update(part.as_bytes());
        mac.update(b"\0");
    }
    let digest = mac.finalize().into_bytes();
    format!("u_{}", hex::encode(&digest[..16]))
}

pub fn relay_secret(key: &Secret, provider_id: &str, key_hash: &str) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key.expose().as_bytes()) else {
        return String::new();
    };
    mac.update(format!("relay\0{provider_id}\0{key_hash}").as_bytes());
    format!("rs-{}", hex::encode(mac.finalize().into_bytes()))
}

impl AppState {
    pub fn new(inner: Inner) -> Self {
        Self(Arc::new(inner))
    }

    /// The user id written into a provider request before routing: an HMAC of the
    /// account id, replaced by `pseudonym_for` the chosen provider when it is sent.
    pub fn pseudonym(&self, user_id: &str) -> String {
        pseudonym(&self.user_id_secret, &[user_id])
    }

    /// The pseudonymous user id one provider sees: an HMAC of the account and the
    /// provider, so colluding providers cannot link a user by comparing ids.
    pub fn pseudonym_for(&self, user_id: &str, provider_id: &str) -> String {
        pseudonym(&self.user_id_secret, &[user_id, provider_id])
    }

    /// The secret a provider's worker requires on every call: an HMAC of its id under
    /// `relay_secret_key` and of its key's hash, so rotating the key rotates it.
    pub fn relay_secret(&self, provider: &providers::Provider) -> String {
        relay_secret(&self.relay_key, &provider.id, &provider.key_hash)
    }

    pub fn is_admin(&self, headers: &HeaderMap) -> bool {
        match (&self.config.admin_key, bearer(headers)) {
            (Some(admin), Some(given)) => constant_time_eq(admin.expose().as_bytes(), given.as_bytes()),
            _ => false,
        }
    }

    pub fn webhook_client(config: &Config) -> Result<reqwest::Client, reqwest::Error> {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.provider_connect_timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .build()
    }

    pub fn http_client(config: &Config) -> Result<reqwest::Client, reqwest::Error> {
        Self::provider_client(config).pool_max_idle_per_host(1024).build()
    }

    /// HTTP/2 with prior knowledge. Each open stream then costs the gateway a few
    /// hundred bytes of HTTP/2 stream state instead of an HTTP/1.1 connection (~25 KB
    /// of hyper buffers and a file descriptor); BENCHMARKS.md has the measurement.
    pub fn h2c_client(config: &Config) -> Result<reqwest::Client, reqwest::Error> {
        Self::provider_client(config)
            .http2_prior_knowledge()
            // A dead connection would take every stream on it along; pings find it.
            .http2_keep_alive_interval(Duration::from_secs(20))
            .http2_keep_alive_while_idle(false)
            .build()
    }

    /// What both provider clients share: the connect timeout, idle pooling, no Nagle; no
    /// redirects and no proxy from the environment (a provider must not steer the
    /// gateway elsewhere), and, unless `allow_private_providers`, names resolved to
    /// public addresses only (`egress`).
    fn provider_client(config: &Config) -> reqwest::ClientBuilder {
        let builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.provider_connect_timeout_ms))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        if config.allow_private_providers {
            builder
        } else {
            builder.dns_resolver(Arc::new(egress::PublicOnly))
        }
    }

    /// The client for a provider: h2c when its plain-HTTP server declares it.
    pub fn client_for(&self, provider: &crate::inference::providers::Provider) -> &reqwest::Client {
        if provider.capabilities.http2 && provider.base_url.starts_with("http://") {
            &self.h2c
        } else {
            &self.http
        }
    }
}
