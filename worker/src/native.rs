//! The forward pass on the CPU with the hand-written kernels (`quant`): the fallback
//! when no GPU opens. Kernels read quantized weights directly (`Precision::Fast`,
//! "reduced") or dequantize rows into f32 tiles (`Precision::Exact`, "full");
//! activations are f32 either way.
//!
//! A step runs over a flattened batch of rows from many sequences, each with its own
//! host KV cache; every row's math is independent of what else is in the batch, so
//! results at one precision are identical alone or batched. The precision is chosen
//! per step by the caller (the engine: exact when any sequence needs it).

use rayon::prelude::*;

use crate::forward::{BatchItem, DeviceInfo, Forward, KvCache, KvStore, StepError};
use crate::model::Model;
use crate::quant::{add_bias, dot, matmul_group, Precision};

/// The native CPU forward pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct Native;

impl Forward for Native {
    fn new_cache(&self, model: &Model) -> Option<KvCache> {
        Some(new_cache(model))
    }

    fn max_seq_len(&self, model: &Model) -> usize {
        model.config.context_length
    }

    fn forward(&self, model: &Model, items: &mut [BatchItem<'_>], precision: Precision) -> Result<Vec<Vec<f32>>, StepError> {
        forward(model, items, precision)
    }

    fn device(&self) -> DeviceInfo {
        crate::host::cpu_device("native-cpu")
    }
}

/// An empty host KV cache for one sequence.
pub fn new_cache(model: &Model) -> KvCache {
    KvCache::host(model.config.n_layers)
}

/// Runs one step at `precision`. Each item appends its tokens to its cache; the
/// returned vector holds, for every item with `want_logits`, the logits of its last
/// token.
pub fn forward(model: &Model, items: &mut [BatchItem<'_>], precision: Precision) -> Result<Vec<Vec<f32>>, StepError> {
    // A step has about 150 parallel regions. Forked from a thread outside the
    // pool, each one sends this thread to sleep and wakes it again; run from a
    // pool thread, the step forks and joins among the pool's own threads, which
    // stay awake between regions. `scope` moves the call onto the pool (and runs
    // it in place when already there).
    rayon::scope(|_| forward_native(model, items, precision))
}

/// Keys and values per layer of a host cache.
type HostKv<'a> = (&'a [Vec<f32>], &'a [Vec<f32>]);
type HostKvMut<'a> = (&'a mut Vec<Vec<f32>>, &'a mut Vec<Vec<f32>>);

fn host_kv(cache: &KvCache) -> Result<HostKv<'_>, StepError> {
    match &cache.store {
        KvStore::Host { k, v } => Ok((k, v)),
        KvStore::Slot(_) => Err(StepError::WrongCache),
    }
}

fn host_kv_mut(cache: &mut KvCache) -> Result<HostKvMut<'_>, StepError> {
    match &mut cache.store {
        KvStore::Host { k, v } => Ok((k, v)),
        KvStore::Slot(_) => Err(StepError::WrongCache),
    }
}

/// `(sin, cos)` of every rotary frequency at `pos`: the same for all heads and
/// layers, so a step computes them once per row instead of once per head per
/// layer (12 heads × 30 layers of the same values for SmolLM2).
fn rope_angles(m: &Model, pos: usize) -> Vec<(f32, f32)> {
    m.inv_freq.iter().map(|f| (pos as f32 * f).sin_cos()).collect()
}

fn rope(m: &Model, x: &mut [f32], angles: &[(f32, f32)]) {
    let hd = m.config.head_dim;
    let half = hd / 2;
    for head in x.chunks_exact_mut(hd) {
        for (i, &(sin, cos)) in angles.iter().enumerate().take(half) {
            let (a, b) = if m.config.rope_neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos - x1 * sin;
            head[b] = x0 * sin + x1 * cos;
        }
    }
}


fn forward_native(model: &Model, items: &mut [BatchItem<'_>], precision: Precision) -> Result<Vec<Vec<f32>>, StepError> {
    let c = &model.config;
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
        return Ok(Vec::new());
    }
    let mut x = vec![0f32; n * dim];
    for (r, &t) in tokens.iter().enumerate() {
        let t = (t as usize).min(c.vocab_size.saturating_sub(1));
        model.embed.dequantize_row(t, &mut x[r * dim..(r + 1) * dim]);
    }
    let mut h = vec![0f32; n * dim];
    let mut q = vec![0f32; n * qd];
    let mut k = vec![0f32; n * kvd];
    let mut v = vec![0f32; n * kvd];
    let mut att = vec![0f32; n * qd];
    let mut o = vec![0f32; n * dim];
    let mut g = vec![0f32; n * c.ffn_dim];
    let mut u = vec![0f32; n * c.ffn_dim];
    let row_angles: Vec<Vec<(f32, f32)>> = row_pos.iter().map(|&p| rope_angles(model, p)).collect();
    let group = c.n_heads / c.n_kv_heads.max(1);
    let scale = 1.0 / (hd as f32).sqrt();
    for (l, layer) in model.layers.iter().enumerate() {
        rms_norm(&x, &layer.attn_norm, c.rms_eps, &mut h);
        matmul_group(&[&layer.wq, &layer.wk, &layer.wv], &h, n, &mut [&mut q, &mut k, &mut v], precision);
        add_bias(&mut q, layer.bq.as_deref());
        add_bias(&mut k, layer.bk.as_deref());
        add_bias(&mut v, layer.bv.as_deref());
        for (r, angles) in row_angles.iter().enumerate() {
            rope(model, &mut q[r * qd..(r + 1) * qd], angles);
            rope(model, &mut k[r * kvd..(r + 1) * kvd], angles);
        }
        for r in 0..n {
            let (kc, vc) = host_kv_mut(items[row_item[r]].cache)?;
            kc[l].extend_from_slice(&k[r * kvd..(r + 1) * kvd]);
            vc[l].extend_from_slice(&v[r * kvd..(r + 1) * kvd]);
        }
        let caches = items.iter().map(|it| host_kv(it.cache)).collect::<Result<Vec<_>, _>>()?;
        att.par_chunks_mut(qd).enumerate().for_each(|(r, out)| {
            let (kc, vc) = caches[row_item[r]];
            let (kc, vc) = (&kc[l], &vc[l]);
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
        let k = it.logit_rows();
        last_rows.extend(row - k..row);
    }
    let m = last_rows.len();
    if m == 0 {
        return Ok(Vec::new());
    }
    let mut xs = vec![0f32; m * dim];
    for (i, &r) in last_rows.iter().enumerate() {
        xs[i * dim..(i + 1) * dim].copy_from_slice(&x[r * dim..(r + 1) * dim]);
    }
    let mut hs = vec![0f32; m * dim];
    rms_norm(&xs, &model.norm, c.rms_eps, &mut hs);
    let head = model.output.as_ref().unwrap_or(&model.embed);
    let mut logits = vec![0f32; m * c.vocab_size];
    head.matmul_with(&hs, m, &mut logits, precision);
    Ok(logits.chunks_exact(c.vocab_size).map(<[f32]>::to_vec).collect())
}

/// Elements per parallel SwiGLU task: one task for a single row of a small model,
/// enough tasks for both cores at batch sizes that matter.
const SILU_CHUNK: usize = 4096;

pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for ((o, a), b) in or.iter_mut().zip(xr).zip(w) {
            *o = a * inv * b;
        }
    }
}
