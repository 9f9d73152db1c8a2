//! OpenAI's error shape: `{"error":{"message","type","param","code"}}`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every error a client sees.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorObject,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ErrorObject {
    /// Human-readable; never contains keys or prompts.
    pub message: String,
    /// `invalid_request_error`, `permission_error`, `insufficient_quota`, `requests`/`tokens` (rate limits), `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The offending request field (a JSON path), when there is one.
    pub param: Option<String>,
    /// Machine-readable: `invalid_api_key`, `model_not_found`, `rate_limit_exceeded`, `insufficient_quota`, …
    pub code: Option<String>,
}
