//! Tool calls (`tools`, `tool_choice`, `parallel_tool_calls`) by constrained decoding.
//!
//! The model writes a call the way Hermes-style chat templates (Qwen2.5, Hermes,
//! SmolLM3) teach it:
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! ```
//!
//! and an llguidance grammar keeps it to that: the name is one of the request's tools
//! and the arguments follow that tool's `parameters` schema (`grammar`). `tool_choice`
//! picks the grammar: `required` (or a named function) allows only calls, `auto` allows
//! calls or text that does not start with `<tool_call>` (the text follows
//! `response_format` when it asks for JSON), `none` leaves the output free. Calls are
//! separated by a newline; `parallel_tool_calls: false` allows one.
//!
//! The tools reach the model through the chat template when it reads a `tools`
//! variable. A template without one gets the documented fallback (`fallback_prompt`):
//! the tool list and the call format appended to the system message (a system message
//! is added first when there is none), earlier calls written into the assistant turns
//! in the same format, and tool results sent as user turns inside
//! `<tool_response>…</tool_response>`.
//!
//! `ToolParser` turns the generated text back into OpenAI `tool_calls`, incrementally,
//! so a stream carries the call's name once and its arguments as deltas.

use serde_json::{json, Value};

/// Tools a request may declare at most (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

/// What opens and closes a call in the model's output.
pub const CALL_OPEN: &str = "<tool_call>\n";
pub const CALL_CLOSE: &str = "\n</tool_call>";

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// The JSON schema of the arguments (an object schema).
    pub parameters: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    /// Exactly this function.
    Named(String),
}

/// A request's tools and how it lets the model use them.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    /// More than one call in one answer.
    pub parallel: bool,
}

/// A request's `tools` that this worker cannot use, with the parameter to name.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub message: String,
    pub param: &'static str,
}

fn refuse(message: impl Into<String>, param: &'static str) -> Refusal {
    Refusal { message: message.into(), param }
}

/// OpenAI's rule for function names: `^[a-zA-Z0-9_-]{1,64}$` (so a name never needs
/// escaping inside the call's JSON).
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Tools {
    /// Reads `tools`, `tool_choice` and `parallel_tool_calls`; `None` when the request
    /// has no tools.
    pub fn parse(tools: Option<&[Value]>, choice: Option<&Value>, parallel: Option<bool>) -> Result<Option<Tools>, Refusal> {
        let tools = tools.unwrap_or_default();
        if tools.is_empty() {
            return match choice {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s == "none" => Ok(None),
                Some(_) => Err(refuse("tool_choice is only allowed when tools are given", "tool_choice")),
            };
        }
        if tools.len() > MAX_TOOLS {
            return Err(refuse(format!("at most {MAX_TOOLS} tools are allowed"), "tools"));
        }
        let mut parsed: Vec<Tool> = Vec::with_capacity(tools.len());
        for t in tools {
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(refuse("every tool must be {\"type\": \"function\", \"function\": {...}}", "tools"));
            }
            let f = t.get("function").ok_or_else(|| refuse("a tool is missing `function`", "tools"))?;
            let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
            if !valid_name(name) {
                return Err(refuse(format!("tool name `{name}` must be 1 to 64 of a-z, A-Z, 0-9, _ and -"), "tools"));
            }
            if parsed.iter().any(|p| p.name == name) {
                return Err(refuse(format!("tool `{name}` is declared twice"), "tools"));
            }
            let parameters = match f.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
                Some(p @ Value::Object(_)) if p.get("type").is_none_or(|t| t == "object") => p.clone(),
                Some(_) => return Err(refuse(format!("the parameters of `{name}` must be a JSON schema of an object"), "tools")),
            };
            let description = f.get("description").and_then(Value::as_str).map(str::to_string);
            parsed.push(Tool { name: name.to_string(), description, parameters });
        }
        let choice = match choice {
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                _ => return Err(refuse("tool_choice must be none, auto, required or a named function", "tool_choice")),
            },
            Some(v) => {
                let name = v.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
                match name {
                    Some(n) if v.get("type").and_then(Value::as_str) == Some("function") => {
                        if !parsed.iter().any(|t| t.name == n) {
                            return Err(refuse(format!("tool_choice names `{n}`, which is not in tools"), "tool_choice"));
                        }
                        ToolChoice::Named(n.to_string())
                    }
                    _ => return Err(refuse("tool_choice must be none, auto, required or a named function", "tool_choice")),
                }
            }
        };
        Ok(Some(Tools { tools: parsed, choice, parallel: parallel.unwrap_or(true) }))
    }

    /// The tools as OpenAI declares them (what templates with a tools section read).
    pub fn declarations(&self) -> Vec<Value> {
        self.tools
            .iter()
            .map(|t| {
                let mut f = json!({"name": t.name, "parameters": t.parameters});
                if let Some(d) = &t.description {
                    f["description"] = json!(d);
                }
                json!({"type": "function", "function": f})
            })
            .collect()
    }

    /// The llguidance Lark grammar of the output, or `None` when it is free
    /// (`tool_choice: none`). `text` is the JSON schema plain answers must follow under
    /// `auto` (from `response_format`), if any. `json_options` is the `x-guidance`
    /// object every JSON part is written with.
    pub fn lark(&self, text: Option<&Value>, json_options: &Value) -> Option<String> {
        let callable: Vec<&Tool> = match &self.choice {
            ToolChoice::None => return None,
            ToolChoice::Named(n) => self.tools.iter().filter(|t| &t.name == n).collect(),
            ToolChoice::Auto | ToolChoice::Required => self.tools.iter().collect(),
        };
        let calls: Vec<Value> = callable
            .iter()
            .map(|t| {
                json!({"type": "object",
                    "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                    "required": ["name", "arguments"], "additionalProperties": false})
            })
            .collect();
        let call_schema = json!({"x-guidance": json_options, "anyOf": calls});
        let repeat = if self.parallel { "(\"\\n\" call)*" } else { "" };
        let mut g = format!(
            "start: {start}\ncalls: call {repeat}\ncall: {open} %json {call_schema} {close}\n",
            start = if self.choice == ToolChoice::Auto { "calls | text" } else { "calls" },
            open = lark_string(CALL_OPEN),
            close = lark_string(CALL_CLOSE),
        );
        if self.choice == ToolChoice::Auto {
            match text {
                Some(schema) => {
                    let mut schema = schema.clone();
                    if let Some(o) = schema.as_object_mut() {
                        o.insert("x-guidance".into(), json_options.clone());
                    }
                    g.push_str(&format!("text: %json {schema}\n"));
                }
                // Any text, the empty answer included, that is not a call.
                None => g.push_str("text: TEXT?\nTEXT: /(?s:.+)/ & ~/(?s:<tool_call>.*)/\n"),
            }
        }
        Some(g)
    }
}

/// A Lark string literal for `s`.
fn lark_string(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// The fallback for chat templates without a tools section: what is appended to the
/// system message.
pub fn fallback_prompt(tools: &Tools) -> String {
    let mut s = String::from(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for d in tools.declarations() {
        s.push('\n');
        s.push_str(&d.to_string());
    }
    s.push_str(
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments \
         within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    s
}

/// A call written the way the model writes it (earlier calls in the fallback prompt).
pub fn write_call(name: &str, arguments: &str) -> String {
    let arguments = serde_json::from_str::<Value>(arguments).unwrap_or_else(|_| json!(arguments));
    format!("{CALL_OPEN}{}{CALL_CLOSE}", json!({"name": name, "arguments": arguments}))
}

/// A piece of the answer as the client sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Content(String),
    /// Call `index` begins: its id and function name.
    CallStart { index: usize, id: String, name: String },
    /// More of call `index`'s arguments (JSON text).
    Arguments { index: usize, text: String },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Not yet known whether the answer is text or calls.
    Undecided,
    Content,
    /// Waiting for `{"name": "<name>", "arguments": ` of the next call.
    Head,
    /// Inside call arguments: JSON nesting depth, in a string, after a backslash.
    Arguments { depth: u32, string: bool, escaped: bool },
    /// After a call's arguments: waiting for `}` + CALL_CLOSE, and maybe another call.
    Tail,
}

/// Reads the generated text into `Piece`s as it arrives.
pub struct ToolParser {
    state: State,
    /// Text not yet turned into pieces.
    buffer: String,
    calls: usize,
    /// `tool_choice: none`: everything is content.
    free: bool,
}

const HEAD_NAME: &str = "{\"name\": \"";
const HEAD_ARGUMENTS: &str = "\", \"arguments\": ";

impl ToolParser {
    pub fn new(tools: &Tools) -> ToolParser {
        ToolParser { state: State::Undecided, buffer: String::new(), calls: 0, free: tools.choice == ToolChoice::None }
    }

    /// Calls begun so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Takes in generated text; returns what can be said of it now.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        if self.free {
            return if text.is_empty() { Vec::new() } else { vec![Piece::Content(text.to_string())] };
        }
        self.buffer.push_str(text);
        let mut out = Vec::new();
        loop {
            let before = (self.state, self.buffer.len());
            self.advance(&mut out);
            if before == (self.state, self.buffer.len()) {
                return out;
            }
        }
    }

    /// The end of the answer: text held back because it might have begun a call is
    /// content after all.
    pub fn finish(&mut self) -> Vec<Piece> {
        let rest = std::mem::take(&mut self.buffer);
        match self.state {
            State::Undecided | State::Content if !rest.is_empty() => vec![Piece::Content(rest)],
            _ => Vec::new(),
        }
    }

    fn advance(&mut self, out: &mut Vec<Piece>) {
        match self.state {
            State::Undecided => {
                if self.buffer.starts_with(CALL_OPEN) {
                    self.buffer.drain(..CALL_OPEN.len());
                    self.state = State::Head;
                } else if !CALL_OPEN.starts_with(self.buffer.as_str()) {
                    self.state = State::Content;
                }
            }
            State::Content => {
                if !self.buffer.is_empty() {
                    out.push(Piece::Content(std::mem::take(&mut self.buffer)));
                }
            }
            State::Head => {
                let Some(rest) = self.buffer.strip_prefix(HEAD_NAME) else { return };
                let Some(end) = rest.find(HEAD_ARGUMENTS) else { return };
                let name = rest[..end].to_string();
                self.buffer.drain(..HEAD_NAME.len() + end + HEAD_ARGUMENTS.len());
                let id = format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24]);
                out.push(Piece::CallStart { index: self.calls, id, name });
                self.calls += 1;
                self.state = State::Arguments { depth: 0, string: false, escaped: false };
            }
            State::Arguments { mut depth, mut string, mut escaped } => {
                let mut end = None;
                for (i, b) in self.buffer.bytes().enumerate() {
                    if string {
                        match (escaped, b) {
                            (true, _) => escaped = false,
                            (false, b'\\') => escaped = true,
                            (false, b'"') => string = false,
                            _ => {}
                        }
                        continue;
                    }
                    match b {
                        b'"' => string = true,
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth = depth.saturating_sub(1);
                            if depth == 0 {
                                end = Some(i + 1);
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                let index = self.calls - 1;
                let taken = end.unwrap_or(self.buffer.len());
                let text: String = self.buffer.drain(..taken).collect();
                if !text.is_empty() {
                    out.push(Piece::Arguments { index, text });
                }
                self.state = if end.is_some() { State::Tail } else { State::Arguments { depth, string, escaped } };
            }
            State::Tail => {
                let close = format!("}}{CALL_CLOSE}");
                let next = format!("{close}\n{CALL_OPEN}");
                if self.buffer.starts_with(&next) {
                    self.buffer.drain(..next.len());
                    self.state = State::Head;
                } else if self.buffer.starts_with(&close) && self.buffer.len() > close.len() && !next.starts_with(self.buffer.as_str()) {
                    // Whatever follows the last call is not part of any call.
                    self.buffer.drain(..close.len());
                    self.state = State::Content;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(choice: Value) -> Tools {
        let t = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
        Tools::parse(t.as_array().map(Vec::as_slice), Some(&choice), None).unwrap().unwrap()
    }

    fn pieces_of(parser: &mut ToolParser, text: &str, step: usize) -> Vec<Piece> {
        let bytes: Vec<char> = text.chars().collect();
        let mut out = Vec::new();
        for chunk in bytes.chunks(step) {
            out.extend(parser.push(&chunk.iter().collect::<String>()));
        }
        out.extend(parser.finish());
        out
    }

    /// Joins a piece list into (content, [(name, arguments)]).
    fn joined(pieces: &[Piece]) -> (String, Vec<(String, String)>) {
        let mut content = String::new();
        let mut calls: Vec<(String, String)> = Vec::new();
        for p in pieces {
            match p {
                Piece::Content(t) => content.push_str(t),
                Piece::CallStart { index, name, .. } => {
                    assert_eq!(*index, calls.len());
                    calls.push((name.clone(), String::new()));
                }
                Piece::Arguments { index, text } => calls[*index].1.push_str(text),
            }
        }
        (content, calls)
    }

    #[test]
    fn calls_come_back_whole_however_the_text_is_cut() {
        let text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Pa}ris\\\"\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {}}\n</tool_call>";
        for step in [1, 2, 3, 7, 1000] {
            let mut p = ToolParser::new(&tools(json!("required")));
            let (content, calls) = joined(&pieces_of(&mut p, text, step));
            assert_eq!(content, "", "step {step}");
            assert_eq!(
                calls,
                vec![("get_weather".into(), "{\"city\": \"Pa}ris\\\"\"}".into()), ("get_weather".into(), "{}".into())],
                "step {step}"
            );
        }
    }

    #[test]
    fn text_is_content_including_a_prefix_of_the_call_marker() {
        for text in ["Hello there", "<tool", "<b>bold</b>", ""] {
            let mut p = ToolParser::new(&tools(json!("auto")));
            let (content, calls) = joined(&pieces_of(&mut p, text, 2));
            assert_eq!((content.as_str(), calls.len()), (text, 0));
        }
    }

    #[test]
    fn a_cut_call_keeps_its_partial_arguments() {
        let mut p = ToolParser::new(&tools(json!("required")));
        let (_, calls) = joined(&pieces_of(&mut p, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"ci", 4));
        assert_eq!(calls, vec![("get_weather".into(), "{\"ci".into())]);
    }

    #[test]
    fn choices_and_refusals() {
        let t = json!([{"type": "function", "function": {"name": "f"}}]);
        let t = t.as_array().map(Vec::as_slice);
        assert_eq!(Tools::parse(t, None, None).unwrap().unwrap().choice, ToolChoice::Auto);
        let named = json!({"type": "function", "function": {"name": "f"}});
        assert_eq!(Tools::parse(t, Some(&named), Some(false)).unwrap().unwrap().choice, ToolChoice::Named("f".into()));
        let other = json!({"type": "function", "function": {"name": "g"}});
        assert_eq!(Tools::parse(t, Some(&other), None).unwrap_err().param, "tool_choice");
        assert_eq!(Tools::parse(None, Some(&json!("required")), None).unwrap_err().param, "tool_choice");
        assert_eq!(Tools::parse(None, Some(&json!("none")), None).unwrap(), None);
        let bad = json!([{"type": "function", "function": {"name": "a b"}}]);
        assert_eq!(Tools::parse(bad.as_array().map(Vec::as_slice), None, None).unwrap_err().param, "tools");
        let twice = json!([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]);
        assert_eq!(Tools::parse(twice.as_array().map(Vec::as_slice), None, None).unwrap_err().param, "tools");
        let scalar = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]);
        assert_eq!(Tools::parse(scalar.as_array().map(Vec::as_slice), None, None).unwrap_err().param, "tools");
    }
}
