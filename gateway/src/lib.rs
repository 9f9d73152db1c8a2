//! GPU Streaming's gateway: an OpenAI-compatible HTTP server in front of a marketplace
//! of providers. `edge::app()` builds the router so tests drive it in-process;
//! `ops::server` runs it. ARCHITECTURE.md maps the rooms below and a request's path
//! through them.

pub mod ads;
pub mod api;
pub mod edge;
pub mod inference;
pub mod money;
pub mod ops;
pub mod state;
pub mod store;
