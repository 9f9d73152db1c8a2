//! The sentence encoder (`bert`) on burn tensors, generic over the backend, so that a
//! worker whose chat model runs on a GPU encodes on it too. The math is `bert`'s, in
//! f32 (an encoder this size gains little from half types, and its vectors are compared
//! by cosine): a batch is padded to its longest sequence as `[batch, len, hidden]`,
//! padded keys are masked out of attention, and pooling counts only real tokens, so a
//! sequence's vector does not depend on what it was batched with beyond rounding.
//! Weights are put on the device once, transposed for `x.matmul(w)`, the query, key
//! and value projections as one `[hidden, 3 × hidden]` matrix.

use burn::tensor::activation::{gelu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::bert::{BertConfig, Encoder, Linear, Norm, Pooling};
use crate::burn_model::{mat, vec1};

struct DeviceNorm<B: Backend> {
    w: Tensor<B, 1>,
    b: Tensor<B, 1>,
}

struct DeviceLinear<B: Backend> {
    /// `[in, out]`.
    w: Tensor<B, 2>,
    b: Tensor<B, 1>,
}

struct DeviceLayer<B: Backend> {
    qkv: DeviceLinear<B>,
    o: DeviceLinear<B>,
    attn_norm: DeviceNorm<B>,
    up: DeviceLinear<B>,
    down: DeviceLinear<B>,
    out_norm: DeviceNorm<B>,
}

pub struct BurnEncoder<B: Backend> {
    config: BertConfig,
    device: B::Device,
    /// `[vocab, hidden]` and `[positions, hidden]`: rows are selected, not multiplied.
    word: Tensor<B, 2>,
    position: Tensor<B, 2>,
    /// Segment 0's embedding (every input is one segment).
    segment: Tensor<B, 1>,
    embed_norm: DeviceNorm<B>,
    layers: Vec<DeviceLayer<B>>,
}

fn norm<B: Backend>(n: &Norm, device: &B::Device) -> DeviceNorm<B> {
    DeviceNorm { w: vec1(&n.w, (device, DType::F32)), b: vec1(&n.b, (device, DType::F32)) }
}

fn linear<B: Backend>(ls: &[&Linear], device: &B::Device) -> DeviceLinear<B> {
    let at = (device, DType::F32);
    let w = Tensor::cat(ls.iter().map(|l| mat::<B>(&l.w, at)).collect(), 1);
    let b: Vec<f32> = ls.iter().flat_map(|l| l.b.iter().copied()).collect();
    DeviceLinear { w, b: vec1(&b, at) }
}

fn rows<B: Backend>(v: &[f32], cols: usize, device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len() / cols, cols]), (device, DType::F32))
}

impl<B: Backend> crate::embeddings::Encode for BurnEncoder<B> {
    fn embed_batch(&self, batch: &[Vec<u32>]) -> Vec<Vec<f32>> {
        BurnEncoder::embed_batch(self, batch)
    }
}

impl<B: Backend> BurnEncoder<B> {
    /// Puts `encoder`'s weights on `device`.
    pub fn new(encoder: &Encoder, device: B::Device) -> Self {
        let h = encoder.config.hidden;
        let layers = encoder
            .layers
            .iter()
            .map(|l| DeviceLayer {
                qkv: linear(&[&l.q, &l.k, &l.v], &device),
                o: linear(&[&l.o], &device),
                attn_norm: norm(&l.attn_norm, &device),
                up: linear(&[&l.up], &device),
                down: linear(&[&l.down], &device),
                out_norm: norm(&l.out_norm, &device),
            })
            .collect();
        BurnEncoder {
            config: encoder.config.clone(),
            word: rows(&encoder.word, h, &device),
            position: rows(&encoder.position, h, &device),
            segment: vec1(&encoder.segment[..h], (&device, DType::F32)),
            embed_norm: norm(&encoder.embed_norm, &device),
            layers,
            device,
        }
    }

    /// Sentence vectors of many token sequences (each `[CLS] … [SEP]`, within the
    /// model's context and vocabulary: the caller checks both), in one padded pass.
    pub fn embed_batch(&self, batch: &[Vec<u32>]) -> Vec<Vec<f32>> {
        let c = &self.config;
        let (n, h) = (batch.len(), c.hidden);
        let len = batch.iter().map(Vec::len).max().unwrap_or(0);
        if n == 0 || len == 0 {
            return vec![Vec::new(); n];
        }
        let dev = &self.device;
        let mut ids = vec![0i64; n * len];
        let mut valid = vec![0f32; n * len];
        for (b, seq) in batch.iter().enumerate() {
            for (i, &id) in seq.iter().enumerate() {
                ids[b * len + i] = i64::from(id);
                valid[b * len + i] = 1.0;
            }
        }
        let positions: Vec<i64> = (0..n * len).map(|r| (r % len) as i64).collect();
        let int = |v: Vec<i64>| Tensor::<B, 1, Int>::from_data(TensorData::new(v, [n * len]), dev);
        let x = self.word.clone().select(0, int(ids)) + self.position.clone().select(0, int(positions))
            + self.segment.clone().unsqueeze_dim::<2>(0).expand([n * len, h]);
        let mut x = layer_norm(x, &self.embed_norm, c.eps);
        let valid = Tensor::<B, 2>::from_data(TensorData::new(valid, [n, len]), (dev, DType::F32));
        // A padded key gets -1e9 before the softmax: exp underflows to 0 exactly.
        let key_bias = valid.clone().sub_scalar(1.0).mul_scalar(1e9).reshape([n, 1, 1, len]).expand([n, c.heads, len, len]);
        for layer in &self.layers {
            x = self.layer(layer, x, &key_bias, n, len);
        }
        let x = x.reshape([n, len, h]);
        let mask = valid.clone().reshape([n, len, 1]).expand([n, len, h]);
        let pooled: Tensor<B, 2> = match c.pooling {
            Pooling::Cls => x.narrow(1, 0, 1).reshape([n, h]),
            Pooling::Max => (x + mask.sub_scalar(1.0).mul_scalar(1e9)).max_dim(1).reshape([n, h]),
            Pooling::Mean => {
                let counts = valid.sum_dim(1).clamp_min(1.0).expand([n, h]);
                (x * mask).sum_dim(1).reshape([n, h]).div(counts)
            }
        };
        let pooled = if c.normalize {
            let norms = pooled.clone().powf_scalar(2.0).sum_dim(1).sqrt().clamp_min(1e-12).expand([n, h]);
            pooled.div(norms)
        } else {
            pooled
        };
        let flat = pooled.into_data().to_vec::<f32>().unwrap_or_default();
        flat.chunks_exact(h).map(<[f32]>::to_vec).collect()
    }

    /// One encoder layer over `[n × len, hidden]` rows.
    fn layer(&self, l: &DeviceLayer<B>, x: Tensor<B, 2>, key_bias: &Tensor<B, 4>, n: usize, len: usize) -> Tensor<B, 2> {
        let c = &self.config;
        let (h, heads) = (c.hidden, c.heads);
        let hd = h / heads;
        let qkv = apply(&l.qkv, x.clone());
        let split = |i: usize| qkv.clone().narrow(1, i * h, h).reshape([n, len, heads, hd]).swap_dims(1, 2);
        let (q, k, v) = (split(0), split(1), split(2));
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(1.0 / (hd as f32).sqrt()) + key_bias.clone();
        let ctx = softmax(scores, 3).matmul(v).swap_dims(1, 2).reshape([n * len, h]);
        let x = layer_norm(x + apply(&l.o, ctx), &l.attn_norm, c.eps);
        let up = gelu(apply(&l.up, x.clone()));
        layer_norm(x + apply(&l.down, up), &l.out_norm, c.eps)
    }
}

/// `x Wᵀ + b` with `W` stored transposed.
fn apply<B: Backend>(l: &DeviceLinear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let [rows, _] = x.dims();
    let [_, out] = l.w.dims();
    x.matmul(l.w.clone()) + l.b.clone().unsqueeze_dim::<2>(0).expand([rows, out])
}

fn layer_norm<B: Backend>(x: Tensor<B, 2>, n: &DeviceNorm<B>, eps: f32) -> Tensor<B, 2> {
    let [rows, cols] = x.dims();
    let mean = x.clone().mean_dim(1).expand([rows, cols]);
    let centred = x - mean;
    let var = centred.clone().powf_scalar(2.0).mean_dim(1).add_scalar(eps).sqrt().expand([rows, cols]);
    centred.div(var) * n.w.clone().unsqueeze_dim::<2>(0).expand([rows, cols]) + n.b.clone().unsqueeze_dim::<2>(0).expand([rows, cols])
}
