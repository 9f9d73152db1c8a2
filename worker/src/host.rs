//! The host: the CPU as a compute device, memory figures, and what registration
//! says about the device the worker computes on.

use serde::Serialize;

use crate::forward::DeviceInfo;

/// What the gateway is told about the hardware at registration (`gpuInfo`). `model`,
/// `memoryMb`, `count` and `backend` are the fields the gateway has always read; the
/// rest are optional extras. Every figure describes the device the worker computes
/// on: a worker on the native CPU path reports the CPU and host RAM even on a machine
/// with a GPU.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuInfo {
    pub model: String,
    pub memory_mb: u64,
    pub count: u32,
    /// `cpu`, `cuda` or `vulkan`: what the math runs on.
    pub backend: &'static str,
    /// The engine: `native-cpu`, `burn-ndarray`, `burn-cuda` or `burn-wgpu`.
    pub engine: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_memory_mb: Option<u64>,
}

impl GpuInfo {
    pub fn from_device(d: &DeviceInfo) -> GpuInfo {
        GpuInfo {
            model: d.name.clone(),
            memory_mb: d.memory_total_mb.unwrap_or(0),
            count: 1,
            backend: d.kind,
            engine: d.engine,
            free_memory_mb: d.memory_free_mb,
        }
    }
}

/// The CPU's model name and thread count, e.g. `AMD EPYC 7B13 (2 threads)`.
pub fn cpu_name() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{model} ({cores} threads)")
}

/// The CPU as a compute device: host RAM is its memory.
pub fn cpu_device(engine: &'static str) -> DeviceInfo {
    DeviceInfo {
        engine,
        kind: "cpu",
        name: cpu_name(),
        weights: "quantized",
        memory_total_mb: Some(total_memory_mb()),
        memory_free_mb: Some(free_memory_mb()),
    }
}

fn meminfo_kb(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|l| l.strip_prefix(key)?.trim().trim_end_matches("kB").trim().parse().ok())
}

pub fn total_memory_mb() -> u64 {
    meminfo_kb("MemTotal:").unwrap_or(0) / 1024
}

pub fn free_memory_mb() -> u64 {
    meminfo_kb("MemAvailable:").unwrap_or(0) / 1024
}

fn status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix(key)?.trim().trim_end_matches("kB").trim().parse().ok()))
        .unwrap_or(0)
}

/// Resident memory of this process.
pub fn rss_mb() -> u64 {
    status_kb("VmRSS:") / 1024
}

/// Peak resident memory of this process.
pub fn peak_rss_mb() -> u64 {
    status_kb("VmHWM:") / 1024
}
