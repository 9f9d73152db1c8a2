//! The admin console in headless Chromium (`tests/browser/console.test.mjs`, driven by
//! playwright-core) against the real `gateway` binary: sign-in, live overview, an XSS
//! payload as a provider name, charts over real usage, revoking a key, creating a
//! campaign, the provider's own view, phone and desktop widths, and no CSP violations.
//!
//! `scripts/test.sh` installs Chromium and the Node package first; without them this
//! test fails rather than skips. Screenshots land in `target/console-screenshots/`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context};
use serde_json::{json, Value};
use tests::{spawn_mock, MockConfig};
use tokio::process::Command;

use crate::cli::{serve_with, ADMIN};
use crate::sdk::{free_port, gateway_bin};

const CHROMIUM: &str = "/usr/bin/chromium";
const PROVIDER_NAME: &str = "<script>alert(1)</script>";

/// POSTs JSON with a bearer key; fails unless the answer is a success.
async fn post(http: &reqwest::Client, url: String, bearer: &str, body: Value) -> anyhow::Result<Value> {
    let response = http.post(&url).bearer_auth(bearer).json(&body).send().await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    ensure!(status.is_success(), "POST {url}: {status} {body}");
    Ok(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_chromium() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default();
    ensure!(Path::new(CHROMIUM).is_file(), "{CHROMIUM} is missing: run scripts/test.sh (it installs chromium)");
    let browser_dir = root.join("tests/browser");
    ensure!(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "tests/browser/node_modules is missing: run scripts/test.sh (or `npm ci` in tests/browser)"
    );
    // `<target>/debug/gateway` → `<target>/console-screenshots`.
    let shots: PathBuf = gateway_bin()?
        .parent()
        .and_then(Path::parent)
        .context("no target dir")?
        .join("console-screenshots");

    let mock = spawn_mock(MockConfig::default()).await?;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let _gateway = serve_with(dir.path(), port, &[]).await;
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let url = |path: &str| format!("{base}{path}");

    // A provider whose name is a script: the console must show it as text.
    let reg = http
        .post(format!("{base}/api/gpu/register"))
        .json(&json!({
            "name": PROVIDER_NAME,
            "capabilities": {"models": ["mock-model"], "maxConcurrentStreams": 16},
            "pricing": {"perToken": 0.0005},
            "baseUrl": mock.url(),
        }))
        .send()
        .await?
        .json::<Value>()
        .await?;
    let provider_id = reg["providerId"].as_str().context("no providerId")?.to_owned();
    let provider_key = reg["providerKey"].as_str().context("no providerKey")?.to_owned();
    post(&http, url("/api/gpu/stream/start"), &provider_key, json!({"providerId": provider_id, "model": "mock-model", "quality": "standard"})).await?;

    // Real usage, so the overview, the charts and the provider's earnings have data.
    let key = post(&http, url("/api/admin/keys"), ADMIN, json!({"name": "console user", "tier": "premium"})).await?;
    let user_key = key["key"].as_str().context("no key")?.to_owned();
    post(&http, url(&format!("/api/admin/users/{}/credit", key["userId"].as_str().context("no userId")?)), ADMIN, json!({"amount": 100})).await?;
    for i in 0..4 {
        let body = json!({"model": "mock-model", "messages": [{"role": "user", "content": format!("hello {i}")}]});
        let r = post(&http, url("/v1/chat/completions"), &user_key, body).await?;
        ensure!(r["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0, "a completion with usage: {r}");
    }
    // The endpoints the console adds: the provider view's look-up answers only to a
    // provider key, and the overview only to the admin key.
    let get = |path: &str, key: Option<&str>| {
        let mut r = http.get(url(path));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    let me: Value = get("/api/gpu/me", Some(&provider_key)).await?.json().await?;
    ensure!(me["id"] == provider_id.as_str() && me["name"] == PROVIDER_NAME, "/api/gpu/me: {me}");
    ensure!(me["earnings"].as_f64().unwrap_or(0.0) > 0.0, "the provider earned from the completions: {me}");
    for (path, key) in [("/api/gpu/me", None), ("/api/gpu/me", Some(ADMIN)), ("/api/gpu/me", Some("pk-not-a-key")), ("/api/admin/overview", Some(provider_key.as_str()))] {
        let status = get(path, key).await?.status();
        ensure!(status == 401, "{path} with {key:?}: {status}");
    }
    let overview: Value = get("/api/admin/overview", Some(ADMIN)).await?.json().await?;
    ensure!(overview["providers"]["online"] == 1 && overview["today"]["requests"] == 4, "overview: {overview}");
    ensure!(overview["today"]["fees"].as_f64().unwrap_or(0.0) > 0.0, "fees today: {overview}");
    let usage: Value = get("/api/analytics/usage", Some(ADMIN)).await?.json().await?;
    let tokens: i64 = usage["series"]["tokensByModel"].as_array().context("no tokensByModel")?.iter().filter_map(|p| p["tokens"].as_i64()).sum();
    ensure!(tokens == usage["promptTokens"].as_i64().unwrap_or(-1) + usage["completionTokens"].as_i64().unwrap_or(-1), "series add up: {usage}");

    let to_revoke = post(&http, url("/api/admin/keys"), ADMIN, json!({"name": "to revoke", "tier": "free"})).await?;
    let advertiser = post(&http, url("/api/admin/advertisers"), ADMIN, json!({"name": "GPU Rentals Inc."})).await?;

    let output = tokio::time::timeout(
        Duration::from_secs(240),
        Command::new("node")
            .arg("console.test.mjs")
            .current_dir(&browser_dir)
            .env("GS_URL", &base)
            .env("GS_ADMIN_KEY", ADMIN)
            .env("GS_PROVIDER_KEY", &provider_key)
            .env("GS_PROVIDER_ID", &provider_id)
            .env("GS_PROVIDER_NAME", PROVIDER_NAME)
            .env("GS_REVOKE_KEY_ID", to_revoke["id"].as_str().context("no key id")?)
            .env("GS_ADVERTISER_ID", advertiser["id"].as_str().context("no advertiser id")?)
            .env("GS_SCREENSHOTS", &shots)
            .env("NO_PROXY", "127.0.0.1,localhost")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("the browser test did not finish within 240 s")?
    .context("cannot run node")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.success(), "console.test.mjs failed with {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}", output.status);
    eprintln!("{stdout}{stderr}");
    for name in ["overview-1280x800", "overview-375x812", "usage-1280x800", "provider-375x812"] {
        ensure!(shots.join(format!("{name}.png")).is_file(), "screenshot {name}.png was not written");
    }
    Ok(())
}

/// The console's endpoints in process, on SQLite or (with `GS_TEST_DB=postgres`, as
/// `scripts/test.sh` runs every `inproc` test) PostgreSQL: the numbers they report
/// agree with the requests that were made and with the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inproc_console_endpoints_report_what_happened() -> anyhow::Result<()> {
    use gateway::ops::config::{Config, Secret};
    use gateway::ops::server::{self, Running};

    let dir = tempfile::tempdir()?;
    let config = Config {
        database_url: crate::inproc::fresh_database(&dir).await.0,
        admin_key: Some(Secret::new(ADMIN)),
        allow_private_providers: true,
        probation_requests: 0,
        free_tier_daily_budget: 1_000.0,
        usage_flush_ms: 5,
        ..Config::default()
    };
    let store = gateway::store::Store::connect(&config.database_url).await?;
    let running = Running::start_with_store(config, store).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server::serve(running, listener, async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let url = |path: &str| format!("{base}{path}");
    let get = |path: &str, key: &str| http.get(url(path)).bearer_auth(key).send();

    let mock = spawn_mock(MockConfig::default()).await?;
    let body = json!({"capabilities": {"models": ["mock-model"], "maxConcurrentStreams": 8}, "pricing": {"perToken": 0.0001}, "baseUrl": mock.url()});
    let reg: Value = http.post(url("/api/gpu/register")).json(&body).send().await?.json().await?;
    let (provider_id, provider_key) = (reg["providerId"].as_str().context("id")?, reg["providerKey"].as_str().context("key")?);
    post(&http, url("/api/gpu/stream/start"), provider_key, json!({"providerId": provider_id, "model": "mock-model", "quality": "standard"})).await?;
    let key = post(&http, url("/api/admin/keys"), ADMIN, json!({"name": "c", "tier": "premium"})).await?;
    post(&http, url(&format!("/api/admin/users/{}/credit", key["userId"].as_str().context("user")?)), ADMIN, json!({"amount": 10})).await?;
    let user_key = key["key"].as_str().context("key")?;
    let mut tokens = 0;
    for _ in 0..3 {
        let r = post(&http, url("/v1/chat/completions"), user_key, json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]})).await?;
        tokens += r["usage"]["total_tokens"].as_i64().context("usage")?;
    }

    let o: Value = get("/api/admin/overview", ADMIN).await?.json().await?;
    ensure!(o["providers"]["online"] == 1 && o["providers"]["total"] == 1, "{o}");
    ensure!(o["today"]["requests"] == 3 && o["today"]["tokens"] == tokens, "{o}");
    ensure!(o["recentRequests"] == 3 && o["errorRate"] == 0.0, "{o}");
    let per_minute: i64 = o["lastHour"].as_array().context("lastHour")?.iter().filter_map(|p| p["requests"].as_i64()).sum();
    ensure!(per_minute == 3, "{o}");
    // The provider is paid the price less the platform fee, and the platform keeps the fee.
    let billed = o["today"]["billed"].as_f64().context("billed")?;
    let fees = o["today"]["fees"].as_f64().context("fees")?;
    ensure!(billed > 0.0 && fees > 0.0 && fees < billed, "{o}");

    let earnings: Value = get("/api/admin/providers/earnings", ADMIN).await?.json().await?;
    let mine = &earnings["data"][0];
    ensure!(mine["providerId"] == provider_id, "{earnings}");
    let earned = mine["earningsMicros"].as_i64().context("earningsMicros")?;
    ensure!(((billed - fees) * 1e6 - earned as f64).abs() < 1.0, "earned {earned} = billed {billed} - fees {fees}");
    ensure!(mine["balance"] == mine["earnings"], "nothing withdrawn yet: {earnings}");

    let me: Value = get("/api/gpu/me", provider_key).await?.json().await?;
    ensure!(me["id"] == provider_id && me["earnings"] == mine["earnings"] && me["requests"] == 3 && me["online"] == true, "{me}");
    ensure!(me["streams"] == json!([{"model": "mock-model", "quality": "standard"}]), "{me}");
    for (path, key) in [("/api/gpu/me", ADMIN), ("/api/gpu/me", user_key), ("/api/admin/overview", provider_key), ("/api/admin/providers/earnings", user_key)] {
        let status = get(path, key).await?.status();
        ensure!(status == 401, "{path}: {status}");
    }

    let revenue: Value = get("/api/analytics/revenue", ADMIN).await?.json().await?;
    let points = revenue["series"]["data"].as_array().with_context(|| format!("revenue series: {revenue}"))?;
    let billed_users: f64 = points.iter().filter_map(|p| p["billedUsers"].as_f64()).sum();
    ensure!((billed_users - billed).abs() < 1e-9 && revenue["series"]["bucketMs"] == 86_400_000, "{revenue}");
    let usage: Value = get("/api/analytics/usage?from=0&to=4102444800000", ADMIN).await?.json().await?;
    let by_quality: i64 = usage["series"]["requestsByQuality"].as_array().with_context(|| format!("usage series: {usage}"))?.iter().filter_map(|p| p["requests"].as_i64()).sum();
    ensure!(by_quality == 3, "{usage}");

    let _ = stop.send(());
    served.await??;
    Ok(())
}
