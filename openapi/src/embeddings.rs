//! `POST /v1/embeddings`: OpenAI's request and response, with our `truncate` extension
//! and `usage.cost`. What `input` may be is read by `tokenize::embeddings` (the
//! gateway and the worker read it with the same rules).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct CreateEmbeddingRequest {
    /// An embedding model some live provider serves (`GET /v1/models` lists them).
    pub model: String,
    /// A string, an array of up to 2,048 strings, an array of token ids, or an array of
    /// up to 2,048 arrays of token ids (the model's WordPiece ids, without `[CLS]` and
    /// `[SEP]`). No empty string or array; at most 300,000 tokens in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub input: Option<serde_json::Value>,
    /// `float` (default) or `base64` (little-endian f32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_format: Option<EncodingFormat>,
    /// Only the model's own width (a model without shortened vectors refuses others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Extension: keep the first tokens of an input longer than the model's context
    /// instead of refusing it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncate: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    Float,
    Base64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct EmbeddingList {
    /// `list`.
    pub object: String,
    pub data: Vec<Embedding>,
    pub model: String,
    pub usage: EmbeddingUsage,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Embedding {
    /// `embedding`.
    pub object: String,
    /// The input's position in the request.
    pub index: u32,
    /// An array of numbers, or a base64 string with `encoding_format: base64`.
    #[schema(value_type = Object)]
    pub embedding: serde_json::Value,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct EmbeddingUsage {
    pub prompt_tokens: u32,
    pub total_tokens: u32,
    /// What the request cost, in USD.
    pub cost: f64,
}
