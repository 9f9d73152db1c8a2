//! The gateway's overhead over a direct call to the provider, as a markdown table.
//!
//! `cargo build --release -p gateway -p tests && cargo run --release -p tests --bin bench-overhead`
//! (BENCHMARKS.md says what each row means and holds the latest results).
//!
//! Three processes, all on 127.0.0.1: this load generator, the mock provider
//! (`target/release/mock-provider`) and the real gateway (`target/release/gateway`,
//! auth and usage recording on, SQLite in a temp dir). The mock runs in its own process
//! so that its runtime neither shares threads with the load generator (which would
//! skew the latencies of both paths) nor is mistaken for gateway work: the gateway's
//! CPU and memory are read from its own `/proc/<pid>`.
//!
//! Every phase is bounded in count and time. Flags: `--quick` (shorter phases),
//! `--rates 250,500,1000`, `--secs 10`, `--streams 10000`, `--gateway PATH` (another build),
//! `--upstream h2c|http1|link` (how the gateway reaches the mock: h2c when registered
//! with `capabilities.http2`, HTTP/1.1 without, or `link`: a second mock process dials
//! out to the gateway and is served over its link, as a worker behind NAT; default h2c).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use futures::StreamExt;
use serde_json::{json, Value};
use tests::bench::{clock_ticks, cpu_ticks, free_port, machine, ms, release_bin, start_mock, wait_healthy, Percentiles, ADMIN_KEY, MODEL};
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;

const QUESTION: &str = "What is the capital of France?";

struct Options {
    rates: Vec<u32>,
    secs: u64,
    streams: usize,
    stream_rate: u32,
    stream_secs: u64,
    /// Another gateway binary to measure (an A/B of a change), instead of target/release/gateway.
    gateway: Option<PathBuf>,
    /// Register the mock with `capabilities.http2` (the gateway multiplexes over h2c).
    h2c: bool,
    /// The gateway reaches the mock over a dial-out link instead.
    link: bool,
}

impl Options {
    fn parse() -> anyhow::Result<Self> {
        let mut o = Self { rates: vec![250, 500, 1000], secs: 10, streams: 10_000, stream_rate: 200, stream_secs: 5, gateway: None, h2c: true, link: false };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => {
                    o.secs = 2;
                    o.stream_secs = 2;
                    o.streams = 1_000;
                }
                "--rates" => {
                    o.rates = args
                        .next()
                        .context("--rates takes a list like 250,500,1000")?
                        .split(',')
                        .map(str::parse)
                        .collect::<Result<_, _>>()?;
                }
                "--secs" => o.secs = args.next().context("--secs takes a number")?.parse()?,
                "--streams" => o.streams = args.next().context("--streams takes a number")?.parse()?,
                "--stream-secs" => o.stream_secs = args.next().context("--stream-secs takes a number")?.parse()?,
                "--gateway" => o.gateway = Some(args.next().context("--gateway takes a path")?.into()),
                "--upstream" => {
                    (o.h2c, o.link) = match args.next().as_deref() {
                        Some("h2c") => (true, false),
                        Some("http1") => (false, false),
                        Some("link") => (false, true),
                        _ => bail!("--upstream takes h2c, http1 or link"),
                    }
                }
                other => bail!("unknown argument {other}; see the top of tests/src/bin/bench-overhead.rs"),
            }
        }
        ensure!(o.rates.iter().all(|&r| r > 0) && o.secs > 0 && o.stream_secs > 0, "rates, --secs and --stream-secs must be positive");
        Ok(o)
    }
}

// --- processes ------------------------------------------------------------------------

struct Setup {
    // Held so that the mock is killed when the bench ends.
    mock: Child,
    /// With `--upstream link`: the mock the gateway reaches over its link.
    linked: Option<Child>,
    gateway: Child,
    mock_url: String,
    gateway_url: String,
    user_key: String,
    _dir: tempfile::TempDir,
}

async fn start(http: &reqwest::Client, max_streams: usize, gateway_bin: Option<&Path>, h2c: bool, link: bool) -> anyhow::Result<Setup> {
    let dir = tempfile::tempdir()?;
    let (mock, mock_url) = start_mock(http).await?;

    let port = free_port()?;
    let log = std::fs::File::create(dir.path().join("gateway.log"))?;
    let gateway_bin = match gateway_bin {
        Some(path) => path.to_owned(),
        None => release_bin("gateway")?,
    };
    let mut gateway = Command::new(gateway_bin)
        .arg("serve")
        .env("GATEWAY_DATABASE_URL", format!("sqlite://{}", dir.path().join("gw.db").display()))
        .env("GATEWAY_ADMIN_KEY", ADMIN_KEY)
        // The mock provider listens on 127.0.0.1.
        .env("GATEWAY_ALLOW_PRIVATE_PROVIDERS", "true")
        .env("GATEWAY_PROBATION_REQUESTS", "0")
        .env("GATEWAY_FREE_TIER_DAILY_BUDGET", "1000")
        // Every client here is one address (127.0.0.1), 10,000 streams at once.
        .env("GATEWAY_MAX_CONNECTIONS_PER_IP", "100000")
        .env("GATEWAY_HOST", "127.0.0.1")
        .env("GPU_STREAMING_PORT", port.to_string())
        // Opening 10,000 idle streams takes longer than the default 120 s idle-chunk timeout.
        .env("GATEWAY_IDLE_CHUNK_TIMEOUT_SECS", "900")
        // The bench polls /health, which is limited per client IP.
        .env("GATEWAY_IP_REQUESTS_PER_MINUTE", "1000000")
        // One mock provider carries all 10,000 idle streams.
        .env("GATEWAY_MAX_PROVIDER_STREAMS", "100000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let gateway_url = format!("http://127.0.0.1:{port}");
    wait_healthy(http, &format!("{gateway_url}/health"), &mut gateway, "the gateway").await?;

    let post = |path: String, bearer: Option<String>, body: Value| {
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
    let mut registration = json!({
        "gpuInfo": {},
        "capabilities": {"models": [MODEL], "maxConcurrentStreams": max_streams + 1_000, "http2": h2c},
        "pricing": {"perToken": 0.000002},
    });
    if link {
        registration["connection"] = json!("dialOut");
    } else {
        registration["baseUrl"] = json!(mock_url);
    }
    let registered = post(format!("{gateway_url}/api/gpu/register"), None, registration).await?;
    let provider_id = registered["providerId"].as_str().context("no providerId")?.to_owned();
    let provider_key = registered["providerKey"].as_str().context("no providerKey")?.to_owned();
    post(
        format!("{gateway_url}/api/gpu/stream/start"),
        Some(provider_key.clone()),
        json!({"providerId": provider_id, "model": MODEL, "quality": "standard"}),
    )
    .await?;
    let linked = if link { Some(start_linked_mock(http, &gateway_url, &provider_id, &provider_key).await?) } else { None };
    let key = post(
        format!("{gateway_url}/api/admin/keys"),
        Some(ADMIN_KEY.to_owned()),
        // The rate limiter runs on every request but with limits far above the offered load:
        // the bench measures overhead, not refusals.
        json!({"name": "bench", "tier": "premium", "requestsPerMinute": 6_000_000u32, "tokensPerMinute": 30_000_000u32}),
    )
    .await?;
    let user_key = key["key"].as_str().context("no key")?.to_owned();
    // Premium keys pay from a prepaid balance (billing on): grant enough credit for the run.
    let user_id = key["userId"].as_str().context("no userId")?.to_owned();
    post(format!("{gateway_url}/api/admin/users/{user_id}/credit"), Some(ADMIN_KEY.to_owned()), json!({"amount": 100000})).await?;
    Ok(Setup { mock, linked, gateway, mock_url, gateway_url, user_key, _dir: dir })
}

/// A second mock process that dials out to the gateway; returns once it is on line there.
async fn start_linked_mock(http: &reqwest::Client, gateway_url: &str, id: &str, key: &str) -> anyhow::Result<Child> {
    let child = Command::new(release_bin("mock-provider")?)
        .args(["--dial", gateway_url, "--provider-id", id, "--provider-key", key])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    for _ in 0..200 {
        let providers: Value = http.get(format!("{gateway_url}/api/admin/providers")).bearer_auth(ADMIN_KEY).send().await?.json().await?;
        if providers["data"][0]["online"] == true {
            return Ok(child);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the linked mock never came on line")
}

// --- /proc ----------------------------------------------------------------------------

fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    Ok(kb / 1024.0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(Iterator::count).unwrap_or(0)
}

// --- measurement ----------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Target {
    Direct,
    Gateway,
}

#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    mock_url: String,
    gateway_url: String,
    user_key: String,
}

impl Client {
    fn request(&self, target: Target, path: &str, body: &Value) -> reqwest::RequestBuilder {
        match target {
            Target::Direct => self.http.post(format!("{}{path}", self.mock_url)).json(body),
            Target::Gateway => {
                self.http.post(format!("{}{path}", self.gateway_url)).bearer_auth(&self.user_key).json(body)
            }
        }
    }
}

struct Run {
    latencies: Percentiles,
    errors: usize,
    achieved: f64,
    cpu_ticks: u64,
    sent: usize,
}

fn chat_body(stream: bool, text: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 16, "stream": stream})
}

/// One non-stream request; the whole body is read. `None` on any failure.
async fn one_chat(client: &Client, target: Target, body: &Value) -> Option<u64> {
    let start = Instant::now();
    let response = client.request(target, "/v1/chat/completions", body).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let bytes = response.bytes().await.ok()?;
    let elapsed = start.elapsed();
    (!bytes.is_empty()).then_some(elapsed.as_micros() as u64)
}

/// Open-loop load: request `i` starts at `t0 + i / rate` whether or not earlier ones
/// have finished, so a slow server cannot slow the offered load down.
async fn open_loop(client: &Client, target: Target, rate: u32, secs: u64, gateway_pid: u32) -> anyhow::Result<Run> {
    let total = (u64::from(rate) * secs) as usize;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let body = Arc::new(chat_body(false, QUESTION));
    let cpu_before = cpu_ticks(gateway_pid)?;
    let t0 = tokio::time::Instant::now() + Duration::from_millis(20);
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        tokio::time::sleep_until(t0 + interval * i as u32).await;
        let (client, body) = (client.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let latency = tokio::time::timeout(Duration::from_secs(10), one_chat(&client, target, &body)).await;
            (latency.ok().flatten(), sent, Instant::now())
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    let mut errors = 0;
    let mut last = Instant::now();
    // Where in the run the slow requests were sent, to tell periodic stalls from noise.
    let mut slow: Vec<(u128, u64)> = Vec::new();
    for task in tasks {
        let (latency, sent, done) = task.await?;
        last = last.max(done);
        match latency {
            Some(us) => {
                if us > 5_000 {
                    slow.push((sent.duration_since(t0.into_std()).as_millis(), us / 1000));
                }
                latencies.push(us)
            }
            None => errors += 1,
        }
    }
    if !slow.is_empty() {
        eprintln!("  {} requests over 5 ms, (sent at ms, took ms): {:?}", slow.len(), &slow[..slow.len().min(40)]);
    }
    let cpu_after = cpu_ticks(gateway_pid)?;
    let elapsed = last.duration_since(t0.into_std()).as_secs_f64();
    Ok(Run {
        achieved: latencies.len() as f64 / elapsed,
        latencies: Percentiles::new(latencies),
        errors,
        cpu_ticks: cpu_after - cpu_before,
        sent: total,
    })
}

struct StreamSample {
    ttft_us: u64,
    /// From the first content chunk to the end of the stream.
    rest_us: u64,
    chunks: usize,
}

/// One streamed chat: time to the first content chunk, then to `[DONE]`.
async fn one_stream(client: &Client, target: Target, body: &Value) -> Option<StreamSample> {
    let start = Instant::now();
    let response = client.request(target, "/v1/chat/completions", body).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let mut bytes = response.bytes_stream();
    let mut buffer: Vec<u8> = Vec::new();
    let mut first: Option<Instant> = None;
    let mut chunks = 0;
    while let Some(piece) = bytes.next().await {
        buffer.extend_from_slice(&piece.ok()?);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            // Comments and other fields (keep-alives) are not chunks.
            let Some(data) = event.strip_prefix(b"data: ") else { continue };
            let data = data.strip_suffix(b"\n\n").unwrap_or(data);
            if data == b"[DONE]" {
                let first = first?;
                return Some(StreamSample {
                    ttft_us: first.duration_since(start).as_micros() as u64,
                    rest_us: first.elapsed().as_micros() as u64,
                    chunks,
                });
            }
            chunks += 1;
            if first.is_none() {
                let v: Value = serde_json::from_slice(data).ok()?;
                if v["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty()) {
                    first = Some(Instant::now());
                }
            }
        }
    }
    None
}

struct StreamRun {
    ttft: Percentiles,
    rest: Percentiles,
    chunks_after_first: f64,
    errors: usize,
}

async fn stream_load(client: &Client, target: Target, rate: u32, secs: u64) -> anyhow::Result<StreamRun> {
    let total = (u64::from(rate) * secs) as usize;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let body = Arc::new(chat_body(true, QUESTION));
    let t0 = tokio::time::Instant::now() + Duration::from_millis(20);
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        tokio::time::sleep_until(t0 + interval * i as u32).await;
        let (client, body) = (client.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(10), one_stream(&client, target, &body)).await.ok().flatten()
        }));
    }
    let (mut ttft, mut rest, mut chunks, mut errors) = (Vec::new(), Vec::new(), 0usize, 0);
    for task in tasks {
        match task.await? {
            Some(s) => {
                ttft.push(s.ttft_us);
                rest.push(s.rest_us);
                // The chunks after the first content chunk (content, finish, usage).
                chunks += s.chunks.saturating_sub(1);
            }
            None => errors += 1,
        }
    }
    let n = ttft.len().max(1);
    Ok(StreamRun {
        chunks_after_first: chunks as f64 / n as f64,
        ttft: Percentiles::new(ttft),
        rest: Percentiles::new(rest),
        errors,
    })
}

async fn active_streams(client: &Client) -> anyhow::Result<u64> {
    let health: Value = client.http.get(format!("{}/health", client.gateway_url)).send().await?.json().await?;
    health["activeStreams"].as_u64().context("no activeStreams in /health")
}

struct IdleResult {
    opened: usize,
    active: u64,
    /// (streams open, gateway RSS MB, mock provider RSS MB)
    rss_points: Vec<(usize, f64, f64)>,
    fds: usize,
    open_secs: f64,
    drained_secs: f64,
}

/// Opens `n` streams that the mock holds open after one token and reads the gateway's
/// RSS along the way; then drops them all and waits for the gateway to let go.
async fn idle_streams(client: &Client, n: usize, gateway_pid: u32, mock_pid: u32) -> anyhow::Result<IdleResult> {
    let body = Arc::new(chat_body(true, "[idle] hold this stream open"));
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let opening = Arc::new(Semaphore::new(128));
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let started = Instant::now();
    let mut rss_points = vec![(0, rss_mb(gateway_pid)?, rss_mb(mock_pid)?)];
    let mut tasks = Vec::with_capacity(n);
    let mut opened = 0;
    let mut failed = 0;
    for _ in 0..n {
        let permit = opening.clone().acquire_owned().await?;
        let (client, body, opened_tx, mut release_rx) =
            (client.clone(), body.clone(), opened_tx.clone(), release_rx.clone());
        tasks.push(tokio::spawn(async move {
            let response = tokio::time::timeout(
                Duration::from_secs(30),
                client.request(Target::Gateway, "/v1/chat/completions", &body).send(),
            )
            .await;
            let Ok(Ok(response)) = response else {
                let _ = opened_tx.send(false);
                return;
            };
            let mut bytes = response.bytes_stream();
            // Wait for the first token, so the stream is known to be flowing end to end.
            let mut seen = Vec::new();
            let ok = loop {
                match tokio::time::timeout(Duration::from_secs(30), bytes.next()).await {
                    Ok(Some(Ok(piece))) => {
                        seen.extend_from_slice(&piece);
                        if seen.windows(5).any(|w| w == b"\"The\"") {
                            break true;
                        }
                    }
                    _ => break false,
                }
            };
            drop(permit);
            let _ = opened_tx.send(ok);
            if ok {
                // Hold the connection (and the stream) until released.
                let _ = release_rx.wait_for(|r| *r).await;
            }
            drop(bytes);
        }));
        while let Ok(ok) = opened_rx.try_recv() {
            if ok {
                opened += 1;
            } else {
                failed += 1;
            }
        }
        if tasks.len() % 2_500 == 0 {
            eprintln!("  {} streams requested, {opened} open, {failed} failed", tasks.len());
        }
        if tasks.len() == n / 2 {
            rss_points.push((opened, rss_mb(gateway_pid)?, rss_mb(mock_pid)?));
        }
    }
    while opened + failed < n {
        match tokio::time::timeout(Duration::from_secs(60), opened_rx.recv()).await {
            Ok(Some(true)) => opened += 1,
            Ok(Some(false)) => failed += 1,
            _ => bail!("streams stopped opening: {opened} open, {failed} failed of {n}"),
        }
    }
    let open_secs = started.elapsed().as_secs_f64();
    // Let the gateway settle (usage batches, allocator) before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let active = active_streams(client).await?;
    rss_points.push((opened, rss_mb(gateway_pid)?, rss_mb(mock_pid)?));
    let fds = open_fds(gateway_pid);
    eprintln!("  {opened} open ({failed} failed) in {open_secs:.1} s; gateway activeStreams {active}");

    let _ = release_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    let released = Instant::now();
    let deadline = released + Duration::from_secs(60);
    while active_streams(client).await? > 0 {
        ensure!(Instant::now() < deadline, "the gateway still has open streams 60 s after the clients left");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(IdleResult {
        opened,
        active,
        rss_points,
        fds,
        open_secs,
        drained_secs: released.elapsed().as_secs_f64(),
    })
}

// --- report ---------------------------------------------------------------------------

async fn bench(options: Options) -> anyhow::Result<String> {
    // A relayed stream holds the client's socket in the gateway and, over HTTP/1.1, one
    // to the provider too (over h2c all streams share one): 10,000 streams may need
    // 20,000 sockets, so raise the soft limit to the hard one; the children inherit it.
    let nofile = rlimit::increase_nofile_limit(u64::MAX).context("cannot raise RLIMIT_NOFILE")?;
    let per_stream = if options.h2c || options.link { 1 } else { 2 };
    let fd_budget = usize::try_from(nofile.saturating_sub(200) / per_stream).unwrap_or(usize::MAX);
    let streams = options.streams.min(fd_budget);
    if streams < options.streams {
        eprintln!(
            "RLIMIT_NOFILE is {nofile} (hard); the gateway needs {per_stream} socket(s) per relayed stream, so {streams} \
             idle streams instead of {}",
            options.streams
        );
    }
    let http = reqwest::Client::builder().pool_max_idle_per_host(usize::MAX).tcp_nodelay(true).build()?;
    let setup = start(&http, options.streams, options.gateway.as_deref(), options.h2c, options.link).await?;
    let gateway_pid = setup.gateway.id().context("the gateway has no pid")?;
    // The process the gateway relays from (the linked mock over a link).
    let mock_pid = setup.linked.as_ref().unwrap_or(&setup.mock).id().context("the mock provider has no pid")?;
    let client = Client {
        http: http.clone(),
        mock_url: setup.mock_url.clone(),
        gateway_url: setup.gateway_url.clone(),
        user_key: setup.user_key.clone(),
    };
    let ticks = clock_ticks();
    let mut out = String::new();
    let now = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let upstream = match (options.link, options.h2c) {
        (true, _) => "a dial-out link (reverse HTTP/2 on the connection the mock opened)",
        (false, true) => "h2c (one multiplexed connection)",
        (false, false) => "HTTP/1.1 (a connection per stream)",
    };
    out.push_str(&format!("Run {now} on {} (RLIMIT_NOFILE {nofile}); gateway → mock over {upstream}.\n\n", machine()));

    eprintln!("warm-up");
    for target in [Target::Direct, Target::Gateway] {
        open_loop(&client, target, 200, 2, gateway_pid).await?;
    }

    out.push_str("#### Non-stream chat, open loop (latency in ms; added = gateway − direct at the same percentile)\n\n");
    out.push_str("| offered req/s | path | requests | achieved req/s | errors | p50 | p90 | p99 | added p50 | added p90 | added p99 | gateway CPU-s / 1k req |\n");
    out.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for &rate in &options.rates {
        eprintln!("non-stream at {rate} req/s for {} s: direct, then through the gateway", options.secs);
        let direct = open_loop(&client, Target::Direct, rate, options.secs, gateway_pid).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let gw = open_loop(&client, Target::Gateway, rate, options.secs, gateway_pid).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (name, run) in [("direct", &direct), ("gateway", &gw)] {
            let (added, cpu) = match name {
                "gateway" => (
                    [0.5, 0.9, 0.99].map(|q| ms(gw.latencies.p(q) - direct.latencies.p(q))),
                    format!("{:.3}", run.cpu_ticks as f64 / ticks / run.sent as f64 * 1000.0),
                ),
                _ => (["".to_owned(), "".to_owned(), "".to_owned()], String::new()),
            };
            out.push_str(&format!(
                "| {rate} | {name} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {cpu} |\n",
                run.sent,
                run.achieved,
                run.errors,
                ms(run.latencies.p(0.5)),
                ms(run.latencies.p(0.9)),
                ms(run.latencies.p(0.99)),
                added[0],
                added[1],
                added[2],
            ));
        }
    }

    eprintln!("streams at {} streams/s for {} s: direct, then through the gateway", options.stream_rate, options.stream_secs);
    let direct = stream_load(&client, Target::Direct, options.stream_rate, options.stream_secs).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu_mid = cpu_ticks(gateway_pid)?;
    let gw = stream_load(&client, Target::Gateway, options.stream_rate, options.stream_secs).await?;
    let cpu_after = cpu_ticks(gateway_pid)?;
    let n_streams = f64::from(options.stream_rate) * options.stream_secs as f64;
    out.push_str(&format!(
        "\n#### Streams, open loop at {} streams/s × {} s (ms; chunks after the first: {:.1} direct, {:.1} gateway)\n\n",
        options.stream_rate, options.stream_secs, direct.chunks_after_first, gw.chunks_after_first
    ));
    out.push_str("| path | errors | TTFT p50 | TTFT p99 | first chunk → [DONE] p50 | p99 | added TTFT p50 | added TTFT p99 | added per chunk p50 | gateway CPU-s / 1k streams |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    out.push_str(&format!(
        "| direct | {} | {} | {} | {} | {} | | | | |\n",
        direct.errors,
        ms(direct.ttft.p(0.5)),
        ms(direct.ttft.p(0.99)),
        ms(direct.rest.p(0.5)),
        ms(direct.rest.p(0.99)),
    ));
    let per_chunk_us = (gw.rest.p(0.5) - direct.rest.p(0.5)) / gw.chunks_after_first.max(1.0);
    out.push_str(&format!(
        "| gateway | {} | {} | {} | {} | {} | {} | {} | {:.1} µs | {:.3} |\n",
        gw.errors,
        ms(gw.ttft.p(0.5)),
        ms(gw.ttft.p(0.99)),
        ms(gw.rest.p(0.5)),
        ms(gw.rest.p(0.99)),
        ms(gw.ttft.p(0.5) - direct.ttft.p(0.5)),
        ms(gw.ttft.p(0.99) - direct.ttft.p(0.99)),
        per_chunk_us,
        (cpu_after - cpu_mid) as f64 / ticks / n_streams * 1000.0,
    ));

    eprintln!("{streams} idle streams through the gateway");
    let idle = idle_streams(&client, streams, gateway_pid, mock_pid).await?;
    out.push_str(
        "\n#### Open idle streams (`[idle]`: one token, then held open)\n\n\
         | streams open | gateway `activeStreams` | gateway RSS MB | gateway fds | mock provider RSS MB (for scale) |\n|---:|---:|---:|---:|---:|\n",
    );
    for (i, (n, rss, mock_rss)) in idle.rss_points.iter().enumerate() {
        let last = i + 1 == idle.rss_points.len();
        out.push_str(&format!(
            "| {n} | {} | {rss:.1} | {} | {mock_rss:.1} |\n",
            if last { idle.active.to_string() } else { String::new() },
            if last { idle.fds.to_string() } else { String::new() },
        ));
    }
    if let [(n0, r0, _), .., (n1, r1, _)] = idle.rss_points[..] {
        if n1 > n0 {
            let per_stream_kb = (r1 - r0) * 1024.0 / (n1 - n0) as f64;
            out.push_str(&format!(
                "\n{} streams opened in {:.1} s; {per_stream_kb:.1} KB RSS per open stream, so about {:.0} MB at 10,000; \
                 all closed in the gateway {:.1} s after the clients left.\n",
                idle.opened,
                idle.open_secs,
                r0 + per_stream_kb * 10_000.0 / 1024.0,
                idle.drained_secs
            ));
        }
    }
    drop(setup);
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
