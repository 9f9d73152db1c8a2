//! A Llama-family model as loaded (Llama 1-3, SmolLM, Mistral, Qwen2): its
//! configuration and weights (GQA attention with RoPE — theta, linear and llama3
//! frequency scaling —, RMSNorm, SwiGLU, tied or separate output embedding, optional
//! q/k/v bias), with its tokenizer and chat template.
//!
//! This module is data only. Loading fills it (`load`: GGUF files, `hf`: Hugging Face
//! directories); the forward passes read it (`native`: CPU kernels on the quantized
//! weights, `burn_model`: burn tensors on a device). Nothing here imports them.

use crate::gguf::GgufError;
use crate::quant::{GgmlType, QMatrix};
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
    /// Keys and values one token adds to the cache, all layers.
    pub fn kv_values_per_token(&self) -> usize {
        self.n_layers * 2 * self.kv_dim()
    }
    /// KV-cache bytes one token occupies (f32 keys and values, all layers).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.kv_values_per_token() * 4
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

impl Layer {
    /// The layer's seven weight matrices.
    pub(crate) fn matrices(&self) -> [&QMatrix; 7] {
        [&self.wq, &self.wk, &self.wv, &self.wo, &self.w_gate, &self.w_up, &self.w_down]
    }
}

pub struct Model {
    pub config: Config,
    pub(crate) embed: QMatrix,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Vec<f32>,
    /// `None` when the output projection is tied to the token embedding.
    pub(crate) output: Option<QMatrix>,
    /// RoPE inverse frequencies (`head_dim / 2`), scaling applied.
    pub(crate) inv_freq: Vec<f32>,
    pub weight_bytes: usize,
}

/// A loaded model with its tokenizer and chat template.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub file_stem: String,
}

impl LoadedModel {
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

impl Model {
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
                .map(|l| l.matrices().iter().map(|m| m.data.len()).sum::<usize>())
                .sum::<usize>();
        Model { config, embed, layers, norm, output, inv_freq, weight_bytes }
    }

    pub fn output_type(&self) -> GgmlType {
        self.output.as_ref().unwrap_or(&self.embed).ty
    }
}
