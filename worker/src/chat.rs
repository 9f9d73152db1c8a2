//! Chat prompts rendered with the model's own Jinja chat template (minijinja), with
//! the request's tools when there are any (`tools` says how, and what a template
//! without a tools section gets instead).

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;
use serde_json::Value;

use crate::tools::{self, Tools};

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("the model has no chat template")]
    NoTemplate,
    #[error("chat template error: {0}")]
    Template(String),
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's calls, as Hugging Face templates read them:
    /// `{"type": "function", "function": {"name", "arguments"}}` with the arguments as
    /// a JSON value (OpenAI sends them as a string).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
    /// A tool turn's answer to this call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into(), ..ChatMessage::default() }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    /// The template reads a `tools` variable (it has a tools section).
    reads_tools: bool,
}

fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<ChatTemplate, ChatError> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.to_string()).map_err(|e| ChatError::Template(e.to_string()))?;
        let reads_tools = env.get_template("chat").is_ok_and(|t| t.undeclared_variables(false).contains("tools"));
        Ok(ChatTemplate { env, bos: bos.to_string(), eos: eos.to_string(), reads_tools })
    }

    /// Whether the template has a tools section of its own.
    pub fn reads_tools(&self) -> bool {
        self.reads_tools
    }

    /// Renders the conversation with the assistant's turn opened.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, ChatError> {
        self.render_with(messages, None)
    }

    /// Renders the conversation and the tools the model may call: through the
    /// template's tools section, or the fallback when it has none.
    pub fn render_with(&self, messages: &[ChatMessage], tools: Option<&Tools>) -> Result<String, ChatError> {
        let t = self.env.get_template("chat").map_err(|e| ChatError::Template(e.to_string()))?;
        let fallback;
        let (messages, declared) = match tools {
            Some(tools) if self.reads_tools => (messages, Some(tools.declarations())),
            Some(tools) => {
                fallback = with_fallback(messages, tools);
                (fallback.as_slice(), None)
            }
            None => (messages, None),
        };
        t.render(context! {
            messages => messages,
            tools => declared,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| ChatError::Template(e.to_string()))
    }
}

/// The conversation for a template without a tools section: the tool list in the
/// system message, calls and results written as text (see `tools`).
fn with_fallback(messages: &[ChatMessage], tools: &Tools) -> Vec<ChatMessage> {
    let prompt = tools::fallback_prompt(tools);
    let mut out = Vec::with_capacity(messages.len() + 1);
    match messages.first() {
        Some(m) if m.role == "system" => out.push(ChatMessage::new("system", format!("{}\n\n{prompt}", m.content))),
        _ => out.push(ChatMessage::new("system", prompt)),
    }
    let rest = if messages.first().is_some_and(|m| m.role == "system") { &messages[1..] } else { messages };
    for m in rest {
        let mut content = m.content.clone();
        for call in m.tool_calls.iter().flatten() {
            let f = &call["function"];
            let arguments = match &f["arguments"] {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            if !content.is_empty() {
                content.push('\n');
            }
            content.push_str(&tools::write_call(f["name"].as_str().unwrap_or_default(), &arguments));
        }
        if m.role == "tool" {
            out.push(ChatMessage::new("user", format!("<tool_response>\n{content}\n</tool_response>")));
        } else {
            out.push(ChatMessage::new(m.role.clone(), content));
        }
    }
    out
}
