//! `/v1/embeddings`: the BERT encoder (`bert`) behind the OpenAI embeddings API, with
//! requests from all callers batched together.
//!
//! One thread owns the encoder. A request's inputs go to it as one job; the thread
//! takes every job waiting when it wakes (up to `MAX_BATCH_INPUTS` inputs) and encodes
//! them as one parallel batch, so concurrent callers share the machine's cores
//! instead of queueing one after another.
//!
//! What a request may ask (everything else is a 400 in the OpenAI shape, naming the
//! parameter): `input` a string, up to `MAX_INPUTS` strings, an array of token ids, or
//! up to `MAX_INPUTS` arrays of token ids (token ids are the text's WordPiece ids; the
//! worker adds `[CLS]` and `[SEP]` as for text); `encoding_format` `float` (default)
//! or `base64` (little-endian f32); `dimensions` only equal to the model's (the
//! encoder has no shortened vectors); `truncate: true` (extension) keeps each input's
//! first tokens when it is longer than the model's context, which is otherwise a 400
//! naming `input`. Usage counts every input's tokens, `[CLS]` and `[SEP]` included.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::bert::Encoder;

pub use tokenize::embeddings::{Refusal, MAX_INPUTS, MAX_REQUEST_TOKENS};
use tokenize::embeddings::Inputs;

/// Inputs the encoder thread takes into one batch.
pub const MAX_BATCH_INPUTS: usize = 256;

#[derive(Debug, Deserialize)]
pub struct EmbeddingsBody {
    pub model: Option<String>,
    pub input: Option<Value>,
    pub encoding_format: Option<String>,
    pub dimensions: Option<u64>,
    /// Extension: shorten inputs longer than the model's context instead of refusing.
    #[serde(default)]
    pub truncate: bool,
    #[allow(dead_code)] // Accepted, as OpenAI's API does; nothing is kept per user.
    pub user: Option<String>,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct EmbedStats {
    pub requests: AtomicU64,
    pub inputs: AtomicU64,
    pub tokens: AtomicU64,
    pub batches: AtomicU64,
}

/// What computes sentence vectors: `bert::Encoder` on the CPU, or
/// `burn_bert::BurnEncoder` on a burn device. Called on the embeddings thread only.
pub trait Encode: Send {
    fn embed_batch(&self, batch: &[Vec<u32>]) -> Vec<Vec<f32>>;
}

impl Encode for Arc<Encoder> {
    fn embed_batch(&self, batch: &[Vec<u32>]) -> Vec<Vec<f32>> {
        Encoder::embed_batch(self, batch)
    }
}

struct Job {
    ids: Vec<Vec<u32>>,
    reply: tokio::sync::oneshot::Sender<Vec<Vec<f32>>>,
}

/// The encoder, the thread that batches for it, and what clients call it.
pub struct Embedder {
    /// The model as loaded (its config and tokenizer; on the CPU, also what encodes).
    pub encoder: Arc<Encoder>,
    pub model_id: String,
    pub stats: Arc<EmbedStats>,
    jobs: mpsc::Sender<Job>,
}

impl Embedder {
    /// Serves `encoder` on the CPU.
    pub fn start(encoder: Encoder, model_id: String) -> Arc<Embedder> {
        let encoder = Arc::new(encoder);
        Self::start_on(encoder.clone(), Box::new(encoder), model_id)
    }

    /// Serves `encoder`'s model, computed by `compute` (`backend::open_encoder`).
    pub fn start_on(encoder: Arc<Encoder>, compute: Box<dyn Encode>, model_id: String) -> Arc<Embedder> {
        let stats = Arc::new(EmbedStats::default());
        let (tx, rx) = mpsc::channel::<Job>();
        let st = stats.clone();
        std::thread::Builder::new()
            .name("embeddings".into())
            .spawn(move || batch_loop(compute.as_ref(), &st, &rx))
            .unwrap_or_else(|e| panic!("cannot start the embeddings thread: {e}"));
        Arc::new(Embedder { encoder, model_id, stats, jobs: tx })
    }

    /// The token ids of each input, `[CLS]` and `[SEP]` included, or why not
    /// (`tokenize::embeddings`, which the gateway counts with too).
    pub fn inputs(&self, body: &EmbeddingsBody) -> Result<Vec<Vec<u32>>, Refusal> {
        let cfg = &self.encoder.config;
        Inputs::parse(body.input.as_ref())?.sequences(&self.encoder.tokenizer, cfg.max_positions, body.truncate)
    }

    /// Encodes `ids` in the next batch.
    pub async fn embed(&self, ids: Vec<Vec<u32>>) -> Option<Vec<Vec<f32>>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.jobs.send(Job { ids, reply }).ok()?;
        rx.await.ok()
    }
}

fn batch_loop(encoder: &dyn Encode, stats: &EmbedStats, rx: &mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let mut inputs = jobs[0].ids.len();
        while inputs < MAX_BATCH_INPUTS {
            match rx.try_recv() {
                Ok(job) => {
                    inputs += job.ids.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let counts: Vec<usize> = jobs.iter().map(|j| j.ids.len()).collect();
        let all: Vec<Vec<u32>> = jobs.iter_mut().flat_map(|j| std::mem::take(&mut j.ids)).collect();
        let started = Instant::now();
        let mut vectors = encoder.embed_batch(&all).into_iter();
        stats.batches.fetch_add(1, Relaxed);
        tracing::debug!(inputs = all.len(), requests = jobs.len(), ms = started.elapsed().as_millis() as u64, "embedding batch");
        for (job, n) in jobs.into_iter().zip(counts) {
            // A caller that went away has dropped its receiver; nothing to do.
            let _ = job.reply.send(vectors.by_ref().take(n).collect());
        }
    }
}

/// The OpenAI response for `vectors` (one per input, in order).
pub fn response(model: &str, vectors: &[Vec<f32>], prompt_tokens: usize, format: &str) -> Value {
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if format == "base64" {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    json!({"object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})
}
