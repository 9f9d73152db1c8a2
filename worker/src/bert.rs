//! A BERT-family sentence encoder on the CPU (all-MiniLM-L6-v2 and its kin), from a
//! sentence-transformers directory: `config.json` (a `bert` model), `model.safetensors`,
//! `tokenizer.json` (WordPiece, from the `tokenize` crate), `modules.json` and
//! `1_Pooling/config.json` (how token vectors become one sentence vector, and whether
//! it is normalised).
//!
//! The math is BERT's, in f32: token + position + segment-0 embeddings, LayerNorm;
//! per layer self-attention (bidirectional, one sequence so no padding mask), output
//! projection, residual and LayerNorm, then the GELU (erf) feed-forward, residual and
//! LayerNorm. The sentence vector is the pooling the model names (mean over tokens,
//! `[CLS]`, or max), L2-normalised when `modules.json` lists `Normalize`. A batch's
//! rows go through each layer together; matrix products use `quant`'s f32 kernels
//! (`Precision::Exact`), attention runs per sequence.

use std::path::Path;

use rayon::prelude::*;
use serde_json::Value;
use tokenize::wordpiece::WordPiece;

use crate::hf::{err, read_json, SafeTensors};
use crate::model::ModelError;
use crate::quant::{add_bias, dot, matmul_group, Precision, QMatrix};

/// How token vectors become the sentence vector (`1_Pooling/config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
}

#[derive(Debug, Clone)]
pub struct BertConfig {
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    pub intermediate: usize,
    /// Positions the model has embeddings for (its context, 512 for MiniLM).
    pub max_positions: usize,
    pub vocab: usize,
    pub eps: f32,
    pub pooling: Pooling,
    pub normalize: bool,
}

/// `y = x Wᵀ + b`.
pub(crate) struct Linear {
    pub(crate) w: QMatrix,
    pub(crate) b: Vec<f32>,
}

impl Linear {
    fn load(st: &SafeTensors, name: &str, out: usize, inp: usize) -> Result<Linear, ModelError> {
        Ok(Linear { w: st.matrix(&format!("{name}.weight"), out, inp)?, b: st.vector(&format!("{name}.bias"), out)? })
    }
}

pub(crate) struct Norm {
    pub(crate) w: Vec<f32>,
    pub(crate) b: Vec<f32>,
}

impl Norm {
    fn load(st: &SafeTensors, name: &str, n: usize) -> Result<Norm, ModelError> {
        Ok(Norm { w: st.vector(&format!("{name}.weight"), n)?, b: st.vector(&format!("{name}.bias"), n)? })
    }

    /// LayerNorm of each `n`-wide row of `x`, in place.
    fn apply(&self, x: &mut [f32], eps: f32) {
        let n = self.w.len();
        for row in x.chunks_exact_mut(n) {
            let mean = row.iter().sum::<f32>() / n as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for ((v, w), b) in row.iter_mut().zip(&self.w).zip(&self.b) {
                *v = (*v - mean) * inv * w + b;
            }
        }
    }
}

pub(crate) struct Layer {
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    pub(crate) attn_norm: Norm,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
    pub(crate) out_norm: Norm,
}

pub struct Encoder {
    pub config: BertConfig,
    pub tokenizer: WordPiece,
    pub(crate) word: Vec<f32>,
    pub(crate) position: Vec<f32>,
    pub(crate) segment: Vec<f32>,
    pub(crate) embed_norm: Norm,
    pub(crate) layers: Vec<Layer>,
}

/// `x Wᵀ + b` for `n` rows, with `quant`'s f32 kernels.
fn linear_group(ls: &[&Linear], x: &[f32], n: usize) -> Vec<Vec<f32>> {
    let mut outs: Vec<Vec<f32>> = ls.iter().map(|l| vec![0f32; n * l.w.rows]).collect();
    let mats: Vec<&QMatrix> = ls.iter().map(|l| &l.w).collect();
    {
        let mut refs: Vec<&mut [f32]> = outs.iter_mut().map(Vec::as_mut_slice).collect();
        matmul_group(&mats, x, n, &mut refs, Precision::Exact);
    }
    for (out, l) in outs.iter_mut().zip(ls) {
        add_bias(out, Some(&l.b));
    }
    outs
}

/// The error function, to 1.5e-7 (Abramowitz and Stegun 7.1.26), for GELU.
fn erf(x: f32) -> f32 {
    let x = f64::from(x);
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t * (0.254_829_592 + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let y = 1.0 - poly * (-x * x).exp();
    (if x < 0.0 { -y } else { y }) as f32
}

fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

impl Encoder {
    /// Loads a sentence-transformers directory.
    pub fn load(dir: &Path) -> Result<Encoder, ModelError> {
        let cfg = read_json(&dir.join("config.json"))?;
        if cfg["model_type"].as_str() != Some("bert") {
            return Err(ModelError::Architecture(cfg["model_type"].as_str().unwrap_or("?").to_string()));
        }
        let num = |k: &str| cfg[k].as_u64().map(|v| v as usize).ok_or_else(|| err(format!("config.json: no {k}")));
        if cfg["hidden_act"].as_str().is_some_and(|a| a != "gelu") {
            return Err(err(format!("config.json: hidden_act {} (only gelu is supported)", cfg["hidden_act"])));
        }
        if cfg["position_embedding_type"].as_str().is_some_and(|p| p != "absolute") {
            return Err(err("config.json: only absolute position embeddings are supported"));
        }
        let pool = read_json(&dir.join("1_Pooling/config.json")).ok();
        let flag = |k: &str| pool.as_ref().and_then(|p| p[k].as_bool()).unwrap_or(false);
        let pooling = match (flag("pooling_mode_cls_token"), flag("pooling_mode_max_tokens")) {
            (true, _) => Pooling::Cls,
            (_, true) => Pooling::Max,
            _ => Pooling::Mean,
        };
        let modules = read_json(&dir.join("modules.json")).unwrap_or(Value::Null);
        let normalize = modules.as_array().into_iter().flatten().any(|m| m["type"].as_str().is_some_and(|t| t.ends_with(".Normalize")));
        let config = BertConfig {
            hidden: num("hidden_size")?,
            heads: num("num_attention_heads")?,
            layers: num("num_hidden_layers")?,
            intermediate: num("intermediate_size")?,
            max_positions: num("max_position_embeddings")?,
            vocab: num("vocab_size")?,
            eps: cfg["layer_norm_eps"].as_f64().unwrap_or(1e-12) as f32,
            pooling,
            normalize,
        };
        if config.heads == 0 || config.hidden % config.heads != 0 {
            return Err(err("config.json: hidden_size is not a multiple of num_attention_heads"));
        }
        let tokenizer = WordPiece::load(&dir.join("tokenizer.json"))?;
        let st = SafeTensors::open(dir)?;
        // Checkpoints saved from `BertModel` name tensors from the root; from a task
        // model (`BertForMaskedLM`…) under `bert.`.
        let p = if st.has("embeddings.word_embeddings.weight") { "" } else { "bert." };
        let (h, f) = (config.hidden, config.intermediate);
        let layers = (0..config.layers)
            .map(|l| {
                let q = format!("{p}encoder.layer.{l}.");
                Ok(Layer {
                    q: Linear::load(&st, &format!("{q}attention.self.query"), h, h)?,
                    k: Linear::load(&st, &format!("{q}attention.self.key"), h, h)?,
                    v: Linear::load(&st, &format!("{q}attention.self.value"), h, h)?,
                    o: Linear::load(&st, &format!("{q}attention.output.dense"), h, h)?,
                    attn_norm: Norm::load(&st, &format!("{q}attention.output.LayerNorm"), h)?,
                    up: Linear::load(&st, &format!("{q}intermediate.dense"), f, h)?,
                    down: Linear::load(&st, &format!("{q}output.dense"), h, f)?,
                    out_norm: Norm::load(&st, &format!("{q}output.LayerNorm"), h)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Encoder {
            word: st.vector(&format!("{p}embeddings.word_embeddings.weight"), config.vocab * h)?,
            position: st.vector(&format!("{p}embeddings.position_embeddings.weight"), config.max_positions * h)?,
            segment: st.vector(&format!("{p}embeddings.token_type_embeddings.weight"), 2 * h)?,
            embed_norm: Norm::load(&st, &format!("{p}embeddings.LayerNorm"), h)?,
            layers,
            config,
            tokenizer,
        })
    }

    /// The sentence vector of one token sequence (`[CLS] … [SEP]`, at most
    /// `max_positions` ids, each below `vocab`; the caller checks both).
    pub fn embed(&self, ids: &[u32]) -> Vec<f32> {
        self.embed_batch(&[ids.to_vec()]).remove(0)
    }

    /// Sentence vectors of many sequences in one pass: their rows go through each layer
    /// together (every weight is read once per batch, not once per sentence);
    /// attention stays within each sequence.
    pub fn embed_batch(&self, batch: &[Vec<u32>]) -> Vec<Vec<f32>> {
        let c = &self.config;
        let h = c.hidden;
        let mut spans = Vec::with_capacity(batch.len());
        let mut rows = 0;
        for ids in batch {
            spans.push((rows, ids.len()));
            rows += ids.len();
        }
        let mut x = vec![0f32; rows * h];
        for (ids, &(r0, _)) in batch.iter().zip(&spans) {
            for (i, &id) in ids.iter().enumerate() {
                let w = &self.word[id as usize * h..][..h];
                let p = &self.position[i * h..][..h];
                for (j, v) in x[(r0 + i) * h..][..h].iter_mut().enumerate() {
                    *v = w[j] + p[j] + self.segment[j];
                }
            }
        }
        self.embed_norm.apply(&mut x, c.eps);
        for layer in &self.layers {
            self.layer(layer, &mut x, &spans);
        }
        spans.iter().map(|&(r0, n)| self.pool(&x[r0 * h..(r0 + n) * h], n)).collect()
    }

    /// The sentence vector from a sequence's `n` final token vectors.
    fn pool(&self, x: &[f32], n: usize) -> Vec<f32> {
        let c = &self.config;
        let h = c.hidden;
        let mut out = vec![0f32; h];
        match c.pooling {
            Pooling::Cls => out.copy_from_slice(&x[..h]),
            Pooling::Max => {
                out.fill(f32::NEG_INFINITY);
                for row in x.chunks_exact(h) {
                    for (o, v) in out.iter_mut().zip(row) {
                        *o = o.max(*v);
                    }
                }
            }
            Pooling::Mean => {
                for row in x.chunks_exact(h) {
                    for (o, v) in out.iter_mut().zip(row) {
                        *o += v;
                    }
                }
                out.iter_mut().for_each(|o| *o /= n.max(1) as f32);
            }
        }
        if c.normalize {
            let norm = dot(&out, &out).sqrt().max(1e-12);
            out.iter_mut().for_each(|o| *o /= norm);
        }
        out
    }

    /// One encoder layer over the rows of every sequence in `spans` (first row, rows).
    fn layer(&self, l: &Layer, x: &mut [f32], spans: &[(usize, usize)]) {
        let c = &self.config;
        let (h, heads) = (c.hidden, c.heads);
        let hd = h / heads;
        let n = x.len() / h;
        let mut qkv = linear_group(&[&l.q, &l.k, &l.v], x, n).into_iter();
        let (q, k, v) = (qkv.next().unwrap_or_default(), qkv.next().unwrap_or_default(), qkv.next().unwrap_or_default());
        let scale = 1.0 / (hd as f32).sqrt();
        let mut ctx = vec![0f32; n * h];
        // Attention per sequence, in parallel over sequences.
        let mut parts: Vec<&mut [f32]> = Vec::with_capacity(spans.len());
        let mut rest = ctx.as_mut_slice();
        for &(_, len) in spans {
            let (part, tail) = rest.split_at_mut(len * h);
            parts.push(part);
            rest = tail;
        }
        parts.into_par_iter().zip(spans).for_each(|(out, &(r0, len))| {
            let mut scores = vec![0f32; len];
            for head in 0..heads {
                let col = head * hd;
                for i in 0..len {
                    let qi = &q[(r0 + i) * h + col..][..hd];
                    for (j, s) in scores.iter_mut().enumerate() {
                        *s = dot(qi, &k[(r0 + j) * h + col..][..hd]) * scale;
                    }
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let o = &mut out[i * h + col..][..hd];
                    for (j, s) in scores.iter().enumerate() {
                        let p = s / sum;
                        for (o, vv) in o.iter_mut().zip(&v[(r0 + j) * h + col..][..hd]) {
                            *o += p * vv;
                        }
                    }
                }
            }
        });
        let attn = linear_group(&[&l.o], &ctx, n).remove(0);
        for (xv, a) in x.iter_mut().zip(&attn) {
            *xv += a;
        }
        l.attn_norm.apply(x, c.eps);
        let mut up = linear_group(&[&l.up], x, n).remove(0);
        up.iter_mut().for_each(|u| *u = gelu(*u));
        let down = linear_group(&[&l.down], &up, n).remove(0);
        for (xv, d) in x.iter_mut().zip(&down) {
            *xv += d;
        }
        l.out_norm.apply(x, c.eps);
    }
}
