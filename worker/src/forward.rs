//! What the engine asks of a forward pass, whichever runs it (`native` on the CPU,
//! `burn_model` on a burn device): per-sequence KV caches, one step over a batch of
//! rows from many sequences, and a description of the device it computes on.

use std::sync::{Arc, Mutex};

use crate::model::Model;
use crate::quant::Precision;

/// One engine step's worth of work for one sequence.
pub struct BatchItem<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    /// Return the logits of the item's last token.
    pub want_logits: bool,
    /// Return the logits of every token of the item instead (tests compare whole
    /// prompts position by position in one step).
    pub all_logits: bool,
}

impl BatchItem<'_> {
    /// How many logit rows this item returns.
    pub fn logit_rows(&self) -> usize {
        match (self.all_logits, self.want_logits) {
            (true, _) => self.tokens.len(),
            (false, true) => self.tokens.len().min(1),
            (false, false) => 0,
        }
    }
}

/// A sequence's attention keys and values: on the host for the native path, a slot of
/// a device-resident cache for burn. `len` tokens are in it.
pub struct KvCache {
    pub len: usize,
    pub(crate) store: KvStore,
}

pub(crate) enum KvStore {
    /// f32 keys and values per layer, grown as tokens arrive.
    Host { k: Vec<Vec<f32>>, v: Vec<Vec<f32>> },
    /// Rows of a preallocated device cache, returned to its pool on drop.
    Slot(SlotLease),
}

impl KvCache {
    pub(crate) fn host(n_layers: usize) -> KvCache {
        KvCache { len: 0, store: KvStore::Host { k: vec![Vec::new(); n_layers], v: vec![Vec::new(); n_layers] } }
    }

    pub(crate) fn slot(lease: SlotLease) -> KvCache {
        KvCache { len: 0, store: KvStore::Slot(lease) }
    }
}

/// A free list of cache slots shared by a device cache and the leases it hands out.
#[derive(Clone, Default)]
pub(crate) struct SlotPool {
    free: Arc<Mutex<Vec<usize>>>,
}

impl SlotPool {
    pub(crate) fn new(slots: usize) -> SlotPool {
        // Popped from the end: slot 0 first.
        SlotPool { free: Arc::new(Mutex::new((0..slots).rev().collect())) }
    }

    pub(crate) fn lease(&self, epoch: u64) -> Option<SlotLease> {
        let index = self.free.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop()?;
        Some(SlotLease { index, epoch, pool: self.clone() })
    }

    pub(crate) fn free_slots(&self) -> usize {
        self.free.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }
}

/// One slot of a device cache, held by one sequence; dropping the sequence (finished,
/// cancelled or failed) gives the slot back.
pub(crate) struct SlotLease {
    pub(crate) index: usize,
    /// The cache allocation the slot belongs to: a cache rebuilt after a failed step
    /// has a new epoch, and the old epoch's contents are gone.
    pub(crate) epoch: u64,
    pool: SlotPool,
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        self.pool.free.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(self.index);
    }
}

/// A step that did not complete: every sequence in it has lost its place, the
/// others are untouched.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("the {backend} backend failed during a forward pass: {detail}")]
    Backend { backend: &'static str, detail: String },
    #[error("a sequence's KV cache was lost when the device cache was rebuilt after a failed step")]
    CacheLost,
    #[error("a sequence's KV cache belongs to another backend")]
    WrongCache,
}

/// Where a forward pass computes, as logged at start and reported in `/health`,
/// registration and heartbeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The engine: `native-cpu`, `burn-ndarray`, `burn-cuda` or `burn-wgpu`.
    pub engine: &'static str,
    /// The kind of processor the math runs on: `cpu`, `cuda` or `vulkan`. A process
    /// that computes on the CPU never says `cuda`.
    pub kind: &'static str,
    /// The device's name (CPU model, CUDA device, Vulkan adapter with its driver).
    pub name: String,
    /// What the weights are on the device: the `--dtype` for burn (`f32`, `bf16`,
    /// `f16`; dequantized at load), `quantized` for the native path (the file's
    /// blocks, read by the kernels).
    pub weights: &'static str,
    /// Memory of the device the weights and KV cache live on, MiB (host RAM for the
    /// CPU and for CPU Vulkan drivers); `None` when the device does not say.
    pub memory_total_mb: Option<u64>,
    pub memory_free_mb: Option<u64>,
}

impl DeviceInfo {
    /// The precisions this device serves, as registered with the gateway. `full` is
    /// exact f32 math whose tokens do not depend on the batch: the native path (exact
    /// steps on request) and burn-ndarray in f32 give that. burn on CUDA or Vulkan runs
    /// autotuned kernels (which may pick another kernel for another batch size, and
    /// tensor-core kernels that take f32 inputs as TF32) and, in bf16/f16, half-type
    /// math: `reduced` only, whatever the `--dtype`.
    pub fn precisions(&self) -> &'static [&'static str] {
        match (self.engine, self.weights) {
            ("native-cpu", _) | ("burn-ndarray", "f32") => &["full", "reduced"],
            _ => &["reduced"],
        }
    }

    /// Whether `full` precision requests can be served.
    pub fn serves_full(&self) -> bool {
        self.precisions().contains(&"full")
    }
}

/// A forward pass the engine can drive.
pub trait Forward: Send + Sync {
    /// A new, empty cache for one sequence, or `None` when the device cache has no
    /// free slot (the request then waits in the queue).
    fn new_cache(&self, model: &Model) -> Option<KvCache>;

    /// Tokens one sequence may hold (prompt and completion): the model's context, or
    /// less when the device cache's slots are shorter.
    fn max_seq_len(&self, model: &Model) -> usize;

    /// Runs one step at `precision` (the burn path computes the same way whatever is
    /// asked; `DeviceInfo::precisions` says which precisions that serves). Each item
    /// appends its tokens to its cache; the result holds, in item order, the logits of
    /// each item's last token (`want_logits`) or of all its tokens (`all_logits`).
    fn forward(&self, model: &Model, items: &mut [BatchItem<'_>], precision: Precision) -> Result<Vec<Vec<f32>>, StepError>;

    /// The device, with its free memory as of now.
    fn device(&self) -> DeviceInfo;

    /// Makes `to` (empty) hold what `from` holds: the choices of an `n > 1` request
    /// share their prompt's keys and values this way instead of computing them again.
    fn copy_cache(&self, _model: &Model, from: &KvCache, to: &mut KvCache) -> Result<(), StepError> {
        match (&from.store, &mut to.store) {
            (KvStore::Host { k, v }, KvStore::Host { k: to_k, v: to_v }) => {
                to_k.clone_from(k);
                to_v.clone_from(v);
                to.len = from.len;
                Ok(())
            }
            _ => Err(StepError::WrongCache),
        }
    }

    /// Bytes of keys and values one cached token takes (what the engine's KV budget
    /// counts): f32 on the host unless the backend keeps another type.
    fn kv_bytes_per_token(&self, model: &Model) -> usize {
        model.config.kv_bytes_per_token()
    }
}
