//! Builds the non-stream JSON response from a provider's stream, for clients that did
//! not ask for one (we always stream from providers so TTFT and usage are observed the
//! same way for every request).

use std::collections::BTreeMap;

use openapi::stream::{
    ChatChoice, ChatCompletion, ChatMessage, FunctionCall, StreamChunk, TextChoice, TextCompletion, ToolCall, Usage,
};
use serde_json::Value;

#[derive(Default)]
struct ToolAcc {
    id: String,
    kind: String,
    name: String,
    arguments: String,
}

#[derive(Default)]
struct ChoiceAcc {
    role: Option<String>,
    content: String,
    refusal: Option<String>,
    tools: BTreeMap<u32, ToolAcc>,
    finish_reason: Option<String>,
    logprobs: Vec<Value>,
    token_logprobs: Option<Value>,
}

#[derive(Default)]
pub struct Aggregator {
    id: Option<String>,
    created: Option<u64>,
    model: Option<String>,
    fingerprint: Option<String>,
    choices: BTreeMap<u32, ChoiceAcc>,
}

impl Aggregator {
    pub fn push(&mut self, chunk: StreamChunk) {
        self.id = self.id.take().or(chunk.id);
        self.created = self.created.or(chunk.created);
        self.model = self.model.take().or(chunk.model);
        self.fingerprint = self.fingerprint.take().or(chunk.system_fingerprint);
        for c in chunk.choices {
            let acc = self.choices.entry(c.index).or_default();
            if let Some(text) = c.text {
                acc.content.push_str(&text);
            }
            if let Some(delta) = c.delta {
                acc.role = acc.role.take().or(delta.role);
                if let Some(text) = delta.content {
                    acc.content.push_str(&text);
                }
                if let Some(r) = delta.refusal {
                    acc.refusal.get_or_insert_with(String::new).push_str(&r);
                }
                for t in delta.tool_calls.unwrap_or_default() {
                    let tool = acc.tools.entry(t.index).or_default();
                    if let Some(id) = t.id {
                        tool.id = id;
                    }
                    if let Some(kind) = t.kind {
                        tool.kind = kind;
                    }
                    if let Some(f) = t.function {
                        if let Some(name) = f.name {
                            tool.name.push_str(&name);
                        }
                        if let Some(args) = f.arguments {
                            tool.arguments.push_str(&args);
                        }
                    }
                }
            }
            if c.finish_reason.is_some() {
                acc.finish_reason = c.finish_reason;
            }
            if let Some(lp) = c.logprobs {
                match lp.get("content").and_then(Value::as_array) {
                    Some(items) => acc.logprobs.extend(items.iter().cloned()),
                    None if !lp.is_null() => acc.token_logprobs = Some(lp),
                    None => {}
                }
            }
        }
    }

    pub fn chat(self, fallback_id: &str, fallback_model: &str, usage: Usage) -> ChatCompletion {
        let choices = self
            .choices
            .into_iter()
            .map(|(index, acc)| {
                let tool_calls: Vec<ToolCall> = acc
                    .tools
                    .into_values()
                    .map(|t| ToolCall {
                        id: t.id,
                        kind: if t.kind.is_empty() { "function".to_owned() } else { t.kind },
                        function: FunctionCall { name: t.name, arguments: t.arguments },
                    })
                    .collect();
                let has_tools = !tool_calls.is_empty();
                ChatChoice {
                    index,
                    message: ChatMessage {
                        role: acc.role.unwrap_or_else(|| "assistant".to_owned()),
                        content: (!(has_tools && acc.content.is_empty())).then_some(acc.content),
                        refusal: acc.refusal,
                        tool_calls: has_tools.then_some(tool_calls),
                    },
                    finish_reason: acc.finish_reason,
                    logprobs: (!acc.logprobs.is_empty()).then(|| serde_json::json!({ "content": acc.logprobs })),
                }
            })
            .collect();
        ChatCompletion {
            id: self.id.unwrap_or_else(|| fallback_id.to_owned()),
            object: "chat.completion".to_owned(),
            created: self.created.unwrap_or_else(unix_now),
            model: self.model.unwrap_or_else(|| fallback_model.to_owned()),
            system_fingerprint: self.fingerprint,
            choices,
            usage,
        }
    }

    pub fn text(self, fallback_id: &str, fallback_model: &str, usage: Usage) -> TextCompletion {
        let choices = self
            .choices
            .into_iter()
            .map(|(index, acc)| TextChoice {
                index,
                text: acc.content,
                finish_reason: acc.finish_reason,
                logprobs: acc.token_logprobs,
            })
            .collect();
        TextCompletion {
            id: self.id.unwrap_or_else(|| fallback_id.to_owned()),
            object: "text_completion".to_owned(),
            created: self.created.unwrap_or_else(unix_now),
            model: self.model.unwrap_or_else(|| fallback_model.to_owned()),
            choices,
            usage,
        }
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
