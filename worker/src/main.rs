//! `worker`: fetch the default model, generate text, serve the OpenAI API, benchmark.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use worker::chat::{ChatMessage, ChatTemplate};
use worker::engine::{generate_blocking, Engine, EngineConfig, Event, GenRequest};
use worker::fetch;
use worker::model::LoadedModel;
use worker::sampling::SamplingParams;

#[derive(Parser)]
#[command(name = "worker", about = "GPU Streaming worker: LLM inference engine and OpenAI-compatible server")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download the default model (SmolLM2-135M-Instruct Q4_1) into the cache and print its path.
    FetchModel {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Generate a completion for one prompt.
    Generate {
        /// GGUF file; defaults to the fetched default model.
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt as a user message in the model's chat template.
        #[arg(long)]
        chat: bool,
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn model_path(p: Option<PathBuf>) -> PathBuf {
    p.unwrap_or_else(fetch::default_model_path)
}

fn load(path: &std::path::Path) -> anyhow::Result<Arc<LoadedModel>> {
    if !path.exists() {
        anyhow::bail!("model file {} not found; run `{}`", path.display(), fetch::FETCH_COMMAND);
    }
    let m = LoadedModel::load(path, true).with_context(|| format!("loading {}", path.display()))?;
    Ok(Arc::new(m))
}

#[allow(clippy::print_stdout)]
fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::FetchModel { dir } => {
            let dir = dir.unwrap_or_else(fetch::cache_dir);
            let path = fetch::fetch_default_model(&dir)?;
            println!("{}", path.display());
        }
        Cmd::Generate { model, prompt, chat, max_tokens, temperature, top_p, top_k, seed } => {
            let m = load(&model_path(model))?;
            let text = if chat {
                let tpl = m.chat_template.as_deref().context("the model has no chat template")?;
                let tpl = ChatTemplate::new(tpl, "", "")?;
                tpl.render(&[ChatMessage { role: "user".into(), content: prompt }])?
            } else {
                prompt
            };
            let engine = Engine::start(m.clone(), EngineConfig::default());
            let req = GenRequest {
                prompt: m.tokenizer.encode(&text),
                params: SamplingParams { temperature, top_p, top_k, seed, max_tokens, ..Default::default() },
                priority: 0,
            };
            let mut stdout = std::io::stdout();
            let (_, done) = generate_blocking(&engine, req, |t| {
                let _ = stdout.write_all(t.as_bytes());
                let _ = stdout.flush();
            });
            println!();
            if let Event::Done { reason, prompt_tokens, completion_tokens } = done {
                tracing::info!(finish_reason = reason.as_str(), prompt_tokens, completion_tokens, "done");
            }
        }
    }
    Ok(())
}
