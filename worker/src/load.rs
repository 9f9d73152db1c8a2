//! Loading a model: a GGUF file (quantized tensors mapped from the file, the tokenizer
//! and chat template from its metadata) or a Hugging Face directory (`hf`). Loading
//! only fills `model::Model`; it knows nothing of the forward passes.

use std::path::Path;

use crate::gguf::{Gguf, TensorInfo};
use crate::model::{Config, Layer, LoadedModel, Model, ModelError};
use crate::quant::QMatrix;
use crate::tokenizer::Tokenizer;

impl LoadedModel {
    /// Loads a GGUF file, or a Hugging Face model directory (config.json,
    /// *.safetensors, tokenizer.json, tokenizer_config.json).
    pub fn load(path: &Path, progress: bool) -> Result<LoadedModel, ModelError> {
        if path.is_dir() {
            return crate::hf::load_dir(path);
        }
        let g = Gguf::open(path)?;
        let tokenizer = Tokenizer::from_gguf(&g)?;
        let model = model_from_gguf(&g, progress)?;
        let chat_template = g.get_str("tokenizer.chat_template").map(str::to_string);
        let file_stem = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(LoadedModel { model, tokenizer, chat_template, file_stem })
    }
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

/// The model's configuration and tensors from a GGUF file (quantized tensors are
/// copied as they are; the kernels read them directly).
pub fn model_from_gguf(g: &Gguf, progress: bool) -> Result<Model, ModelError> {
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
