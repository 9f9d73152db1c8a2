//! Chat prompts rendered with the model's own Jinja chat template (minijinja).

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("the model has no chat template")]
    NoTemplate,
    #[error("chat template error: {0}")]
    Template(String),
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
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
        Ok(ChatTemplate { env, bos: bos.to_string(), eos: eos.to_string() })
    }

    /// Renders the conversation with the assistant's turn opened.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, ChatError> {
        let t = self.env.get_template("chat").map_err(|e| ChatError::Template(e.to_string()))?;
        t.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| ChatError::Template(e.to_string()))
    }
}
