//! Llama-family decoder (Llama 1-3, SmolLM, Mistral, Qwen2): GQA attention with RoPE
//! (theta, linear and llama3 frequency scaling), RMSNorm, SwiGLU, tied or separate
//! output embedding, optional q/k/v bias.
//!
//! `forward` runs one step over a flattened batch of rows from many sequences, each
//! with its own KV cache; every row's math is independent of what else is in the
//! batch, so results at one precision are identical alone or batched. The precision
//! is chosen per step by the caller (the engine: exact when any sequence needs it).

use std::path::Path;

use rayon::prelude::*;

use crate::burn_model::BurnForward;
use crate::gguf::{Gguf, GgufError, TensorInfo};
use crate::quant::{dot, matmul_group, GgmlType, Precision, QMatrix};
use crate::tokenizer::{Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("unsupported architecture {0:?}")]
    Architecture(String),
    #[error("{0}")]
    Hf(String),
    #[error("tensor {name}: expected shape {expected:?}, found {found:?}")]
    Shape { name: String, expected: Vec<usize>, found: Vec<usize> },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub arch: String,
    pub name: String,
    pub n_layers: usize,
    pub dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    /// Rotate (x[i], x[i + d/2]) pairs (GPT-NeoX style) instead of adjacent pairs.
    pub rope_neox: bool,
    pub rope_linear_factor: f32,
}

impl Config {
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    /// KV-cache bytes one token occupies (f32 keys and values, all layers).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.n_layers * 2 * self.kv_dim() * 4
    }
}

pub struct Layer {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) wq: QMatrix,
    pub(crate) wk: QMatrix,
    pub(crate) wv: QMatrix,
    pub(crate) wo: QMatrix,
    pub(crate) bq: Option<Vec<f32>>,
    pub(crate) bk: Option<Vec<f32>>,
    pub(crate) bv: Option<Vec<f32>>,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) w_gate: QMatrix,
    pub(crate) w_up: QMatrix,
    pub(crate) w_down: QMatrix,
}

pub struct Model {
    pub config: Config,
    pub(crate) embed: QMatrix,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Vec<f32>,
    /// `None` when the output projection is tied to the token embedding.
    pub(crate) output: Option<QMatrix>,
    /// cos/sin per (position, frequency), computed lazily up to the longest position seen.
    inv_freq: Vec<f32>,
    pub weight_bytes: usize,
    /// When set, `forward` runs on burn (GPU with the `cuda` feature) instead of the
    /// native kernels.
    burn: Option<Box<dyn BurnForward>>,
}

/// A loaded model with its tokenizer and chat template.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub file_stem: String,
}

impl LoadedModel {
    /// Loads a GGUF file, or a Hugging Face model directory (config.json,
    /// *.safetensors, tokenizer.json, tokenizer_config.json).
    pub fn load(path: &Path, progress: bool) -> Result<LoadedModel, ModelError> {
        if path.is_dir() {
            return crate::hf::load_dir(path);
        }
        let g = Gguf::open(path)?;
        let tokenizer = Tokenizer::from_gguf(&g)?;
        let model = Model::from_gguf(&g, progress)?;
        let chat_template = g.get_str("tokenizer.chat_template").map(str::to_string);
        let file_stem = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(LoadedModel { model, tokenizer, chat_template, file_stem })
    }

    /// The id clients use: the file name without its quantization suffix
    /// (`SmolLM2-135M-Instruct.Q4_1.gguf` → `smollm2-135m-instruct`), else `general.name`.
    pub fn default_model_id(&self) -> String {
        let stem = self.file_stem.trim_end_matches(".gguf");
        let base = match stem.rsplit_once('.') {
            Some((b, q)) if q.starts_with(['Q', 'q', 'F', 'f', 'B', 'b', 'I', 'i']) && q.len() <= 8 => b,
            _ => stem,
        };
        let base = if base.is_empty() { self.model.config.name.as_str() } else { base };
        slug(base)
    }
}

pub fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || c == '.' {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.trim_end_matches('-').to_string()
}

fn vec_f32(g: &Gguf, t: &TensorInfo) -> Vec<f32> {
    let mut out = vec![0f32; t.n_elements()];
    crate::quant::dequantize(t.ty, g.tensor_data(t), &mut out);
    out
}

fn matrix(g: &Gguf, name: &str, rows: usize, cols: usize) -> Result<QMatrix, ModelError> {
    let t = g.tensor(name)?;
    if t.dims.len() != 2 || t.dims[0] != cols || t.dims[1] != rows {
        return Err(ModelError::Shape { name: name.to_string(), expected: vec![cols, rows], found: t.dims.clone() });
    }
    Ok(QMatrix::new(t.ty, rows, cols, g.tensor_data(t).to_vec()))
}

fn vector(g: &Gguf, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
    let t = g.tensor(name)?;
    if t.n_elements() != len {
        return Err(ModelError::Shape { name: name.to_string(), expected: vec![len], found: t.dims.clone() });
    }
    Ok(vec_f32(g, t))
}

fn opt_vector(g: &Gguf, name: &str, len: usize) -> Result<Option<Vec<f32>>, ModelError> {
    if g.has_tensor(name) {
        vector(g, name, len).map(Some)
    } else {
        Ok(None)
    }
}

impl Model {
    pub fn from_gguf(g: &Gguf, progress: bool) -> Result<Model, ModelError> {
        let arch = g.get_str("general.architecture").unwrap_or("llama").to_string();
        let rope_neox = match arch.as_str() {
            "llama" | "mistral" | "granite" => false,
            "qwen2" | "qwen3" => true,
            other => return Err(ModelError::Architecture(other.to_string())),
        };
        let k = |s: &str| format!("{arch}.{s}");
        let dim = g.get_u64(&k("embedding_length"))? as usize;
        let n_heads = g.get_u64(&k("attention.head_count"))? as usize;
        let n_kv_heads = g.get_u64(&k("attention.head_count_kv")).map_or(n_heads, |v| v as usize);
        let head_dim = g.get_u64(&k("attention.key_length")).map_or(dim / n_heads.max(1), |v| v as usize);
        let embed_info = g.tensor("token_embd.weight")?;
        let vocab_size = embed_info.dims.get(1).copied().unwrap_or(0);
        let config = Config {
            name: g.get_str("general.name").unwrap_or(&arch).to_string(),
            n_layers: g.get_u64(&k("block_count"))? as usize,
            dim,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_dim: g.get_u64(&k("feed_forward_length"))? as usize,
            vocab_size,
            context_length: g.get_u64(&k("context_length")).map_or(2048, |v| v as usize),
            rope_theta: g.get_f64(&k("rope.freq_base")).unwrap_or(10000.0) as f32,
            rms_eps: g.get_f64(&k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5) as f32,
            rope_neox,
            rope_linear_factor: match g.get_str(&k("rope.scaling.type")) {
                Some("linear") => g.get_f64(&k("rope.scaling.factor")).unwrap_or(1.0) as f32,
                _ => 1.0,
            },
            arch,
        };
        let bar = if progress {
            let total: u64 = g.tensors.iter().map(|t| t.n_bytes as u64).sum();
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template("loading {msg} [{bar:30}] {bytes}/{total_bytes}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        let c = &config;
        let qd = c.n_heads * c.head_dim;
        let kvd = c.kv_dim();
        let embed = matrix(g, "token_embd.weight", c.vocab_size, c.dim)?;
        bar.inc(embed.data.len() as u64);
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            let n = |s: &str| format!("blk.{l}.{s}");
            bar.set_message(format!("layer {}/{}", l + 1, c.n_layers));
            let layer = Layer {
                attn_norm: vector(g, &n("attn_norm.weight"), c.dim)?,
                wq: matrix(g, &n("attn_q.weight"), qd, c.dim)?,
                wk: matrix(g, &n("attn_k.weight"), kvd, c.dim)?,
                wv: matrix(g, &n("attn_v.weight"), kvd, c.dim)?,
                wo: matrix(g, &n("attn_output.weight"), c.dim, qd)?,
                bq: opt_vector(g, &n("attn_q.bias"), qd)?,
                bk: opt_vector(g, &n("attn_k.bias"), kvd)?,
                bv: opt_vector(g, &n("attn_v.bias"), kvd)?,
                ffn_norm: vector(g, &n("ffn_norm.weight"), c.dim)?,
                w_gate: matrix(g, &n("ffn_gate.weight"), c.ffn_dim, c.dim)?,
                w_up: matrix(g, &n("ffn_up.weight"), c.ffn_dim, c.dim)?,
                w_down: matrix(g, &n("ffn_down.weight"), c.dim, c.ffn_dim)?,
            };
            let bytes: usize = [&layer.wq, &layer.wk, &layer.wv, &layer.wo, &layer.w_gate, &layer.w_up, &layer.w_down]
                .iter()
                .map(|m| m.data.len())
                .sum();
            bar.inc(bytes as u64);
            layers.push(layer);
        }
        let norm = vector(g, "output_norm.weight", c.dim)?;
        let output = if g.has_tensor("output.weight") {
            Some(matrix(g, "output.weight", c.vocab_size, c.dim)?)
        } else {
            None
        };
        bar.finish_and_clear();
        // llama3-style scaling ships precomputed per-frequency divisors.
        let rope_freqs = g.tensor("rope_freqs.weight").ok().map(|t| vec_f32(g, t));
        Ok(Model::from_parts(config, embed, layers, norm, output, rope_freqs))
    }

    pub(crate) fn from_parts(
        config: Config,
        embed: QMatrix,
        layers: Vec<Layer>,
        norm: Vec<f32>,
        output: Option<QMatrix>,
        rope_freqs: Option<Vec<f32>>,
    ) -> Model {
        let c = &config;
        let half = c.head_dim / 2;
        let mut inv_freq: Vec<f32> =
            (0..half).map(|i| 1.0 / c.rope_theta.powf((2 * i) as f32 / c.head_dim as f32)).collect();
        for (v, d) in inv_freq.iter_mut().zip(rope_freqs.into_iter().flatten()) {
            *v /= d;
        }
        for v in inv_freq.iter_mut() {
            *v /= c.rope_linear_factor;
        }
        let weight_bytes = embed.data.len()
            + output.as_ref().map_or(0, |o| o.data.len())
            + layers
                .iter()
                .map(|l| {
                    [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down].iter().map(|m| m.data.len()).sum::<usize>()
                })
                .sum::<usize>();
        Model { config, embed, layers, norm, output, inv_freq, weight_bytes, burn: None }
    }

    /// Moves the forward pass onto burn's default backend (CUDA with the `cuda`
    /// feature, ndarray otherwise), with f32 weights on the device.
    pub fn use_burn(&mut self) {
        let device = Default::default();
        let b = crate::burn_model::BurnModel::<crate::burn_model::DefaultBurnBackend>::new(self, device);
        self.burn = Some(Box::new(b));
    }

    pub fn backend_name(&self) -> &'static str {
        match (&self.burn, cfg!(feature = "cuda")) {
            (None, _) => "native-cpu",
            (Some(_), true) => "burn-cuda",
            (Some(_), false) => "burn-ndarray",
        }
    }

    pub fn output_type(&self) -> GgmlType {
        self.output.as_ref().unwrap_or(&self.embed).ty
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache { k: vec![Vec::new(); self.config.n_layers], v: vec![Vec::new(); self.config.n_layers], len: 0, ext: None }
    }

    /// `(sin, cos)` of every rotary frequency at `pos`: the same for all heads and
    /// layers, so a step computes them once per row instead of once per head per
    /// layer (12 heads × 30 layers of the same values for SmolLM2).
    fn rope_angles(&self, pos: usize) -> Vec<(f32, f32)> {
        self.inv_freq.iter().map(|f| (pos as f32 * f).sin_cos()).collect()
    }

    fn rope(&self, x: &mut [f32], angles: &[(f32, f32)]) {
        let hd = self.config.head_dim;
        let half = hd / 2;
        for head in x.chunks_exact_mut(hd) {
            for (i, &(sin, cos)) in angles.iter().enumerate().take(half) {
                let (a, b) = if self.config.rope_neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
            }
        }
    }

    /// Runs one step at `precision`. Each item appends its tokens to its cache; the
    /// returned vector holds, for every item with `want_logits`, the logits of its last
    /// token. The burn path always runs f32 weights, which is `Exact`'s contract.
    pub fn forward(&self, items: &mut [BatchItem<'_>], precision: Precision) -> Vec<Vec<f32>> {
        if let Some(b) = &self.burn {
            return items.iter_mut().filter_map(|it| b.forward_one(&self.config, &self.inv_freq, self, it)).collect();
        }
        // A step has about 150 parallel regions. Forked from a thread outside the
        // pool, each one sends this thread to sleep and wakes it again; run from a
        // pool thread, the step forks and joins among the pool's own threads, which
        // stay awake between regions. `scope` moves the call onto the pool (and runs
        // it in place when already there).
        rayon::scope(|_| self.forward_native(items, precision))
    }

    fn forward_native(&self, items: &mut [BatchItem<'_>], precision: Precision) -> Vec<Vec<f32>> {
        let c = &self.config;
        let (dim, hd, kvd) = (c.dim, c.head_dim, c.kv_dim());
        let qd = c.n_heads * hd;
        let mut row_item = Vec::new();
        let mut row_pos = Vec::new();
        let mut tokens = Vec::new();
        for (i, it) in items.iter().enumerate() {
            for (j, &t) in it.tokens.iter().enumerate() {
                row_item.push(i);
                row_pos.push(it.cache.len + j);
                tokens.push(t);
            }
        }
        let n = tokens.len();
        if n == 0 {
            return Vec::new();
        }
        let mut x = vec![0f32; n * dim];
        for (r, &t) in tokens.iter().enumerate() {
            let t = (t as usize).min(c.vocab_size.saturating_sub(1));
            self.embed.dequantize_row(t, &mut x[r * dim..(r + 1) * dim]);
        }
        let mut h = vec![0f32; n * dim];
        let mut q = vec![0f32; n * qd];
        let mut k = vec![0f32; n * kvd];
        let mut v = vec![0f32; n * kvd];
        let mut att = vec![0f32; n * qd];
        let mut o = vec![0f32; n * dim];
        let mut g = vec![0f32; n * c.ffn_dim];
        let mut u = vec![0f32; n * c.ffn_dim];
        let row_angles: Vec<Vec<(f32, f32)>> = row_pos.iter().map(|&p| self.rope_angles(p)).collect();
        let group = c.n_heads / c.n_kv_heads.max(1);
        let scale = 1.0 / (hd as f32).sqrt();
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, c.rms_eps, &mut h);
            matmul_group(&[&layer.wq, &layer.wk, &layer.wv], &h, n, &mut [&mut q, &mut k, &mut v], precision);
            add_bias(&mut q, layer.bq.as_deref());
            add_bias(&mut k, layer.bk.as_deref());
            add_bias(&mut v, layer.bv.as_deref());
            for (r, angles) in row_angles.iter().enumerate() {
                self.rope(&mut q[r * qd..(r + 1) * qd], angles);
                self.rope(&mut k[r * kvd..(r + 1) * kvd], angles);
            }
            for r in 0..n {
                let cache = &mut *items[row_item[r]].cache;
                cache.k[l].extend_from_slice(&k[r * kvd..(r + 1) * kvd]);
                cache.v[l].extend_from_slice(&v[r * kvd..(r + 1) * kvd]);
            }
            let caches: Vec<&KvCache> = items.iter().map(|it| &*it.cache).collect();
            att.par_chunks_mut(qd).enumerate().for_each(|(r, out)| {
                let cache = caches[row_item[r]];
                let (kc, vc) = (&cache.k[l], &cache.v[l]);
                let span = row_pos[r] + 1;
                let mut scores = vec![0f32; span];
                for hh in 0..c.n_heads {
                    let kvh = hh / group;
                    let qh = &q[r * qd + hh * hd..r * qd + (hh + 1) * hd];
                    let mut max = f32::NEG_INFINITY;
                    for (t, s) in scores.iter_mut().enumerate() {
                        *s = dot(qh, &kc[t * kvd + kvh * hd..t * kvd + (kvh + 1) * hd]) * scale;
                        max = max.max(*s);
                    }
                    let mut sum = 0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let oh = &mut out[hh * hd..(hh + 1) * hd];
                    oh.fill(0.0);
                    for (t, s) in scores.iter().enumerate() {
                        let w = s / sum;
                        let vt = &vc[t * kvd + kvh * hd..t * kvd + (kvh + 1) * hd];
                        for (a, b) in oh.iter_mut().zip(vt) {
                            *a += w * b;
                        }
                    }
                }
            });
            layer.wo.matmul_with(&att, n, &mut o, precision);
            for (a, b) in x.iter_mut().zip(&o) {
                *a += b;
            }
            rms_norm(&x, &layer.ffn_norm, c.rms_eps, &mut h);
            matmul_group(&[&layer.w_gate, &layer.w_up], &h, n, &mut [&mut g, &mut u], precision);
            // SwiGLU is elementwise, so chunks split anywhere give the same results;
            // its `exp`s were about 1% of a 16-row step, all on one core. A single
            // chunk stays on this thread: handing it to the pool costs a wake-up.
            let swiglu = |(gc, uc): (&mut [f32], &[f32])| {
                for (a, b) in gc.iter_mut().zip(uc) {
                    *a = *a / (1.0 + (-*a).exp()) * b;
                }
            };
            if g.len() > SILU_CHUNK {
                g.par_chunks_mut(SILU_CHUNK).zip(u.par_chunks(SILU_CHUNK)).for_each(swiglu);
            } else {
                swiglu((&mut g, &u));
            }
            layer.w_down.matmul_with(&g, n, &mut o, precision);
            for (a, b) in x.iter_mut().zip(&o) {
                *a += b;
            }
        }
        for it in items.iter_mut() {
            it.cache.len += it.tokens.len();
        }
        // Only the last row of each item that wants logits goes through the output head.
        let mut last_rows = Vec::new();
        let mut row = 0;
        for it in items.iter() {
            row += it.tokens.len();
            if it.want_logits && !it.tokens.is_empty() {
                last_rows.push(row - 1);
            }
        }
        let m = last_rows.len();
        if m == 0 {
            return Vec::new();
        }
        let mut xs = vec![0f32; m * dim];
        for (i, &r) in last_rows.iter().enumerate() {
            xs[i * dim..(i + 1) * dim].copy_from_slice(&x[r * dim..(r + 1) * dim]);
        }
        let mut hs = vec![0f32; m * dim];
        rms_norm(&xs, &self.norm, c.rms_eps, &mut hs);
        let head = self.output.as_ref().unwrap_or(&self.embed);
        let mut logits = vec![0f32; m * c.vocab_size];
        head.matmul_with(&hs, m, &mut logits, precision);
        logits.chunks_exact(c.vocab_size).map(<[f32]>::to_vec).collect()
    }
}

/// Elements per parallel SwiGLU task: one task for a single row of a small model,
/// enough tasks for both cores at batch sizes that matter.
const SILU_CHUNK: usize = 4096;

fn add_bias(x: &mut [f32], b: Option<&[f32]>) {
    if let Some(b) = b {
        for row in x.chunks_exact_mut(b.len()) {
            for (a, bb) in row.iter_mut().zip(b) {
                *a += bb;
            }
        }
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for ((o, a), b) in or.iter_mut().zip(xr).zip(w) {
            *o = a * inv * b;
        }
    }
}

/// Per-sequence attention keys and values, f32, all layers.
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    pub len: usize,
    /// The burn path's device-side cache.
    pub(crate) ext: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl KvCache {
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|x| x.capacity() * 4).sum()
    }
}

pub struct BatchItem<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    pub want_logits: bool,
}
