//! OpenAI request types (re-exported from async-openai) and our extensions to them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use async_openai::types::chat::{
    ChatCompletionRequestMessage, CreateChatCompletionRequest, StopConfiguration,
};
pub use async_openai::types::completions::CreateCompletionRequest;
pub use async_openai::types::models::{ListModelResponse, Model};

/// Fields we accept on top of OpenAI's request body. They are read from the same JSON
/// object as the OpenAI request and never forwarded to providers.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct RequestExtensions {
    /// Quality tier: `low`, `standard`, `high`, `ultra` or a custom level.
    #[serde(default)]
    pub quality: Option<String>,
    #[serde(default)]
    pub ad_preferences: Option<AdPreferences>,
    /// A per-hour reservation to run on (see `POST /api/llm/reservations`).
    #[serde(default)]
    pub reservation: Option<String>,
    /// Allow serving at a lower tier when the asked one has no provider right now.
    #[serde(default)]
    pub quality_fallback: Option<bool>,
    /// Adaptive quality: the highest tier whose expected time to first token fits.
    #[serde(default)]
    pub max_latency_ms: Option<u64>,
}

/// A user's ad preferences for one request (free tier).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct AdPreferences {
    #[serde(default)]
    pub categories: Vec<String>,
    #[serde(default)]
    pub blocked_categories: Vec<String>,
    #[serde(default)]
    pub opt_out: bool,
    /// `content` (a labelled last delta), `metadata` (an `ad` object on the final
    /// chunk, no text) or `prompt` (where the gateway allows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<String>,
}
