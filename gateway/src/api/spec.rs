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
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

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
        crate::api::openai::chat_completions,
        crate::api::embeddings::create_embeddings,
        crate::api::openai::completions,
        crate::api::openai::list_models,
        crate::api::openai::get_model,
        crate::api::responses::create_response,
        crate::api::responses::get_response,
        crate::api::responses::delete_response,
        crate::api::simple::inference,
        crate::api::simple::models,
        crate::api::simple::status,
        crate::api::simple::websocket,
        crate::api::simple::create_reservation,
        crate::api::simple::list_reservations,
        crate::api::simple::release_reservation,
        crate::api::wallet::own_balance,
        crate::api::wallet::own_transactions,
        crate::api::admin::keys::admin_create_key,
        crate::api::admin::keys::admin_list_keys,
        crate::api::admin::keys::admin_revoke_key,
        crate::api::admin::keys::admin_delete_key,
        crate::api::admin::providers::admin_providers,
        crate::api::admin::users::admin_credit_user,
        crate::api::admin::users::admin_user_balance,
        crate::api::admin::users::user_transactions,
        crate::api::admin::payouts::admin_payouts,
        crate::api::admin::payouts::admin_auto_payouts,
        crate::api::admin::payouts::admin_payout_transition,
        crate::api::admin::payouts::admin_settings,
        crate::api::admin::payouts::admin_update_settings,
        crate::api::admin::reports::revenue,
        crate::api::admin::reports::usage,
        crate::api::admin::providers::admin_quality_levels,
        crate::api::admin::providers::admin_add_quality_level,
        crate::api::admin::providers::admin_provider_approve,
        crate::api::admin::providers::admin_provider_suspend,
        crate::api::admin::ads::create_advertiser,
        crate::api::admin::ads::list_advertisers,
        crate::api::admin::ads::credit_advertiser,
        crate::api::admin::ads::create_campaign,
        crate::api::admin::ads::list_campaigns,
        crate::api::admin::ads::get_campaign,
        crate::api::admin::ads::update_campaign,
        crate::api::admin::ads::report,
        crate::api::ad_choices::click,
        crate::api::ad_choices::set_preferences,
        crate::api::admin::reports::overview,
        crate::api::admin::providers::provider_earnings,
        crate::api::operations::health,
        crate::api::operations::metrics_text,
        serve,
        crate::api::gpu::register,
        crate::api::gpu::stream_start,
        crate::api::gpu::stream_stop,
        crate::api::gpu::rotate_key,
        crate::inference::links::accept,
        crate::inference::links::forwarded,
        crate::api::gpu::heartbeat,
        crate::api::console::provider_me,
        crate::api::gpu::provider_balance,
        crate::api::wallet::withdraw,
        crate::api::wallet::set_method,
        crate::api::wallet::provider_withdrawals,
        crate::api::wallet::provider_transactions,
        crate::api::wallet::top_up,
        crate::api::wallet::payout_webhook,
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
/// [`crate::edge::listener::MAX_HEAD_BYTES`] on the plain listener is refused before it reaches
/// a handler, so no handler's attribute can list it.
struct HeadLimit;

impl Modify for HeadLimit {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::Operation;
        use utoipa::openapi::ResponseBuilder;
        let description = format!(
            "The request line and headers together are over {} KB (plain HTTP); the server \
             answers before routing, with an empty body.",
            crate::edge::listener::MAX_HEAD_BYTES / 1024
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
