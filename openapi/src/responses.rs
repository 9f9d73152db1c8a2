//! OpenAI's Responses API (`/v1/responses`): the request the gateway parses and the
//! response objects and stream events it writes.
//!
//! The gateway serves it by translating to chat completions, which every provider
//! speaks; these types are the wire shapes on the client's side only. `input`, `tools`
//! and `tool_choice` are parsed as JSON values so that the handler can name the exact
//! item a refusal is about (`input[2].content[0].type`); their schemas below describe
//! what is accepted.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::ads::Ad;
use crate::openai::RequestExtensions;

/// `POST /v1/responses`: OpenAI's body (the subset we honour) plus our extensions.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[schema(example = json!({"model": "llama-3.1-8b-instruct", "input": "What is the capital of France?", "max_output_tokens": 32}))]
pub struct CreateResponseRequest {
    /// A model id from `GET /v1/models`, optionally with a quality suffix (`model:high`).
    pub model: String,
    /// A string (one user message) or a list of input items.
    #[schema(value_type = ResponseInput)]
    pub input: Value,
    /// A system message put first; not carried over by `previous_response_id`.
    #[serde(default)]
    pub instructions: Option<String>,
    /// Capped by the quality tier's `maxTokens`.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_output_tokens: Option<u32>,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f32>,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1)]
    pub top_p: Option<f32>,
    /// Function tools; built-in tools (web search, file search, …) are refused.
    #[serde(default)]
    #[schema(value_type = Option<Vec<FunctionTool>>)]
    pub tools: Option<Vec<Value>>,
    /// `none`, `auto`, `required`, or `{"type": "function", "name": …}`.
    #[serde(default)]
    #[schema(value_type = Option<ResponseToolChoice>)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub text: Option<TextConfig>,
    /// Up to 16 string pairs, keys up to 64 and values up to 512 characters.
    #[serde(default)]
    pub metadata: Option<HashMap<String, String>>,
    /// Ignored: providers see a pseudonym of the account instead.
    #[serde(default)]
    pub user: Option<String>,
    /// Keep the response for `GET /v1/responses/{id}` and `previous_response_id`
    /// (default true).
    #[serde(default)]
    pub store: Option<bool>,
    /// Answer as server-sent events of typed `response.*` events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Continue the conversation of a stored response: its input and output are replayed
    /// before this request's input.
    #[serde(default)]
    pub previous_response_id: Option<String>,
    /// Only `disabled` (the default): the gateway never drops context on its own.
    #[serde(default)]
    pub truncation: Option<String>,
    /// Refused when true: responses run while the client waits.
    #[serde(default)]
    pub background: Option<bool>,
    /// Refused: no server-side conversations or stored prompts.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub conversation: Option<Value>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub prompt: Option<Value>,
    /// Only an empty list: no extra output data can be included.
    #[serde(default)]
    pub include: Option<Vec<String>>,
    #[serde(flatten)]
    pub extensions: RequestExtensions,
}

/// The `input` of a response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ResponseInput {
    Text(String),
    Items(Vec<InputItem>),
}

/// One input item: a message, a function call the model made earlier, or its result.
/// A message may leave out `type`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InputItem {
    Message {
        /// `user`, `assistant`, `system` or `developer`.
        role: String,
        content: MessageContent,
    },
    FunctionCall {
        call_id: String,
        name: String,
        /// The arguments as a JSON string.
        arguments: String,
    },
    FunctionCallOutput {
        call_id: String,
        output: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<InputPart>),
}

/// Text parts only: images, files and audio are refused with a 400.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InputPart {
    InputText { text: String },
    OutputText { text: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FunctionTool {
    Function {
        name: String,
        #[serde(default)]
        description: Option<String>,
        /// A JSON Schema object for the arguments.
        #[serde(default)]
        #[schema(value_type = Option<Object>)]
        parameters: Option<Value>,
        #[serde(default)]
        strict: Option<bool>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ResponseToolChoice {
    /// `none`, `auto` or `required`.
    Mode(String),
    Function(NamedFunction),
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NamedFunction {
    /// `function`.
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
}

/// `text`: how the answer's text is formatted.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct TextConfig {
    #[serde(default)]
    pub format: Option<TextFormat>,
}

/// `json_object` and `json_schema` need a provider with the `response_format` feature.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TextFormat {
    Text,
    JsonObject,
    JsonSchema {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        description: Option<String>,
        #[serde(default)]
        #[schema(value_type = Option<Object>)]
        schema: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        strict: Option<bool>,
    },
}

/// `object: "response"`, as returned, retrieved, and carried by the stream's events.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResponseObject {
    /// `resp_…`.
    pub id: String,
    /// `response`.
    pub object: String,
    /// Unix seconds.
    pub created_at: u64,
    /// `in_progress`, `completed`, `incomplete` or `failed`.
    pub status: String,
    pub error: Option<ResponseError>,
    pub incomplete_details: Option<IncompleteDetails>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u32>,
    pub model: String,
    pub output: Vec<OutputItem>,
    /// All `output_text` parts of the message items, joined (the SDKs' `output_text`).
    pub output_text: String,
    pub parallel_tool_calls: bool,
    pub previous_response_id: Option<String>,
    pub store: bool,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub text: TextConfig,
    /// As the request gave it, `auto` by default.
    #[schema(value_type = ResponseToolChoice)]
    pub tool_choice: Value,
    #[schema(value_type = Vec<Object>)]
    pub tools: Vec<Value>,
    /// `disabled`.
    pub truncation: String,
    pub usage: Option<ResponseUsage>,
    pub user: Option<String>,
    pub metadata: HashMap<String, String>,
    /// The quality tier that served the response.
    pub quality: String,
    /// The ad of a free-tier response with the `metadata` placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ad: Option<Ad>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResponseError {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct IncompleteDetails {
    /// `max_output_tokens` or `content_filter`.
    pub reason: String,
}

/// An output item. Ours are messages and function calls; a free-tier answer's ad is a
/// message item of its own whose id starts with `msg_ad_`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputItem {
    Message {
        id: String,
        /// `in_progress` while streaming, then `completed` or `incomplete`.
        status: String,
        /// `assistant`.
        role: String,
        content: Vec<OutputContent>,
    },
    FunctionCall {
        id: String,
        call_id: String,
        name: String,
        /// The arguments as a JSON string.
        arguments: String,
        status: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputContent {
    OutputText {
        text: String,
        #[schema(value_type = Vec<Object>)]
        annotations: Vec<Value>,
    },
    Refusal {
        refusal: String,
    },
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema)]
pub struct ResponseUsage {
    pub input_tokens: u32,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: u32,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: u32,
    /// What the response cost, in USD (as `usage.cost` of chat completions).
    pub cost: f64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema)]
pub struct InputTokensDetails {
    pub cached_tokens: u32,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema)]
pub struct OutputTokensDetails {
    pub reasoning_tokens: u32,
}

/// `DELETE /v1/responses/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeletedResponse {
    pub id: String,
    /// `response`.
    pub object: String,
    pub deleted: bool,
}
