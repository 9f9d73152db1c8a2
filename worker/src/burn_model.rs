//! The same Llama-family forward pass written with burn tensors, generic over the
//! backend: burn-cuda with the `cuda` feature (GPU), burn-ndarray otherwise.
//!
//! Weights are dequantized to f32 device tensors at load time (exact f32 math, like
//! `Precision::Exact`). Each sequence keeps its KV cache on the device; within an
//! engine step, sequences run one after another (no cross-sequence batching on this
//! path yet).

use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::model::{BatchItem, Config, Model};
use crate::quant::QMatrix;

/// The backend `--backend burn` uses: CUDA when built with the `cuda` feature.
#[cfg(feature = "cuda")]
pub type DefaultBurnBackend = burn::backend::Cuda;
#[cfg(not(feature = "cuda"))]
pub type DefaultBurnBackend = burn::backend::NdArray;

struct Layer<B: Backend> {
    attn_norm: Tensor<B, 1>,
    wq: Tensor<B, 2>,
    wk: Tensor<B, 2>,
    wv: Tensor<B, 2>,
    wo: Tensor<B, 2>,
    bq: Option<Tensor<B, 1>>,
    bk: Option<Tensor<B, 1>>,
    bv: Option<Tensor<B, 1>>,
    ffn_norm: Tensor<B, 1>,
    w_gate: Tensor<B, 2>,
    w_up: Tensor<B, 2>,
    w_down: Tensor<B, 2>,
}

pub struct BurnModel<B: Backend> {
    device: B::Device,
    layers: Vec<Layer<B>>,
    norm: Tensor<B, 1>,
    /// [dim, vocab]
    head: Tensor<B, 2>,
}

/// Per-sequence device KV cache: per layer ([kv_heads, len, head_dim] keys, values).
struct DeviceKv<B: Backend> {
    layers: Vec<Option<(Tensor<B, 3>, Tensor<B, 3>)>>,
}

/// Object-safe view of a `BurnModel<B>` so `Model` can hold any backend.
pub trait BurnForward: Send + Sync {
    fn forward_one(&self, cfg: &Config, inv_freq: &[f32], model: &Model, item: &mut BatchItem<'_>) -> Option<Vec<f32>>;
}

fn vec1<B: Backend>(v: &[f32], device: &B::Device) -> Tensor<B, 1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), device)
}

/// `[rows, cols]` weights as a `[cols, rows]` tensor so that `x.matmul(w)` applies them.
fn mat<B: Backend>(m: &QMatrix, device: &B::Device) -> Tensor<B, 2> {
    let mut data = vec![0f32; m.rows * m.cols];
    for r in 0..m.rows {
        m.dequantize_row(r, &mut data[r * m.cols..(r + 1) * m.cols]);
    }
    Tensor::<B, 2>::from_data(TensorData::new(data, [m.rows, m.cols]), device).transpose()
}

impl<B: Backend> BurnModel<B> {
    pub fn new(model: &Model, device: B::Device) -> BurnModel<B> {
        let d = &device;
        let layers = model
            .layers
            .iter()
            .map(|l| Layer {
                attn_norm: vec1(&l.attn_norm, d),
                wq: mat(&l.wq, d),
                wk: mat(&l.wk, d),
                wv: mat(&l.wv, d),
                wo: mat(&l.wo, d),
                bq: l.bq.as_deref().map(|b| vec1(b, d)),
                bk: l.bk.as_deref().map(|b| vec1(b, d)),
                bv: l.bv.as_deref().map(|b| vec1(b, d)),
                ffn_norm: vec1(&l.ffn_norm, d),
                w_gate: mat(&l.w_gate, d),
                w_up: mat(&l.w_up, d),
                w_down: mat(&l.w_down, d),
            })
            .collect();
        let head = mat(model.output.as_ref().unwrap_or(&model.embed), d);
        BurnModel { norm: vec1(&model.norm, d), layers, head, device }
    }

    fn rms_norm(x: Tensor<B, 2>, w: &Tensor<B, 1>, eps: f32) -> Tensor<B, 2> {
        let [t, d] = x.dims();
        let ms = x.clone().powf_scalar(2.0).mean_dim(1).add_scalar(eps).sqrt().expand([t, d]);
        x.div(ms).mul(w.clone().unsqueeze_dim::<2>(0).expand([t, d]))
    }

    /// Rotary embedding on `[t, heads, hd]` with host-computed cos/sin of shape [t, hd/2].
    fn rope(&self, x: Tensor<B, 3>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>, neox: bool) -> Tensor<B, 3> {
        let [t, h, hd] = x.dims();
        let half = hd / 2;
        let cos = cos.clone().unsqueeze_dim::<3>(1).expand([t, h, half]);
        let sin = sin.clone().unsqueeze_dim::<3>(1).expand([t, h, half]);
        if neox {
            let x0 = x.clone().narrow(2, 0, half);
            let x1 = x.narrow(2, half, half);
            let a = x0.clone().mul(cos.clone()).sub(x1.clone().mul(sin.clone()));
            let b = x0.mul(sin).add(x1.mul(cos));
            Tensor::cat(vec![a, b], 2)
        } else {
            let pairs = x.reshape([t, h, half, 2]);
            let x0 = pairs.clone().narrow(3, 0, 1).reshape([t, h, half]);
            let x1 = pairs.narrow(3, 1, 1).reshape([t, h, half]);
            let a = x0.clone().mul(cos.clone()).sub(x1.clone().mul(sin.clone()));
            let b = x0.mul(sin).add(x1.mul(cos));
            Tensor::cat(vec![a.unsqueeze_dim::<4>(3), b.unsqueeze_dim::<4>(3)], 3).reshape([t, h, hd])
        }
    }
}

fn add_bias<B: Backend>(x: Tensor<B, 2>, b: &Option<Tensor<B, 1>>) -> Tensor<B, 2> {
    match b {
        Some(b) => {
            let [t, n] = x.dims();
            x.add(b.clone().unsqueeze_dim::<2>(0).expand([t, n]))
        }
        None => x,
    }
}

impl<B: Backend> BurnForward for BurnModel<B>
where
    B::Device: Send + Sync,
{
    fn forward_one(&self, c: &Config, inv_freq: &[f32], model: &Model, item: &mut BatchItem<'_>) -> Option<Vec<f32>> {
        let dev = &self.device;
        let t = item.tokens.len();
        if t == 0 {
            return None;
        }
        let past = item.cache.len;
        let (dim, hd) = (c.dim, c.head_dim);
        let (nh, nkv) = (c.n_heads, c.n_kv_heads);
        let group = nh / nkv.max(1);
        // Token embeddings are gathered on the host from the quantized table.
        let mut emb = vec![0f32; t * dim];
        for (r, &tok) in item.tokens.iter().enumerate() {
            let tok = (tok as usize).min(c.vocab_size.saturating_sub(1));
            model.embed.dequantize_row(tok, &mut emb[r * dim..(r + 1) * dim]);
        }
        let mut x = Tensor::<B, 2>::from_data(TensorData::new(emb, [t, dim]), dev);
        let half = hd / 2;
        let (mut cos, mut sin) = (Vec::with_capacity(t * half), Vec::with_capacity(t * half));
        for p in past..past + t {
            for f in inv_freq.iter().take(half) {
                let (s, co) = (p as f32 * f).sin_cos();
                cos.push(co);
                sin.push(s);
            }
        }
        let cos = Tensor::<B, 2>::from_data(TensorData::new(cos, [t, half]), dev);
        let sin = Tensor::<B, 2>::from_data(TensorData::new(sin, [t, half]), dev);
        let total = past + t;
        let mut mask = vec![0f32; t * total];
        for i in 0..t {
            for j in past + i + 1..total {
                mask[i * total + j] = f32::NEG_INFINITY;
            }
        }
        let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [t, total]), dev).unsqueeze_dim::<3>(0).expand([nh, t, total]);
        let scale = 1.0 / (hd as f32).sqrt();

        let kv = item.cache.ext.get_or_insert_with(|| Box::new(DeviceKv::<B> { layers: Vec::new() }));
        let kv = kv.downcast_mut::<DeviceKv<B>>()?;
        kv.layers.resize_with(c.n_layers, || None);

        for (l, layer) in self.layers.iter().enumerate() {
            let h = BurnModel::<B>::rms_norm(x.clone(), &layer.attn_norm, c.rms_eps);
            let q = add_bias(h.clone().matmul(layer.wq.clone()), &layer.bq).reshape([t, nh, hd]);
            let k = add_bias(h.clone().matmul(layer.wk.clone()), &layer.bk).reshape([t, nkv, hd]);
            let v = add_bias(h.matmul(layer.wv.clone()), &layer.bv).reshape([t, nkv, hd]);
            let q = self.rope(q, &cos, &sin, c.rope_neox).swap_dims(0, 1); // [nh, t, hd]
            let k = self.rope(k, &cos, &sin, c.rope_neox).swap_dims(0, 1); // [nkv, t, hd]
            let v = v.swap_dims(0, 1);
            let (k_all, v_all) = match kv.layers[l].take() {
                Some((pk, pv)) => (Tensor::cat(vec![pk, k], 1), Tensor::cat(vec![pv, v], 1)),
                None => (k, v),
            };
            kv.layers[l] = Some((k_all.clone(), v_all.clone()));
            // Grouped-query attention: each kv head serves `group` query heads.
            let k_rep = k_all.unsqueeze_dim::<4>(1).expand([nkv, group, total, hd]).reshape([nh, total, hd]);
            let v_rep = v_all.unsqueeze_dim::<4>(1).expand([nkv, group, total, hd]).reshape([nh, total, hd]);
            let scores = q.matmul(k_rep.swap_dims(1, 2)).mul_scalar(scale).add(mask.clone());
            let att = softmax(scores, 2).matmul(v_rep); // [nh, t, hd]
            let att = att.swap_dims(0, 1).reshape([t, nh * hd]);
            x = x.add(att.matmul(layer.wo.clone()));
            let h = BurnModel::<B>::rms_norm(x.clone(), &layer.ffn_norm, c.rms_eps);
            let g = silu(h.clone().matmul(layer.w_gate.clone()));
            let u = h.matmul(layer.w_up.clone());
            x = x.add(g.mul(u).matmul(layer.w_down.clone()));
        }
        item.cache.len += t;
        if !item.want_logits {
            return None;
        }
        let last = x.narrow(0, t - 1, 1);
        let logits = BurnModel::<B>::rms_norm(last, &self.norm, c.rms_eps).matmul(self.head.clone());
        logits.into_data().to_vec::<f32>().ok()
    }
}
