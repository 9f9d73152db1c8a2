//! `worker bench`: throughput and latency of the engine in-process (no HTTP), so the
//! numbers are the engine's own; and `worker logits`, every position's logits of a
//! token sequence, which worker/scripts/gpu-check.sh compares with `transformers`.

use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;

use llguidance::Matcher;

use crate::bert::Encoder;
use crate::grammar::Grammars;
use crate::engine::{Engine, Event, GenRequest};
use crate::forward::{BatchItem, Forward, StepError};
use crate::model::Model;
use crate::quant::Precision;
use crate::sampling::SamplingParams;

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub concurrency: Vec<usize>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig { prompt_tokens: 512, decode_tokens: 128, concurrency: vec![1, 4, 16, 32] }
    }
}

/// Decode speed with and without a JSON schema (`grammar`), same prompts and length.
#[derive(Debug, Clone, Serialize)]
pub struct ConstrainedRow {
    pub streams: usize,
    /// Per-stream decode tokens per second, free and under the schema.
    pub free_tps: f64,
    pub schema_tps: f64,
}

/// A schema whose answers are longer than any bench run (forty strings), so a
/// constrained stream runs its whole `max_tokens` as a free one does.
fn long_schema() -> serde_json::Value {
    serde_json::json!({"type": "json_schema", "json_schema": {"name": "notes", "schema": {"type": "object",
        "properties": {"notes": {"type": "array", "minItems": 40, "maxItems": 40, "items": {"type": "string", "maxLength": 40}}},
        "required": ["notes"], "additionalProperties": false}}})
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub streams: usize,
    /// Generated tokens per second over all streams, first token to last.
    pub aggregate_tps: f64,
    /// Decode tokens per second of one stream (mean over streams).
    pub per_stream_tps: f64,
    #[serde(serialize_with = "as_ms")]
    pub ttft_mean: Duration,
}

/// Durations in the JSON report are milliseconds.
fn as_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// What `worker bench` prints (`Display`, a Markdown table) or writes (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub prompt_tokens: usize,
    pub prompt_tps: f64,
    #[serde(serialize_with = "as_ms")]
    pub prompt_ttft: Duration,
    #[serde(serialize_with = "as_ms")]
    pub short_ttft: Duration,
    pub rows: Vec<Row>,
    /// At one stream and at the most streams measured.
    pub constrained: Vec<ConstrainedRow>,
    pub peak_rss_mb: u64,
    pub threads: usize,
    pub device: String,
    /// The float type weights are computed in (`quantized` on the native path).
    pub weights: &'static str,
    /// GPU memory in use at the end (total − free: the process's weights, cache and
    /// buffers on a machine that runs nothing else); CUDA only.
    pub device_memory_used_mb: Option<u64>,
}

struct StreamResult {
    ttft: Duration,
    first: Instant,
    last: Instant,
    tokens: usize,
}

fn run_streams(engine: &Engine, prompts: Vec<Vec<u32>>, max_tokens: usize) -> Vec<StreamResult> {
    run_constrained(engine, prompts, max_tokens, None)
}

/// Runs `prompts` as concurrent streams of `max_tokens` tokens each, every one under
/// its own copy of `constraint` when there is one.
fn run_constrained(engine: &Engine, prompts: Vec<Vec<u32>>, max_tokens: usize, constraint: Option<&Matcher>) -> Vec<StreamResult> {
    let start = Instant::now();
    let rxs: Vec<_> = prompts
        .into_iter()
        .map(|prompt| {
            let req = GenRequest {
                prompt,
                params: SamplingParams { max_tokens, ignore_eos: true, ..Default::default() },
                priority: 0,
                precision: engine.config.default_precision,
            };
            engine.submit_constrained(req, constraint.map(Matcher::deep_clone))
        })
        .collect();
    let handles: Vec<_> = rxs
        .into_iter()
        .map(|mut rx| {
            std::thread::spawn(move || {
                let mut first = None;
                let mut last = Instant::now();
                let mut tokens = 0;
                while let Some(ev) = rx.blocking_recv() {
                    let now = Instant::now();
                    match ev {
                        Event::Logprob(_) => {}
                        Event::Text(_) => {
                            first.get_or_insert(now);
                            last = now;
                        }
                        Event::Error { .. } => break,
                        Event::Done { completion_tokens, .. } => {
                            tokens = completion_tokens;
                            first.get_or_insert(now);
                            last = now;
                            break;
                        }
                    }
                }
                let first = first.unwrap_or(last);
                StreamResult { ttft: first - start, first, last, tokens }
            })
        })
        .collect();
    handles.into_iter().filter_map(|h| h.join().ok()).collect()
}

/// Decode tokens per second of one stream, first token to last (mean over streams).
fn per_stream_tps(results: &[StreamResult]) -> f64 {
    results.iter().map(|r| r.tokens.saturating_sub(1) as f64 / (r.last - r.first).as_secs_f64().max(1e-9)).sum::<f64>()
        / results.len().max(1) as f64
}

pub fn run(engine: &Engine, cfg: &BenchConfig) -> BenchReport {
    let tok = &engine.model.tokenizer;
    let text = "The quick brown fox jumps over the lazy dog while the river runs to the sea. ".repeat(64);
    let mut long: Vec<u32> = tok.encode(&text);
    long.truncate(cfg.prompt_tokens);
    // Warm up caches and the thread pool.
    run_streams(engine, vec![tok.encode("Hello")], 4);
    let r = run_streams(engine, vec![long], 1);
    let prompt_ttft = r.first().map_or(Duration::ZERO, |r| r.ttft);
    let prompt_tps = cfg.prompt_tokens as f64 / prompt_ttft.as_secs_f64().max(1e-9);
    let mut rows = Vec::new();
    let mut short_ttft = Duration::ZERO;
    for &n in &cfg.concurrency {
        let prompts = (0..n).map(|i| tok.encode(&format!("Story number {i}: Once upon a time, in a land far away,"))).collect();
        let results = run_streams(engine, prompts, cfg.decode_tokens);
        let first = results.iter().map(|r| r.first).min();
        let last = results.iter().map(|r| r.last).max();
        let total: usize = results.iter().map(|r| r.tokens.saturating_sub(1)).sum();
        let span = match (first, last) {
            (Some(f), Some(l)) => (l - f).as_secs_f64().max(1e-9),
            _ => 1.0,
        };
        let per_stream = per_stream_tps(&results);
        let ttft_mean = results.iter().map(|r| r.ttft).sum::<Duration>() / results.len().max(1) as u32;
        if n == 1 {
            short_ttft = ttft_mean;
        }
        rows.push(Row { streams: n, aggregate_tps: total as f64 / span, per_stream_tps: per_stream, ttft_mean });
    }
    let constrained = match Grammars::new(tok).and_then(|g| g.constraint(Some(&long_schema()))) {
        Ok(Some(m)) => {
            let most = cfg.concurrency.iter().copied().max().unwrap_or(1);
            let mut counts = vec![1, most];
            counts.dedup();
            counts
                .into_iter()
                .map(|n| {
                    let prompts = || (0..n).map(|i| tok.encode(&format!("Write notes number {i} about the sea as JSON."))).collect();
                    let free = per_stream_tps(&run_constrained(engine, prompts(), cfg.decode_tokens, None));
                    let schema = per_stream_tps(&run_constrained(engine, prompts(), cfg.decode_tokens, Some(&m)));
                    ConstrainedRow { streams: n, free_tps: free, schema_tps: schema }
                })
                .collect()
        }
        Ok(None) | Err(_) => Vec::new(),
    };
    let device = engine.forward.device();
    BenchReport {
        prompt_tokens: cfg.prompt_tokens,
        prompt_tps,
        prompt_ttft,
        short_ttft,
        rows,
        constrained,
        peak_rss_mb: crate::host::peak_rss_mb(),
        threads: rayon::current_num_threads(),
        device: format!("{} on {}", device.engine, device.name),
        weights: device.weights,
        device_memory_used_mb: device
            .memory_total_mb
            .zip(device.memory_free_mb)
            .filter(|_| device.kind == "cuda")
            .map(|(t, f)| t.saturating_sub(f)),
    }
}

/// The logits of every position of `tokens`, prefilled `chunk` tokens per step in one
/// sequence: row `i` predicts token `i + 1`.
pub fn logits(forward: &dyn Forward, model: &Model, tokens: &[u32], chunk: usize) -> Result<Vec<Vec<f32>>, StepError> {
    let Some(mut cache) = forward.new_cache(model) else {
        return Err(StepError::Backend { backend: forward.device().engine, detail: "no free cache slot".into() });
    };
    let mut rows = Vec::with_capacity(tokens.len());
    for part in tokens.chunks(chunk.max(1)) {
        let mut items = [BatchItem { cache: &mut cache, tokens: part, want_logits: true, all_logits: true }];
        rows.extend(forward.forward(model, &mut items, Precision::Fast)?);
    }
    Ok(rows)
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "device: {} · {} compute threads", self.device, self.threads)?;
        writeln!(f)?;
        writeln!(f, "| metric | value |")?;
        writeln!(f, "|---|---|")?;
        writeln!(f, "| prompt processing ({}-token prompt) | {:.0} tok/s (TTFT {:.0} ms) |", self.prompt_tokens, self.prompt_tps, self.prompt_ttft.as_secs_f64() * 1e3)?;
        writeln!(f, "| TTFT, short prompt, 1 stream | {:.0} ms |", self.short_ttft.as_secs_f64() * 1e3)?;
        writeln!(f, "| weights | {} |", self.weights)?;
        writeln!(f, "| peak RSS | {} MiB |", self.peak_rss_mb)?;
        if let Some(mb) = self.device_memory_used_mb {
            writeln!(f, "| device memory in use | {mb} MiB |")?;
        }
        writeln!(f)?;
        writeln!(f, "| streams | aggregate decode tok/s | per-stream tok/s | mean TTFT |")?;
        writeln!(f, "|---|---|---|---|")?;
        for r in &self.rows {
            writeln!(f, "| {} | {:.0} | {:.1} | {:.0} ms |", r.streams, r.aggregate_tps, r.per_stream_tps, r.ttft_mean.as_secs_f64() * 1e3)?;
        }
        if !self.constrained.is_empty() {
            writeln!(f)?;
            writeln!(f, "| streams | per-stream tok/s, free | with a JSON schema | schema costs |")?;
            writeln!(f, "|---|---|---|---|")?;
            for r in &self.constrained {
                let cost = (1.0 - r.schema_tps / r.free_tps.max(1e-9)) * 100.0;
                writeln!(f, "| {} | {:.1} | {:.1} | {cost:.1} % |", r.streams, r.free_tps, r.schema_tps)?;
            }
        }
        Ok(())
    }
}

/// One row of `worker bench-embeddings`: sentences encoded per second at a batch size.
#[derive(Debug, Clone)]
pub struct EmbedRow {
    pub batch: usize,
    pub sentences_per_s: f64,
    pub batch_latency: Duration,
}

/// Sentences per second of `encoder` at each batch size (batches of distinct
/// sentences, repeated for at least `min_time`), after one warm-up batch.
pub fn embeddings(encoder: &Encoder, batches: &[usize], min_time: Duration) -> Vec<EmbedRow> {
    let sentence = |i: usize| encoder.tokenizer.encode(&format!("Sentence number {i} is about the weather in a small town by the sea, and it rains."));
    encoder.embed_batch(&[sentence(0)]);
    batches
        .iter()
        .map(|&b| {
            let batch: Vec<Vec<u32>> = (0..b.max(1)).map(sentence).collect();
            let (start, mut rounds) = (Instant::now(), 0u32);
            while rounds == 0 || start.elapsed() < min_time {
                encoder.embed_batch(&batch);
                rounds += 1;
            }
            let spent = start.elapsed();
            EmbedRow { batch: b, sentences_per_s: (rounds as usize * batch.len()) as f64 / spent.as_secs_f64(), batch_latency: spent / rounds }
        })
        .collect()
}
