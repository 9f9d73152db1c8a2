//! Settlements per second on PostgreSQL with one and three gateway replicas, and the
//! latency that the shared counters in Redis add to a request, as a markdown table.
//!
//! `cargo build --release -p gateway -p tests && target/release/bench-fleet`
//! (BENCHMARKS.md, "Replicas", says what each row means and holds the latest results).
//!
//! Processes, all on 127.0.0.1: this load generator, the mock provider
//! (`target/release/mock-provider`, its own process as in `bench-overhead`) and the real
//! gateway (`target/release/gateway serve`) as one or three replicas on a fresh
//! PostgreSQL schema (`postgres://postgres@127.0.0.1:5432/test`, as `scripts/test.sh`
//! starts it; dropped afterwards), with Redis at `redis://127.0.0.1:6379` under a fresh
//! key prefix for the rows that use it. Three rows: one replica without Redis, one with
//! Redis (rate limits and provider slot leases in Redis: the cost of the shared
//! counters), three with Redis (a second replica on PostgreSQL refuses to start without
//! it), the load spread round-robin over them.
//!
//! Each row: a closed loop of `--concurrency` tasks sending non-stream chat requests
//! with a funded premium key (`--keys N`: N keys of N users, task i using key i mod N)
//! for 2 s (warm-up, not counted), then `--probe` requests one at a time (latency at
//! low load), then the closed loop again for `--secs`. Every
//! answered request was settled (usage row and ledger entries committed) before its
//! answer was sent, so answers per second are settlements per second; after each row
//! the replicas are stopped, the schema must hold a usage row for every answer and
//! `gateway ledger check` must pass. A second table splits the CPU of the loaded phase
//! per settlement between the replicas, PostgreSQL, Redis, the mock and this process
//! (from `/proc`), since on a small machine they all share the cores.
//!
//! Flags: `--quick` (3 s, probe 50), `--concurrency 64`, `--secs 10`, `--probe 200`,
//! `--keys 1`, `--gateway PATH` (another build).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use gateway::store::new_id;
use serde_json::{json, Value};
use tests::bench::{clock_ticks, cores, cpu_model, cpu_ticks, free_port, ms, release_bin, start_mock, wait_healthy, Percentiles, ADMIN_KEY, MODEL, PG_URL};
use tokio::process::{Child, Command};

const REDIS_URL: &str = "redis://127.0.0.1:6379";
const WARM_UP: Duration = Duration::from_secs(2);
/// A request without its whole answer after this long counts as an error.
const TIMEOUT: Duration = Duration::from_secs(10);

struct Options {
    concurrency: usize,
    secs: u64,
    probe: usize,
    /// Premium keys, each of its own user (account): the load's tasks take them in turn.
    keys: usize,
    /// Another gateway binary to measure (an A/B of a change), instead of target/release/gateway.
    gateway: Option<PathBuf>,
}

impl Options {
    fn parse() -> anyhow::Result<Self> {
        let mut o = Self { concurrency: 64, secs: 10, probe: 200, keys: 1, gateway: None };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => {
                    o.secs = 3;
                    o.probe = 50;
                }
                "--concurrency" => o.concurrency = args.next().context("--concurrency takes a number")?.parse()?,
                "--secs" => o.secs = args.next().context("--secs takes a number")?.parse()?,
                "--probe" => o.probe = args.next().context("--probe takes a number")?.parse()?,
                "--keys" => o.keys = args.next().context("--keys takes a number")?.parse()?,
                "--gateway" => o.gateway = Some(args.next().context("--gateway takes a path")?.into()),
                other => bail!("unknown argument {other}; see the top of tests/src/bin/bench-fleet.rs"),
            }
        }
        ensure!(
            o.concurrency > 0 && o.secs > 0 && o.probe > 0 && o.keys > 0,
            "--concurrency, --secs, --probe and --keys must be positive"
        );
        Ok(o)
    }
}

/// One row of the table: how many replicas, and whether they share counters in Redis.
#[derive(Clone, Copy)]
struct Shape {
    replicas: usize,
    redis: bool,
}

/// One replica without Redis is the baseline; one with Redis adds only the shared
/// counters; three need Redis (a second replica on PostgreSQL refuses to start without).
const SHAPES: [Shape; 3] =
    [Shape { replicas: 1, redis: false }, Shape { replicas: 1, redis: true }, Shape { replicas: 3, redis: true }];

// --- processes ------------------------------------------------------------------------

/// The last lines of a replica's log, for an error message.
fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A fresh PostgreSQL schema (and Redis key prefix) for one row; `dispose` drops it.
struct Database {
    schema: String,
    /// The schema's URL, as the replicas and `gateway ledger check` get it.
    url: String,
    redis_prefix: String,
}

impl Database {
    async fn fresh() -> anyhow::Result<Self> {
        // `new_id` is lowercase hex behind a prefix: a valid bare identifier.
        let schema = new_id("bench");
        let pool = sqlx::AnyPool::connect(PG_URL).await.context("PostgreSQL at 127.0.0.1:5432 (scripts/test.sh starts it)")?;
        sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&pool).await?;
        pool.close().await;
        let url = format!("{PG_URL}?options=-c%20search_path%3D{schema}");
        let redis_prefix = format!("bench-{}:", schema.trim_start_matches("bench_"));
        Ok(Self { schema, url, redis_prefix })
    }

    async fn usage_rows(&self) -> anyhow::Result<i64> {
        let pool = sqlx::AnyPool::connect(&self.url).await?;
        let rows = sqlx::query_scalar("SELECT COUNT(*) FROM usage_records").fetch_one(&pool).await;
        pool.close().await;
        Ok(rows?)
    }

    /// Drops the schema, and the Redis keys under the prefix (best effort: they expire
    /// anyway, and `redis-cli` may be missing).
    async fn dispose(self) -> anyhow::Result<()> {
        let delete = "for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end return 0";
        let pattern = format!("{}*", self.redis_prefix);
        let _ = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "EVAL", delete, "0", &pattern])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .status()
            .await;
        let pool = sqlx::AnyPool::connect(PG_URL).await?;
        sqlx::query(&format!("DROP SCHEMA {} CASCADE", self.schema)).execute(&pool).await?;
        pool.close().await;
        Ok(())
    }
}

/// The replicas of one row. Dropping it kills them.
struct Fleet {
    replicas: Vec<Child>,
    urls: Vec<String>,
    user_keys: Vec<String>,
    _logs: tempfile::TempDir,
}

impl Fleet {
    async fn start(http: &reqwest::Client, common: &Common<'_>, db: &Database, shape: Shape, keys: usize) -> anyhow::Result<Self> {
        let logs = tempfile::tempdir()?;
        let mut replicas = Vec::new();
        let mut urls = Vec::new();
        // One at a time: the first applies the migrations before the others connect.
        for i in 0..shape.replicas {
            let port = free_port()?;
            let log_path = logs.path().join(format!("replica-{i}.log"));
            let mut command = Command::new(common.gateway_bin);
            command
                .arg("serve")
                .env("GATEWAY_DATABASE_URL", &db.url)
                .env("GATEWAY_ADMIN_KEY", ADMIN_KEY)
                // The mock provider listens on 127.0.0.1.
                .env("GATEWAY_ALLOW_PRIVATE_PROVIDERS", "true")
                .env("GATEWAY_PROBATION_REQUESTS", "0")
                .env("GATEWAY_HOST", "127.0.0.1")
                .env("GPU_STREAMING_PORT", port.to_string())
                // The replicas that did not take the registration route to the mock
                // after their next reload.
                .env("GATEWAY_PROVIDER_REFRESH_SECS", "1")
                .env("GATEWAY_REPLICA_ID", format!("bench-{i}"))
                // Every client here is one address (127.0.0.1), and the bench polls /health,
                // which is limited per client IP.
                .env("GATEWAY_MAX_CONNECTIONS_PER_IP", "100000")
                .env("GATEWAY_IP_REQUESTS_PER_MINUTE", "1000000")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log_path)?)
                .kill_on_drop(true);
            if shape.redis {
                command.env("GATEWAY_REDIS_URL", REDIS_URL).env("GATEWAY_REDIS_PREFIX", &db.redis_prefix);
            } else {
                command.env_remove("GATEWAY_REDIS_URL");
            }
            let mut child = command.spawn()?;
            let url = format!("http://127.0.0.1:{port}");
            let what = format!("gateway replica {i}");
            if let Err(e) = wait_healthy(http, &format!("{url}/health"), &mut child, &what).await {
                bail!("{e}; its log ends:\n{}", log_tail(&log_path));
            }
            replicas.push(child);
            urls.push(url);
        }
        let user_keys = provision(http, &urls[0], common.mock_url, keys).await?;
        let fleet = Self { replicas, urls, user_keys, _logs: logs };
        fleet.wait_ready(http, shape).await?;
        Ok(fleet)
    }

    /// Until every replica routes the model, and with Redis counts every replica live.
    async fn wait_ready(&self, http: &reqwest::Client, shape: Shape) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        for url in &self.urls {
            loop {
                let models: Value =
                    http.get(format!("{url}/v1/models")).bearer_auth(&self.user_keys[0]).send().await?.json().await?;
                if models["data"].as_array().is_some_and(|d| !d.is_empty()) {
                    break;
                }
                ensure!(Instant::now() < deadline, "{url} did not route {MODEL} within 20 s");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        if !shape.redis {
            return Ok(());
        }
        for url in &self.urls {
            loop {
                let health = self.health(http, url).await?;
                if health["replica"]["liveReplicas"].as_u64() == Some(shape.replicas as u64) {
                    break;
                }
                if Instant::now() >= deadline {
                    eprintln!("  {url} counts {} live replicas, not {}; going on", health["replica"]["liveReplicas"], shape.replicas);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    fn pids(&self) -> anyhow::Result<Vec<u32>> {
        self.replicas.iter().map(|c| c.id().context("a replica has no pid")).collect()
    }

    async fn health(&self, http: &reqwest::Client, url: &str) -> anyhow::Result<Value> {
        Ok(http.get(format!("{url}/health")).send().await?.json().await?)
    }

    /// Each replica's capacity mode (`shared` with Redis, `fallback` if Redis was away,
    /// `local` without).
    async fn capacity_modes(&self, http: &reqwest::Client) -> anyhow::Result<Vec<String>> {
        let mut modes = Vec::new();
        for url in &self.urls {
            let health = self.health(http, url).await?;
            modes.push(health["replica"]["capacity"].as_str().unwrap_or("?").to_owned());
        }
        Ok(modes)
    }

    /// Kills the replicas and waits for them to be gone, so nothing writes to the
    /// schema while it is checked and dropped.
    async fn stop(mut self) -> anyhow::Result<()> {
        for child in &mut self.replicas {
            child.start_kill()?;
        }
        for child in &mut self.replicas {
            child.wait().await?;
        }
        Ok(())
    }
}

/// Registers the mock through one replica, puts it on line, and returns `keys` premium
/// keys, each of its own user with credit, whose rate limits never bind.
async fn provision(http: &reqwest::Client, gateway_url: &str, mock_url: &str, keys: usize) -> anyhow::Result<Vec<String>> {
    let post = |path: String, bearer: Option<&str>, body: Value| {
        let mut request = http.post(path.clone()).json(&body);
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await?;
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            ensure!(status.is_success(), "POST {path}: {status} {body}");
            anyhow::Ok(body)
        }
    };
    let registration = json!({
        "gpuInfo": {},
        "capabilities": {"models": [MODEL], "maxConcurrentStreams": 1_000, "http2": true},
        "pricing": {"perToken": 0.000002},
        "baseUrl": mock_url,
    });
    let registered = post(format!("{gateway_url}/api/gpu/register"), None, registration).await?;
    let provider_id = registered["providerId"].as_str().context("no providerId")?;
    let provider_key = registered["providerKey"].as_str().context("no providerKey")?;
    post(
        format!("{gateway_url}/api/gpu/stream/start"),
        Some(provider_key),
        json!({"providerId": provider_id, "model": MODEL, "quality": "standard"}),
    )
    .await?;
    let mut user_keys = Vec::with_capacity(keys);
    for i in 0..keys {
        let key = post(
            format!("{gateway_url}/api/admin/keys"),
            Some(ADMIN_KEY),
            // The limiter runs on every request (in Redis for the shared rows) but with
            // limits far above what the load reaches: the bench measures its cost, not refusals.
            json!({"name": format!("bench-{i}"), "tier": "premium", "requestsPerMinute": 6_000_000u32, "tokensPerMinute": 30_000_000u32}),
        )
        .await?;
        user_keys.push(key["key"].as_str().context("no key")?.to_owned());
        // Premium keys pay from a prepaid balance: grant enough credit for the run.
        let user_id = key["userId"].as_str().context("no userId")?;
        post(format!("{gateway_url}/api/admin/users/{user_id}/credit"), Some(ADMIN_KEY), json!({"amount": 100000})).await?;
    }
    Ok(user_keys)
}

// --- /proc ----------------------------------------------------------------------------

/// The whole machine's (busy, all) clock ticks from `/proc/stat`, over every core.
fn machine_ticks() -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().find(|l| l.starts_with("cpu ")).context("no cpu line in /proc/stat")?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let all: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Ok((all - idle, all))
}

/// utime + stime of every process named `name` (its `comm`), by pid.
fn ticks_named(name: &str) -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == name) {
            if let Ok(ticks) = cpu_ticks(pid) {
                out.insert(pid, ticks);
            }
        }
    }
    out
}

/// Who spends the CPU of a row, in the columns of the CPU table.
const CPU_GROUPS: [&str; 5] = ["gateway replicas", "PostgreSQL", "Redis", "mock provider", "load generator"];

/// CPU ticks so far of each of `CPU_GROUPS`, by pid, and of the whole machine.
struct Cpu {
    groups: [BTreeMap<u32, u64>; 5],
    machine: (u64, u64),
}

impl Cpu {
    fn read(replicas: &[u32], mock: u32) -> anyhow::Result<Self> {
        let own = |pids: &[u32]| pids.iter().map(|&pid| Ok((pid, cpu_ticks(pid)?))).collect::<anyhow::Result<BTreeMap<_, _>>>();
        Ok(Self {
            groups: [
                own(replicas)?,
                // Every PostgreSQL process (the replicas' backends, the WAL writer,
                // the checkpointer), also those of anyone else using the server.
                ticks_named("postgres"),
                ticks_named("redis-server"),
                own(&[mock])?,
                own(&[std::process::id()])?,
            ],
            machine: machine_ticks()?,
        })
    }

    /// CPU-ms per answer of each group since `before` (a process that started since
    /// counts whole; one that ended is lost), and how busy the machine's cores were, in %.
    fn since(&self, before: &Cpu, answered: usize) -> ([f64; 5], f64) {
        let per_answer = |i: usize| {
            let ticks: u64 = self.groups[i]
                .iter()
                .map(|(pid, &now)| now.saturating_sub(before.groups[i].get(pid).copied().unwrap_or(0)))
                .sum();
            ticks as f64 / clock_ticks() * 1000.0 / answered.max(1) as f64
        };
        let busy = self.machine.0.saturating_sub(before.machine.0) as f64;
        let all = self.machine.1.saturating_sub(before.machine.1).max(1) as f64;
        (std::array::from_fn(per_answer), busy / all * 100.0)
    }
}

// --- measurement ----------------------------------------------------------------------

/// Sends requests round-robin over the replicas of a row.
#[derive(Clone)]
struct Load {
    http: reqwest::Client,
    urls: Arc<Vec<String>>,
    user_keys: Arc<Vec<String>>,
    body: Arc<Value>,
    next: Arc<AtomicUsize>,
}

impl Load {
    /// One non-stream chat with the `key`th key (modulo their number), the whole answer
    /// read: its latency in µs, or what went wrong.
    async fn chat(&self, key: usize) -> Result<u64, String> {
        let url = &self.urls[self.next.fetch_add(1, Ordering::Relaxed) % self.urls.len()];
        let start = Instant::now();
        let request = self.http.post(format!("{url}/v1/chat/completions")).bearer_auth(&self.user_keys[key % self.user_keys.len()]).json(&*self.body);
        let answer = tokio::time::timeout(TIMEOUT, async {
            let response = request.send().await.map_err(|e| format!("transport: {e}"))?;
            let status = response.status();
            let bytes = response.bytes().await.map_err(|e| format!("reading the body: {e}"))?;
            if !status.is_success() {
                return Err(format!("{status}: {}", String::from_utf8_lossy(&bytes[..bytes.len().min(200)])));
            }
            if bytes.is_empty() {
                return Err("an empty body".to_owned());
            }
            Ok(())
        })
        .await;
        match answer {
            Err(_) => Err(format!("no answer within {} s", TIMEOUT.as_secs())),
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => Ok(start.elapsed().as_micros() as u64),
        }
    }
}

struct Phase {
    latencies: Percentiles,
    errors: usize,
    first_error: Option<String>,
    secs: f64,
}

impl Phase {
    fn answered(&self) -> usize {
        self.latencies.0.len()
    }

    fn per_sec(&self) -> f64 {
        self.answered() as f64 / self.secs
    }

    fn report_errors(&self, what: &str) {
        if let Some(e) = &self.first_error {
            eprintln!("  {what}: {} errors, the first: {e}", self.errors);
        }
    }
}

/// `concurrency` tasks, each sending its next request as soon as its last is answered,
/// until `secs` have passed; the time includes the answers to the last requests.
async fn closed_loop(load: &Load, concurrency: usize, length: Duration) -> anyhow::Result<Phase> {
    let started = Instant::now();
    let end = started + length;
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            let load = load.clone();
            tokio::spawn(async move {
                let (mut latencies, mut errors, mut first_error) = (Vec::new(), 0, None);
                while Instant::now() < end {
                    match load.chat(task).await {
                        Ok(us) => latencies.push(us),
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(e);
                        }
                    }
                }
                (latencies, errors, first_error)
            })
        })
        .collect();
    let (mut latencies, mut errors, mut first_error) = (Vec::new(), 0, None);
    for task in tasks {
        let (l, e, first) = task.await?;
        latencies.extend(l);
        errors += e;
        first_error = first_error.or(first);
    }
    Ok(Phase { secs: started.elapsed().as_secs_f64(), latencies: Percentiles::new(latencies), errors, first_error })
}

/// `n` requests one at a time: latency without queueing behind other requests.
async fn probe(load: &Load, n: usize) -> Phase {
    let started = Instant::now();
    let (mut latencies, mut errors, mut first_error) = (Vec::with_capacity(n), 0, None);
    for i in 0..n {
        match load.chat(i).await {
            Ok(us) => latencies.push(us),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    Phase { secs: started.elapsed().as_secs_f64(), latencies: Percentiles::new(latencies), errors, first_error }
}

struct Row {
    shape: Shape,
    load: Phase,
    probe: Phase,
    /// Answers over the whole row (warm-up, probe and load).
    answered: usize,
    usage_rows: i64,
    modes: Vec<String>,
    /// CPU-ms per answer at c=concurrency of each of `CPU_GROUPS`.
    cpu_ms: [f64; 5],
    /// How busy the machine's cores were at c=concurrency, in %.
    busy: f64,
    /// PostgreSQL's WAL flushes (fsyncs) per answer at c=concurrency.
    wal_syncs: f64,
}

/// What every row uses: the gateway binary, the mock provider and the PostgreSQL server.
struct Common<'a> {
    gateway_bin: &'a Path,
    mock_url: &'a str,
    mock_pid: u32,
    /// The PostgreSQL server, for its statistics.
    postgres: &'a sqlx::AnyPool,
}

async fn measure(http: &reqwest::Client, common: &Common<'_>, shape: Shape, options: &Options) -> anyhow::Result<Row> {
    let db = Database::fresh().await?;
    let row = measure_on(http, common, &db, shape, options).await;
    // The replicas are gone (stopped, or killed on drop) whether or not the row succeeded.
    let disposed = db.dispose().await;
    let row = row?;
    disposed.context("dropping the bench schema")?;
    Ok(row)
}

async fn measure_on(http: &reqwest::Client, common: &Common<'_>, db: &Database, shape: Shape, options: &Options) -> anyhow::Result<Row> {
    let fleet = Fleet::start(http, common, db, shape, options.keys).await?;
    let load = Load {
        http: http.clone(),
        urls: Arc::new(fleet.urls.clone()),
        user_keys: Arc::new(fleet.user_keys.clone()),
        body: Arc::new(json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8,
        })),
        next: Arc::new(AtomicUsize::new(0)),
    };
    let warm = closed_loop(&load, options.concurrency, WARM_UP).await?;
    warm.report_errors("warm-up");
    tokio::time::sleep(Duration::from_millis(500)).await;
    eprintln!("  {} requests one at a time", options.probe);
    let probe = probe(&load, options.probe).await;
    probe.report_errors("probe");
    tokio::time::sleep(Duration::from_millis(500)).await;
    eprintln!("  closed loop of {} for {} s", options.concurrency, options.secs);
    let pids = fleet.pids()?;
    let (before, syncs_before) = (Cpu::read(&pids, common.mock_pid)?, wal_syncs(common.postgres).await?);
    let measured = closed_loop(&load, options.concurrency, Duration::from_secs(options.secs)).await?;
    let (cpu_ms, busy) = Cpu::read(&pids, common.mock_pid)?.since(&before, measured.answered());
    let wal_syncs = (wal_syncs(common.postgres).await? - syncs_before) as f64 / measured.answered().max(1) as f64;
    measured.report_errors("load");
    let modes = fleet.capacity_modes(http).await?;
    // A replica that lost Redis during the row counts slots on its own (`fallback`):
    // that row would not measure the shared counters.
    ensure!(
        modes.iter().all(|m| m == if shape.redis { "shared" } else { "local" }),
        "the replicas' capacity modes are {modes:?}"
    );
    fleet.stop().await?;

    let answered = warm.answered() + probe.answered() + measured.answered();
    let usage_rows = db.usage_rows().await?;
    ensure!(
        usage_rows >= answered as i64,
        "{answered} requests were answered but only {usage_rows} usage rows were written: answers without settlements"
    );
    let check = Command::new(common.gateway_bin)
        .args(["ledger", "check"])
        .env("GATEWAY_DATABASE_URL", &db.url)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await?;
    ensure!(
        check.status.success(),
        "`gateway ledger check` failed ({}):\n{}{}",
        check.status,
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    eprintln!(
        "  {:.0} answers/s, {usage_rows} usage rows for {answered} answers; ledger check OK",
        measured.per_sec()
    );
    Ok(Row { shape, load: measured, probe, answered, usage_rows, modes, cpu_ms, busy, wal_syncs })
}

// --- report ---------------------------------------------------------------------------

/// As `tests::bench::machine`, with the `(nproc)` this table has always said.
fn machine() -> String {
    format!("{} cores (nproc), {}", cores(), cpu_model())
}

/// The output of a command, trimmed; empty if it failed.
fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The commit this tree is at, `-dirty` with uncommitted changes to tracked files.
fn commit() -> String {
    let head = command_output("git", &["rev-parse", "--short", "HEAD"]);
    if head.is_empty() {
        return "unknown".to_owned();
    }
    let dirty = !command_output("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    if dirty {
        format!("{head}-dirty")
    } else {
        head
    }
}

async fn postgres_version(postgres: &sqlx::AnyPool) -> anyhow::Result<String> {
    Ok(sqlx::query_scalar("SELECT split_part(version(), ' on ', 1)").fetch_one(postgres).await?)
}

/// The server's WAL flushes so far (`pg_stat_wal.wal_sync`: one per commit that found its
/// WAL not yet on disk; PostgreSQL's own group commit makes concurrent commits share one).
/// Server-wide, and backends report it up to a second late, which over a phase of
/// several seconds mostly cancels out.
async fn wal_syncs(postgres: &sqlx::AnyPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT wal_sync FROM pg_stat_wal").fetch_one(postgres).await?)
}

async fn bench(options: Options) -> anyhow::Result<String> {
    sqlx::any::install_default_drivers();
    let gateway_bin = match &options.gateway {
        Some(path) => path.clone(),
        None => release_bin("gateway")?,
    };
    let postgres = sqlx::AnyPool::connect(PG_URL).await.context("PostgreSQL at 127.0.0.1:5432 (scripts/test.sh starts it)")?;
    let pg = postgres_version(&postgres).await?;
    let redis = command_output("redis-cli", &["-h", "127.0.0.1", "INFO", "server"])
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:").map(|v| format!("Redis {}", v.trim())))
        .unwrap_or_else(|| "Redis".to_owned());
    let http = reqwest::Client::builder().pool_max_idle_per_host(usize::MAX).tcp_nodelay(true).build()?;
    let (mock, mock_url) = start_mock(&http).await?;
    let mock_pid = mock.id().context("the mock provider has no pid")?;
    let common = Common { gateway_bin: &gateway_bin, mock_url: &mock_url, mock_pid, postgres: &postgres };

    let started = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let mut rows = Vec::new();
    for shape in SHAPES {
        eprintln!("{} replica(s), {}", shape.replicas, if shape.redis { "Redis" } else { "no Redis" });
        rows.push(measure(&http, &common, shape, &options).await?);
    }
    drop(mock);
    postgres.close().await;

    let mut out = format!(
        "Run {started} on {}, gateway `{}` (release), {pg}, {redis}; a closed loop of {} for {} s after a {} s \
         warm-up (c={}), and {} requests one at a time (c=1); non-stream chat, `max_tokens` 8; {}.\n\n",
        machine(),
        commit(),
        options.concurrency,
        options.secs,
        WARM_UP.as_secs(),
        options.concurrency,
        options.probe,
        match options.keys {
            1 => "one premium key".to_owned(),
            n => format!("{n} premium keys of {n} users, task i using key i mod {n}"),
        },
    );
    let c = options.concurrency;
    out.push_str(&format!(
        "| replicas | Redis | settlements/s | p50 ms (c={c}) | p99 ms (c={c}) | p50 ms (c=1) | p99 ms (c=1) | errors |\n"
    ));
    out.push_str("|---:|---|---:|---:|---:|---:|---:|---:|\n");
    for row in &rows {
        out.push_str(&format!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} |\n",
            row.shape.replicas,
            if row.shape.redis { "yes" } else { "no" },
            row.load.per_sec(),
            ms(row.load.latencies.p(0.5)),
            ms(row.load.latencies.p(0.99)),
            ms(row.probe.latencies.p(0.5)),
            ms(row.probe.latencies.p(0.99)),
            row.load.errors + row.probe.errors,
        ));
    }
    if let [a, b, ..] = &rows[..] {
        out.push_str(&format!(
            "\nAdded by the shared counters (1 replica, Redis − no Redis): p50 {} ms, p99 {} ms at c=1; \
             p50 {} ms, p99 {} ms and {:+.1} % settlements/s at c={c}.\n",
            ms(b.probe.latencies.p(0.5) - a.probe.latencies.p(0.5)),
            ms(b.probe.latencies.p(0.99) - a.probe.latencies.p(0.99)),
            ms(b.load.latencies.p(0.5) - a.load.latencies.p(0.5)),
            ms(b.load.latencies.p(0.99) - a.load.latencies.p(0.99)),
            (b.load.per_sec() / a.load.per_sec() - 1.0) * 100.0,
        ));
    }
    let settled: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{}{}: {} usage rows for {} answers (capacity {})",
                r.shape.replicas,
                if r.shape.redis { "+Redis" } else { "" },
                r.usage_rows,
                r.answered,
                r.modes.join("/")
            )
        })
        .collect();
    out.push_str(&format!(
        "Every answer settled and `gateway ledger check` passed after each row; {}.\n",
        settled.join("; ")
    ));
    out.push_str(&format!(
        "\nCPU-ms per settlement at c={c} (utime + stime from `/proc`; PostgreSQL is every `postgres` process \
         on the machine), and how busy the {} cores were:\n\n",
        cores()
    ));
    out.push_str(&format!("| replicas | Redis | {} | cores busy | WAL fsyncs / settlement |\n", CPU_GROUPS.join(" | ")));
    out.push_str(&format!("|---:|---|{}---:|---:|\n", "---:|".repeat(CPU_GROUPS.len())));
    for row in &rows {
        let cpu: Vec<String> = row.cpu_ms.iter().map(|ms| format!("{ms:.2}")).collect();
        out.push_str(&format!(
            "| {} | {} | {} | {:.0} % | {:.2} |\n",
            row.shape.replicas,
            if row.shape.redis { "yes" } else { "no" },
            cpu.join(" | "),
            row.busy,
            row.wal_syncs
        ));
    }
    Ok(out)
}

#[tokio::main]
#[allow(clippy::print_stdout)]
async fn main() -> anyhow::Result<()> {
    let options = Options::parse()?;
    let report = bench(options).await?;
    println!("{report}");
    Ok(())
}
