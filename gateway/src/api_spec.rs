//! The OpenAPI 3.1 document, generated from the code with utoipa.
//!
//! Each handler carries its own `#[utoipa::path]` (method, path, body, parameters,
//! every status it answers with); `ApiDoc` lists the handlers. Request and response
//! types derive `ToSchema` where they are defined (the `openapi` crate, or next to the
//! handler for a body only one handler reads). Handlers that answer with a
//! `serde_json::Value` are described by the schemas below, which follow the `json!`
//! they build field by field; schemathesis checks every response against them.
//!
//! Schema names are global to the document and utoipa does not detect a clash: a second
//! `ToSchema` type with the same name silently replaces the first (name new ones for
//! what they hold, or use `#[schema(as = …)]`).
//!
//! `gateway openapi` prints the document; the checked-in copy is `openapi/openapi.json`
//! and a test fails when it differs from what the code generates.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// Security scheme names, as used in `security(...)` of the path attributes.
pub const USER_KEY: &str = "user_key";
pub const PROVIDER_KEY: &str = "provider_key";
pub const ADMIN_KEY: &str = "admin_key";
pub const SIGNATURE: &str = "signature";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "GPU Streaming gateway",
        description = "An OpenAI-compatible LLM gateway in front of a marketplace of GPU providers. \
            Errors are always `{\"error\":{\"message\",\"type\",\"param\",\"code\"}}`; every response \
            carries `x-request-id`; authenticated user responses carry OpenAI's `x-ratelimit-*` headers.",
        license(name = "MIT")
    ),
    paths(
        crate::openai_api::chat_completions,
        crate::openai_api::completions,
        crate::openai_api::list_models,
        crate::openai_api::get_model,
        crate::responses_api::create_response,
        crate::responses_api::get_response,
        crate::responses_api::delete_response,
        crate::simple_api::inference,
        crate::simple_api::models,
        crate::simple_api::status,
        crate::simple_api::websocket,
        crate::simple_api::create_reservation,
        crate::simple_api::list_reservations,
        crate::simple_api::release_reservation,
        crate::payments_api::own_balance,
        crate::payments_api::own_transactions,
        crate::platform_api::admin_create_key,
        crate::platform_api::admin_list_keys,
        crate::platform_api::admin_revoke_key,
        crate::platform_api::admin_delete_key,
        crate::platform_api::admin_providers,
        crate::platform_api::admin_credit_user,
        crate::platform_api::admin_user_balance,
        crate::payments_api::user_transactions,
        crate::payments_api::admin_payouts,
        crate::payments_api::admin_auto_payouts,
        crate::payments_api::admin_payout_transition,
        crate::payments_api::admin_settings,
        crate::payments_api::admin_update_settings,
        crate::payments_api::revenue,
        crate::payments_api::usage,
        crate::platform_api::admin_quality_levels,
        crate::platform_api::admin_add_quality_level,
        crate::platform_api::admin_provider_approve,
        crate::platform_api::admin_provider_suspend,
        crate::ads::api::create_advertiser,
        crate::ads::api::list_advertisers,
        crate::ads::api::credit_advertiser,
        crate::ads::api::create_campaign,
        crate::ads::api::list_campaigns,
        crate::ads::api::get_campaign,
        crate::ads::api::update_campaign,
        crate::ads::api::report,
        crate::ads::api::click,
        crate::ads::api::set_preferences,
        crate::console::overview,
        crate::console::provider_earnings,
        crate::health,
        crate::metrics_text,
        serve,
        crate::platform_api::register,
        crate::platform_api::stream_start,
        crate::platform_api::stream_stop,
        crate::platform_api::rotate_key,
        crate::links::accept,
        crate::links::forwarded,
        crate::platform_api::heartbeat,
        crate::console::provider_me,
        crate::platform_api::provider_balance,
        crate::payments_api::withdraw,
        crate::payments_api::set_method,
        crate::payments_api::provider_withdrawals,
        crate::payments_api::provider_transactions,
        crate::payments_api::top_up,
        crate::payments_api::payout_webhook,
    ),
    components(schemas(openapi::stream::StreamChunk)),
    modifiers(&Security, &HeadLimit),
    tags(
        (name = "openai", description = "The OpenAI-compatible API (user keys)."),
        (name = "llm", description = "The simple API and the caller's own account (user keys)."),
        (name = "providers", description = "Provider registration, streams and heartbeats (provider keys)."),
        (name = "payments", description = "Provider balances and payouts (provider keys), signed webhooks."),
        (name = "admin", description = "Keys, providers, credit, payouts, settings, quality levels (admin key)."),
        (name = "ads", description = "Advertisers and campaigns (admin key) and the click-tracking redirect (open)."),
        (name = "analytics", description = "Revenue and usage reports (admin key)."),
        (name = "operations", description = "Health, metrics and this document (open)."),
    )
)]
struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |format: &str, description: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format(format)
                    .description(Some(description))
                    .build(),
            )
        };
        components.add_security_scheme(
            USER_KEY,
            bearer("sk-…", "A user API key (`sk-…`), made by `POST /api/admin/keys` or `gateway keys create`; `?api_key=` works too."),
        );
        components.add_security_scheme(
            PROVIDER_KEY,
            bearer("pk-…", "A provider key (`pk-…`), returned once by `POST /api/gpu/register`; it must belong to the provider the request names."),
        );
        components.add_security_scheme(ADMIN_KEY, bearer("admin key", "The gateway's admin key (`GATEWAY_ADMIN_KEY`)."));
        components.add_security_scheme(
            SIGNATURE,
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "x-signature",
                "`sha256=<hex>`: HMAC-SHA256 of the raw body with the webhook's shared secret.",
            ))),
        );
    }
}

/// Adds hyper's 431 to every operation: a request whose line and headers together pass
/// [`crate::server::MAX_HEAD_BYTES`] on the plain listener is refused before it reaches
/// a handler, so no handler's attribute can list it.
struct HeadLimit;

impl Modify for HeadLimit {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::Operation;
        use utoipa::openapi::ResponseBuilder;
        let description = format!(
            "The request line and headers together are over {} KB (plain HTTP); the server \
             answers before routing, with an empty body.",
            crate::server::MAX_HEAD_BYTES / 1024
        );
        let response = ResponseBuilder::new().description(description).build();
        for item in openapi.paths.paths.values_mut() {
            let operations: [&mut Option<Operation>; 8] = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.options,
                &mut item.head,
                &mut item.patch,
                &mut item.trace,
            ];
            for operation in operations.into_iter().flatten() {
                operation.responses.responses.insert("431".to_owned(), response.clone().into());
            }
        }
    }
}

/// The document as the code describes it.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as pretty-printed JSON with a final newline (the checked-in form).
pub fn json() -> String {
    match document().to_pretty_json() {
        Ok(mut text) => {
            text.push('\n');
            text
        }
        // Serializing a document of plain strings and maps cannot fail; answer with an
        // empty object rather than panic if it ever does.
        Err(_) => "{}\n".to_owned(),
    }
}

/// `GET /openapi.json`: this document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document.", content_type = "application/json", body = Object)),
)]
pub async fn serve() -> Response {
    static TEXT: OnceLock<String> = OnceLock::new();
    let text = TEXT.get_or_init(json).clone();
    ([(header::CONTENT_TYPE, "application/json")], text).into_response()
}

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
    pub data: Vec<crate::reservations::Reservation>,
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
    pub data: Vec<crate::payments::Withdrawal>,
}

/// `PUT /api/payment/method`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MethodSet {
    pub provider_id: String,
    pub method: crate::payments::PayoutMethod,
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
