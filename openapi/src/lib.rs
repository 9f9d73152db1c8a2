//! The API contract of GPU Streaming: the wire types that cross the HTTP edges.
//!
//! OpenAI's request shapes come from async-openai's serde types (types only, no HTTP
//! client); our own extensions and the platform API live next to them. Unknown request
//! fields are ignored, as OpenAI does.

pub mod ads;
pub mod embeddings;
pub mod error;
pub mod openai;
pub mod openai_schema;
pub mod platform;
pub mod responses;
pub mod stream;
pub use async_openai;
