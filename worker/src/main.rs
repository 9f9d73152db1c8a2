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
use worker::quant::Precision;
use worker::registration::GatewayConfig;
use worker::serve::ServeConfig;
use worker::sampling::SamplingParams;

#[derive(Parser)]
#[command(name = "worker", about = "GPU Streaming worker: LLM inference engine and OpenAI-compatible server")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // Parsed once.
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
        /// Full precision: exact f32 math on dequantized weights (slower).
        #[arg(long)]
        exact: bool,
        #[arg(long, default_value = "native")]
        backend: Backend,
    },
    /// Measure prompt and decode throughput, TTFT and memory; prints a Markdown table.
    Bench {
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 128)]
        decode_tokens: usize,
        /// Concurrent stream counts to measure.
        #[arg(long, default_value = "1,4,16,32", value_delimiter = ',')]
        streams: Vec<usize>,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Serve the OpenAI API, optionally joined to a gateway as a provider.
    Serve {
        /// GGUF file; defaults to the fetched default model.
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, default_value = "0.0.0.0")]
        host: String,
        #[arg(long, default_value_t = 8081)]
        port: u16,
        /// Model id clients use (default: from the file name or `general.name`).
        #[arg(long)]
        model_id: Option<String>,
        #[command(flatten)]
        engine: EngineArgs,
        /// Gateway to join (register, go on line, heartbeat).
        #[arg(long)]
        gateway: Option<String>,
        #[arg(long, env = "WORKER_PROVIDER_KEY")]
        provider_key: Option<String>,
        #[arg(long)]
        provider_id: Option<String>,
        /// URL the gateway uses to reach this worker (default http://127.0.0.1:PORT).
        #[arg(long)]
        public_url: Option<String>,
        /// Provider name shown at the gateway (default: the host name).
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value_t = 0.000002)]
        price_per_token: f64,
        #[arg(long, default_value_t = 0.5)]
        price_per_hour: f64,
        #[arg(long, default_value_t = 5.0)]
        minimum_payout: f64,
        /// Qualities served, comma-separated; one gateway stream each.
        #[arg(long, default_value = "low,standard,high,ultra", value_delimiter = ',')]
        qualities: Vec<String>,
        /// Where the provider credentials are kept.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
}

#[derive(clap::Args, Clone)]
struct EngineArgs {
    /// Requests that name no `precision` get full precision (exact f32 math on
    /// dequantized weights, slower); by default they get reduced precision (the fused
    /// quantized kernels, which differ only in f32 rounding). A request's own
    /// `precision` (`full` or `reduced`, sent by the gateway per quality tier) wins.
    #[arg(long)]
    exact: bool,
    /// `native` (quantized CPU kernels) or `burn` (burn tensors: CUDA when built with
    /// `--features cuda`, ndarray on CPU otherwise; f32 weights).
    #[arg(long, default_value = "native")]
    backend: Backend,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 32)]
    max_seqs: usize,
    /// KV-cache memory budget in MiB (each admitted request reserves
    /// min(prompt + max_tokens, context) tokens of f32 keys and values).
    #[arg(long, default_value_t = 8192)]
    kv_budget_mb: usize,
    /// Prompt tokens processed per step (chunked prefill).
    #[arg(long, default_value_t = 256)]
    prefill_chunk: usize,
}

impl EngineArgs {
    fn config(&self) -> EngineConfig {
        EngineConfig {
            max_seqs: self.max_seqs.max(1),
            kv_budget_bytes: self.kv_budget_mb << 20,
            prefill_chunk: self.prefill_chunk.max(1),
            default_precision: precision(self.exact),
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Native,
    Burn,
}

fn precision(exact: bool) -> Precision {
    if exact { Precision::Exact } else { Precision::Fast }
}

fn apply_backend(m: &mut Arc<LoadedModel>, backend: Backend) {
    if backend == Backend::Burn {
        if let Some(m) = Arc::get_mut(m) {
            m.model.use_burn();
        }
    }
    tracing::info!(backend = m.model.backend_name(), "model ready");
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
        Cmd::Generate { model, prompt, chat, max_tokens, temperature, top_p, top_k, seed, exact, backend } => {
            let mut m = load(&model_path(model))?;
            apply_backend(&mut m, backend);
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
                precision: precision(exact),
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
        Cmd::Bench { model, prompt_tokens, decode_tokens, streams, engine } => {
            let mut m = load(&model_path(model))?;
            apply_backend(&mut m, engine.backend);
            let mut cfg = engine.config();
            cfg.max_seqs = cfg.max_seqs.max(streams.iter().copied().max().unwrap_or(1));
            let engine = Engine::start(m, cfg);
            let report = worker::bench::run(&engine, &worker::bench::BenchConfig { prompt_tokens, decode_tokens, concurrency: streams });
            println!("{report}");
        }
        Cmd::Serve {
            model,
            host,
            port,
            model_id,
            engine,
            gateway,
            provider_key,
            provider_id,
            public_url,
            name,
            price_per_token,
            price_per_hour,
            minimum_payout,
            qualities,
            key_file,
        } => {
            let mut m = load(&model_path(model))?;
            apply_backend(&mut m, engine.backend);
            let model_id = model_id.unwrap_or_else(|| m.default_model_id());
            let engine = Engine::start(m, engine.config());
            let gateway = gateway.map(|url| GatewayConfig {
                url,
                provider_key,
                provider_id,
                public_url: public_url.unwrap_or_else(|| format!("http://127.0.0.1:{port}")),
                name: name.unwrap_or_else(|| {
                    std::fs::read_to_string("/etc/hostname").map_or_else(|_| "worker".into(), |h| h.trim().to_string())
                }),
                per_token_usd: price_per_token,
                per_hour_usd: price_per_hour,
                minimum_payout_usd: minimum_payout,
                qualities,
                key_file: key_file.unwrap_or_else(worker::registration::default_key_file),
            });
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(worker::serve::run(engine, model_id, ServeConfig { host, port, gateway }))?;
        }
    }
    Ok(())
}
