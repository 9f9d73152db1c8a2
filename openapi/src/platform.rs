//! The platform API: provider registration and streams, keys, the seed's simple API.
//! Field names follow the seed's camelCase.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::openai::AdPreferences;
use crate::stream::Usage;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisterProviderRequest {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub gpu_info: serde_json::Value,
    pub capabilities: Capabilities,
    pub pricing: Pricing,
    /// Where the provider's OpenAI-compatible server listens; required for a `direct`
    /// provider, left out for a `dialOut` one.
    #[serde(default)]
    #[schema(pattern = "^https?://")]
    pub base_url: Option<String>,
    /// How the gateway reaches it (default `direct`).
    #[serde(default)]
    pub connection: Connection,
}

/// How the gateway reaches a provider. `direct`: it connects to the provider's
/// `baseUrl`. `dialOut`: the provider (a worker behind NAT) connects out to the gateway
/// (`GET /api/gpu/link` with `Upgrade: gs-link`) and the gateway sends requests over
/// that connection as HTTP/2 streams; it needs no address anyone can reach.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum Connection {
    #[default]
    Direct,
    DialOut,
}

impl Connection {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::DialOut => "dialOut",
        }
    }

    /// The stored form back (anything unknown is `direct`).
    pub fn parse(s: &str) -> Self {
        if s == "dialOut" { Self::DialOut } else { Self::Direct }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    /// Model ids, none blank.
    #[schema(min_items = 1)]
    pub models: Vec<String>,
    #[schema(minimum = 1)]
    pub max_concurrent_streams: u32,
    #[serde(default = "default_qualities")]
    pub supported_qualities: Vec<String>,
    /// Optional request features the provider honours (`tools`, `logprobs`,
    /// `response_format`, `n`, `logit_bias`, `seed`, `penalties`, `stop`, `vision`).
    /// Absent means "everything", as for a generic OpenAI-compatible server.
    #[serde(default)]
    pub features: Option<Vec<String>>,
    /// The numeric precisions the provider can serve (see `Precision`). Absent means
    /// `["full"]`: a provider that makes no claim serves its model as loaded, so it
    /// gets every tier, including those that require full precision.
    #[serde(default = "default_precisions")]
    #[schema(min_items = 1)]
    pub precisions: Vec<Precision>,
    /// The `http://` base URL also speaks HTTP/2 without TLS (h2c, prior knowledge):
    /// the gateway then multiplexes its streams to the provider over one connection
    /// instead of holding a connection per stream. `https://` URLs negotiate HTTP/2
    /// by ALPN whatever this says. Absent means `false` (HTTP/1.1).
    #[serde(default)]
    pub http2: bool,
    /// Embedding models it serves on `/v1/embeddings` (none blank, none also in
    /// `models`, at most 16). Chat requests never go to them. Absent means none.
    #[serde(default)]
    pub embedding_models: Vec<String>,
}

fn default_qualities() -> Vec<String> {
    ["low", "standard", "high", "ultra"].iter().map(|s| (*s).to_owned()).collect()
}

fn default_precisions() -> Vec<Precision> {
    vec![Precision::Full]
}

/// Numeric precision. `full`: the model's math as loaded (our worker: exact f32 on
/// exactly dequantized weights). `reduced`: faster kernels whose results differ in
/// rounding (our worker: fused quantized kernels). The gateway sends it to providers
/// as the request body's `precision` (`reduced` there means reduced precision is
/// allowed); a quality level's `precision` is what its requests require.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Full,
    Reduced,
}

/// Prices in USD as the seed sends them, each with an exact integer twin: micro-USD
/// per million tokens for `perToken`, micro-USD for the others. Either form is
/// accepted (both given, they must agree); both are returned. The gateway stores the
/// integers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Pricing {
    /// USD per token (absent: `perTokenPerMillionMicros` is required).
    #[serde(default = "absent")]
    #[schema(minimum = 0, maximum = 1000)]
    pub per_token: f64,
    /// Micro-USD per million tokens: `perToken` exactly (2 µUSD a token = 2000000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub per_token_per_million_micros: Option<i64>,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub per_hour: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub per_hour_micros: Option<i64>,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub minimum_payout: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub minimum_payout_micros: Option<i64>,
}

/// `perToken` left out (NaN never comes from JSON, so it marks the absence).
fn absent() -> f64 {
    f64::NAN
}

impl Pricing {
    /// USD prices with their exact twins unset (the gateway fills them in responses).
    pub fn usd(per_token: f64, per_hour: f64, minimum_payout: f64) -> Self {
        Self {
            per_token,
            per_token_per_million_micros: None,
            per_hour,
            per_hour_micros: None,
            minimum_payout,
            minimum_payout_micros: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisterProviderResponse {
    pub provider_id: String,
    /// Shown once; the gateway stores only its hash.
    pub provider_key: String,
    pub status: String,
    /// What the gateway sends as `Authorization: Bearer …` on every call to this
    /// provider; its worker refuses `/v1/*` without it. Shown once, derived from the
    /// provider key (not stored), and replaced when the key is rotated.
    #[serde(default)]
    pub relay_secret: String,
}

/// `POST /api/gpu/keys/rotate`: the provider whose key (the bearer) is replaced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotateKeyRequest {
    pub provider_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotatedKey {
    pub provider_id: String,
    /// The new key, shown once; the old one stops working at once.
    pub provider_key: String,
    /// The new relay secret (the old one stops working at once).
    #[serde(default)]
    pub relay_secret: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamControl {
    pub provider_id: String,
    pub model: String,
    #[serde(default = "default_quality")]
    pub quality: String,
}

fn default_quality() -> String {
    "standard".to_owned()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    pub provider_id: String,
    #[serde(default)]
    pub active_streams: u32,
    #[serde(default)]
    pub queue_length: u32,
    #[serde(default)]
    pub free_memory_mb: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateKeyRequest {
    /// Not blank.
    #[schema(pattern = "\\S")]
    pub name: String,
    /// `free` (the default) or `premium`.
    #[serde(default = "default_tier")]
    #[schema(pattern = "^(free|premium)$")]
    pub tier: String,
    /// Attach the key to an existing user; a new user is created otherwise.
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    #[serde(default)]
    pub tokens_per_minute: Option<u32>,
    /// Spending limit per UTC day, USD.
    #[serde(default)]
    pub daily_limit: Option<f64>,
    /// Spending limit per calendar month (UTC), USD.
    #[serde(default)]
    pub monthly_limit: Option<f64>,
}

fn default_tier() -> String {
    "free".to_owned()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedKey {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub tier: String,
    /// The secret, shown once.
    pub key: String,
    pub prefix: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyInfo {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub tier: String,
    pub prefix: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    /// The key's own limits; null means the tier's default (rate) or none (spending).
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    /// Spending limits, micro-USD per UTC day and calendar month.
    pub daily_limit_micros: Option<i64>,
    pub monthly_limit_micros: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderInfo {
    pub id: String,
    pub name: String,
    /// `null` for a `dialOut` provider.
    pub base_url: Option<String>,
    pub connection: Connection,
    pub status: String,
    pub gpu_info: serde_json::Value,
    pub capabilities: Capabilities,
    pub pricing: Pricing,
    /// `model:quality` streams that are on line.
    pub streams: Vec<StreamControlInfo>,
    pub online: bool,
    pub active_requests: u32,
    pub last_heartbeat_at: Option<i64>,
    pub created_at: i64,
    /// Requests whose usage report was implausible and billed on the gateway's count.
    pub usage_flags: u64,
    /// Routing score in [0, 1] (success rate, TTFT, uptime, price, honesty).
    pub score: f64,
    /// Success rate, TTFT, uptime, honesty (EWMAs) and the circuit breaker's state.
    pub health: serde_json::Value,
    /// Requests it must still serve well before it leaves probation (0: trusted).
    #[serde(default)]
    pub probation_remaining: u32,
    /// Why its status was last changed (an admin's note, or a refused `baseUrl`).
    #[serde(default)]
    pub status_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamControlInfo {
    pub model: String,
    pub quality: String,
}

/// The seed's `POST /api/llm/inference` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[schema(example = json!({"prompt": "What is the capital of France?", "model": "llama-3.1-8b-instruct", "options": {"quality": "standard", "maxTokens": 16}}))]
#[serde(rename_all = "camelCase")]
pub struct InferenceRequest {
    pub prompt: String,
    pub model: String,
    #[serde(default)]
    pub options: InferenceOptions,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferenceOptions {
    #[serde(default)]
    pub quality: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub ad_preferences: Option<AdPreferences>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferenceResponse {
    pub result: String,
    pub model: String,
    pub quality: String,
    pub finish_reason: Option<String>,
    pub usage: Usage,
    pub request_id: String,
    /// Free tier: the labelled ad this answer carries (also appended to `result`
    /// with the `content` placement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ad: Option<crate::ads::Ad>,
}
