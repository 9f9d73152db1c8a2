//! The API handlers, grouped by who calls them. Each handler parses its body once
//! (`edge::extract`), answers with `edge::error::ApiError` on failure, and carries its
//! own `#[utoipa::path]`; `spec` assembles the OpenAPI document from them and `schemas`
//! holds the response shapes and error rows they share.

/// Users: the OpenAI surface (`/v1/chat/completions`, `/v1/completions`, `/v1/models`).
pub mod openai;
/// Users: `/v1/embeddings`.
pub mod embeddings;
/// Users: the Responses API (`/v1/responses`).
pub mod responses;
/// Users: the seed's simple API (`/api/llm/*`: inference, WebSocket, reservations).
pub mod simple;
/// Users: the ad click redirect and ad preferences.
pub mod ad_choices;
/// Providers: registration, streams, heartbeats, key rotation (`/api/gpu/*`).
pub mod gpu;
/// Providers and users: balances, transactions, withdrawals, top-ups (`/api/payment/*`).
pub mod wallet;
/// The operator: `/api/admin/*` and `/api/analytics/*`.
pub mod admin;
/// The admin console's static files (`/admin`) and a provider's own page data.
pub mod console;
/// Operators' probes: `/health`, `/metrics`.
pub mod operations;
/// The OpenAPI document (`/openapi.json`, `gateway openapi`).
pub mod spec;
/// Response shapes and error rows shared by the handlers' OpenAPI annotations.
pub mod schemas;
