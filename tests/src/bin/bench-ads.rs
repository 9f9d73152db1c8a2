//! What the ad layer costs: CPU per request for targeting and the auction, and the
//! time to first token it adds end to end. Prints two markdown tables.
//!
//! `cargo run --release -p tests --bin bench-ads` (BENCHMARKS.md holds the results).
//!
//! 1. Selection: a typical chat body is parsed as the layer parses it, the recent user
//!    text classified and the auction run over 10, 100 and 1,000 active campaigns
//!    (spread over the five categories, varied bids, CPM and CPC), 20,000 times each;
//!    the table gives µs per request (median of 5 runs).
//! 2. TTFT: two in-process gateways in front of the same in-process mock provider, one
//!    with ads off and one with 100 campaigns, take the same free-tier streaming
//!    request in alternation (sequential, `--requests` each, default 1,000). The table
//!    gives TTFT and full-response percentiles for both; the ad gateway's responses all
//!    carry an ad (checked).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use futures::StreamExt;
use gateway::ads::{classify, Ads, Placement, Targeting};
use gateway::ops::config::{Config, Secret};
use gateway::ops::server::{self, Running};
use gateway::store::Store;
use serde_json::{json, Value};
use tests::{spawn_mock, MockConfig};

const ADMIN: &str = "bench-ads-admin-key-0123456789";
const QUESTION: &str = "How do I fix this Rust compiler error in my Python and Rust code?";

async fn seed_campaigns(store: &Store, n: usize) -> anyhow::Result<()> {
    let now = gateway::store::now_ms();
    let ledger = gateway::money::ledger::Ledger::new(store.clone());
    for a in 0..10 {
        sqlx::query("INSERT INTO advertisers (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(format!("adv_{a}"))
            .bind(format!("Advertiser {a}"))
            .bind(now)
            .execute(&store.pool)
            .await?;
        ledger
            .credit(&gateway::money::ledger::advertiser_account(&format!("adv_{a}")), 1_000_000_000, "advertiser_credit", "bench")
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    for i in 0..n {
        let category = classify::CATEGORIES[i % 5];
        let (cpm, cpc) = if i % 3 == 0 { (0, 20_000 + (i as i64 % 17) * 1_000) } else { (500_000 + (i as i64 % 23) * 100_000, 0) };
        sqlx::query(
            "INSERT INTO campaigns (id, advertiser_id, name, categories, title, body, url, cpm_bid, cpc_bid, daily_budget, total_budget, \
             starts_at, ends_at, status, frequency_cap, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, NULL, NULL, 'active', 0, $12, $12)",
        )
        .bind(format!("cmp_{i:05}"))
        .bind(format!("adv_{}", i % 10))
        .bind(format!("Campaign {i}"))
        .bind(category)
        .bind(format!("Product {i}"))
        .bind("A product for people who build software.")
        .bind(format!("https://example.com/{i}"))
        .bind(cpm)
        .bind(cpc)
        .bind(100_000_000i64)
        .bind(1_000_000_000i64)
        .bind(now)
        .execute(&store.pool)
        .await?;
    }
    Ok(())
}

fn body() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "model": "mock-model",
        "stream": true,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "I am learning Rust."},
            {"role": "assistant", "content": "Great! Rust is a systems programming language focused on safety."},
            {"role": "user", "content": QUESTION},
        ],
    }))
    .unwrap_or_default()
}

/// µs per request for parse + classify + auction, median of 5 runs of `iterations`.
fn time_selection(ads: &Ads, iterations: usize) -> (f64, f64) {
    let body = body();
    let mut runs = Vec::new();
    let mut filled = 0usize;
    for _ in 0..5 {
        let started = Instant::now();
        for _ in 0..iterations {
            let Ok(json) = serde_json::from_slice::<Value>(&body) else { continue };
            let text: Vec<&str> = json["messages"]
                .as_array()
                .map(|m| m.iter().filter(|m| m["role"] == "user").filter_map(|m| m["content"].as_str()).collect())
                .unwrap_or_default();
            let context = classify::classify(&text.join("\n"));
            let Some(category) = context.category else { continue };
            let t = Targeting {
                category,
                blocked: &[],
                user_id: "user_bench",
                request_id: "req_bench",
                placement: Placement::Content,
                base_url: "http://127.0.0.1",
            };
            if ads.select(&t).is_some() {
                filled += 1;
            }
        }
        runs.push(started.elapsed().as_secs_f64() * 1e6 / iterations as f64);
    }
    runs.sort_by(f64::total_cmp);
    (runs[2], filled as f64 / (5 * iterations) as f64)
}

struct Gw {
    base: String,
    key: String,
}

async fn start_gateway(mock_url: &str, ads_on: bool, campaigns: usize, dir: &tempfile::TempDir) -> anyhow::Result<Gw> {
    let url = format!("sqlite://{}", dir.path().join(format!("gw-{ads_on}.db")).display());
    let config = Config {
        database_url: url.clone(),
        admin_key: Some(Secret::new(ADMIN)),
        allow_private_providers: true,
        probation_requests: 0,
        free_tier_daily_budget: 1_000_000.0,
        ads_enabled: ads_on,
        free_requests_per_minute: 1_000_000,
        health_check_secs: 0,
        ..Config::default()
    };
    let store = Store::connect(&url).await?;
    seed_campaigns(&store, campaigns).await?;
    let running = Running::start_with_store(config, store).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(server::serve(running, listener, std::future::pending()));
    let http = reqwest::Client::new();
    let reg: Value = http
        .post(format!("{base}/api/gpu/register"))
        .json(&json!({"capabilities": {"models": ["mock-model"], "maxConcurrentStreams": 64}, "pricing": {"perToken": 0.000002}, "baseUrl": mock_url}))
        .send()
        .await?
        .json()
        .await?;
    let (id, pkey) = (reg["providerId"].as_str().context("providerId")?, reg["providerKey"].as_str().context("providerKey")?);
    http.post(format!("{base}/api/gpu/stream/start"))
        .bearer_auth(pkey)
        .json(&json!({"providerId": id, "model": "mock-model", "quality": "standard"}))
        .send()
        .await?
        .error_for_status()?;
    let key: Value = http
        .post(format!("{base}/api/admin/keys"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "bench", "tier": "free"}))
        .send()
        .await?
        .json()
        .await?;
    Ok(Gw { base, key: key["key"].as_str().context("key")?.to_owned() })
}

/// One streaming request: (TTFT, total, carried an ad).
async fn one(http: &reqwest::Client, gw: &Gw, body: &[u8]) -> anyhow::Result<(Duration, Duration, bool)> {
    let started = Instant::now();
    let r = http
        .post(format!("{}/v1/chat/completions", gw.base))
        .bearer_auth(&gw.key)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await?;
    ensure!(r.status() == 200, "status {}", r.status());
    let mut stream = r.bytes_stream();
    let mut ttft = None;
    let mut text = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if ttft.is_none() && chunk.windows(8).any(|w| w == b"content\"") {
            ttft = Some(started.elapsed());
        }
        text.extend_from_slice(&chunk);
    }
    let total = started.elapsed();
    Ok((ttft.unwrap_or(total), total, text.windows(12).any(|w| w == b"[Sponsored] ")))
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut requests = 1_000usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--requests" => requests = args.next().context("--requests N")?.parse()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let dir = tempfile::tempdir()?;

    let mut table = String::from(
        "| active campaigns | µs per request (parse + classify + auction, median of 5 × 20,000) | filled |\n|---:|---:|---:|\n",
    );
    for n in [10usize, 100, 1_000] {
        let url = format!("sqlite://{}", dir.path().join(format!("sel-{n}.db")).display());
        let store = Store::connect(&url).await?;
        seed_campaigns(&store, n).await?;
        let ads = Ads::load(store, &Config::default(), None).await?;
        let (us, fill) = time_selection(&ads, 20_000);
        table.push_str(&format!("| {n} | {us:.1} | {:.0}% |\n", fill * 100.0));
    }
    print_table(&table);

    let mock = spawn_mock(MockConfig::default()).await?;
    let off = start_gateway(&mock.url(), false, 100, &dir).await?;
    let on = start_gateway(&mock.url(), true, 100, &dir).await?;
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let body = body();
    // Warm both paths (connections, caches).
    for _ in 0..50 {
        one(&http, &off, &body).await?;
        one(&http, &on, &body).await?;
    }
    let (mut off_t, mut off_all, mut on_t, mut on_all) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut with_ad = 0;
    for _ in 0..requests {
        let (t, all, ad) = one(&http, &off, &body).await?;
        ensure!(!ad, "the ads-off gateway placed an ad");
        off_t.push(t);
        off_all.push(all);
        let (t, all, ad) = one(&http, &on, &body).await?;
        with_ad += usize::from(ad);
        on_t.push(t);
        on_all.push(all);
    }
    ensure!(with_ad == requests, "only {with_ad} of {requests} responses carried an ad");
    for v in [&mut off_t, &mut off_all, &mut on_t, &mut on_all] {
        v.sort();
    }
    let mut table = String::from(
        "| gateway | requests | TTFT p50 ms | TTFT p99 ms | full response p50 ms | full response p99 ms |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for (name, t, all) in [("ads off", &off_t, &off_all), ("ads on (100 campaigns, every response carries an ad)", &on_t, &on_all)] {
        table.push_str(&format!(
            "| {name} | {requests} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
            pct(t, 0.5),
            pct(t, 0.99),
            pct(all, 0.5),
            pct(all, 0.99)
        ));
    }
    print_table(&table);
    Ok(())
}

#[allow(clippy::print_stdout)]
fn print_table(table: &str) {
    println!("{table}");
}
