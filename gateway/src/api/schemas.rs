//! The shapes of responses built with `json!` (so the OpenAPI document can describe
//! them field by field) and the error rows the handlers' annotations share, one type
//! per kind of failure.

use serde::Serialize;
use utoipa::ToSchema;

// --- Schemas of the `json!` responses -------------------------------------------------

/// One server-sent event of a streamed completion (`text/event-stream`).
#[derive(Serialize, ToSchema)]
pub struct ServerSentEvent {
    /// A chunk as JSON (a `ChatCompletionChunk`, or a `text_completion` chunk on
    /// `/v1/completions`), `[DONE]` at the end, or `{"error":{…}}` when the provider
    /// failed after the first token.
    pub data: String,
}

/// `GET /health`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    pub status: HealthStatus,
    pub database: DatabaseStatus,
    pub active_streams: u64,
    /// Providers registered (any status).
    pub providers: u64,
    pub replica: ReplicaView,
}

/// This replica and its view of what the replicas share.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaView {
    /// `replica_id` (the host name and port when not configured).
    pub id: String,
    /// Replicas heard from on this database in the last 15 s, this one included.
    pub live_replicas: u32,
    /// How provider slots are counted: `shared` (Redis leases, fleet-wide), `fallback`
    /// (Redis unreachable: each replica uses cap ÷ live replicas) or `local` (one
    /// replica, no Redis).
    pub capacity: String,
    /// How provider health (breakers, scores) is judged: `shared` (the fleet's, through
    /// Redis), `alone` (Redis unreachable: this replica's own) or `local` (no Redis).
    pub health: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Ok,
    Degraded,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseStatus {
    Ok,
    Unreachable,
}

/// `GET /v1/models`.
#[derive(Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<ModelObject>,
}

/// A model some live provider serves.
#[derive(Serialize, ToSchema)]
pub struct ModelObject {
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Unix seconds: when the first provider serving it registered.
    pub created: u32,
    pub owned_by: String,
}

/// `GET /api/llm/models`.
#[derive(Serialize, ToSchema)]
pub struct LlmModels {
    pub models: Vec<LlmModel>,
}

#[derive(Serialize, ToSchema)]
pub struct LlmModel {
    pub id: String,
    /// Live providers serving it.
    pub providers: u64,
    /// Quality streams on line for it, sorted.
    pub qualities: Vec<String>,
}

/// `GET /api/llm/status`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LlmStatus {
    pub providers_online: u64,
    pub providers_registered: u64,
    pub active_streams: u64,
    /// Requests waiting for a provider slot.
    pub queue: u64,
    pub models: Vec<String>,
}

/// A list of reservations.
#[derive(Serialize, ToSchema)]
pub struct ReservationList {
    pub object: String,
    pub data: Vec<crate::money::reservations::Reservation>,
}

/// `GET /api/llm/balance`: USD.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OwnBalance {
    pub user_id: String,
    pub balance: f64,
    pub held: f64,
    pub available: f64,
}

/// A user account's balance, in USD and micro-USD.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserBalance {
    /// The ledger account (`user:…`, `provider:…`).
    pub account: String,
    pub balance: f64,
    pub held: f64,
    pub available: f64,
    pub balance_micros: i64,
    pub held_micros: i64,
    pub available_micros: i64,
}

/// `GET /api/payment/balance/{provider_id}`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderBalance {
    pub provider_id: String,
    pub account: String,
    pub balance: f64,
    pub held: f64,
    pub available: f64,
    pub balance_micros: i64,
    pub held_micros: i64,
    pub available_micros: i64,
}

/// One account's ledger lines, newest first.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct History {
    pub object: String,
    pub data: Vec<HistoryLine>,
    /// Pass as `before` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryLine {
    /// The journal entry id.
    pub id: String,
    /// `usage`, `credit`, `topup`, `withdrawal`, `reservation`, …
    pub kind: String,
    pub request_id: Option<String>,
    pub memo: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// USD; negative for debits.
    pub amount: f64,
    pub amount_micros: i64,
}

/// A list of keys.
#[derive(Serialize, ToSchema)]
pub struct KeyList {
    pub object: String,
    pub data: Vec<openapi::platform::KeyInfo>,
}

/// A revoked key.
#[derive(Serialize, ToSchema)]
pub struct KeyRevoked {
    pub id: String,
    pub revoked: bool,
}

/// A list of providers.
#[derive(Serialize, ToSchema)]
pub struct ProviderList {
    pub object: String,
    pub data: Vec<openapi::platform::ProviderInfo>,
}

/// A provider's new status.
#[derive(Serialize, ToSchema)]
pub struct ProviderStatusChange {
    pub id: String,
    /// `active` or `suspended`.
    pub status: String,
}

/// `POST /api/gpu/stream/start`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamStarted {
    pub provider_id: String,
    pub model: String,
    pub quality: String,
    pub streaming: bool,
    /// The provider's status: `active`, `pending` (awaiting approval) or `suspended`.
    pub status: String,
}

/// `POST /api/gpu/stream/stop`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamStopped {
    pub provider_id: String,
    pub model: String,
    pub quality: String,
    pub streaming: bool,
}

/// `POST /api/gpu/heartbeat`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatAck {
    pub provider_id: String,
    pub ok: bool,
}

/// A quality level.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QualityLevelInfo {
    pub name: String,
    pub multiplier: f64,
    pub latency_multiplier: f64,
    pub cost_multiplier: f64,
    pub max_tokens: u32,
    pub priority: i32,
    pub min_provider_score: f64,
    /// `full`: only providers that list `full` in `capabilities.precisions` serve the
    /// level, asked for full precision; `reduced`: any provider, reduced precision allowed.
    pub precision: openapi::platform::Precision,
    pub custom: bool,
}

/// A list of quality levels.
#[derive(Serialize, ToSchema)]
pub struct QualityLevelList {
    pub object: String,
    pub data: Vec<QualityLevelInfo>,
}

/// A list of withdrawals.
#[derive(Serialize, ToSchema)]
pub struct WithdrawalList {
    pub object: String,
    pub data: Vec<crate::money::payments::Withdrawal>,
}

/// `PUT /api/payment/method`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MethodSet {
    pub provider_id: String,
    pub method: crate::money::payments::PayoutMethod,
    /// When withdrawals start going to it (ms since the epoch): at once for a first
    /// method or an admin's change, else `payout_method_delay_secs` later.
    pub effective_at: i64,
}

/// Payout settings: amounts in USD, `processingFee` in percent.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PayoutSettingsView {
    pub minimum_withdrawal: f64,
    pub auto_payout_threshold: f64,
    pub processing_fee: f64,
}

/// `POST /api/payment/topup`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopUpResult {
    pub event_id: String,
    /// False when this event was applied before (a retried webhook).
    pub applied: bool,
    /// The user's posted balance, USD.
    pub balance: f64,
}

/// `GET /api/analytics/revenue`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Revenue {
    /// Unix milliseconds, inclusive.
    pub from: i64,
    /// Unix milliseconds, exclusive.
    pub to: i64,
    pub total: RevenueTotal,
    pub by_source: RevenueBySource,
    pub daily: Vec<RevenueDay>,
    pub monthly: Vec<RevenueMonth>,
    pub by_model: Vec<SpendBy>,
    pub by_provider: Vec<SpendBy>,
    pub series: RevenueSeries,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevenueTotal {
    pub fees: f64,
    pub fees_micros: i64,
    pub ad_revenue_balance_change: f64,
    pub ad_revenue_balance_change_micros: i64,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevenueBySource {
    pub fees: f64,
    pub fees_micros: i64,
    pub ads: f64,
    pub ads_micros: i64,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevenueDay {
    /// `YYYY-MM-DD` (UTC).
    pub date: String,
    pub fees: f64,
    pub fees_micros: i64,
    pub ads: f64,
    pub ads_micros: i64,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevenueMonth {
    /// `YYYY-MM` (UTC).
    pub month: String,
    pub fees: f64,
    pub fees_micros: i64,
    pub ads: f64,
    pub ads_micros: i64,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpendBy {
    pub key: String,
    /// USD.
    pub spend: f64,
    pub spend_micros: i64,
    pub requests: i64,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevenueSeries {
    pub bucket_ms: i64,
    pub data: Vec<RevenuePoint>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevenuePoint {
    /// Bucket start, Unix milliseconds.
    pub t: i64,
    pub fees: f64,
    pub fees_micros: i64,
    pub ads: f64,
    pub ads_micros: i64,
    pub billed_users: f64,
    pub billed_users_micros: i64,
    pub billed_ad_funded: f64,
    pub billed_ad_funded_micros: i64,
}

/// `GET /api/analytics/usage`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageReport {
    pub from: i64,
    pub to: i64,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// Share of requests that did not end `ok`, in [0, 1].
    pub error_rate: f64,
    pub by_model_and_quality: Vec<UsageGroup>,
    pub peak_hours: Vec<PeakHour>,
    pub active_providers: i64,
    pub series: UsageSeries,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageGroup {
    pub model: String,
    pub quality: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub errors: i64,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeakHour {
    pub hour_utc: i64,
    pub requests: i64,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageSeries {
    pub bucket_ms: i64,
    pub tokens_by_model: Vec<TokensPoint>,
    pub requests_by_quality: Vec<RequestsPoint>,
}

#[derive(Serialize, ToSchema)]
pub struct TokensPoint {
    pub t: i64,
    pub model: String,
    pub tokens: i64,
}

#[derive(Serialize, ToSchema)]
pub struct RequestsPoint {
    pub t: i64,
    pub quality: String,
    pub requests: i64,
}

// --- error responses, declared once -------------------------------------------------

// Each is one row of an operation's `responses(...)`: an OpenAI-shaped error body with
// the status and meaning every route that can answer it shares.

#[derive(utoipa::IntoResponses)]
#[response(status = 400, description = "Invalid request: a bad or missing field (`param` names it) or malformed JSON.")]
pub struct BadRequest(#[allow(dead_code)] openapi::error::ErrorBody);

#[derive(utoipa::IntoResponses)]
#[response(status = 401, description = "Missing or wrong key.")]
pub struct Unauthorized(#[allow(dead_code)] openapi::error::ErrorBody);

#[derive(utoipa::IntoResponses)]
#[response(status = 403, description = "The admin API is disabled (no admin key is configured).")]
pub struct AdminDisabled(#[allow(dead_code)] openapi::error::ErrorBody);

#[derive(utoipa::IntoResponses)]
#[response(status = 404, description = "No such resource.")]
pub struct NotFound(#[allow(dead_code)] openapi::error::ErrorBody);

#[derive(utoipa::IntoResponses)]
#[response(status = 409, description = "Conflicts with the current state.")]
pub struct Conflict(#[allow(dead_code)] openapi::error::ErrorBody);

#[derive(utoipa::IntoResponses)]
#[response(status = 413, description = "The request body is larger than `max_body_bytes`.")]
pub struct PayloadTooLarge(#[allow(dead_code)] openapi::error::ErrorBody);

#[derive(utoipa::IntoResponses)]
#[response(status = 415, description = "The body is not JSON (`Content-Type` must be `application/json`).")]
pub struct UnsupportedMediaType(#[allow(dead_code)] openapi::error::ErrorBody);

#[derive(utoipa::IntoResponses)]
#[response(status = 429, description = "Rate limited (`retry-after`).")]
pub struct RateLimited(#[allow(dead_code)] openapi::error::ErrorBody);

#[derive(utoipa::IntoResponses)]
#[response(status = 429, description = "Rate limited (`retry-after`), or the prepaid balance or a spending limit does not cover the request (`x-should-retry: false`).")]
pub struct RateLimitedOrNoFunds(#[allow(dead_code)] openapi::error::ErrorBody);

#[derive(utoipa::IntoResponses)]
#[response(status = 429, description = "Too many requests from this IP address (`retry-after`).")]
pub struct IpRateLimited(#[allow(dead_code)] openapi::error::ErrorBody);

#[derive(utoipa::IntoResponses)]
#[response(status = 502, description = "The provider failed before the first token on every attempt.")]
pub struct ProviderFailed(#[allow(dead_code)] openapi::error::ErrorBody);

#[derive(utoipa::IntoResponses)]
#[response(status = 503, description = "No provider is available for the model right now (`retry-after`).")]
pub struct NoProvider(#[allow(dead_code)] openapi::error::ErrorBody);

/// What every request the relay serves (chat, completions, responses, the simple API)
/// may also fail with: its body, its funding and limits, and the providers.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum RelayFailures {
    #[response(status = 413, description = "The request body is larger than `max_body_bytes`.")]
    PayloadTooLarge(openapi::error::ErrorBody),
    #[response(status = 415, description = "The body is not JSON (`Content-Type` must be `application/json`).")]
    UnsupportedMediaType(openapi::error::ErrorBody),
    #[response(status = 429, description = "Rate limited (`retry-after`), or the prepaid balance or a spending limit does not cover the request (`x-should-retry: false`).")]
    RateLimitedOrNoFunds(openapi::error::ErrorBody),
    #[response(status = 502, description = "The provider failed before the first token on every attempt.")]
    ProviderFailed(openapi::error::ErrorBody),
    #[response(status = 503, description = "No provider is available for the model right now (`retry-after`).")]
    NoProvider(openapi::error::ErrorBody),
    #[response(status = 504, description = "The provider did not answer in time.")]
    ProviderTimeout(openapi::error::ErrorBody),
}
