//! Which forward pass the worker runs, on which device, and what it says about it.
//!
//! `--backend auto` (the default) runs burn on CUDA when the worker was built with
//! `cuda` and a CUDA device opens and runs a kernel, else the native CPU path, with
//! one log line saying why. `--backend burn` runs burn on the device `--burn-device`
//! names (CUDA by default in a `cuda` build, else ndarray on the CPU) or fails with
//! what is missing: it never falls back silently. Whatever runs, `DeviceInfo`
//! describes the device the math actually runs on.
//!
//! With the `cuda` feature burn runs with its fusion (chains of element-wise ops
//! compiled into one kernel) and autotune (matmul, reduction and attention kernels,
//! flash attention among them, benchmarked per shape on first use). Autotune results
//! and compiled kernels are cached on disk (`kernel_cache_dir`), so a restart does not
//! retune.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use crate::bert::Encoder;
use crate::burn_bert::BurnEncoder;
use crate::burn_model::{check_fits, BurnModel, CacheConfig, Dtype, LoadError};
use crate::embeddings::Encode;
use crate::forward::{DeviceInfo, Forward};
use crate::model::Model;
use crate::native::Native;

/// `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// burn on CUDA when built with `cuda` and a device opens, else native.
    Auto,
    /// The hand-written CPU kernels on quantized weights.
    Native,
    /// burn on `--burn-device`; an error when that device is not usable.
    Burn,
}

/// `--burn-device`: where `--backend burn` computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BurnDevice {
    /// NVIDIA GPU through burn-cuda (needs the `cuda` feature, a driver and NVRTC).
    Cuda,
    /// A Vulkan adapter through burn-wgpu (needs the `wgpu` feature); used to check
    /// the GPU kernels on Mesa's software driver.
    Wgpu,
    /// The CPU through burn-ndarray.
    Ndarray,
}

impl BurnDevice {
    /// CUDA in a `cuda` build, else ndarray.
    pub fn default_for_build() -> BurnDevice {
        if cfg!(feature = "cuda") { BurnDevice::Cuda } else { BurnDevice::Ndarray }
    }

    /// `--dtype`'s default on this device: bf16 on CUDA (half the bytes read per
    /// token), f32 elsewhere (burn-ndarray computes in f32; lavapipe has no bf16).
    pub fn default_dtype(self) -> Dtype {
        match self {
            BurnDevice::Cuda => Dtype::Bf16,
            BurnDevice::Wgpu | BurnDevice::Ndarray => Dtype::F32,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BurnDevice::Cuda => "cuda",
            BurnDevice::Wgpu => "wgpu",
            BurnDevice::Ndarray => "ndarray",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("--backend burn --burn-device {device}: this worker was built without the `{device}` feature (rebuild with `cargo build -p worker --release --features {device}`)")]
    NotBuilt { device: &'static str },
    #[error("--backend burn --burn-device {device}: no usable device: {reason}")]
    NoDevice { device: &'static str, reason: String },
    #[error("--dtype {dtype} applies to burn; the native CPU path computes on the file's quantized weights (drop --dtype or use --backend burn)")]
    DtypeOnNative { dtype: &'static str },
    #[error(transparent)]
    Load(#[from] LoadError),
}

/// The forward pass the engine will drive and the device it runs on.
pub struct Opened {
    pub forward: Arc<dyn Forward>,
    pub device: DeviceInfo,
}

/// What `--backend`, `--burn-device` and `--dtype` ask for.
#[derive(Debug, Clone, Copy)]
pub struct Choice {
    pub backend: BackendChoice,
    pub burn_device: BurnDevice,
    /// `None`: the device's default (`BurnDevice::default_dtype`).
    pub dtype: Option<Dtype>,
}

/// Opens the backend `choice` asks for, with a device KV cache of `slots` sequences
/// in `kv_budget_bytes` when it is burn.
pub fn open(model: &Model, choice: Choice, slots: usize, kv_budget_bytes: usize) -> Result<Opened, BackendError> {
    let cache =
        |device: BurnDevice| CacheConfig { slots, kv_budget_bytes, dtype: choice.dtype.unwrap_or(device.default_dtype()), max_tensor_bytes: None };
    match choice.backend {
        BackendChoice::Native => match choice.dtype {
            Some(d) if d != Dtype::F32 => Err(BackendError::DtypeOnNative { dtype: d.name() }),
            _ => Ok(native()),
        },
        BackendChoice::Burn => open_burn(model, choice.burn_device, cache(choice.burn_device)),
        BackendChoice::Auto if cfg!(feature = "cuda") => match open_burn(model, BurnDevice::Cuda, cache(BurnDevice::Cuda)) {
            Ok(o) => Ok(o),
            Err(e) => {
                tracing::warn!("--backend auto: burn on CUDA is not usable ({e}); running the native CPU path");
                Ok(native())
            }
        },
        BackendChoice::Auto => Ok(native()),
    }
}

fn native() -> Opened {
    Opened { forward: Arc::new(Native), device: Native.device() }
}

/// Opens burn on `device`.
pub fn open_burn(model: &Model, device: BurnDevice, cache: CacheConfig) -> Result<Opened, BackendError> {
    match device {
        BurnDevice::Ndarray => {
            let info = DeviceInfo { weights: cache.dtype.name(), ..crate::host::cpu_device("burn-ndarray") };
            let free = Box::new(|| Some(crate::host::free_memory_mb()));
            on_device::<burn::backend::NdArray>(model, Default::default(), info, free, cache)
        }
        BurnDevice::Cuda => open_cuda(model, cache),
        BurnDevice::Wgpu => open_wgpu(model, cache),
    }
}

/// Checks that the model fits, then loads it (a backend panic while loading, such as
/// an allocation failure, becomes an error).
fn on_device<B: burn::tensor::backend::Backend>(
    model: &Model,
    device: B::Device,
    info: DeviceInfo,
    free: Box<dyn Fn() -> Option<u64> + Send + Sync>,
    cache: CacheConfig,
) -> Result<Opened, BackendError>
where
    B::Device: Send + Sync,
{
    check_fits(model, cache, &info.name, info.memory_free_mb)?;
    let engine = info.engine;
    let loaded = quietly(|| BurnModel::<B>::new(model, device, info, free, cache))
        .map_err(|detail| LoadError::Backend { backend: engine, detail })??;
    let device = loaded.device();
    Ok(Opened { forward: Arc::new(loaded), device })
}

/// The sentence encoder on the device the chat model computes on (`engine`, as its
/// `DeviceInfo` names it): burn's `BurnEncoder` on `burn-*` engines, `encoder` itself
/// on the CPU. Returns what encodes and the engine that runs it. A burn device that
/// cannot hold or run the encoder is an error; the caller decides whether to fall
/// back to the CPU.
pub fn open_encoder(encoder: &Arc<Encoder>, engine: &'static str) -> Result<(Box<dyn Encode>, &'static str), BackendError> {
    let on = |compute: Result<Box<dyn Encode>, String>| {
        compute.map(|c| (c, engine)).map_err(|detail| BackendError::Load(LoadError::Backend { backend: engine, detail }))
    };
    match engine {
        "burn-ndarray" => on(quietly(|| Box::new(BurnEncoder::<burn::backend::NdArray>::new(encoder, Default::default())) as Box<dyn Encode>)),
        #[cfg(feature = "wgpu")]
        "burn-wgpu" => {
            let adapter = wgpu_adapter().map_err(|reason| BackendError::NoDevice { device: "wgpu", reason })?;
            // The word embeddings are the largest tensor; past the binding limit wgpu computes garbage.
            let largest = 4 * encoder.word.len();
            if (largest as u64) > adapter.max_binding_bytes {
                return on(Err(format!("the word embeddings ({largest} bytes) exceed the adapter's {}-byte binding limit", adapter.max_binding_bytes)));
            }
            on(quietly(|| {
                Box::new(BurnEncoder::<burn::backend::Wgpu>::new(encoder, burn::backend::wgpu::WgpuDevice::DefaultDevice)) as Box<dyn Encode>
            }))
        }
        #[cfg(feature = "cuda")]
        "burn-cuda" => on(quietly(|| {
            Box::new(BurnEncoder::<burn::backend::Cuda>::new(encoder, burn::backend::cuda::CudaDevice::default())) as Box<dyn Encode>
        })),
        _ => Ok((Box::new(encoder.clone()), "native-cpu")),
    }
}

/// Runs `f`, turning a panic into its message without printing it: backends report
/// a missing driver or a failed allocation by panicking.
pub(crate) fn quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = catch_unwind(AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    result.map_err(|p| panic_message(p.as_ref()))
}

/// The text of a panic payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "panic".into())
}

#[cfg(feature = "cuda")]
fn open_cuda(model: &Model, cache: CacheConfig) -> Result<Opened, BackendError> {
    use burn::backend::cuda::CudaDevice;
    use burn::backend::Cuda;
    use burn::tensor::Tensor;

    let no_device = |reason: String| BackendError::NoDevice { device: "cuda", reason };
    use_kernel_cache();
    let ctx = quietly(|| cudarc::driver::CudaContext::new(0))
        .map_err(|p| no_device(format!("the CUDA driver did not load ({p})")))?
        .map_err(|e| no_device(format!("CUDA device 0 did not open ({e})")))?;
    let name = ctx.name().map_err(|e| no_device(format!("cannot read the device name ({e})")))?;
    let (free, total) = ctx.mem_get_info().map_err(|e| no_device(format!("cannot read the device memory ({e})")))?;
    // A kernel must compile (NVRTC) and run before the device counts as usable.
    let device = CudaDevice::default();
    let probe = quietly(|| {
        let a = Tensor::<Cuda, 2>::ones([2, 2], &device);
        a.clone().matmul(a).into_data().to_vec::<f32>().map_err(|e| format!("{e:?}"))
    });
    match probe {
        Ok(Ok(v)) if v == [2.0; 4] => {}
        Ok(Ok(v)) => return Err(no_device(format!("a test matmul on {name} gave {v:?}"))),
        Ok(Err(e)) | Err(e) => return Err(no_device(format!("a test kernel did not run on {name} ({e})"))),
    }
    let mb = |b: usize| (b >> 20) as u64;
    let info = DeviceInfo {
        engine: "burn-cuda",
        kind: "cuda",
        name,
        weights: cache.dtype.name(),
        memory_total_mb: Some(mb(total)),
        memory_free_mb: Some(mb(free)),
    };
    let free = Box::new(move || ctx.mem_get_info().ok().map(|(free, _)| mb(free)));
    on_device::<Cuda>(model, device, info, free, cache)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_: &Model, _: CacheConfig) -> Result<Opened, BackendError> {
    Err(BackendError::NotBuilt { device: BurnDevice::Cuda.name() })
}

/// The Vulkan adapter burn-wgpu computes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adapter {
    /// The device name, e.g. `llvmpipe (LLVM 15.0.6, 256 bits)` for lavapipe.
    pub name: String,
    /// The driver, e.g. `llvmpipe`, and its version string.
    pub driver: String,
    pub driver_info: String,
    /// A CPU implementation (lavapipe, SwiftShader): its memory is host RAM.
    pub is_cpu: bool,
    /// The largest buffer a kernel may bind (lavapipe: 128 MiB); a larger tensor is
    /// not an error in wgpu, its kernels compute garbage.
    pub max_binding_bytes: u64,
}

/// Initializes burn-wgpu's default device on Vulkan once per process and describes
/// its adapter.
#[cfg(feature = "wgpu")]
pub fn wgpu_adapter() -> Result<Adapter, String> {
    use burn::backend::wgpu::{graphics::Vulkan, init_setup, WgpuDevice};
    static ADAPTER: std::sync::OnceLock<Result<Adapter, String>> = std::sync::OnceLock::new();
    ADAPTER
        .get_or_init(|| {
            // Before the runtime starts: starting it fixes CubeCL's configuration.
            use_kernel_cache();
            let setup = quietly(|| init_setup::<Vulkan>(&WgpuDevice::DefaultDevice, Default::default()))
                .map_err(|p| format!("no Vulkan adapter opened ({p}); on Debian, `apt-get install mesa-vulkan-drivers` provides lavapipe"))?;
            let info = setup.adapter.get_info();
            let limits = setup.device.limits();
            Ok(Adapter {
                max_binding_bytes: limits.max_storage_buffer_binding_size.min(limits.max_buffer_size),
                name: info.name.clone(),
                driver: info.driver.clone(),
                driver_info: info.driver_info.clone(),
                is_cpu: format!("{:?}", info.device_type) == "Cpu",
            })
        })
        .clone()
}

#[cfg(feature = "wgpu")]
fn open_wgpu(model: &Model, cache: CacheConfig) -> Result<Opened, BackendError> {
    use burn::backend::wgpu::WgpuDevice;
    use burn::backend::Wgpu;

    use_kernel_cache();
    let adapter = wgpu_adapter().map_err(|reason| BackendError::NoDevice { device: "wgpu", reason })?;
    // A CPU adapter computes in host RAM; a GPU adapter's free memory is not exposed by
    // wgpu, so it is reported as unknown rather than guessed.
    let (total, free) = if adapter.is_cpu {
        (Some(crate::host::total_memory_mb()), Some(crate::host::free_memory_mb()))
    } else {
        (None, None)
    };
    let info = DeviceInfo {
        engine: "burn-wgpu",
        kind: "vulkan",
        name: format!("{} ({} {})", adapter.name, adapter.driver, adapter.driver_info),
        weights: cache.dtype.name(),
        memory_total_mb: total,
        memory_free_mb: free,
    };
    let is_cpu = adapter.is_cpu;
    let free: Box<dyn Fn() -> Option<u64> + Send + Sync> =
        Box::new(move || is_cpu.then(crate::host::free_memory_mb));
    let cache = CacheConfig { max_tensor_bytes: Some(usize::try_from(adapter.max_binding_bytes).unwrap_or(usize::MAX)), ..cache };
    on_device::<Wgpu>(model, WgpuDevice::DefaultDevice, info, free, cache)
}

#[cfg(not(feature = "wgpu"))]
fn open_wgpu(_: &Model, _: CacheConfig) -> Result<Opened, BackendError> {
    Err(BackendError::NotBuilt { device: BurnDevice::Wgpu.name() })
}

/// Where CubeCL keeps autotune results and compiled kernels between runs:
/// `$GS_KERNEL_CACHE`, else `~/.cache/gpu-streaming/cubecl` (CubeCL's own default is a
/// `target/` folder above the working directory, or the user cache when there is none).
pub fn kernel_cache_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("GS_KERNEL_CACHE") {
        return d.into();
    }
    let home = std::env::var_os("HOME").map_or_else(|| std::path::PathBuf::from("."), std::path::PathBuf::from);
    home.join(".cache").join("gpu-streaming").join("cubecl")
}

/// Points CubeCL's autotune results and compiled kernels (PTX on CUDA) at
/// `kernel_cache_dir` before the first kernel runs. Once per process; a configuration
/// already in place (a `cubecl.toml`, or a kernel that ran before) is kept.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn use_kernel_cache() {
    use burn::cubecl::config::{cache::CacheConfig as KernelCache, CubeClRuntimeConfig, RuntimeConfig};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let dir = kernel_cache_dir();
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), "cannot create the kernel cache folder ({e}); autotune results will not persist");
            return;
        }
        let mut storage = CubeClRuntimeConfig::storage().lock();
        if storage.is_none() {
            // What CubeCL would read itself (a `cubecl.toml`, its environment
            // variables), with our folder where it names none.
            let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
            if matches!(config.autotune.cache, KernelCache::Target) {
                config.autotune.cache = KernelCache::File(dir.clone());
            }
            config.compilation.cache.get_or_insert(KernelCache::File(dir.clone()));
            *storage = Some(std::sync::Arc::new(config));
            tracing::info!(dir = %dir.display(), "autotune results and compiled kernels are cached on disk");
        }
    });
}
