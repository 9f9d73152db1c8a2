//! Hugging Face model directories: `config.json`, `*.safetensors` (F32/F16/BF16),
//! `tokenizer.json` (byte-level BPE, loaded by the `tokenize` crate) and
//! `tokenizer_config.json` (chat template).
//!
//! Weights keep their file dtype and go through the same kernels as GGUF tensors.
//! Hugging Face Llama checkpoints rotate (x[i], x[i + d/2]) pairs in RoPE, so the
//! model is marked `rope_neox`; GGUF conversions permute q/k to adjacent pairs instead.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use crate::model::{slug, Config, Layer, LoadedModel, Model, ModelError};
use crate::quant::{dequantize, GgmlType, QMatrix};

pub(crate) fn err(msg: impl Into<String>) -> ModelError {
    ModelError::Hf(msg.into())
}

pub(crate) fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| err(format!("{}: {e}", path.display())))
}

struct Tensor {
    ty: GgmlType,
    shape: Vec<usize>,
    file: usize,
    start: usize,
    end: usize,
}

/// The tensors of a directory's `*.safetensors` files (float tensors; others, such as
/// BERT's int64 `position_ids`, are skipped).
pub(crate) struct SafeTensors {
    files: Vec<Vec<u8>>,
    tensors: HashMap<String, Tensor>,
}

impl SafeTensors {
    pub(crate) fn open(dir: &Path) -> Result<SafeTensors, ModelError> {
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| err(format!("cannot list {}: {e}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(err(format!("no .safetensors files in {}", dir.display())));
        }
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for (fi, p) in paths.iter().enumerate() {
            let data = std::fs::read(p).map_err(|e| err(format!("cannot read {}: {e}", p.display())))?;
            let n = data.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).unwrap_or(u64::MAX) as usize;
            let header: Value = data
                .get(8..8usize.saturating_add(n))
                .and_then(|h| serde_json::from_slice(h).ok())
                .ok_or_else(|| err(format!("{}: bad safetensors header", p.display())))?;
            let base = 8 + n;
            for (name, t) in header.as_object().into_iter().flatten() {
                if name == "__metadata__" {
                    continue;
                }
                let ty = match t["dtype"].as_str() {
                    Some("F32") => GgmlType::F32,
                    Some("F16") => GgmlType::F16,
                    Some("BF16") => GgmlType::BF16,
                    Some("I64" | "I32" | "I16" | "I8" | "U8" | "BOOL") => continue,
                    other => return Err(err(format!("{name}: unsupported dtype {other:?}"))),
                };
                let shape: Vec<usize> =
                    t["shape"].as_array().into_iter().flatten().filter_map(|d| d.as_u64().map(|d| d as usize)).collect();
                let off: Vec<usize> =
                    t["data_offsets"].as_array().into_iter().flatten().filter_map(|d| d.as_u64().map(|d| d as usize)).collect();
                let (start, end) = match off[..] {
                    [a, b] if base + b <= data.len() && a <= b => (base + a, base + b),
                    _ => return Err(err(format!("{name}: bad data offsets"))),
                };
                if end - start != shape.iter().product::<usize>() * ty.block_bytes() {
                    return Err(err(format!("{name}: size does not match its shape")));
                }
                tensors.insert(name.clone(), Tensor { ty, shape, file: fi, start, end });
            }
            files.push(data);
        }
        Ok(SafeTensors { files, tensors })
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn get(&self, name: &str) -> Result<&Tensor, ModelError> {
        self.tensors.get(name).ok_or_else(|| err(format!("missing tensor {name}")))
    }

    fn bytes(&self, t: &Tensor) -> &[u8] {
        &self.files[t.file][t.start..t.end]
    }

    pub(crate) fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<QMatrix, ModelError> {
        let t = self.get(name)?;
        if t.shape != [rows, cols] {
            return Err(ModelError::Shape { name: name.into(), expected: vec![rows, cols], found: t.shape.clone() });
        }
        Ok(QMatrix::new(t.ty, rows, cols, self.bytes(t).to_vec()))
    }

    pub(crate) fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let t = self.get(name)?;
        if t.shape.iter().product::<usize>() != len {
            return Err(ModelError::Shape { name: name.into(), expected: vec![len], found: t.shape.clone() });
        }
        let mut out = vec![0f32; len];
        dequantize(t.ty, self.bytes(t), &mut out);
        Ok(out)
    }

    fn opt_vector(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>, ModelError> {
        if self.tensors.contains_key(name) {
            self.vector(name, len).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Per-frequency divisors of Llama 3's RoPE scaling (as llama.cpp computes them).
fn llama3_rope_freqs(cfg: &Value, theta: f32, head_dim: usize) -> Option<Vec<f32>> {
    let rs = &cfg["rope_scaling"];
    if rs["rope_type"].as_str().or(rs["type"].as_str()) != Some("llama3") {
        return None;
    }
    let factor = rs["factor"].as_f64()? as f32;
    let low = rs["low_freq_factor"].as_f64().unwrap_or(1.0) as f32;
    let high = rs["high_freq_factor"].as_f64().unwrap_or(4.0) as f32;
    let old_ctx = rs["original_max_position_embeddings"].as_f64().unwrap_or(8192.0) as f32;
    let (low_wl, high_wl) = (old_ctx / low, old_ctx / high);
    Some(
        (0..head_dim / 2)
            .map(|i| {
                let freq = 1.0 / theta.powf((2 * i) as f32 / head_dim as f32);
                let wavelen = 2.0 * std::f32::consts::PI / freq;
                if wavelen < high_wl {
                    1.0
                } else if wavelen > low_wl {
                    factor
                } else {
                    let smooth = (old_ctx / wavelen - low) / (high - low);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }
            })
            .collect(),
    )
}

pub fn load_dir(dir: &Path) -> Result<LoadedModel, ModelError> {
    let cfg = read_json(&dir.join("config.json"))?;
    let u = |k: &str| cfg[k].as_u64().map(|v| v as usize).ok_or_else(|| err(format!("config.json lacks {k}")));
    let arch = cfg["model_type"].as_str().unwrap_or("llama").to_string();
    if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
        return Err(ModelError::Architecture(arch));
    }
    let dim = u("hidden_size")?;
    let n_heads = u("num_attention_heads")?;
    let n_kv_heads = u("num_key_value_heads").unwrap_or(n_heads);
    let head_dim = u("head_dim").unwrap_or(dim / n_heads.max(1));
    let rope_theta = cfg["rope_theta"].as_f64().unwrap_or(10000.0) as f32;
    let st = SafeTensors::open(dir)?;
    let embed_shape = &st.get("model.embed_tokens.weight")?.shape;
    let vocab_size = embed_shape.first().copied().unwrap_or(0);
    let name = dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| arch.clone());
    let config = Config {
        arch: arch.clone(),
        name: name.clone(),
        n_layers: u("num_hidden_layers")?,
        dim,
        n_heads,
        n_kv_heads,
        head_dim,
        ffn_dim: u("intermediate_size")?,
        vocab_size,
        context_length: u("max_position_embeddings").unwrap_or(2048),
        rope_theta,
        rms_eps: cfg["rms_norm_eps"].as_f64().unwrap_or(1e-5) as f32,
        rope_neox: true,
        rope_linear_factor: match cfg["rope_scaling"]["type"].as_str().or(cfg["rope_scaling"]["rope_type"].as_str()) {
            Some("linear") => cfg["rope_scaling"]["factor"].as_f64().unwrap_or(1.0) as f32,
            _ => 1.0,
        },
    };
    let c = &config;
    let (qd, kvd) = (c.n_heads * c.head_dim, c.kv_dim());
    let mut layers = Vec::with_capacity(c.n_layers);
    for l in 0..c.n_layers {
        let n = |s: &str| format!("model.layers.{l}.{s}");
        layers.push(Layer {
            attn_norm: st.vector(&n("input_layernorm.weight"), c.dim)?,
            wq: st.matrix(&n("self_attn.q_proj.weight"), qd, c.dim)?,
            wk: st.matrix(&n("self_attn.k_proj.weight"), kvd, c.dim)?,
            wv: st.matrix(&n("self_attn.v_proj.weight"), kvd, c.dim)?,
            wo: st.matrix(&n("self_attn.o_proj.weight"), c.dim, qd)?,
            bq: st.opt_vector(&n("self_attn.q_proj.bias"), qd)?,
            bk: st.opt_vector(&n("self_attn.k_proj.bias"), kvd)?,
            bv: st.opt_vector(&n("self_attn.v_proj.bias"), kvd)?,
            ffn_norm: st.vector(&n("post_attention_layernorm.weight"), c.dim)?,
            w_gate: st.matrix(&n("mlp.gate_proj.weight"), c.ffn_dim, c.dim)?,
            w_up: st.matrix(&n("mlp.up_proj.weight"), c.ffn_dim, c.dim)?,
            w_down: st.matrix(&n("mlp.down_proj.weight"), c.dim, c.ffn_dim)?,
        });
    }
    let embed = st.matrix("model.embed_tokens.weight", c.vocab_size, c.dim)?;
    let norm = st.vector("model.norm.weight", c.dim)?;
    let tied = cfg["tie_word_embeddings"].as_bool().unwrap_or(false) || !st.tensors.contains_key("lm_head.weight");
    let output = if tied { None } else { Some(st.matrix("lm_head.weight", c.vocab_size, c.dim)?) };
    let rope_freqs = llama3_rope_freqs(&cfg, rope_theta, head_dim);
    let model = Model::from_parts(config, embed, layers, norm, output, rope_freqs);

    let tokenizer = tokenize::hf::load(&dir.join("tokenizer.json"))?;
    let tok_cfg = read_json(&dir.join("tokenizer_config.json")).unwrap_or(Value::Null);
    let chat_template = match &tok_cfg["chat_template"] {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => a
            .iter()
            .find(|t| t["name"].as_str() == Some("default"))
            .or(a.first())
            .and_then(|t| t["template"].as_str().map(str::to_string)),
        _ => None,
    };
    Ok(LoadedModel { model, tokenizer, chat_template, file_stem: slug(&name) })
}
