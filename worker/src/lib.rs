//! The GPU Streaming worker: the inference engine a GPU owner runs. It loads GGUF
//! models, runs them with continuous batching, and serves the OpenAI API.

pub mod backend;
pub mod bench;
pub mod bert;
pub mod burn_bert;
pub mod burn_model;
pub mod chat;
pub mod embeddings;
pub mod engine;
pub mod fetch;
pub mod forward;
pub mod grammar;
pub mod gguf;
pub mod hf;
pub mod host;
pub mod load;
pub mod model;
pub mod native;
pub mod quant;
pub mod registration;
pub mod sampling;
pub mod serve;
pub mod server;
pub mod tools;

/// The tokenizer lives in the `tokenize` crate (shared with the gateway, which counts
/// delivered tokens with it); the worker's modules name it `crate::tokenizer`.
pub use tokenize::tokenizer;
