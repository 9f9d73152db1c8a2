//! Schemas of the OpenAI request subset the gateway accepts, for the OpenAPI document.
//!
//! The handlers parse async-openai's types (re-exported in `openai`), which carry no
//! schema; these types describe the same JSON for the document and are never used to
//! parse a request. They list what we honour: a field OpenAI has and we refuse (audio
//! output, web search, predicted outputs) is absent here and answered with a 400.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::openai::RequestExtensions;

/// `POST /v1/chat/completions`: OpenAI's body plus our extensions.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16, "quality": "standard"}))]
pub struct ChatCompletionRequest {
    /// A model id from `GET /v1/models`, optionally with a quality suffix (`model:high`).
    pub model: String,
    #[schema(min_items = 1)]
    pub messages: Vec<ChatMessageParam>,
    /// Answer as server-sent events (`text/event-stream`) instead of one JSON body.
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f32>,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1)]
    pub top_p: Option<f32>,
    /// Capped by the quality tier's `maxTokens`.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_tokens: Option<u32>,
    /// Takes precedence over `max_tokens`.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 128)]
    pub n: Option<u8>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    #[schema(minimum = -2, maximum = 2)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    #[schema(minimum = -2, maximum = 2)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Requires `logprobs: true`.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 20)]
    pub top_logprobs: Option<u8>,
    #[serde(default)]
    pub tools: Option<Vec<Tool>>,
    /// Only with `tools`.
    #[serde(default)]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    /// Token id (as a string) → bias in -100..100.
    #[serde(default)]
    pub logit_bias: Option<HashMap<String, i32>>,
    /// Ignored: providers see a pseudonym of the account instead.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(flatten)]
    pub extensions: RequestExtensions,
}

/// `POST /v1/completions` (legacy): one text prompt.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"model": "llama-3.1-8b-instruct", "prompt": "The capital of France is", "max_tokens": 16}))]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f32>,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1)]
    pub top_p: Option<f32>,
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 128)]
    pub n: Option<u8>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    #[schema(minimum = -2, maximum = 2)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    #[schema(minimum = -2, maximum = 2)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 5)]
    pub logprobs: Option<u8>,
    #[serde(default)]
    pub logit_bias: Option<HashMap<String, i32>>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(flatten)]
    pub extensions: RequestExtensions,
}

/// A text prompt, or an array holding exactly one (token-id prompts are refused).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    /// Exactly one string; more are refused (400).
    One(Vec<String>),
}

/// One stop sequence or up to four.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    /// At most four; more are refused (400).
    Many(Vec<String>),
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` and no choices before `[DONE]`.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// A chat message, by `role`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum ChatMessageParam {
    System {
        content: TextContent,
        #[serde(default)]
        name: Option<String>,
    },
    Developer {
        content: TextContent,
        #[serde(default)]
        name: Option<String>,
    },
    User {
        content: UserContent,
        #[serde(default)]
        name: Option<String>,
    },
    Assistant {
        #[serde(default)]
        content: Option<TextContent>,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        refusal: Option<String>,
        #[serde(default)]
        tool_calls: Option<Vec<crate::stream::ToolCall>>,
    },
    Tool {
        content: TextContent,
        tool_call_id: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum TextContent {
    Text(String),
    Parts(Vec<TextPart>),
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TextPart {
    Text { text: String },
}

/// A user message's content; images need a provider with the `vision` feature.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum UserContent {
    Text(String),
    Parts(Vec<UserPart>),
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum UserPart {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImageUrl {
    /// An `https:` or `data:` URL.
    pub url: String,
    /// `auto`, `low` or `high`.
    #[serde(default)]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Tool {
    Function { function: FunctionDefinition },
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FunctionDefinition {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// A JSON Schema object for the arguments.
    #[serde(default)]
    pub parameters: Option<HashMap<String, serde_json::Value>>,
    #[serde(default)]
    pub strict: Option<bool>,
}

/// `none`, `auto`, `required`, or a named function.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ToolChoice {
    Mode(ToolChoiceMode),
    Named(NamedToolChoice),
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ToolChoiceMode {
    None,
    Auto,
    Required,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NamedToolChoice {
    Function { function: FunctionName },
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FunctionName {
    pub name: String,
}

/// `json_object` and `json_schema` need a provider with the `response_format` feature.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JsonSchemaFormat {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub schema: Option<HashMap<String, serde_json::Value>>,
    #[serde(default)]
    pub strict: Option<bool>,
}
