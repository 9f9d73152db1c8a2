//! Throughput of the billing ledger, as a markdown table: holds per second
//! (`Ledger::hold`, one short transaction each, the request path's cost) and acked
//! settlements per second through the real group-commit writer (`usage::spawn` with the
//! gateway's default batch size and flush wait; each submitter waits for its ack as a
//! request waits before sending `[DONE]`), with the p50/p99 of that wait.
//!
//! `cargo run --release -p tests --bin bench-ledger`                SQLite only
//! `cargo run --release -p tests --bin bench-ledger -- --postgres`  SQLite, then PostgreSQL
//! Flags: `--secs 5` (length of each hold phase), `--levels 1,16,128,512` (in flight).
//!
//! SQLite is a file in a temp dir opened by the gateway's own `Store::connect` (WAL,
//! `synchronous = NORMAL`, 8 connections); PostgreSQL is `postgres://postgres@127.0.0.1:5432/test`
//! (as `scripts/test.sh` starts it) with a fresh schema per level, dropped afterwards.
//! Each level starts on a fresh database: `in flight` users, each funded once, then
//! `in flight` tasks take holds on their own user for `--secs`, then the same tasks
//! settle every hold they took (70% of it charged, the platform fee taken), one at a
//! time each, so `in flight` settlements wait in the writer's channel at any moment.
//! After each level `Ledger::check` must report nothing and every settlement must have
//! its usage row.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use gateway::ops::config::Config;
use gateway::money::ledger::{self, Billing, Ledger, Payer, Settlement};
use gateway::money::units::Micros;
use gateway::money::holds::Hold;
use gateway::store::{new_id, now_ms, Store};
use gateway::money::usage::{self, Completion, UsageRecord, UsageSink, UsageStatus};
use tests::bench::PG_URL;
use tokio_util::sync::CancellationToken;

const HOLD: Micros = 1_000;
/// Bounds memory and the settle phase's length whatever the hold rate.
const MAX_HOLDS: usize = 200_000;

struct Options {
    postgres: bool,
    secs: f64,
    levels: Vec<usize>,
}

impl Options {
    fn parse() -> anyhow::Result<Self> {
        let mut o = Self { postgres: false, secs: 5.0, levels: vec![1, 16, 128, 512] };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--postgres" => o.postgres = true,
                "--secs" => o.secs = args.next().context("--secs takes a number")?.parse()?,
                "--levels" => {
                    o.levels = args
                        .next()
                        .context("--levels takes a list like 1,16,128,512")?
                        .split(',')
                        .map(str::parse)
                        .collect::<Result<_, _>>()?;
                }
                other => bail!("unknown argument {other}; see the top of tests/src/bin/bench-ledger.rs"),
            }
        }
        ensure!(o.secs > 0.0 && o.levels.iter().all(|&l| l > 0), "--secs and every level must be positive");
        Ok(o)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "SQLite",
            Self::Postgres => "PostgreSQL",
        }
    }
}

/// A fresh database; the temp dir or schema goes away with `dispose`.
struct Db {
    store: Store,
    schema: Option<String>,
    _dir: tempfile::TempDir,
}

impl Db {
    async fn fresh(backend: Backend) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let (url, schema) = match backend {
            Backend::Sqlite => (format!("sqlite://{}", dir.path().join("bench.db").display()), None),
            Backend::Postgres => {
                // `new_id` is lowercase hex behind a prefix: a valid bare identifier.
                let schema = new_id("bench");
                sqlx::any::install_default_drivers();
                let pool = sqlx::AnyPool::connect(PG_URL).await.context("PostgreSQL at 127.0.0.1:5432 (scripts/test.sh starts it)")?;
                sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&pool).await?;
                pool.close().await;
                (format!("{PG_URL}?options=-c%20search_path%3D{schema}"), Some(schema))
            }
        };
        let store = Store::connect(&url).await?;
        Ok(Self { store, schema, _dir: dir })
    }

    async fn version(&self) -> anyhow::Result<String> {
        let sql = match self.store.backend {
            gateway::store::Backend::Sqlite => "SELECT 'SQLite ' || sqlite_version()",
            gateway::store::Backend::Postgres => "SELECT split_part(version(), ' on ', 1)",
        };
        Ok(sqlx::query_scalar(sql).fetch_one(&self.store.pool).await?)
    }

    async fn dispose(self) -> anyhow::Result<()> {
        self.store.pool.close().await;
        if let Some(schema) = self.schema {
            let pool = sqlx::AnyPool::connect(PG_URL).await?;
            sqlx::query(&format!("DROP SCHEMA {schema} CASCADE")).execute(&pool).await?;
            pool.close().await;
        }
        Ok(())
    }
}

struct Row {
    backend: Backend,
    in_flight: usize,
    holds: usize,
    holds_per_sec: f64,
    settled: usize,
    settled_per_sec: f64,
    p50: Duration,
    p99: Duration,
}

fn record(request_id: &str, user_id: &str) -> UsageRecord {
    UsageRecord {
        request_id: request_id.to_owned(),
        key_id: Some("key_bench".into()),
        user_id: Some(user_id.to_owned()),
        endpoint: "chat",
        model: "bench-model".into(),
        provider_id: Some("prov_bench".into()),
        quality: "standard".into(),
        prompt_tokens: 12,
        completion_tokens: 100,
        ttft_us: Some(20_000),
        latency_ms: 400,
        status: UsageStatus::Ok,
        error_code: None,
        created_at: now_ms(),
        cost_micros: 0,
        payer: Some("user"),
        usage_source: "provider",
    }
}

/// Takes holds on `account` until `deadline` (or the per-task share of `MAX_HOLDS`).
async fn take_holds(ledger: Ledger, account: String, deadline: Instant, cap: usize) -> anyhow::Result<Vec<Hold>> {
    let mut holds = Vec::new();
    while Instant::now() < deadline && holds.len() < cap {
        let request_id = new_id("req");
        let hold = ledger.hold(&account, HOLD, &request_id, None).await?.context("the bench user ran out of funds")?;
        holds.push(hold);
    }
    Ok(holds)
}

/// Settles `holds` one at a time, waiting for each ack; returns each wait.
async fn settle(sink: UsageSink, fee_bp: u32, holds: Vec<Hold>) -> anyhow::Result<Vec<Duration>> {
    let mut waits = Vec::with_capacity(holds.len());
    for hold in holds {
        let request_id = new_id("req");
        let charge = hold.amount * 7 / 10;
        let user_id = hold.account_id.trim_start_matches("user:").to_owned();
        let billing = Billing::Settle(Settlement {
            request_id: request_id.clone(),
            payer: Payer::User(hold),
            provider_id: "prov_bench".into(),
            charge,
            fee: ledger::fee(charge, fee_bp),
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start = Instant::now();
        sink.record(Completion { record: record(&request_id, &user_id), billing: Some(billing), ack: Some(tx) });
        ensure!(rx.await == Ok(true), "settlement {request_id} was not committed");
        waits.push(start.elapsed());
    }
    Ok(waits)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn level(backend: Backend, in_flight: usize, secs: f64) -> anyhow::Result<(Row, String)> {
    let db = Db::fresh(backend).await?;
    let version = db.version().await?;
    let config = Config::default();
    let ledger = Ledger::new(db.store.clone());
    let users: Vec<String> = (0..in_flight).map(|i| ledger::user_account(&format!("bench{i}"))).collect();
    for user in &users {
        ledger.credit(user, 1_000_000_000_000, "grant", "bench funds").await?;
    }

    let cap = MAX_HOLDS / in_flight;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = users.iter().map(|u| tokio::spawn(take_holds(ledger.clone(), u.clone(), deadline, cap))).collect();
    let mut per_task = Vec::with_capacity(in_flight);
    for t in tasks {
        per_task.push(t.await??);
    }
    let hold_secs = started.elapsed().as_secs_f64();
    let holds: usize = per_task.iter().map(Vec::len).sum();

    let stop = CancellationToken::new();
    let (sink, writer) = usage::spawn(
        std::sync::Arc::default(),
        db.store.clone(),
        config.usage_batch_max,
        Duration::from_millis(config.usage_flush_ms),
        stop.clone(),
    );
    let started = Instant::now();
    let tasks: Vec<_> = per_task.into_iter().map(|h| tokio::spawn(settle(sink.clone(), config.platform_fee_bp, h))).collect();
    let mut waits = Vec::with_capacity(holds);
    for t in tasks {
        waits.extend(t.await??);
    }
    let settle_secs = started.elapsed().as_secs_f64();
    stop.cancel();
    writer.handle.await?;
    waits.sort_unstable();

    let report = ledger.check().await?;
    ensure!(report.violations.is_empty(), "ledger check after the bench: {:?}", report.violations);
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_records").fetch_one(&db.store.pool).await?;
    ensure!(usize::try_from(rows)? == holds, "{rows} usage rows for {holds} settlements");
    db.dispose().await?;

    let row = Row {
        backend,
        in_flight,
        holds,
        holds_per_sec: holds as f64 / hold_secs,
        settled: waits.len(),
        settled_per_sec: waits.len() as f64 / settle_secs,
        p50: percentile(&waits, 0.50),
        p99: percentile(&waits, 0.99),
    };
    Ok((row, version))
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| backend | in flight | holds/s (`Ledger::hold`) | acked settlements/s (group commit) | ack wait p50 | ack wait p99 | holds / settlements |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {} | {} | {} / {} |\n",
            r.backend.name(),
            r.in_flight,
            r.holds_per_sec,
            r.settled_per_sec,
            ms(r.p50),
            ms(r.p99),
            r.holds,
            r.settled,
        ));
    }
    out
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|m| m.trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".into())
}

async fn run(options: &Options) -> anyhow::Result<String> {
    let mut backends = vec![Backend::Sqlite];
    if options.postgres {
        backends.push(Backend::Postgres);
    }
    let mut rows = Vec::new();
    let mut versions = Vec::new();
    for &backend in &backends {
        for &in_flight in &options.levels {
            eprintln!("{}: {in_flight} in flight", backend.name());
            let (row, version) = level(backend, in_flight, options.secs).await?;
            eprintln!(
                "  {:.0} holds/s, {:.0} settlements/s, ack p50 {} p99 {}",
                row.holds_per_sec,
                row.settled_per_sec,
                ms(row.p50),
                ms(row.p99)
            );
            rows.push(row);
            if !versions.contains(&version) {
                versions.push(version);
            }
        }
    }
    let cores = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
    Ok(format!(
        "{}\n{cores} cores ({}); {}; hold phase {} s per level.\n",
        table(&rows),
        cpu_model(),
        versions.join("; "),
        options.secs
    ))
}

#[tokio::main]
#[allow(clippy::print_stdout)]
async fn main() -> anyhow::Result<()> {
    let options = Options::parse()?;
    let report = run(&options).await?;
    println!("{report}");
    Ok(())
}
