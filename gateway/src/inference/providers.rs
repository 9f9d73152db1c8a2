//! Providers: registration, streams on/off line, heartbeats, and the in-memory registry
//! that routing reads on every request.
//!
//! The database is the source of truth; each replica keeps a snapshot it updates at once
//! for its own writes and reloads every `provider_refresh_secs` for the others'. In-flight
//! counters are per replica and survive reloads.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;

use openapi::platform::{Capabilities, Connection, Pricing, ProviderInfo, RegisterProviderRequest, StreamControlInfo};
use parking_lot::RwLock;
use sqlx::Row;

use crate::edge::keys::{generate_secret, hash_key};
use crate::store::{new_id, now_ms, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderStatus {
    Pending,
    Active,
    Suspended,
}

impl ProviderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Suspended => "suspended",
        }
    }
    fn parse(s: &str) -> Self {
        match s {
            "active" => Self::Active,
            "suspended" => Self::Suspended,
            _ => Self::Pending,
        }
    }
}

/// Counters that belong to this replica and outlive registry reloads.
#[derive(Debug, Default)]
pub struct Load {
    /// Streams this replica has open to the provider.
    pub in_flight: AtomicU32,
    /// Streams the whole fleet has open to it, as last read from Redis (`capacity`);
    /// 0 without shared capacity.
    pub fleet_in_flight: AtomicU32,
    /// The share of the cap this replica may use is `1 / divisor` (0 or 1: all of it;
    /// the live replicas while Redis is unreachable).
    pub divisor: AtomicU32,
    pub last_heartbeat_ms: AtomicI64,
    pub health: crate::inference::health::Health,
    /// A dial-out provider's link to this replica, while it is open.
    pub link: parking_lot::Mutex<Option<Arc<crate::inference::open_links::Link>>>,
}

impl Load {
    /// Slots in use as routing sees them: the fleet's, or this replica's own.
    pub fn used(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed).max(self.fleet_in_flight.load(Ordering::Relaxed))
    }

    /// The slots routing may fill of a provider with `cap` streams.
    pub fn limit(&self, cap: u32) -> u32 {
        (cap / self.divisor.load(Ordering::Relaxed).max(1)).max(1)
    }

    pub fn link(&self) -> Option<Arc<crate::inference::open_links::Link>> {
        self.link.lock().clone()
    }
}

/// One provider as routing sees it.
#[derive(Debug)]
pub struct Provider {
    pub id: String,
    pub name: String,
    /// Empty for a dial-out provider.
    pub base_url: String,
    pub connection: Connection,
    pub status: ProviderStatus,
    pub capabilities: Capabilities,
    pub pricing: Pricing,
    /// Price in micro-USD per million tokens (the exact stored value).
    pub price_per_mtok: i64,
    pub gpu_info: serde_json::Value,
    /// `(model, quality)` pairs on line.
    pub streams: HashSet<(String, String)>,
    pub features: Option<HashSet<String>>,
    pub created_at: i64,
    pub load: Arc<Load>,
    /// The active per-hour reservation that owns this provider, if any.
    pub reservation: Option<ActiveReservation>,
    /// The hash of its provider key (its relay secret is derived from it).
    pub key_hash: String,
    /// Requests it must still serve well before it leaves probation (0: trusted).
    pub probation_left: u32,
    /// Why an operator or the gateway changed its status, shown in the admin API.
    pub status_reason: Option<String>,
    /// A dial-out provider's link held by another replica (one of `replica_peers`):
    /// its `replica_url` and when that replica last saw the link alive.
    pub link_elsewhere: Option<(String, i64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveReservation {
    pub id: String,
    pub user_id: String,
    pub model: String,
    pub ends_at: i64,
}

/// Embedding models one provider may register.
const MAX_EMBEDDING_MODELS: usize = 16;

impl Provider {
    /// Active, with a stream on line and a recent heartbeat; a dial-out provider also
    /// needs its link open to this replica (its link's probes are its heartbeats) or
    /// to another that requests can be forwarded to.
    pub fn is_live(&self, now: i64, stale_after_ms: i64) -> bool {
        self.status == ProviderStatus::Active
            && !self.streams.is_empty()
            && now - self.load.last_heartbeat_ms.load(Ordering::Relaxed) <= stale_after_ms
            && (self.connection == Connection::Direct || self.load.link.lock().is_some() || self.forwardable(now, stale_after_ms))
    }

    /// Whether another replica holds its link, seen alive lately.
    pub fn forwardable(&self, now: i64, stale_after_ms: i64) -> bool {
        self.link_elsewhere.as_ref().is_some_and(|(_, seen)| now - seen <= stale_after_ms)
    }

    /// Whether it serves `model` on `/v1/embeddings`.
    pub fn embeds(&self, model: &str) -> bool {
        self.capabilities.embedding_models.iter().any(|m| m == model)
    }

    pub fn supports(&self, feature: &str) -> bool {
        self.features.as_ref().is_none_or(|f| f.contains(feature))
    }

    pub fn serves(&self, model: &str, quality: &str) -> bool {
        self.streams.iter().any(|(m, q)| m == model && q == quality)
    }

    /// Whether the provider may serve a request with this precision requirement: a
    /// full-precision one only when it lists `full`; any other on whatever it runs.
    pub fn meets(&self, precision: crate::inference::quality::Precision) -> bool {
        match precision {
            crate::inference::quality::Precision::Full => self.capabilities.precisions.contains(&openapi::platform::Precision::Full),
            crate::inference::quality::Precision::ReducedAllowed => true,
        }
    }

    pub fn info(&self, now: i64, stale_after_ms: i64, usage_flags: u64, score: f64) -> ProviderInfo {
        let mut streams: Vec<StreamControlInfo> = self
            .streams
            .iter()
            .map(|(model, quality)| StreamControlInfo { model: model.clone(), quality: quality.clone() })
            .collect();
        streams.sort_by(|a, b| (&a.model, &a.quality).cmp(&(&b.model, &b.quality)));
        let heartbeat = self.load.last_heartbeat_ms.load(Ordering::Relaxed);
        ProviderInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            base_url: (self.connection == Connection::Direct).then(|| self.base_url.clone()),
            connection: self.connection,
            status: self.status.as_str().to_owned(),
            gpu_info: self.gpu_info.clone(),
            capabilities: self.capabilities.clone(),
            pricing: self.pricing,
            streams,
            online: self.is_live(now, stale_after_ms),
            active_requests: self.load.in_flight.load(Ordering::Relaxed),
            last_heartbeat_at: (heartbeat > 0).then_some(heartbeat),
            created_at: self.created_at,
            usage_flags,
            score,
            health: serde_json::to_value(self.load.health.snapshot()).unwrap_or_default(),
            probation_remaining: self.probation_left,
            status_reason: self.status_reason.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{message}")]
    Invalid { message: String, param: &'static str },
    #[error("provider {0} does not exist")]
    Unknown(String),
    #[error("the provider key does not belong to provider {0}")]
    WrongKey(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

pub struct Registry {
    store: Store,
    /// This replica's `replica_url` and the `replica_peers`, when requests for dial-out
    /// providers may be forwarded between replicas.
    replicas: (Option<String>, Vec<String>),
    providers: RwLock<Arc<HashMap<String, Arc<Provider>>>>,
    /// Serializes reloads so a slow reload that read the database earlier can never
    /// replace the snapshot of one that read it later.
    reloading: tokio::sync::Mutex<()>,
}

const MICROS_PER_USD: f64 = 1_000_000.0;

/// USD (as the seed sends it) to integer micro-USD, rejecting what cannot be money.
fn usd_to_micros(usd: f64, scale: f64, param: &'static str) -> Result<i64, ProviderError> {
    if !usd.is_finite() || usd < 0.0 || usd * scale > 1e15 {
        return Err(ProviderError::Invalid { message: format!("{param} must be a non-negative amount in USD"), param });
    }
    #[allow(clippy::cast_possible_truncation)]
    Ok((usd * scale).round() as i64)
}

/// Settles each price of a registration from its USD field or its exact twin (both
/// given: they must agree), so the rest of registration reads the USD fields.
pub fn resolve_pricing(pricing: &mut Pricing) -> Result<(), ProviderError> {
    let prices = [
        ("pricing.perToken", "pricing.perTokenPerMillionMicros", &mut pricing.per_token, pricing.per_token_per_million_micros, 1e12),
        ("pricing.perHour", "pricing.perHourMicros", &mut pricing.per_hour, pricing.per_hour_micros, MICROS_PER_USD),
        ("pricing.minimumPayout", "pricing.minimumPayoutMicros", &mut pricing.minimum_payout, pricing.minimum_payout_micros, MICROS_PER_USD),
    ];
    for (name, twin, usd, exact, scale) in prices {
        let Some(exact) = exact else {
            if usd.is_nan() {
                return Err(ProviderError::Invalid { message: format!("{name} (USD) or {twin} is required"), param: "pricing.perToken" });
            }
            continue;
        };
        if exact < 0 {
            return Err(ProviderError::Invalid { message: format!("{twin} must not be negative"), param: twin });
        }
        #[allow(clippy::cast_precision_loss)]
        let from_exact = exact as f64 / scale;
        // The USD field left out (or 0, its default for the optional prices) takes the twin.
        if usd.is_nan() || (*usd == 0.0 && name != "pricing.perToken") {
            *usd = from_exact;
        } else if usd_to_micros(*usd, scale, name)? != exact {
            return Err(ProviderError::Invalid { message: format!("{name} ({usd}) and {twin} ({exact}) disagree; send one of them"), param: name });
        }
    }
    Ok(())
}

/// A registration's prices and capacity within the market's bounds (`config`): every
/// model it serves must admit its prices (a `price_bounds` entry, else the global
/// ceilings), and it may claim at most `max_provider_streams` streams.
pub fn check_market(config: &crate::ops::config::Config, request: &RegisterProviderRequest) -> Result<(), ProviderError> {
    let caps = &request.capabilities;
    if caps.max_concurrent_streams > config.max_provider_streams {
        return Err(ProviderError::Invalid {
            message: format!(
                "capabilities.maxConcurrentStreams must be at most {} on this gateway, got {}",
                config.max_provider_streams, caps.max_concurrent_streams
            ),
            param: "capabilities.maxConcurrentStreams",
        });
    }
    let pricing = &request.pricing;
    for model in &caps.models {
        let bound = config.price_bounds.get(model).copied().unwrap_or_default();
        let checks = [
            ("pricing.perToken", pricing.per_token, bound.per_token.unwrap_or(config.price_ceiling_per_token), "per token"),
            ("pricing.perHour", pricing.per_hour, bound.per_hour.unwrap_or(config.price_ceiling_per_hour), "per hour"),
        ];
        for (param, asked, ceiling, unit) in checks {
            if asked > ceiling {
                return Err(ProviderError::Invalid {
                    message: format!("{param} {asked} is above this market's ceiling of {ceiling} USD {unit} for model {model}"),
                    param,
                });
            }
        }
    }
    Ok(())
}

impl Registry {
    pub async fn load(store: Store, replica_url: Option<String>, replica_peers: Vec<String>) -> Result<Self, sqlx::Error> {
        let registry = Self { store, replicas: (replica_url, replica_peers), providers: RwLock::new(Arc::new(HashMap::new())), reloading: tokio::sync::Mutex::new(()) };
        registry.reload().await?;
        Ok(registry)
    }

    pub fn snapshot(&self) -> Arc<HashMap<String, Arc<Provider>>> {
        self.providers.read().clone()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Provider>> {
        self.providers.read().get(id).cloned()
    }

    /// Reloads every provider from the database, keeping this replica's counters.
    pub async fn reload(&self) -> Result<(), sqlx::Error> {
        let _serial = self.reloading.lock().await;
        let rows = sqlx::query(
            "SELECT id, name, base_url, status, gpu_info, capabilities, price_per_mtok_micros, \
             price_per_hour_micros, minimum_payout_micros, created_at, last_heartbeat_at, key_hash, probation_left, \
             status_reason, connection, link_replica, link_seen_at FROM providers",
        )
        .fetch_all(&self.store.pool)
        .await?;
        let stream_rows = sqlx::query("SELECT provider_id, model, quality FROM provider_streams")
            .fetch_all(&self.store.pool)
            .await?;
        let mut streams: HashMap<String, HashSet<(String, String)>> = HashMap::new();
        for row in &stream_rows {
            streams
                .entry(row.try_get("provider_id")?)
                .or_default()
                .insert((row.try_get("model")?, row.try_get("quality")?));
        }
        let reservation_rows = sqlx::query("SELECT id, user_id, provider_id, model, ends_at FROM reservations WHERE status = 'active'")
            .fetch_all(&self.store.pool)
            .await?;
        let mut reservations: HashMap<String, ActiveReservation> = HashMap::new();
        for r in &reservation_rows {
            reservations.insert(
                r.try_get("provider_id")?,
                ActiveReservation { id: r.try_get("id")?, user_id: r.try_get("user_id")?, model: r.try_get("model")?, ends_at: r.try_get("ends_at")? },
            );
        }
        let old = self.snapshot();
        let mut next = HashMap::with_capacity(rows.len());
        for row in &rows {
            let id: String = row.try_get("id")?;
            let capabilities: Capabilities = decode_json(row.try_get("capabilities")?)?;
            let load = old.get(&id).map(|p| p.load.clone()).unwrap_or_default();
            let heartbeat: Option<i64> = row.try_get("last_heartbeat_at")?;
            load.last_heartbeat_ms.fetch_max(heartbeat.unwrap_or(0), Ordering::Relaxed);
            let provider = Provider {
                name: row.try_get("name")?,
                base_url: row.try_get("base_url")?,
                connection: Connection::parse(&row.try_get::<String, _>("connection")?),
                status: ProviderStatus::parse(&row.try_get::<String, _>("status")?),
                features: capabilities.features.as_ref().map(|f| f.iter().cloned().collect()),
                capabilities,
                pricing: {
                    let (per_mtok, per_hour, min_payout): (i64, i64, i64) = (
                        row.try_get("price_per_mtok_micros")?,
                        row.try_get("price_per_hour_micros")?,
                        row.try_get("minimum_payout_micros")?,
                    );
                    Pricing {
                        per_token: per_mtok as f64 / 1e12,
                        per_token_per_million_micros: Some(per_mtok),
                        per_hour: per_hour as f64 / MICROS_PER_USD,
                        per_hour_micros: Some(per_hour),
                        minimum_payout: min_payout as f64 / MICROS_PER_USD,
                        minimum_payout_micros: Some(min_payout),
                    }
                },
                price_per_mtok: row.try_get("price_per_mtok_micros")?,
                gpu_info: decode_json(row.try_get("gpu_info")?)?,
                streams: streams.remove(&id).unwrap_or_default(),
                created_at: row.try_get("created_at")?,
                reservation: reservations.remove(&id),
                key_hash: row.try_get("key_hash")?,
                probation_left: u32::try_from(row.try_get::<i64, _>("probation_left")?).unwrap_or(0),
                status_reason: row.try_get("status_reason")?,
                link_elsewhere: self.peer_holding_link(row.try_get("link_replica")?, row.try_get("link_seen_at")?),
                load,
                id: id.clone(),
            };
            next.insert(id, Arc::new(provider));
        }
        close_unwanted(&old, &next);
        *self.providers.write() = Arc::new(next);
        Ok(())
    }

    /// A replica recorded as holding a link, if it is a configured peer other than this one.
    fn peer_holding_link(&self, replica: Option<String>, seen: Option<i64>) -> Option<(String, i64)> {
        let (own, peers) = &self.replicas;
        let replica = replica.filter(|r| own.as_ref().is_some_and(|own| own != r) && peers.contains(r))?;
        Some((replica, seen?))
    }

    /// Records that this replica (`replica`) holds the provider's link, alive now.
    pub async fn record_link_holder(&self, provider_id: &str, replica: &str) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE providers SET link_replica = $1, link_seen_at = $2 WHERE id = $3")
            .bind(replica)
            .bind(now_ms())
            .bind(provider_id)
            .execute(&self.store.pool)
            .await
            .map(drop)
    }

    /// The provider's link to `replica` closed (unless another replica has it by now).
    pub async fn forget_link_holder(&self, provider_id: &str, replica: &str) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE providers SET link_replica = NULL WHERE id = $1 AND link_replica = $2")
            .bind(provider_id)
            .bind(replica)
            .execute(&self.store.pool)
            .await
            .map(drop)
    }

    pub async fn register(
        &self,
        mut request: RegisterProviderRequest,
        status: ProviderStatus,
        probation: u32,
    ) -> Result<(openapi::platform::RegisterProviderResponse, String), ProviderError> {
        let invalid = |message: &str, param: &'static str| ProviderError::Invalid { message: message.to_owned(), param };
        let base_url = match (request.connection, &request.base_url) {
            (Connection::Direct, Some(url)) if url.starts_with("http://") || url.starts_with("https://") => {
                url.trim_end_matches('/').to_owned()
            }
            (Connection::Direct, _) => return Err(invalid("baseUrl must be an http:// or https:// URL", "baseUrl")),
            (Connection::DialOut, None) => String::new(),
            (Connection::DialOut, Some(_)) => {
                return Err(invalid("a dialOut provider connects to the gateway: leave baseUrl out", "baseUrl"))
            }
        };
        let caps = &request.capabilities;
        if caps.models.is_empty() || caps.models.iter().any(|m| m.trim().is_empty()) {
            return Err(invalid("capabilities.models must list at least one model id", "capabilities.models"));
        }
        if caps.embedding_models.len() > MAX_EMBEDDING_MODELS
            || caps.embedding_models.iter().any(|m| m.trim().is_empty() || caps.models.contains(m))
        {
            return Err(invalid(
                "capabilities.embeddingModels may list at most 16 model ids, none blank and none also in capabilities.models",
                "capabilities.embeddingModels",
            ));
        }
        if caps.max_concurrent_streams == 0 {
            return Err(invalid("capabilities.maxConcurrentStreams must be at least 1", "capabilities.maxConcurrentStreams"));
        }
        // Unknown values are already refused when the body is parsed (naming the entry).
        if caps.precisions.is_empty() {
            return Err(invalid("capabilities.precisions must list at least one of full, reduced (or be left out: full)", "capabilities.precisions"));
        }
        request.capabilities.precisions.sort_unstable();
        request.capabilities.precisions.dedup();
        // Prices: per token is stored per million tokens so sub-micro-USD prices keep precision.
        let per_mtok = usd_to_micros(request.pricing.per_token, 1e12, "pricing.perToken")?;
        let per_hour = usd_to_micros(request.pricing.per_hour, MICROS_PER_USD, "pricing.perHour")?;
        let min_payout = usd_to_micros(request.pricing.minimum_payout, MICROS_PER_USD, "pricing.minimumPayout")?;
        let id = new_id("prov");
        let key = generate_secret("pk-");
        let key_hash = hash_key(&key);
        let name = request.name.clone().unwrap_or_else(|| format!("provider-{}", &id[id.len() - 6..]));
        let caps_json = serde_json::to_string(&request.capabilities).map_err(|e| invalid(&e.to_string(), "capabilities"))?;
        sqlx::query(
            "INSERT INTO providers (id, name, key_hash, base_url, status, gpu_info, capabilities, \
             price_per_mtok_micros, price_per_hour_micros, minimum_payout_micros, created_at, probation_left, connection) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(&id)
        .bind(&name)
        .bind(&key_hash)
        .bind(&base_url)
        .bind(status.as_str())
        .bind(request.gpu_info.to_string())
        .bind(caps_json)
        .bind(per_mtok)
        .bind(per_hour)
        .bind(min_payout)
        .bind(now_ms())
        .bind(i64::from(probation))
        .bind(request.connection.as_str())
        .execute(&self.store.pool)
        .await?;
        self.reload().await?;
        // The relay secret is filled in by the caller, which holds its key.
        Ok((
            openapi::platform::RegisterProviderResponse {
                provider_id: id,
                provider_key: key,
                status: status.as_str().to_owned(),
                relay_secret: String::new(),
            },
            key_hash,
        ))
    }

    /// Checks that `secret` is the key of `provider_id`.
    pub async fn authenticate(&self, provider_id: &str, secret: &str) -> Result<(), ProviderError> {
        let hash: Option<String> = sqlx::query_scalar("SELECT key_hash FROM providers WHERE id = $1")
            .bind(provider_id)
            .fetch_optional(&self.store.pool)
            .await?;
        let hash = hash.ok_or_else(|| ProviderError::Unknown(provider_id.to_owned()))?;
        if !constant_time_eq(hash.as_bytes(), hash_key(secret).as_bytes()) {
            return Err(ProviderError::WrongKey(provider_id.to_owned()));
        }
        Ok(())
    }

    /// Replaces a provider's key; the old one (and the relay secret derived from it)
    /// stops working at once. Returns the new key and its hash.
    pub async fn rotate_key(&self, provider_id: &str) -> Result<(String, String), ProviderError> {
        let key = generate_secret("pk-");
        let key_hash = hash_key(&key);
        let updated = sqlx::query("UPDATE providers SET key_hash = $1 WHERE id = $2")
            .bind(&key_hash)
            .bind(provider_id)
            .execute(&self.store.pool)
            .await?;
        if updated.rows_affected() == 0 {
            return Err(ProviderError::Unknown(provider_id.to_owned()));
        }
        self.reload().await?;
        Ok((key, key_hash))
    }

    pub async fn start_stream(&self, provider_id: &str, model: &str, quality: &str) -> Result<(), ProviderError> {
        // Another replica may have registered it moments ago.
        if self.get(provider_id).is_none() {
            self.reload().await?;
        }
        let provider = self.get(provider_id).ok_or_else(|| ProviderError::Unknown(provider_id.to_owned()))?;
        if !provider.capabilities.models.iter().any(|m| m == model) {
            return Err(ProviderError::Invalid {
                message: format!("model `{model}` is not in this provider's capabilities.models"),
                param: "model",
            });
        }
        if !provider.capabilities.supported_qualities.iter().any(|q| q == quality) {
            return Err(ProviderError::Invalid {
                message: format!("quality `{quality}` is not in this provider's capabilities.supportedQualities"),
                param: "quality",
            });
        }
        let now = now_ms();
        sqlx::query(
            "INSERT INTO provider_streams (provider_id, model, quality, started_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (provider_id, model, quality) DO NOTHING",
        )
        .bind(provider_id)
        .bind(model)
        .bind(quality)
        .bind(now)
        .execute(&self.store.pool)
        .await?;
        // Going on line counts as a heartbeat.
        self.record_heartbeat(provider_id, 0, 0).await?;
        self.reload().await?;
        Ok(())
    }

    pub async fn stop_stream(&self, provider_id: &str, model: &str, quality: &str) -> Result<(), ProviderError> {
        sqlx::query("DELETE FROM provider_streams WHERE provider_id = $1 AND model = $2 AND quality = $3")
            .bind(provider_id)
            .bind(model)
            .bind(quality)
            .execute(&self.store.pool)
            .await?;
        self.reload().await?;
        Ok(())
    }

    pub async fn record_heartbeat(&self, provider_id: &str, active: u32, queue: u32) -> Result<(), ProviderError> {
        let now = now_ms();
        let updated = sqlx::query(
            "UPDATE providers SET last_heartbeat_at = $1, reported_active_streams = $2, reported_queue_length = $3 WHERE id = $4",
        )
        .bind(now)
        .bind(i64::from(active))
        .bind(i64::from(queue))
        .bind(provider_id)
        .execute(&self.store.pool)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(ProviderError::Unknown(provider_id.to_owned()));
        }
        if let Some(p) = self.get(provider_id) {
            p.load.last_heartbeat_ms.fetch_max(now, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Sets a provider's status with the reason shown beside it. An admin's approval
    /// also ends its probation.
    pub async fn set_status(&self, provider_id: &str, status: ProviderStatus, reason: Option<&str>) -> Result<(), ProviderError> {
        let sql = if status == ProviderStatus::Active {
            "UPDATE providers SET status = $1, status_reason = $2, probation_left = 0 WHERE id = $3"
        } else {
            "UPDATE providers SET status = $1, status_reason = $2 WHERE id = $3"
        };
        let updated = sqlx::query(sql)
            .bind(status.as_str())
            .bind(reason)
            .bind(provider_id)
            .execute(&self.store.pool)
            .await?;
        if updated.rows_affected() == 0 {
            return Err(ProviderError::Unknown(provider_id.to_owned()));
        }
        self.reload().await?;
        Ok(())
    }
}

impl Registry {
    /// Sets a provider back to `pending` with its streams off line, saying why.
    pub async fn take_off_line(&self, provider_id: &str, reason: &str) -> Result<(), ProviderError> {
        sqlx::query("DELETE FROM provider_streams WHERE provider_id = $1").bind(provider_id).execute(&self.store.pool).await?;
        self.set_status(provider_id, ProviderStatus::Pending, Some(reason)).await
    }
}

/// One request served well (honest usage, no failure) by a provider on probation.
pub fn advance_probation(store: Store, provider_id: String) {
    tokio::spawn(async move {
        let done = sqlx::query("UPDATE providers SET probation_left = probation_left - 1 WHERE id = $1 AND probation_left > 0")
            .bind(&provider_id)
            .execute(&store.pool)
            .await;
        if let Err(e) = done {
            tracing::warn!(provider = %provider_id, error = %e, "cannot record probation progress");
        }
    });
}

/// A provider on probation failed a request or misreported its usage: its probation
/// starts over.
pub fn restart_probation(store: Store, provider_id: String, length: u32) {
    tokio::spawn(async move {
        let done = sqlx::query("UPDATE providers SET probation_left = $1 WHERE id = $2 AND probation_left > 0")
            .bind(i64::from(length))
            .bind(&provider_id)
            .execute(&store.pool)
            .await;
        if let Err(e) = done {
            tracing::warn!(provider = %provider_id, error = %e, "cannot restart probation");
        }
    });
}

fn decode_json<T: serde::de::DeserializeOwned>(text: String) -> Result<T, sqlx::Error> {
    serde_json::from_str(&text).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Called with each new registry snapshot: kills the links of providers that are gone,
/// suspended, or whose key changed (a rotated or revoked key must not keep serving).
pub fn close_unwanted(old: &HashMap<String, Arc<Provider>>, next: &HashMap<String, Arc<Provider>>) {
    for (id, provider) in old {
        let Some(link) = provider.load.link() else { continue };
        let reason = match next.get(id) {
            None => "provider removed",
            Some(p) if p.status == ProviderStatus::Suspended => "provider suspended",
            Some(p) if p.key_hash != link.key_hash => "provider key changed",
            Some(_) => continue,
        };
        tracing::info!(provider = %id, reason, "closing the provider's link");
        provider.load.link.lock().take();
        link.kill();
    }
}

