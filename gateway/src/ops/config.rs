//! Configuration: defaults → TOML file → environment (`GATEWAY_<KEY>`, plus the
//! documented aliases `GPU_STREAMING_PORT`, `GATEWAY_DATABASE_URL`, `GATEWAY_ADMIN_KEY`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {source}")]
    Toml { path: PathBuf, source: toml::de::Error },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

/// A secret that never shows up in logs or `Debug` output.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Registration {
    /// Anyone may register a provider; it is active at once.
    Open,
    /// New providers wait in `pending` until an admin approves them.
    AdminApproved,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// A per-model price ceiling (`[price_bounds]`); a field left out is the global ceiling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceBound {
    /// USD per token.
    #[serde(default)]
    pub per_token: Option<f64>,
    /// USD per hour of reservation.
    #[serde(default)]
    pub per_hour: Option<f64>,
}

/// A bulk-usage discount: from `monthly_tokens` billed tokens in the calendar month on,
/// a paying user's further requests cost `discount_bp` basis points less.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VolumeDiscount {
    pub monthly_tokens: u64,
    pub discount_bp: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to bind; the port comes from `port`.
    pub host: String,
    pub port: u16,
    /// `sqlite://FILE` (embedded, default) or `postgres://…` for many replicas.
    pub database_url: String,
    /// Key for `/api/admin/*` and the console. Without one the admin API refuses everything.
    pub admin_key: Option<Secret>,
    /// Secret for the pseudonymous user ids sent to providers; generated and stored
    /// in the database when not set, so it survives restarts.
    pub user_id_secret: Option<Secret>,
    pub registration: Registration,
    pub max_body_bytes: usize,
    /// How long open streams may run on after SIGTERM before the process exits.
    pub shutdown_grace_secs: u64,
    pub provider_connect_timeout_ms: u64,
    /// Time a provider has to deliver its first token before we fail over.
    pub first_token_timeout_secs: u64,
    /// Time between two chunks after the first token before the stream is failed.
    pub idle_chunk_timeout_secs: u64,
    /// Providers tried per request before giving up (failover before the first token).
    pub max_attempts: u32,
    /// A provider without a heartbeat for this long is treated as off line.
    pub provider_stale_after_secs: u64,
    /// How often each replica reloads providers from the database.
    pub provider_refresh_secs: u64,
    pub key_cache_ttl_secs: u64,
    pub usage_batch_max: usize,
    /// Extra wait before committing a batch (0: commit as soon as the last one is done).
    pub usage_flush_ms: u64,
    /// SQLite: how often the WAL is checkpointed and started over (`Store::checkpoint`).
    /// Each settlement commit appends ~15 pages (60 KB) to the WAL, so at 1,000 req/s
    /// 100 ms keeps it near 7–14 MB; 1 s let it reach 64 MB and 5 s 340 MB, with a
    /// longer stall at every checkpoint (BENCHMARKS.md).
    pub sqlite_checkpoint_ms: u64,
    /// Platform fee on provider earnings, in basis points (1000 = 10%).
    pub platform_fee_bp: u32,
    /// Open holds older than this are voided (their request died with a process).
    pub hold_ttl_secs: u64,
    /// HMAC secret of the payment processor's top-up webhook; top-ups are off without it.
    pub topup_webhook_secret: Option<Secret>,
    /// The payout service that receives new withdrawals (signed webhook); manual without it.
    pub payout_webhook_url: Option<String>,
    pub payout_webhook_secret: Option<Secret>,
    /// Redis for what several replicas share (`redis://…`): rate limits, key changes,
    /// provider slots (`inference::capacity`). Required when more than one replica runs
    /// on one PostgreSQL database; a single replica keeps all of it in process without.
    pub redis_url: Option<String>,
    /// What every Redis key and channel of this gateway starts with (`gs:`), so several
    /// gateways (or parallel tests) can share one Redis.
    pub redis_prefix: String,
    /// This replica's name in `/health`, `/metrics`, the `replicas` table and its Redis
    /// leases: the host name and `port` when not set (stable across restarts).
    pub replica_id: Option<String>,
    /// Default per-key limits by tier (a key's own limits win).
    pub free_requests_per_minute: u32,
    pub free_tokens_per_minute: u32,
    pub premium_requests_per_minute: u32,
    pub premium_tokens_per_minute: u32,
    /// Per client IP on unauthenticated endpoints (registration, webhooks).
    pub ip_requests_per_minute: u32,
    /// Provider score weights (normalised): success rate, TTFT, uptime, price.
    pub score_weight_success: f64,
    pub score_weight_latency: f64,
    pub score_weight_uptime: f64,
    pub score_weight_price: f64,
    /// Consecutive failures that open a provider's circuit breaker, and how long it stays open.
    pub breaker_failures: u32,
    pub breaker_cooldown_ms: u64,
    /// Active `/health` checks of every provider (0 turns them off).
    pub health_check_secs: u64,
    /// When every eligible provider is busy: how long a request waits for a free slot,
    /// and how many may wait at once, before 503 with `retry-after`.
    pub queue_timeout_ms: u64,
    pub queue_max: u32,
    /// Bulk-usage discount tiers (TOML `[[volume_discounts]]`, or env as an inline array).
    pub volume_discounts: Vec<VolumeDiscount>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub log_format: LogFormat,
    /// The gateway's public base URL (`https://api.example.com`), for ad click links;
    /// without it they are built from the request's `Host`.
    pub public_url: Option<String>,
    /// Contextual ads on free-tier chat and completions responses.
    pub ads_enabled: bool,
    /// Default placement: `content` (a labelled last delta) or `metadata` (an `ad`
    /// object on the final chunk). A request may ask for either.
    pub ads_placement: String,
    /// Allow the `prompt` placement (a labelled sponsor note in the system prompt).
    pub ads_prompt_placement: bool,
    /// Minimum classifier confidence for a contextual ad.
    pub ads_min_relevance: f64,
    /// Sensitive topics that never carry an ad (`self_harm`, `mental_health_crisis`, `politics`).
    pub ads_excluded_topics: Vec<String>,
    /// Floor price of the auction (micro-USD per thousand impressions).
    pub ads_reserve_cpm_micros: i64,
    /// Share of each ad charge paid to the provider whose output carried the ad (basis points).
    pub ads_provider_share_bp: u32,
    /// Whether free-tier keys may opt out of ads (`ad_preferences.opt_out`).
    pub ads_free_opt_out: bool,
    /// Accept `?api_key=` on every user route, not only the WebSocket's.
    pub allow_query_api_key: bool,
    /// A WebSocket session is closed after this many seconds.
    pub ws_max_session_secs: u64,
    /// Let providers sit at private, loopback or link-local addresses and use `http://`
    /// (a private deployment, the demo, the tests). Off, a `baseUrl` must be `https://`
    /// to public addresses only, checked at registration and at every connection.
    pub allow_private_providers: bool,
    /// The most a provider may ask per token (USD), unless `price_bounds` says otherwise
    /// for a model it serves; a dearer registration is refused. Paying users are held and
    /// free tokens are paid from ad revenue at these prices, so an unbounded one lets a
    /// single registration price everyone else out or drain the platform.
    pub price_ceiling_per_token: f64,
    /// The most a provider may ask per hour of reservation (USD).
    pub price_ceiling_per_hour: f64,
    /// Per-model ceilings (TOML `[price_bounds]` `"model-id" = { per_token = 0.01 }`).
    pub price_bounds: BTreeMap<String, PriceBound>,
    /// The most concurrent streams a provider may claim (`capabilities.maxConcurrentStreams`).
    pub max_provider_streams: u32,
    /// The largest SSE event a provider may send, in bytes; a larger one ends its
    /// stream with an error event (what was delivered is billed).
    pub provider_max_event_bytes: usize,
    /// The most a provider's response body may carry, in bytes.
    pub provider_max_response_bytes: u64,
    /// A request's stream ends after this many seconds, however steadily the provider
    /// sends (the idle timeout only bounds the gaps).
    pub request_deadline_secs: u64,
    /// What free keys' tokens may cost the platform per UTC day (USD, paid from
    /// `platform:ad_revenue`); past it free requests get 429. 0 turns the free tier off.
    pub free_tier_daily_budget: f64,
    /// A self-registered provider serves this many requests on probation (honest usage,
    /// no failure; a failure starts it over) before it is trusted. 0: no probation.
    pub probation_requests: u32,
    /// While a trusted provider serves the same model, providers on probation get at
    /// most this share of that model's requests.
    pub probation_max_share: f64,
    /// A provider's new payout method takes effect this many seconds after it is set
    /// (a first one at once), so a stolen provider key cannot redirect earnings at once.
    pub payout_method_delay_secs: u64,
    /// Open connections one client IP may hold; more are closed at once.
    pub max_connections_per_ip: u32,
    /// Dial-out provider links one client IP may hold open (`/api/gpu/link`).
    pub max_links_per_ip: u32,
    /// This replica's address as the other replicas reach it (`http://10.0.0.5:8080`).
    /// With `replica_peers`, a request for a dial-out provider whose link another
    /// replica holds is forwarded to that replica (signed with `relay_secret_key`).
    pub replica_url: Option<String>,
    /// Every replica's `replica_url`: the only addresses requests are forwarded to.
    pub replica_peers: Vec<String>,
    /// A request body must arrive within this many seconds (slow-body attacks).
    pub body_read_timeout_secs: u64,
    /// Key of the relay secrets: each provider's is an HMAC of its id under this key,
    /// sent on every call to it, so its worker answers only this gateway. Generated and
    /// stored in the database when not set; set it (the same on every replica) so that
    /// a copy of the database cannot derive the secrets.
    pub relay_secret_key: Option<Secret>,
    /// Seed of routing's random choices: set, the same traffic is routed the same way
    /// (tests that check where traffic goes); unset, the OS seeds it per thread.
    pub routing_seed: Option<u64>,
    /// Stored Responses API answers (`store: true`) are deleted this many days after
    /// they were made, and not served or replayed after that.
    pub responses_retention_days: u32,
    /// OTLP/HTTP collector (`http://collector:4318`): request spans are exported there.
    pub otel_endpoint: Option<String>,
    pub otel_service_name: String,
    /// The tokenizer of each model id (TOML `[tokenizers]` `"model-id" = "PATH"`, or env
    /// as an inline table): a `.gguf` file (its header alone is read), a Hugging Face
    /// model directory or a `tokenizer.json`. The relay counts a model's delivered
    /// tokens with it to check the provider's usage; models without one are counted
    /// by content chunks.
    pub tokenizers: BTreeMap<String, PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".to_owned(),
            port: 3002,
            database_url: "sqlite://gpu-streaming.db".to_owned(),
            admin_key: None,
            user_id_secret: None,
            registration: Registration::Open,
            max_body_bytes: 4 * 1024 * 1024,
            shutdown_grace_secs: 30,
            provider_connect_timeout_ms: 2_000,
            first_token_timeout_secs: 120,
            idle_chunk_timeout_secs: 120,
            max_attempts: 3,
            provider_stale_after_secs: 90,
            provider_refresh_secs: 5,
            key_cache_ttl_secs: 60,
            usage_batch_max: 512,
            usage_flush_ms: 0,
            sqlite_checkpoint_ms: 100,
            platform_fee_bp: 1_000,
            hold_ttl_secs: 3_600,
            topup_webhook_secret: None,
            payout_webhook_url: None,
            payout_webhook_secret: None,
            volume_discounts: Vec::new(),
            redis_url: None,
            redis_prefix: "gs:".to_owned(),
            replica_id: None,
            score_weight_success: 0.4,
            score_weight_latency: 0.3,
            score_weight_uptime: 0.2,
            score_weight_price: 0.1,
            breaker_failures: 3,
            breaker_cooldown_ms: 10_000,
            health_check_secs: 10,
            queue_timeout_ms: 2_000,
            queue_max: 1_000,
            free_requests_per_minute: 60,
            free_tokens_per_minute: 200_000,
            premium_requests_per_minute: 3_000,
            premium_tokens_per_minute: 2_000_000,
            ip_requests_per_minute: 120,
            tls_cert: None,
            tls_key: None,
            log_format: LogFormat::Text,
            public_url: None,
            ads_enabled: true,
            ads_placement: "content".to_owned(),
            ads_prompt_placement: false,
            ads_min_relevance: 0.3,
            ads_excluded_topics: crate::ads::classify::TOPICS.iter().map(|t| (*t).to_owned()).collect(),
            ads_reserve_cpm_micros: 100_000,
            ads_provider_share_bp: 2_000,
            ads_free_opt_out: false,
            allow_query_api_key: false,
            ws_max_session_secs: 3_600,
            allow_private_providers: false,
            price_ceiling_per_token: 0.001,
            price_ceiling_per_hour: 100.0,
            price_bounds: BTreeMap::new(),
            max_provider_streams: 1_024,
            provider_max_event_bytes: 1 << 20,
            provider_max_response_bytes: 64 << 20,
            request_deadline_secs: 600,
            responses_retention_days: 30,
            free_tier_daily_budget: 10.0,
            probation_requests: 50,
            probation_max_share: 0.1,
            payout_method_delay_secs: 86_400,
            max_connections_per_ip: 256,
            max_links_per_ip: 8,
            replica_url: None,
            replica_peers: Vec::new(),
            body_read_timeout_secs: 30,
            relay_secret_key: None,
            routing_seed: None,
            otel_endpoint: None,
            otel_service_name: "gpu-streaming-gateway".to_owned(),
            tokenizers: BTreeMap::new(),
        }
    }
}

/// Env names that the docs promise besides the generic `GATEWAY_<KEY>` form.
const ALIASES: &[(&str, &str)] = &[("GPU_STREAMING_PORT", "port")];

impl Config {
    /// `provider_stale_after_secs` in milliseconds, as liveness checks compare it.
    pub fn stale_after_ms(&self) -> i64 {
        i64::try_from(self.provider_stale_after_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }

    /// The circuit breaker's settings (`breaker_failures`, `breaker_cooldown_ms`).
    pub fn breaking(&self) -> crate::inference::health::Breaking {
        crate::inference::health::Breaking {
            threshold: self.breaker_failures,
            cooldown_ms: i64::try_from(self.breaker_cooldown_ms).unwrap_or(i64::MAX),
        }
    }

    pub fn weights(&self) -> crate::inference::health::Weights {
        crate::inference::health::Weights {
            success: self.score_weight_success,
            latency: self.score_weight_latency,
            uptime: self.score_weight_uptime,
            price: self.score_weight_price,
        }
    }

    /// Loads defaults, then the file (when given), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file, &env)
    }

    pub fn load_from(file: Option<&Path>, env: &[(String, String)]) -> Result<Self, ConfigError> {
        let mut table = toml::Table::try_from(Config::default()).map_err(|e| ConfigError::Invalid {
            key: "<defaults>".into(),
            message: e.to_string(),
        })?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
            let file_table: toml::Table = text
                .parse()
                .map_err(|source| ConfigError::Toml { path: path.to_owned(), source })?;
            for (key, value) in file_table {
                table.insert(key, value);
            }
        }
        for (name, value) in env {
            let key = if let Some((_, key)) = ALIASES.iter().find(|(alias, _)| alias == name) {
                (*key).to_owned()
            } else if let Some(rest) = name.strip_prefix("GATEWAY_") {
                rest.to_ascii_lowercase()
            } else {
                continue;
            };
            if !Self::is_key(&key) {
                // Unknown GATEWAY_* variables belong to other tools (tests, scripts).
                continue;
            }
            table.insert(key, env_value(value));
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| ConfigError::Invalid { key: e.path().to_string(), message: e.inner().to_string() })?;
        config.validate()?;
        Ok(config)
    }

    fn is_key(key: &str) -> bool {
        const KEYS: &[&str] = &[
            "host", "port", "database_url", "admin_key", "user_id_secret", "registration",
            "max_body_bytes", "shutdown_grace_secs", "provider_connect_timeout_ms",
            "first_token_timeout_secs", "idle_chunk_timeout_secs", "max_attempts",
            "provider_stale_after_secs", "provider_refresh_secs", "key_cache_ttl_secs",
            "usage_batch_max", "usage_flush_ms", "sqlite_checkpoint_ms", "platform_fee_bp", "hold_ttl_secs", "topup_webhook_secret", "payout_webhook_url", "payout_webhook_secret", "volume_discounts", "redis_url", "redis_prefix", "replica_id", "score_weight_success", "score_weight_latency", "score_weight_uptime",
            "score_weight_price", "breaker_failures", "breaker_cooldown_ms", "health_check_secs", "queue_timeout_ms", "queue_max",
            "free_requests_per_minute", "free_tokens_per_minute", "premium_requests_per_minute",
            "premium_tokens_per_minute", "ip_requests_per_minute", "tls_cert", "tls_key", "log_format",
            "public_url", "ads_enabled", "ads_placement", "ads_prompt_placement", "ads_min_relevance",
            "ads_excluded_topics", "ads_reserve_cpm_micros", "ads_provider_share_bp", "ads_free_opt_out",
            "allow_query_api_key", "ws_max_session_secs", "allow_private_providers", "price_ceiling_per_token", "price_ceiling_per_hour", "price_bounds", "max_provider_streams",
            "provider_max_event_bytes", "provider_max_response_bytes", "request_deadline_secs",
            "responses_retention_days", "otel_endpoint", "otel_service_name", "tokenizers",
            "free_tier_daily_budget", "probation_requests", "probation_max_share", "payout_method_delay_secs",
            "max_connections_per_ip", "max_links_per_ip", "replica_url", "replica_peers", "body_read_timeout_secs", "relay_secret_key", "routing_seed",
        ];
        KEYS.contains(&key)
    }

    /// This replica's id: `replica_id`, or the host name and `port`.
    pub fn replica(&self) -> String {
        self.replica_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
            format!("{}:{}", if host.is_empty() { "gateway" } else { host.as_str() }, self.port)
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| {
            Err(ConfigError::Invalid { key: key.to_owned(), message: message.to_owned() })
        };
        if !(self.database_url.starts_with("sqlite:") || self.database_url.starts_with("postgres")) {
            return invalid("database_url", "must start with sqlite: or postgres://");
        }
        for (key, v) in [
            ("free_requests_per_minute", self.free_requests_per_minute),
            ("free_tokens_per_minute", self.free_tokens_per_minute),
            ("premium_requests_per_minute", self.premium_requests_per_minute),
            ("premium_tokens_per_minute", self.premium_tokens_per_minute),
            ("ip_requests_per_minute", self.ip_requests_per_minute),
        ] {
            if v == 0 {
                return invalid(key, "must be at least 1");
            }
        }
        let weights = [self.score_weight_success, self.score_weight_latency, self.score_weight_uptime, self.score_weight_price];
        if weights.iter().any(|w| !w.is_finite() || *w < 0.0) || weights.iter().sum::<f64>() <= 0.0 {
            return invalid("score_weight_success", "score weights must be non-negative and not all zero");
        }
        if self.breaker_failures == 0 {
            return invalid("breaker_failures", "must be at least 1");
        }
        if self.redis_prefix.is_empty() || self.redis_prefix.len() > 64 || self.redis_prefix.chars().any(char::is_whitespace) {
            return invalid("redis_prefix", "must be 1 to 64 characters without spaces");
        }
        if self.replica_id.as_ref().is_some_and(|id| id.is_empty() || id.len() > 128 || id.chars().any(char::is_whitespace)) {
            return invalid("replica_id", "must be 1 to 128 characters without spaces");
        }
        if self.max_attempts == 0 {
            return invalid("max_attempts", "must be at least 1");
        }
        if self.usage_batch_max == 0 {
            return invalid("usage_batch_max", "must be at least 1");
        }
        let ceilings = [("price_ceiling_per_token", Some(self.price_ceiling_per_token)), ("price_ceiling_per_hour", Some(self.price_ceiling_per_hour))];
        let overrides = self.price_bounds.values().flat_map(|b| [("price_bounds", b.per_token), ("price_bounds", b.per_hour)]);
        for (key, v) in ceilings.into_iter().chain(overrides) {
            if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
                return invalid(key, "prices must be non-negative USD amounts");
            }
        }
        if !self.free_tier_daily_budget.is_finite() || self.free_tier_daily_budget < 0.0 {
            return invalid("free_tier_daily_budget", "must be a non-negative amount in USD (0 turns the free tier off)");
        }
        if !(0.0..=1.0).contains(&self.probation_max_share) {
            return invalid("probation_max_share", "must be between 0 and 1");
        }
        if self.max_connections_per_ip == 0 {
            return invalid("max_connections_per_ip", "must be at least 1");
        }
        if self.max_links_per_ip == 0 {
            return invalid("max_links_per_ip", "must be at least 1");
        }
        let is_url = |u: &String| (u.starts_with("http://") || u.starts_with("https://")) && !u.ends_with('/');
        if self.replica_url.as_ref().is_some_and(|u| !is_url(u)) || !self.replica_peers.iter().all(is_url) {
            return invalid("replica_url", "replica_url and every replica_peers entry must be an http(s):// URL without a trailing slash");
        }
        if self.replica_url.as_ref().is_some_and(|u| !self.replica_peers.contains(u)) {
            return invalid("replica_peers", "must list replica_url (every replica's address, this one's too)");
        }
        if self.body_read_timeout_secs == 0 {
            return invalid("body_read_timeout_secs", "must be at least 1");
        }
        if self.ws_max_session_secs == 0 {
            return invalid("ws_max_session_secs", "must be at least 1");
        }
        if self.max_provider_streams == 0 {
            return invalid("max_provider_streams", "must be at least 1");
        }
        if self.provider_max_event_bytes < 1024 {
            return invalid("provider_max_event_bytes", "must be at least 1024");
        }
        if self.provider_max_response_bytes < self.provider_max_event_bytes as u64 {
            return invalid("provider_max_response_bytes", "must be at least provider_max_event_bytes");
        }
        if self.request_deadline_secs == 0 {
            return invalid("request_deadline_secs", "must be at least 1");
        }
        if self.responses_retention_days == 0 {
            return invalid("responses_retention_days", "must be at least 1 (use `store: false` on requests to keep nothing)");
        }
        if self.sqlite_checkpoint_ms == 0 {
            return invalid("sqlite_checkpoint_ms", "must be at least 1");
        }
        if self.payout_webhook_url.is_some() != self.payout_webhook_secret.is_some() {
            return invalid("payout_webhook_url", "payout_webhook_url and payout_webhook_secret must be given together");
        }
        if self.volume_discounts.iter().any(|d| d.discount_bp > 10_000) {
            return invalid("volume_discounts", "discount_bp must be at most 10000 (100%)");
        }
        if !matches!(self.ads_placement.as_str(), "content" | "metadata" | "prompt") {
            return invalid("ads_placement", "must be content, metadata or prompt");
        }
        if self.ads_placement == "prompt" && !self.ads_prompt_placement {
            return invalid("ads_placement", "prompt placement needs ads_prompt_placement = true");
        }
        if let Some(t) = self.ads_excluded_topics.iter().find(|t| !crate::ads::classify::TOPICS.contains(&t.as_str())) {
            return invalid("ads_excluded_topics", &format!("unknown topic {t}; known: {}", crate::ads::classify::TOPICS.join(", ")));
        }
        if !(0.0..=1.0).contains(&self.ads_min_relevance) {
            return invalid("ads_min_relevance", "must be between 0 and 1");
        }
        if self.ads_provider_share_bp > 10_000 {
            return invalid("ads_provider_share_bp", "must be at most 10000 (100%)");
        }
        if self.ads_reserve_cpm_micros < 0 {
            return invalid("ads_reserve_cpm_micros", "must not be negative");
        }
        if self.platform_fee_bp > 10_000 {
            return invalid("platform_fee_bp", "must be at most 10000 (100%)");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return invalid("tls_cert", "tls_cert and tls_key must be given together");
        }
        if self.tokenizers.keys().any(|model| model.trim().is_empty()) {
            return invalid("tokenizers", "model ids must not be empty");
        }
        if let Some(key) = &self.admin_key {
            if key.expose().len() < 16 {
                return invalid("admin_key", "must be at least 16 characters");
            }
        }
        Ok(())
    }
}

/// Environment values are TOML scalars when they parse as one (`3002`, `true`), arrays
/// and inline tables when they start with `[` or `{`, strings otherwise.
fn env_value(raw: &str) -> toml::Value {
    if raw.trim_start().starts_with(['[', '{']) {
        if let Ok(table) = format!("v = {raw}").parse::<toml::Table>() {
            if let Some(v) = table.get("v") {
                return v.clone();
            }
        }
    }
    if let Ok(i) = raw.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if let Ok(f) = raw.parse::<f64>() {
        return toml::Value::Float(f);
    }
    if let Ok(b) = raw.parse::<bool>() {
        return toml::Value::Boolean(b);
    }
    toml::Value::String(raw.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    /// Every key can be set from the environment (a key missing from `is_key` was
    /// silently ignored as `GATEWAY_<KEY>`).
    #[test]
    fn every_key_is_settable_from_the_environment() {
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        for key in defaults.keys() {
            assert!(Config::is_key(key), "{key} is missing from Config::is_key");
        }
        let c = Config::load_from(None, &env(&[("GATEWAY_MAX_CONNECTIONS_PER_IP", "7"), ("GATEWAY_RELAY_SECRET_KEY", "k")])).unwrap();
        assert_eq!(c.max_connections_per_ip, 7);
        assert_eq!(c.relay_secret_key.unwrap().expose(), "k");
    }

    #[test]
    fn replicas_name_each_other_by_url() {
        let peers = r#"["http://10.0.0.5:8080", "http://10.0.0.6:8080"]"#;
        let c = Config::load_from(None, &env(&[("GATEWAY_REPLICA_URL", "http://10.0.0.5:8080"), ("GATEWAY_REPLICA_PEERS", peers)])).unwrap();
        assert_eq!(c.replica_peers.len(), 2);
        let err = Config::load_from(None, &env(&[("GATEWAY_REPLICA_URL", "http://10.0.0.7:8080"), ("GATEWAY_REPLICA_PEERS", peers)]));
        assert!(err.unwrap_err().to_string().contains("replica_peers"));
        assert!(Config::load_from(None, &env(&[("GATEWAY_REPLICA_PEERS", r#"["10.0.0.5:8080"]"#)])).is_err());
    }

    #[test]
    fn env_overrides_file_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(&path, "port = 4000\nmax_attempts = 2\n").unwrap();
        let config = Config::load_from(
            Some(&path),
            &env(&[("GPU_STREAMING_PORT", "5000"), ("GATEWAY_DATABASE_URL", "postgres://x/y")]),
        )
        .unwrap();
        assert_eq!(config.port, 5000);
        assert_eq!(config.max_attempts, 2);
        assert_eq!(config.database_url, "postgres://x/y");
        assert_eq!(Config::load_from(None, &[]).unwrap().port, 3002);
    }

    #[test]
    fn bad_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(&path, "prot = 4000\n").unwrap();
        let err = Config::load_from(Some(&path), &[]).unwrap_err().to_string();
        assert!(err.contains("prot"), "{err}");
        let err = Config::load_from(None, &env(&[("GATEWAY_MAX_ATTEMPTS", "many")])).unwrap_err();
        assert!(err.to_string().contains("max_attempts"), "{err}");
    }

    #[test]
    fn volume_discounts_from_file_and_env() {
        let raw = "[{ monthly_tokens = 1000, discount_bp = 500 }]";
        let config = Config::load_from(None, &env(&[("GATEWAY_VOLUME_DISCOUNTS", raw)])).unwrap();
        assert_eq!(config.volume_discounts, vec![VolumeDiscount { monthly_tokens: 1000, discount_bp: 500 }]);
        let bad = "[{ monthly_tokens = 1000, discount_bp = 50000 }]";
        assert!(Config::load_from(None, &env(&[("GATEWAY_VOLUME_DISCOUNTS", bad)])).is_err());
    }

    #[test]
    fn tokenizers_from_file_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(&path, "[tokenizers]\n\"org/model:v1\" = \"/models/m.gguf\"\nsmall = \"/models/small\"\n").unwrap();
        let config = Config::load_from(Some(&path), &[]).unwrap();
        assert_eq!(config.tokenizers.get("org/model:v1"), Some(&PathBuf::from("/models/m.gguf")));
        assert_eq!(config.tokenizers.get("small"), Some(&PathBuf::from("/models/small")));
        let raw = r#"{ "smollm2-135m-instruct" = "/m/SmolLM2.gguf" }"#;
        let config = Config::load_from(Some(&path), &env(&[("GATEWAY_TOKENIZERS", raw)])).unwrap();
        assert_eq!(config.tokenizers.len(), 1, "env replaces the file's table");
        assert_eq!(config.tokenizers["smollm2-135m-instruct"], PathBuf::from("/m/SmolLM2.gguf"));
        let err = Config::load_from(None, &env(&[("GATEWAY_TOKENIZERS", r#"{ "" = "/x" }"#)])).unwrap_err();
        assert!(err.to_string().contains("tokenizers"), "{err}");
        let err = Config::load_from(None, &env(&[("GATEWAY_TOKENIZERS", "/just/a/path")])).unwrap_err();
        assert!(err.to_string().contains("tokenizers"), "{err}");
    }

    #[test]
    fn price_bounds_from_file_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(&path, "price_ceiling_per_token = 0.0005\n[price_bounds]\n\"big\" = { per_token = 0.01, per_hour = 500 }\n").unwrap();
        let config = Config::load_from(Some(&path), &[]).unwrap();
        assert_eq!(config.price_ceiling_per_token, 0.0005);
        assert_eq!(config.price_bounds["big"], PriceBound { per_token: Some(0.01), per_hour: Some(500.0) });
        let config = Config::load_from(None, &env(&[("GATEWAY_PRICE_BOUNDS", r#"{ "m" = { per_hour = 7 } }"#)])).unwrap();
        assert_eq!(config.price_bounds["m"], PriceBound { per_token: None, per_hour: Some(7.0) });
        for (key, raw) in [
            ("GATEWAY_PRICE_BOUNDS", r#"{ "m" = { per_tokens = 1 } }"#),
            ("GATEWAY_PRICE_BOUNDS", r#"{ "m" = { per_token = -1 } }"#),
            ("GATEWAY_PRICE_CEILING_PER_HOUR", "-3"),
            ("GATEWAY_MAX_PROVIDER_STREAMS", "0"),
        ] {
            let err = Config::load_from(None, &env(&[(key, raw)])).unwrap_err();
            let named = key.trim_start_matches("GATEWAY_").to_ascii_lowercase();
            assert!(err.to_string().contains(&named), "{key}={raw}: {err}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("sk-very-secret");
        assert!(!format!("{s:?}").contains("very"));
    }
}
