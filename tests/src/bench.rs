//! What the benchmark binaries (`tests/src/bin/bench-*.rs`) share: the release binaries
//! they start and how they wait for them, CPU time from `/proc`, latency percentiles and
//! the machine line above their tables.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use tokio::process::{Child, Command};

/// The model the mock provider serves in the benchmarks.
pub const MODEL: &str = "mock-model";
/// The admin key of the gateways the benchmarks start.
pub const ADMIN_KEY: &str = "bench-admin-key-0123456789abcdef";
/// PostgreSQL as `scripts/test.sh` starts it.
pub const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

// --- processes ------------------------------------------------------------------------

/// `target/release`, where this binary and the ones it starts live.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent().map(Path::to_path_buf).context("no directory for the bench binary")
}

pub fn release_bin(name: &str) -> anyhow::Result<PathBuf> {
    let bin = bin_dir()?.join(name);
    ensure!(
        bin.is_file(),
        "{} is missing: run `cargo build --release -p gateway -p tests` first",
        bin.display()
    );
    Ok(bin)
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub async fn wait_healthy(http: &reqwest::Client, url: &str, child: &mut Child, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited with {status} before it was healthy");
        }
        if http.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{what} was not healthy within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The mock provider (`target/release/mock-provider`) in its own process on a free
/// port, once healthy: the child (killed on drop) and its URL.
pub async fn start_mock(http: &reqwest::Client) -> anyhow::Result<(Child, String)> {
    let port = free_port()?;
    let mut mock = Command::new(release_bin("mock-provider")?)
        .args(["--port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let url = format!("http://127.0.0.1:{port}");
    wait_healthy(http, &format!("{url}/health"), &mut mock, "the mock provider").await?;
    Ok((mock, url))
}

// --- /proc ----------------------------------------------------------------------------

pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after it are fixed.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("odd /proc/pid/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the name.
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

// --- measurement ----------------------------------------------------------------------

/// Microsecond percentiles of a sample.
pub struct Percentiles(pub Vec<u64>);

impl Percentiles {
    pub fn new(mut v: Vec<u64>) -> Self {
        v.sort_unstable();
        Self(v)
    }
    pub fn p(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        // Nearest rank.
        let rank = ((q * self.0.len() as f64).ceil() as usize).clamp(1, self.0.len());
        self.0[rank - 1] as f64
    }
}

// --- report ---------------------------------------------------------------------------

pub fn ms(us: f64) -> String {
    format!("{:.2}", us / 1000.0)
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map(usize::from).unwrap_or(0)
}

/// The CPU's model name from `/proc/cpuinfo`.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())))
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

/// `N cores, <CPU model>`, for the line above a table.
pub fn machine() -> String {
    format!("{} cores, {}", cores(), cpu_model())
}
