//! What this machine has: GPU (from `nvidia-smi`) or CPU, and memory figures.

use std::process::Command;

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuInfo {
    pub model: String,
    pub memory_mb: u64,
    pub count: u32,
    pub backend: &'static str,
}

/// GPU info from `nvidia-smi` when it is present and works, else the CPU.
pub fn detect() -> GpuInfo {
    if let Some(g) = nvidia_smi() {
        return g;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    GpuInfo { model: format!("{model} ({cores} threads)"), memory_mb: total_memory_mb(), count: 1, backend: "cpu" }
}

fn nvidia_smi() -> Option<GpuInfo> {
    let out = Command::new("nvidia-smi")
        .args(["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let gpus: Vec<(String, u64)> = text
        .lines()
        .filter_map(|l| {
            let (name, mem) = l.rsplit_once(',')?;
            Some((name.trim().to_string(), mem.trim().parse().ok()?))
        })
        .collect();
    let (name, mem) = gpus.first()?.clone();
    Some(GpuInfo { model: name, memory_mb: mem, count: gpus.len() as u32, backend: "cuda" })
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
