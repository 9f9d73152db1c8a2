//! `worker`: fetch the default model, generate text, serve the OpenAI API, benchmark.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use worker::backend::{BackendChoice, BurnDevice, Choice};
use worker::burn_model::Dtype;
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
        /// The default embedding model (all-MiniLM-L6-v2) instead; prints its directory.
        #[arg(long)]
        embedding: bool,
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
        #[command(flatten)]
        engine: EngineArgs,
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
        /// Also write the report as JSON here (durations in milliseconds).
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Sentences per second of a BERT embedding model at each batch size; prints a
    /// Markdown table.
    BenchEmbeddings {
        /// A sentence-transformers directory (`worker fetch-model --embedding`).
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value = "1,32", value_delimiter = ',')]
        batches: Vec<usize>,
        /// Seconds each batch size runs at least.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Write the logits of every position of a token sequence (little-endian f32,
    /// `[tokens, vocab]`), for comparing with another implementation.
    Logits {
        #[arg(long)]
        model: Option<PathBuf>,
        /// Token ids, one per line or separated by commas or spaces.
        #[arg(long, conflicts_with = "text", required_unless_present = "text")]
        tokens: Option<PathBuf>,
        /// A text file to tokenize with the model's tokenizer instead.
        #[arg(long)]
        text: Option<PathBuf>,
        /// Keep the first N tokens.
        #[arg(long)]
        max_tokens: Option<usize>,
        /// Write the token ids used here (one line, comma-separated).
        #[arg(long)]
        tokens_out: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Serve the OpenAI API, optionally joined to a gateway as a provider.
    Serve {
        /// GGUF file; defaults to the fetched default model.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Address to listen on; 127.0.0.1 unless you open it (`--host 0.0.0.0`).
        #[arg(long, default_value = "127.0.0.1")]
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
        /// With --provider-id and --provider-key: the relay secret registration returned.
        #[arg(long, env = "WORKER_RELAY_SECRET")]
        relay_secret: Option<String>,
        /// A key callers must send (`Authorization: Bearer KEY`); a worker without
        /// --gateway needs it, or --open.
        #[arg(long, env = "WORKER_API_KEY")]
        api_key: Option<String>,
        /// Answer `/v1/*` without any key (a private network only).
        #[arg(long)]
        open: bool,
        /// PEM certificate chain: serve HTTPS (with --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// URL the gateway uses to reach this worker. Without it the worker dials out to
        /// the gateway and serves over that connection (works behind NAT; honours
        /// HTTPS_PROXY / HTTP_PROXY / NO_PROXY).
        #[arg(long)]
        public_url: Option<String>,
        /// PEM certificates to trust for an https --gateway besides the usual roots.
        #[arg(long)]
        gateway_ca: Option<PathBuf>,
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
        /// A sentence-transformers BERT directory (all-MiniLM-L6-v2:
        /// `worker fetch-model --embedding`) to serve `/v1/embeddings` with.
        #[arg(long)]
        embedding_model: Option<PathBuf>,
        /// Model id of the embedding model (default: its folder's name, lowercased).
        #[arg(long, requires = "embedding_model")]
        embedding_model_id: Option<String>,
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
    /// `auto`: burn on CUDA when built with `--features cuda` and a CUDA device opens,
    /// else the native CPU kernels (one log line says why). `native`: the quantized CPU
    /// kernels. `burn`: burn tensors (f32 weights) on `--burn-device`, or an error
    /// naming what is missing.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Where `--backend burn` computes: `cuda` (default in a `cuda` build), `wgpu`
    /// (a Vulkan adapter, with `--features wgpu`) or `ndarray` (the CPU; default
    /// otherwise).
    #[arg(long, value_enum)]
    burn_device: Option<BurnDevice>,
    /// The float type of weights, activations and KV cache on burn: `bf16` (default on
    /// CUDA), `f16` or `f32` (default elsewhere). burn on CUDA or Vulkan serves
    /// `reduced` precision only, whatever the type (autotuned kernels).
    #[arg(long, value_enum)]
    dtype: Option<Dtype>,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 32)]
    max_seqs: usize,
    /// KV-cache memory budget in MiB (each admitted request reserves
    /// min(prompt + max_tokens, context) tokens of keys and values: f32 on the CPU, the
    /// `--dtype` on burn). On burn the whole budget is allocated on the device at
    /// start, one slot per sequence.
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

fn precision(exact: bool) -> Precision {
    if exact { Precision::Exact } else { Precision::Fast }
}

/// Opens the backend the flags ask for and starts the engine on it, logging what
/// computes and its memory.
fn start_engine(m: Arc<LoadedModel>, args: &EngineArgs, cfg: EngineConfig) -> anyhow::Result<Engine> {
    let burn_device = args.burn_device.unwrap_or_else(BurnDevice::default_for_build);
    let choice = Choice { backend: args.backend, burn_device, dtype: args.dtype };
    let opened = worker::backend::open(&m.model, choice, cfg.max_seqs, cfg.kv_budget_bytes)?;
    let d = &opened.device;
    if args.exact && !d.serves_full() {
        anyhow::bail!("--exact asks for full precision by default, but {} ({}) serves `reduced` precision only (full is exact, batch-invariant f32: --backend native)", d.engine, d.weights);
    }
    tracing::info!(
        engine = d.engine,
        kind = d.kind,
        device = %d.name,
        weights = d.weights,
        memory_total_mb = d.memory_total_mb,
        memory_free_mb = d.memory_free_mb,
        "model ready"
    );
    Ok(Engine::start_with(m, opened.forward, cfg))
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
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,cubecl_runtime::tune=warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::FetchModel { dir, embedding } => {
            let dir = dir.unwrap_or_else(fetch::cache_dir);
            let path = if embedding { fetch::fetch_embedding_model(&dir)? } else { fetch::fetch_default_model(&dir)? };
            println!("{}", path.display());
        }
        Cmd::Generate { model, prompt, chat, max_tokens, temperature, top_p, top_k, seed, engine } => {
            let m = load(&model_path(model))?;
            let text = if chat {
                let tpl = m.chat_template.as_deref().context("the model has no chat template")?;
                let tpl = ChatTemplate::new(tpl, "", "")?;
                tpl.render(&[ChatMessage::new("user", prompt)])?
            } else {
                prompt
            };
            let cfg = engine.config();
            let exact = engine.exact;
            let engine = start_engine(m.clone(), &engine, cfg)?;
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
            match done {
                Event::Done { reason, prompt_tokens, completion_tokens } => {
                    tracing::info!(finish_reason = reason.as_str(), prompt_tokens, completion_tokens, "done");
                }
                Event::Error { message } => anyhow::bail!(message),
                _ => {}
            }
        }
        Cmd::Bench { model, prompt_tokens, decode_tokens, streams, json, engine } => {
            let m = load(&model_path(model))?;
            let mut cfg = engine.config();
            cfg.max_seqs = cfg.max_seqs.max(streams.iter().copied().max().unwrap_or(1));
            let engine = start_engine(m, &engine, cfg)?;
            let report = worker::bench::run(&engine, &worker::bench::BenchConfig { prompt_tokens, decode_tokens, concurrency: streams });
            println!("{report}");
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&report)?).with_context(|| format!("writing {}", path.display()))?;
            }
        }
        Cmd::BenchEmbeddings { model, batches, seconds } => {
            let encoder = worker::bert::Encoder::load(&model).with_context(|| format!("loading {}", model.display()))?;
            let rows = worker::bench::embeddings(&encoder, &batches, std::time::Duration::from_secs_f64(seconds));
            println!("model: {} · {} compute threads\n", model.display(), rayon::current_num_threads());
            println!("| batch | sentences/s | batch latency |\n|---|---|---|");
            for r in rows {
                println!("| {} | {:.0} | {:.1} ms |", r.batch, r.sentences_per_s, r.batch_latency.as_secs_f64() * 1e3);
            }
        }
        Cmd::Logits { model, tokens, text, max_tokens, tokens_out, out, engine } => {
            let m = load(&model_path(model))?;
            let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
            let mut ids = match (&tokens, &text) {
                (Some(path), _) => read(path)?
                    .split(|c: char| c == ',' || c.is_whitespace())
                    .filter(|t| !t.is_empty())
                    .map(|t| t.parse::<u32>().with_context(|| format!("{}: `{t}` is not a token id", path.display())))
                    .collect::<anyhow::Result<Vec<u32>>>()?,
                (None, Some(path)) => m.tokenizer.encode(&read(path)?),
                (None, None) => anyhow::bail!("--tokens or --text"),
            };
            ids.truncate(max_tokens.unwrap_or(usize::MAX));
            let vocab = m.model.config.vocab_size;
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                anyhow::bail!("token id {bad} is outside the vocabulary ({vocab})");
            }
            if let Some(path) = tokens_out {
                let line = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
                std::fs::write(&path, line + "\n").with_context(|| format!("writing {}", path.display()))?;
            }
            let mut cfg = engine.config();
            cfg.max_seqs = 1;
            cfg.kv_budget_bytes = cfg.kv_budget_bytes.max(ids.len() * m.model.config.kv_bytes_per_token());
            let chunk = cfg.prefill_chunk;
            let engine = start_engine(m.clone(), &engine, cfg)?;
            let rows = worker::bench::logits(engine.forward.as_ref(), &m.model, &ids, chunk)?;
            let bytes: Vec<u8> = rows.iter().flatten().flat_map(|v| v.to_le_bytes()).collect();
            std::fs::write(&out, bytes).with_context(|| format!("writing {}", out.display()))?;
            tracing::info!(positions = rows.len(), vocab, out = %out.display(), "logits written");
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
            relay_secret,
            api_key,
            open,
            tls_cert,
            tls_key,
            public_url,
            gateway_ca,
            name,
            price_per_token,
            price_per_hour,
            minimum_payout,
            qualities,
            key_file,
            embedding_model,
            embedding_model_id,
        } => {
            let m = load(&model_path(model))?;
            let model_id = model_id.unwrap_or_else(|| m.default_model_id());
            let cfg = engine.config();
            let engine = start_engine(m, &engine, cfg)?;
            let embedder = match embedding_model {
                Some(dir) => {
                    let encoder = worker::bert::Encoder::load(&dir).with_context(|| format!("loading the embedding model {}", dir.display()))?;
                    let id = embedding_model_id.unwrap_or_else(|| worker::model::slug(&dir.file_name().unwrap_or_default().to_string_lossy()));
                    let encoder = Arc::new(encoder);
                    // On the chat model's device; the CPU when that device cannot run it.
                    let (compute, on) = match worker::backend::open_encoder(&encoder, engine.forward.device().engine) {
                        Ok(opened) => opened,
                        Err(e) => {
                            tracing::warn!("the embedding model cannot run on the chat model's device ({e}); encoding on the CPU");
                            (Box::new(encoder.clone()) as Box<dyn worker::embeddings::Encode>, "native-cpu")
                        }
                    };
                    tracing::info!(model = %id, dim = encoder.config.hidden, engine = on, "embedding model ready");
                    Some(worker::embeddings::Embedder::start_on(encoder, compute, id))
                }
                None => None,
            };
            let gateway = gateway.map(|url| GatewayConfig {
                url,
                provider_key,
                provider_id,
                relay_secret,
                public_url,
                gateway_ca,
                name: name.unwrap_or_else(|| {
                    std::fs::read_to_string("/etc/hostname").map_or_else(|_| "worker".into(), |h| h.trim().to_string())
                }),
                per_token_usd: price_per_token,
                per_hour_usd: price_per_hour,
                minimum_payout_usd: minimum_payout,
                qualities,
                key_file: key_file.unwrap_or_else(worker::registration::default_key_file),
                embedding_models: embedder.iter().map(|e| e.model_id.clone()).collect(),
            });
            let rt = tokio::runtime::Runtime::new()?;
            let tls = tls_cert.zip(tls_key);
            rt.block_on(worker::serve::run(engine, model_id, ServeConfig { host, port, gateway, api_key, open, tls, embedder }))?;
        }
    }
    Ok(())
}
