//! The forward pass on burn tensors, generic over the backend: burn-cuda with the
//! `cuda` feature, burn-wgpu with `wgpu` (the check on Mesa's lavapipe), burn-ndarray
//! on the CPU.
//!
//! Weights are dequantized on the host and put on the device in the `--dtype` the
//! worker runs (`Dtype`): f32 (exact on burn-ndarray; autotuned GPU kernels may take
//! it as TF32), or bf16 / f16 (half the bytes per weight and per cached key; bf16 is
//! the default on CUDA). In the half types activations, the residual stream and the KV
//! cache are in that type too, as in Hugging Face `transformers`; RMSNorm is computed
//! in f32 and cast back (as `LlamaRMSNorm` does), and the logits come down as f32.
//!
//! One engine step is one batched pass: the rows of every sequence in the step (one
//! per decoding sequence, a chunk per prefilling one) go through each layer together
//! as `[rows, dim]`, so every weight is multiplied once per step. Token ids, positions
//! and cache indices go up as one integer upload; the logits of the rows that want
//! them come down as one read.
//!
//! The KV cache is device-resident and allocated once: per layer, keys and values are
//! `[slots × slot_len, kv_dim]`, one slot per sequence the engine may run at once. A
//! step writes its rows' keys and values in place (`scatter_nd` with assignment) and
//! reads each sequence's prefix back with `select`; ragged lengths are masked in
//! `module::attention`. Decoding sequences share one attention call, each prefill
//! chunk has its own (its rows attend causally to the prefix and to each other). RoPE
//! tables are built once on the device and indexed by position.

use std::sync::{Mutex, PoisonError};

use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::forward::{BatchItem, DeviceInfo, Forward, KvCache, KvStore, SlotPool, StepError};
use crate::model::{Config, Model};
use crate::quant::{Precision, QMatrix};

/// `--dtype`: the float type of weights, activations and the KV cache on burn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    /// bfloat16: the range of f32 with 8 bits of mantissa; the default on CUDA.
    Bf16,
    /// IEEE half precision.
    F16,
    /// f32 math (exact on burn-ndarray; autotuned GPU kernels may use TF32).
    F32,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
            Dtype::F32 => "f32",
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            Dtype::Bf16 | Dtype::F16 => 2,
            Dtype::F32 => 4,
        }
    }

    pub fn burn(self) -> DType {
        match self {
            Dtype::Bf16 => DType::BF16,
            Dtype::F16 => DType::F16,
            Dtype::F32 => DType::F32,
        }
    }
}

/// How much device cache to allocate, and in which type.
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// Sequences that can hold a slot at once (the engine's `max_seqs`).
    pub slots: usize,
    /// Bytes of keys and values for all slots together (the engine's KV budget),
    /// counted in `dtype`.
    pub kv_budget_bytes: usize,
    /// The type of weights, activations and cache.
    pub dtype: Dtype,
    /// The largest tensor the device computes on correctly (wgpu's storage-binding
    /// limit; `None`: no limit). The cache's per-layer tensors are shortened to fit.
    pub max_tensor_bytes: Option<usize>,
}

/// Why a model cannot be put on a device.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "the model does not fit on {device}: it needs {needed_mb} MiB ({dtype} weights {weights_mb} MiB + KV cache {kv_mb} MiB) but {free_mb} MiB is free; lower --kv-budget-mb or --max-seqs, use a smaller --dtype, or a smaller model"
    )]
    DoesNotFit { device: String, dtype: &'static str, needed_mb: u64, weights_mb: u64, kv_mb: u64, free_mb: u64 },
    #[error(
        "{name} ({mb} MiB in {dtype}) exceeds the largest buffer {device} can bind ({limit_mb} MiB); use a smaller --dtype or model, or another device"
    )]
    TensorTooLarge { name: &'static str, mb: u64, dtype: &'static str, device: String, limit_mb: u64 },
    #[error("--dtype {dtype} is not supported by {device}; {hint}")]
    UnsupportedDtype { dtype: &'static str, device: String, hint: &'static str },
    #[error(
        "a KV budget of {budget_mb} MiB over {slots} slots leaves {slot_len} tokens per sequence, fewer than the {min} a request needs; raise --kv-budget-mb or lower --max-seqs"
    )]
    CacheTooSmall { budget_mb: u64, slots: usize, slot_len: usize, min: usize },
    #[error("the {backend} backend failed while loading the model: {detail}")]
    Backend { backend: &'static str, detail: String },
}

/// Fewest tokens a slot may hold: a slot shorter than a prompt chunk is a
/// configuration mistake, not a useful cache.
pub const MIN_SLOT_LEN: usize = 64;

/// Bytes of weights the burn path puts on the device for `model` in `dtype`.
pub fn weight_bytes(model: &Model, dtype: Dtype) -> usize {
    let mats = |l: &crate::model::Layer| l.matrices().iter().map(|m| m.rows * m.cols).sum::<usize>();
    // The output head is its own copy even when tied to the embedding.
    let elements = 2 * model.embed.rows * model.embed.cols
        + model.layers.iter().map(mats).sum::<usize>()
        + model.config.dim * (2 * model.config.n_layers + 1);
    elements * dtype.bytes()
}

/// The largest weight matrix: its name and element count.
fn largest_weight(model: &Model) -> (&'static str, usize) {
    let size = |m: &QMatrix| m.rows * m.cols;
    let mut largest = ("the token embedding", size(&model.embed));
    if let Some(out) = &model.output {
        largest = std::cmp::max_by(largest, ("the output head", size(out)), |a, b| a.1.cmp(&b.1));
    }
    for l in &model.layers {
        for m in l.matrices() {
            largest = std::cmp::max_by(largest, ("a layer's weight matrix", size(m)), |a, b| a.1.cmp(&b.1));
        }
    }
    largest
}

/// Bytes of keys and values one cached token takes on the device in `dtype`.
pub fn kv_bytes_per_token(cfg: &Config, dtype: Dtype) -> usize {
    cfg.kv_values_per_token() * dtype.bytes()
}

/// Tokens per slot for `cache`, and the bytes the whole cache takes. Each layer's keys
/// (and values) are one `[slots × slot_len, kv_dim]` tensor, kept within
/// `max_tensor_bytes`.
pub fn cache_layout(cfg: &Config, cache: CacheConfig) -> Result<(usize, usize), LoadError> {
    let per_token = kv_bytes_per_token(cfg, cache.dtype);
    let slots = cache.slots.max(1);
    let mut slot_len = (cache.kv_budget_bytes / (slots * per_token).max(1)).min(cfg.context_length);
    if let Some(max) = cache.max_tensor_bytes {
        slot_len = slot_len.min(max / (slots * cfg.kv_dim() * cache.dtype.bytes()).max(1));
    }
    if slot_len < MIN_SLOT_LEN.min(cfg.context_length) {
        return Err(LoadError::CacheTooSmall {
            budget_mb: (cache.kv_budget_bytes >> 20) as u64,
            slots,
            slot_len,
            min: MIN_SLOT_LEN,
        });
    }
    Ok((slot_len, slots * slot_len * per_token))
}

/// Refuses a model whose weights and cache would not fit in `free_mb`.
pub fn check_fits(model: &Model, cache: CacheConfig, device: &str, free_mb: Option<u64>) -> Result<(), LoadError> {
    let (_, kv_bytes) = cache_layout(&model.config, cache)?;
    let weights = weight_bytes(model, cache.dtype);
    let mb = |b: usize| (b as u64).div_ceil(1 << 20);
    if let Some(limit) = cache.max_tensor_bytes {
        let (name, elements) = largest_weight(model);
        let bytes = elements * cache.dtype.bytes();
        if bytes > limit {
            return Err(LoadError::TensorTooLarge { name, mb: mb(bytes), dtype: cache.dtype.name(), device: device.to_string(), limit_mb: mb(limit) });
        }
    }
    let Some(free_mb) = free_mb else { return Ok(()) };
    let needed_mb = mb(weights) + mb(kv_bytes);
    if needed_mb > free_mb {
        return Err(LoadError::DoesNotFit {
            device: device.to_string(),
            dtype: cache.dtype.name(),
            needed_mb,
            weights_mb: mb(weights),
            kv_mb: mb(kv_bytes),
            free_mb,
        });
    }
    Ok(())
}

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

/// The device cache: per layer, keys and values of every slot.
struct DeviceCache<B: Backend> {
    /// `None` while a step holds the tensors (and after a step that failed with them).
    layers: Option<Vec<(Tensor<B, 2>, Tensor<B, 2>)>>,
    /// Bumped whenever the cache is allocated anew: leases of older epochs are stale.
    epoch: u64,
}

pub struct BurnModel<B: Backend> {
    device: B::Device,
    /// The float type of weights, activations and cache.
    dtype: Dtype,
    info: DeviceInfo,
    /// Current free memory of the device, for `/health` and heartbeats.
    free_memory_mb: Box<dyn Fn() -> Option<u64> + Send + Sync>,
    cfg: Config,
    /// `[vocab, dim]`: rows are gathered by token id.
    embed: Tensor<B, 2>,
    layers: Vec<Layer<B>>,
    norm: Tensor<B, 1>,
    /// `[dim, vocab]`.
    head: Tensor<B, 2>,
    /// RoPE cos and sin, `[slot_len, head_dim / 2]`.
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    cache: Mutex<DeviceCache<B>>,
    pool: SlotPool,
    slots: usize,
    slot_len: usize,
}

/// Where a float tensor is created, and in which type.
pub(crate) type At<'a, B> = (&'a burn::tensor::Device<B>, DType);

pub(crate) fn vec1<B: Backend>(v: &[f32], at: At<'_, B>) -> Tensor<B, 1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), at)
}

fn dequantized<B: Backend>(m: &QMatrix, at: At<'_, B>) -> Tensor<B, 2> {
    let mut data = vec![0f32; m.rows * m.cols];
    for r in 0..m.rows {
        m.dequantize_row(r, &mut data[r * m.cols..(r + 1) * m.cols]);
    }
    Tensor::from_data(TensorData::new(data, [m.rows, m.cols]), at)
}

/// `[rows, cols]` weights as a contiguous `[cols, rows]` tensor so that `x.matmul(w)`
/// applies them. Transposed on the host once: a transposed view made burn-ndarray copy
/// every weight into a contiguous layout at every matmul.
pub(crate) fn mat<B: Backend>(m: &QMatrix, at: At<'_, B>) -> Tensor<B, 2> {
    let mut row = vec![0f32; m.cols];
    let mut data = vec![0f32; m.rows * m.cols];
    for r in 0..m.rows {
        m.dequantize_row(r, &mut row);
        for (c, v) in row.iter().enumerate() {
            data[c * m.rows + r] = *v;
        }
    }
    Tensor::from_data(TensorData::new(data, [m.cols, m.rows]), at)
}

impl<B: Backend> BurnModel<B> {
    /// Puts `model` on `device` (described by `info`) with a cache laid out by `cache`.
    /// The caller has checked that it fits (`check_fits`).
    pub fn new(
        model: &Model,
        device: B::Device,
        info: DeviceInfo,
        free_memory_mb: Box<dyn Fn() -> Option<u64> + Send + Sync>,
        cache: CacheConfig,
    ) -> Result<BurnModel<B>, LoadError> {
        let (slot_len, _) = cache_layout(&model.config, cache)?;
        let dtype = cache.dtype;
        if !B::supports_dtype(&device, dtype.burn()) {
            return Err(LoadError::UnsupportedDtype {
                dtype: dtype.name(),
                device: format!("{} ({})", info.name, info.engine),
                hint: match info.kind {
                    "cuda" => "bf16 needs compute capability 8.0 or newer (A100, RTX 30xx, H100); use --dtype f16 or f32",
                    "vulkan" => "this adapter has no shader support for it; use --dtype f32",
                    _ => "this device computes in f32; use --dtype f32",
                },
            });
        }
        let d: At<'_, B> = (&device, dtype.burn());
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
        let embed = dequantized::<B>(&model.embed, d);
        // A tied output head is a second, transposed copy of the embedding (a
        // transposed view would be copied at every step's matmul instead).
        let head = mat(model.output.as_ref().unwrap_or(&model.embed), d);
        let half = model.config.head_dim / 2;
        let (mut cos, mut sin) = (Vec::with_capacity(slot_len * half), Vec::with_capacity(slot_len * half));
        for p in 0..slot_len {
            for f in model.inv_freq.iter().take(half) {
                let (s, c) = (p as f32 * f).sin_cos();
                cos.push(c);
                sin.push(s);
            }
        }
        let cos = Tensor::from_data(TensorData::new(cos, [slot_len, half]), d);
        let sin = Tensor::from_data(TensorData::new(sin, [slot_len, half]), d);
        let mut info = info;
        info.weights = dtype.name();
        let slots = cache.slots.max(1);
        let burn = BurnModel {
            norm: vec1(&model.norm, d),
            cfg: model.config.clone(),
            embed,
            layers,
            head,
            cos,
            sin,
            cache: Mutex::new(DeviceCache { layers: None, epoch: 0 }),
            pool: SlotPool::new(slots),
            slots,
            slot_len,
            info,
            free_memory_mb,
            device,
            dtype,
        };
        burn.allocate_cache(&mut burn.lock_cache());
        Ok(burn)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, DeviceCache<B>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Allocates the whole cache (zeros) under a new epoch.
    fn allocate_cache(&self, cache: &mut DeviceCache<B>) {
        let rows = self.slots * self.slot_len;
        let kvd = self.cfg.kv_dim();
        let zeros = || Tensor::<B, 2>::zeros([rows, kvd], (&self.device, self.dtype.burn()));
        cache.layers = Some((0..self.cfg.n_layers).map(|_| (zeros(), zeros())).collect());
        cache.epoch += 1;
    }

    /// Slots and tokens per slot of the device cache.
    pub fn cache_shape(&self) -> (usize, usize) {
        (self.slots, self.slot_len)
    }

    /// RMSNorm, computed in f32 whatever the model's type (a mean of squares in bf16
    /// loses most of its bits), then cast back and scaled, as `LlamaRMSNorm` does.
    fn rms_norm(x: Tensor<B, 2>, w: &Tensor<B, 1>, eps: f32) -> Tensor<B, 2> {
        let [t, d] = x.dims();
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let ms = x.clone().powf_scalar(2.0).mean_dim(1).add_scalar(eps).sqrt().expand([t, d]);
        x.div(ms).cast(dtype).mul(w.clone().unsqueeze_dim::<2>(0).expand([t, d]))
    }

    /// Rotary embedding on `[t, heads, hd]` with per-row cos/sin of shape `[t, hd/2]`.
    fn rope(x: Tensor<B, 3>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>, neox: bool) -> Tensor<B, 3> {
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

    /// `[n, L, kv_dim]` cache rows as `[n, heads, L, hd]`, each kv head repeated for
    /// the query heads it serves (grouped-query attention).
    fn heads(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        let c = &self.cfg;
        let [n, len, _] = x.dims();
        let group = c.n_heads / c.n_kv_heads.max(1);
        x.reshape([n, len, c.n_kv_heads, c.head_dim])
            .swap_dims(1, 2)
            .unsqueeze_dim::<5>(2)
            .expand([n, c.n_kv_heads, group, len, c.head_dim])
            .reshape([n, c.n_heads, len, c.head_dim])
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

/// One attention call of a step: decoding sequences together (`rows` = sequences,
/// one query each), or one prefill chunk (`rows` = its tokens).
struct AttnGroup<B: Backend> {
    /// First row of the group in the step's row order, and its row count.
    row0: usize,
    rows: usize,
    /// Sequences in the group (1 for a prefill chunk).
    seqs: usize,
    /// Cache rows each sequence reads, `[seqs × len]`, and `len`.
    gather: Tensor<B, 1, Int>,
    len: usize,
    /// `true` where a query must not see a key: `[seqs, heads, queries, len]`.
    mask: Tensor<B, 4, Bool>,
}

/// The host-side plan of a step: rows ordered decoding sequences first, then each
/// prefill chunk; everything that goes up is in one integer buffer.
struct Plan {
    /// Token ids, positions, cache write rows, logits rows, then the groups' gather
    /// rows and visible-key counts.
    ints: Vec<i64>,
    rows: usize,
    /// (row0, rows, seqs, len, gather offset in `ints`, visible offset in `ints`).
    groups: Vec<(usize, usize, usize, usize, usize, usize)>,
    /// Rows of logits that come down.
    logits_rows: usize,
}

impl<B: Backend> BurnModel<B>
where
    B::Device: Send + Sync,
{
    fn plan(&self, items: &[BatchItem<'_>], epoch: u64) -> Result<Plan, StepError> {
        let mut slots = Vec::with_capacity(items.len());
        for it in items {
            match &it.cache.store {
                KvStore::Slot(lease) if lease.epoch == epoch => slots.push(lease.index),
                KvStore::Slot(_) => return Err(StepError::CacheLost),
                KvStore::Host { .. } => return Err(StepError::WrongCache),
            }
            if it.cache.len + it.tokens.len() > self.slot_len {
                return Err(StepError::Backend {
                    backend: self.info.engine,
                    detail: format!("a sequence of {} tokens exceeds the cache slot ({} tokens)", it.cache.len + it.tokens.len(), self.slot_len),
                });
            }
        }
        // Row order: single-token items (decoding) first, then multi-token chunks.
        let single: Vec<usize> = (0..items.len()).filter(|&i| items[i].tokens.len() == 1).collect();
        let multi: Vec<usize> = (0..items.len()).filter(|&i| items[i].tokens.len() > 1).collect();
        let order: Vec<usize> = single.iter().chain(&multi).copied().collect();
        let rows: usize = items.iter().map(|it| it.tokens.len()).sum();
        let (mut ids, mut pos, mut write) = (Vec::with_capacity(rows), Vec::with_capacity(rows), Vec::with_capacity(rows));
        let mut first_row = vec![0usize; items.len()];
        for &i in &order {
            first_row[i] = ids.len();
            let it = &items[i];
            for (j, &t) in it.tokens.iter().enumerate() {
                let p = it.cache.len + j;
                ids.push(i64::from(t.min(self.cfg.vocab_size.saturating_sub(1) as u32)));
                pos.push(p as i64);
                write.push((slots[i] * self.slot_len + p) as i64);
            }
        }
        let logits: Vec<i64> = (0..items.len())
            .flat_map(|i| {
                let end = first_row[i] + items[i].tokens.len();
                (end - items[i].logit_rows()..end).map(|r| r as i64)
            })
            .collect();
        let mut ints = Vec::with_capacity(rows * 4);
        ints.extend_from_slice(&ids);
        ints.extend_from_slice(&pos);
        ints.extend_from_slice(&write);
        ints.extend_from_slice(&logits);
        let mut groups = Vec::new();
        if !single.is_empty() {
            let len = single.iter().map(|&i| items[i].cache.len + 1).max().unwrap_or(1);
            let g0 = ints.len();
            for &i in &single {
                let base = slots[i] * self.slot_len;
                let last = items[i].cache.len;
                // Positions past a sequence's end read its last row; the mask hides them.
                ints.extend((0..len).map(|j| (base + j.min(last)) as i64));
            }
            let v0 = ints.len();
            ints.extend(single.iter().map(|&i| (items[i].cache.len + 1) as i64));
            groups.push((0, single.len(), single.len(), len, g0, v0));
        }
        for &i in &multi {
            let it = &items[i];
            let (t, past) = (it.tokens.len(), it.cache.len);
            let len = past + t;
            let base = slots[i] * self.slot_len;
            let g0 = ints.len();
            ints.extend((0..len).map(|j| (base + j) as i64));
            let v0 = ints.len();
            ints.extend((0..t).map(|j| (past + j + 1) as i64));
            groups.push((first_row[i], t, 1, len, g0, v0));
        }
        Ok(Plan { ints, rows, groups, logits_rows: logits.len() })
    }

    fn step(&self, items: &mut [BatchItem<'_>], cache: &mut DeviceCache<B>) -> Result<Vec<Vec<f32>>, StepError> {
        let c = &self.cfg;
        let plan = self.plan(items, cache.epoch)?;
        let n = plan.rows;
        if n == 0 {
            return Ok(Vec::new());
        }
        let (nh, hd, kvd) = (c.n_heads, c.head_dim, c.kv_dim());
        let dev = &self.device;
        // The one upload of the step.
        let len = plan.ints.len();
        let ints = Tensor::<B, 1, Int>::from_data(TensorData::new(plan.ints, [len]), dev);
        let ids = ints.clone().narrow(0, 0, n);
        let pos = ints.clone().narrow(0, n, n);
        let write = ints.clone().narrow(0, 2 * n, n).reshape([n, 1]);
        let groups: Vec<AttnGroup<B>> = plan
            .groups
            .iter()
            .map(|&(row0, rows, seqs, len, g0, v0)| {
                let queries = rows / seqs;
                let gather = ints.clone().narrow(0, g0, seqs * len);
                // Query q of sequence s sees keys 0..visible[s, q].
                let visible = ints.clone().narrow(0, v0, rows).reshape([seqs, 1, queries, 1]).expand([seqs, 1, queries, len]);
                let keys = Tensor::<B, 1, Int>::arange(0..len as i64, dev).reshape([1, 1, 1, len]).expand([seqs, 1, queries, len]);
                let mask = keys.greater_equal(visible).expand([seqs, nh, queries, len]);
                AttnGroup { row0, rows, seqs, gather, len, mask }
            })
            .collect();
        let cos = self.cos.clone().select(0, pos.clone());
        let sin = self.sin.clone().select(0, pos);
        let mut x = self.embed.clone().select(0, ids);
        // Taken for the step: a panic inside leaves the cache empty, and the next step
        // allocates a new one.
        let Some(old) = cache.layers.take() else { return Err(StepError::CacheLost) };
        let mut kv = Vec::with_capacity(old.len());
        for (layer, (kc, vc)) in self.layers.iter().zip(old) {
            let h = Self::rms_norm(x.clone(), &layer.attn_norm, c.rms_eps);
            let q = add_bias(h.clone().matmul(layer.wq.clone()), &layer.bq).reshape([n, nh, hd]);
            let k = add_bias(h.clone().matmul(layer.wk.clone()), &layer.bk).reshape([n, c.n_kv_heads, hd]);
            let v = add_bias(h.matmul(layer.wv.clone()), &layer.bv);
            let q = Self::rope(q, &cos, &sin, c.rope_neox);
            let k = Self::rope(k, &cos, &sin, c.rope_neox).reshape([n, kvd]);
            // Written in place (the cache tensors are the only handles to their buffers),
            // then read back with the prefix.
            let kc = kc.scatter_nd(write.clone(), k, IndexingUpdateOp::Assign);
            let vc = vc.scatter_nd(write.clone(), v, IndexingUpdateOp::Assign);
            let mut outs = Vec::with_capacity(groups.len());
            for g in &groups {
                let queries = g.rows / g.seqs;
                let qg = q.clone().narrow(0, g.row0, g.rows).reshape([g.seqs, queries, nh, hd]).swap_dims(1, 2);
                let keys = self.heads(kc.clone().select(0, g.gather.clone()).reshape([g.seqs, g.len, kvd]));
                let values = self.heads(vc.clone().select(0, g.gather.clone()).reshape([g.seqs, g.len, kvd]));
                let o = attention(qg, keys, values, Some(g.mask.clone()), None, AttentionModuleOptions::default());
                outs.push(o.swap_dims(1, 2).reshape([g.rows, nh * hd]));
            }
            let att = if outs.len() == 1 { outs.remove(0) } else { Tensor::cat(outs, 0) };
            x = x.add(att.matmul(layer.wo.clone()));
            let h = Self::rms_norm(x.clone(), &layer.ffn_norm, c.rms_eps);
            let gate = silu(h.clone().matmul(layer.w_gate.clone()));
            let up = h.matmul(layer.w_up.clone());
            x = x.add(gate.mul(up).matmul(layer.w_down.clone()));
            kv.push((kc, vc));
        }
        cache.layers = Some(kv);
        for it in items.iter_mut() {
            it.cache.len += it.tokens.len();
        }
        if plan.logits_rows == 0 {
            return Ok(Vec::new());
        }
        let logits_at = ints.narrow(0, 3 * n, plan.logits_rows);
        let last = x.select(0, logits_at);
        let logits = Self::rms_norm(last, &self.norm, c.rms_eps).matmul(self.head.clone()).cast(DType::F32);
        // The one read of the step.
        let data = logits.try_into_data().map_err(|e| self.failed(format!("{e:?}")))?;
        let flat = data.to_vec::<f32>().map_err(|e| self.failed(format!("{e:?}")))?;
        Ok(flat.chunks_exact(c.vocab_size).map(<[f32]>::to_vec).collect())
    }

    fn failed(&self, detail: String) -> StepError {
        StepError::Backend { backend: self.info.engine, detail }
    }
}

impl<B: Backend> Forward for BurnModel<B>
where
    B::Device: Send + Sync,
{
    fn new_cache(&self, _model: &Model) -> Option<KvCache> {
        let epoch = self.lock_cache().epoch;
        self.pool.lease(epoch).map(KvCache::slot)
    }

    fn max_seq_len(&self, _model: &Model) -> usize {
        self.slot_len
    }

    fn forward(&self, _model: &Model, items: &mut [BatchItem<'_>], _precision: Precision) -> Result<Vec<Vec<f32>>, StepError> {
        let mut cache = self.lock_cache();
        if cache.layers.is_none() {
            // A failed step took the cache with it; sequences that had a slot in it fail
            // on their next step (their lease's epoch is stale), new ones start clean.
            tracing::warn!(engine = self.info.engine, "rebuilding the device KV cache after a failed step");
            self.allocate_cache(&mut cache);
        }
        self.step(items, &mut cache)
    }

    fn kv_bytes_per_token(&self, _model: &Model) -> usize {
        kv_bytes_per_token(&self.cfg, self.dtype)
    }

    /// Copies the slot's rows on the device, layer by layer.
    fn copy_cache(&self, _model: &Model, from: &KvCache, to: &mut KvCache) -> Result<(), StepError> {
        let mut cache = self.lock_cache();
        let (KvStore::Slot(src), KvStore::Slot(dst)) = (&from.store, &to.store) else { return Err(StepError::WrongCache) };
        if from.len == 0 {
            to.len = 0;
            return Ok(());
        }
        if src.epoch != cache.epoch || dst.epoch != cache.epoch {
            return Err(StepError::CacheLost);
        }
        let Some(layers) = cache.layers.take() else { return Err(StepError::CacheLost) };
        let (src, dst, len, width) = (src.index * self.slot_len, dst.index * self.slot_len, from.len, self.cfg.kv_dim());
        let copied = layers
            .into_iter()
            .map(|(k, v)| {
                let rows = |t: &Tensor<B, 2>| t.clone().slice([src..src + len, 0..width]);
                let (k_rows, v_rows) = (rows(&k), rows(&v));
                (k.slice_assign([dst..dst + len, 0..width], k_rows), v.slice_assign([dst..dst + len, 0..width], v_rows))
            })
            .collect();
        cache.layers = Some(copied);
        to.len = len;
        Ok(())
    }

    fn device(&self) -> DeviceInfo {
        let mut info = self.info.clone();
        info.memory_free_mb = (self.free_memory_mb)();
        info
    }
}

impl<B: Backend> BurnModel<B> {
    /// Free cache slots right now.
    pub fn free_slots(&self) -> usize {
        self.pool.free_slots()
    }
}
