//! The real `gateway` binary: the `keys` and `ledger check` commands, SIGTERM during a
//! stream, and `kill -9` under streaming load followed by `ledger check`.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tests::{spawn_mock, MockConfig};
use tokio::process::{Child, Command};

use crate::sdk::{free_port, gateway_bin};

pub(crate) const ADMIN: &str = "cli-test-admin-key-0123456789";

fn db_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("gw.db").display())
}

pub(crate) async fn run(dir: &Path, args: &[&str]) -> (i32, String) {
    run_on(&db_url(dir), args).await
}

/// `gateway <args>` on the database at `database_url` (a fleet's PostgreSQL schema).
pub(crate) async fn run_on(database_url: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(gateway_bin().unwrap())
        .args(args)
        .env("GATEWAY_DATABASE_URL", database_url)
        .output()
        .await
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

async fn serve(dir: &Path, port: u16) -> Child {
    serve_with(dir, port, &[]).await
}

pub(crate) async fn serve_with(dir: &Path, port: u16, env: &[(&str, &str)]) -> Child {
    let child = Command::new(gateway_bin().unwrap())
        .arg("serve")
        .env("GATEWAY_DATABASE_URL", db_url(dir))
        .env("GATEWAY_ADMIN_KEY", ADMIN)
        // The mock providers listen on 127.0.0.1.
        .env("GATEWAY_ALLOW_PRIVATE_PROVIDERS", "true")
        .env("GATEWAY_PROBATION_REQUESTS", "0")
        .env("GATEWAY_FREE_TIER_DAILY_BUDGET", "1000")
        .env("GATEWAY_HOST", "127.0.0.1")
        .env("GPU_STREAMING_PORT", port.to_string())
        .env("GATEWAY_SHUTDOWN_GRACE_SECS", "10")
        // A test's own settings win over the defaults above.
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    for _ in 0..300 {
        if http.get(format!("http://127.0.0.1:{port}/health")).send().await.is_ok_and(|r| r.status().is_success()) {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("gateway did not start");
}

/// Registers a mock and returns a funded premium key.
async fn provision(base: &str, mock_url: &str) -> String {
    provision_with(base, mock_url, 256).await
}

/// Registers a mock that takes `streams` streams at once and returns a funded premium key.
pub(crate) async fn provision_with(base: &str, mock_url: &str, streams: u32) -> String {
    let http = reqwest::Client::new();
    let reg: Value = http
        .post(format!("{base}/api/gpu/register"))
        .json(&json!({"capabilities": {"models": ["mock-model"], "maxConcurrentStreams": streams}, "pricing": {"perToken": 0.000002}, "baseUrl": mock_url}))
        .send().await.unwrap().json().await.unwrap();
    let r = http
        .post(format!("{base}/api/gpu/stream/start"))
        .bearer_auth(reg["providerKey"].as_str().unwrap())
        .json(&json!({"providerId": reg["providerId"], "model": "mock-model", "quality": "standard"}))
        .send().await.unwrap();
    assert_eq!(r.status(), 200);
    let key: Value = http.post(format!("{base}/api/admin/keys")).bearer_auth(ADMIN)
        .json(&json!({"name": "cli", "tier": "premium"})).send().await.unwrap().json().await.unwrap();
    let r = http.post(format!("{base}/api/admin/users/{}/credit", key["userId"].as_str().unwrap())).bearer_auth(ADMIN)
        .json(&json!({"amount": 100})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    key["key"].as_str().unwrap().to_owned()
}

async fn sigterm(child: &Child) {
    let pid = child.id().unwrap().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn cli_keys_create_list_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = run(dir.path(), &["keys", "create", "--name", "alice", "--tier", "premium"]).await;
    assert_eq!(code, 0, "{out}");
    let json_end = out.rfind('}').unwrap();
    let created: Value = serde_json::from_str(&out[..=json_end]).unwrap();
    assert!(created["key"].as_str().unwrap().starts_with("sk-"));
    assert_eq!(created["tier"], "premium");
    let (code, out) = run(dir.path(), &["keys", "list"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("alice") && out.contains("active") && !out.contains(created["key"].as_str().unwrap()));
    let (code, _) = run(dir.path(), &["keys", "revoke", created["id"].as_str().unwrap()]).await;
    assert_eq!(code, 0);
    let (_, out) = run(dir.path(), &["keys", "list"]).await;
    assert!(out.contains("revoked"));
    let (code, out) = run(dir.path(), &["keys", "create", "--name", "bob", "--tier", "gold"]).await;
    assert_ne!(code, 0);
    assert!(out.contains("free or premium"), "{out}");
}

#[tokio::test]
async fn cli_sigterm_lets_open_streams_finish() {
    let dir = tempfile::tempdir().unwrap();
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let port = free_port().unwrap();
    let child = serve(dir.path(), port).await;
    let base = format!("http://127.0.0.1:{port}");
    let key = provision(&base, &mock.url()).await;
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "mock-model", "messages": [{"role": "user", "content": "[slow]"}], "stream": true}))
        .send().await.unwrap();
    assert_eq!(response.status(), 200);
    sigterm(&child).await;
    let body = response.text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "the stream finished after SIGTERM: {body}");
    let mut child = child;
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "clean exit: {status}");
    let (code, out) = run(dir.path(), &["ledger", "check"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("OK"), "{out}");
}

#[tokio::test]
async fn cli_kill_9_under_load_then_ledger_check() {
    let dir = tempfile::tempdir().unwrap();
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let port = free_port().unwrap();
    let mut child = serve(dir.path(), port).await;
    let base = format!("http://127.0.0.1:{port}");
    let key = provision(&base, &mock.url()).await;
    let http = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..60 {
        let (http, base, key) = (http.clone(), base.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            // Stagger so the kill lands while streams are at every stage.
            tokio::time::sleep(Duration::from_millis(10 * (i % 20))).await;
            let text = if i % 3 == 0 { "[slow]" } else { "hi" };
            let r = http.post(format!("{base}/v1/chat/completions")).bearer_auth(&key)
                .json(&json!({"model": "mock-model", "messages": [{"role": "user", "content": text}], "stream": true}))
                .send().await.ok()?;
            let id = r.headers().get("x-request-id")?.to_str().ok()?.to_owned();
            let body = r.text().await.unwrap_or_default();
            body.ends_with("data: [DONE]\n\n").then_some(id)
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let mut done = Vec::new();
    for t in tasks {
        if let Some(id) = t.await.unwrap() {
            done.push(id);
        }
    }
    let (code, out) = run(dir.path(), &["ledger", "check"]).await;
    assert_eq!(code, 0, "ledger check after kill -9: {out}");
    // Every stream that got [DONE] has its settled entry.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&db_url(dir.path())).await.unwrap();
    for id in &done {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ledger_entries WHERE request_id = $1 AND kind = 'usage'")
            .bind(id).fetch_one(&pool).await.unwrap();
        assert_eq!(n, 1, "request {id} got [DONE] but has {n} settled entries");
    }
    // The check must also catch tampering.
    sqlx::query("UPDATE accounts SET posted = posted + 1 WHERE id = 'platform:fees'").execute(&pool).await.unwrap();
    pool.close().await;
    let (code, out) = run(dir.path(), &["ledger", "check"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("VIOLATION"), "{out}");
    eprintln!("{} of 60 streams completed before the kill", done.len());
}

#[tokio::test]
async fn cli_two_replicas_share_rate_limits_through_redis() {
    let dir = tempfile::tempdir().unwrap();
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let redis = [("GATEWAY_REDIS_URL", "redis://127.0.0.1:6379")];
    let (p1, p2) = (free_port().unwrap(), free_port().unwrap());
    let _one = serve_with(dir.path(), p1, &redis).await;
    let _two = serve_with(dir.path(), p2, &redis).await;
    let (b1, b2) = (format!("http://127.0.0.1:{p1}"), format!("http://127.0.0.1:{p2}"));
    provision(&b1, &mock.url()).await;
    let http = reqwest::Client::new();
    let key: Value = http.post(format!("{b1}/api/admin/keys")).bearer_auth(ADMIN)
        .json(&json!({"name": "shared", "tier": "free", "requestsPerMinute": 10})).send().await.unwrap().json().await.unwrap();
    let key = key["key"].as_str().unwrap().to_owned();
    // Replica two learns about the provider on its next reload.
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    let mut ok = [0, 0];
    for i in 0..30 {
        let base = if i % 2 == 0 { &b1 } else { &b2 };
        let r = http.post(format!("{base}/v1/chat/completions")).bearer_auth(&key)
            .json(&json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}))
            .send().await.unwrap();
        match r.status().as_u16() {
            200 => ok[i % 2] += 1,
            429 => {}
            s => panic!("status {s}: {}", r.text().await.unwrap()),
        }
    }
    assert_eq!(ok[0] + ok[1], 10, "together the replicas admit the limit, no more: {ok:?}");
    assert!(ok[0] > 0 && ok[1] > 0, "both replicas served: {ok:?}");
}

/// `gateway demo` (here in front of the mock with `--upstream`) prints everything needed
/// to try both tiers and open the console: a free key, a premium key with credit, an
/// admin key that the admin API takes, and the console's URL.
#[tokio::test]
async fn demo_prints_keys_for_both_tiers_an_admin_key_and_the_console() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let mut child = Command::new(gateway_bin().unwrap())
        .args(["demo", "--upstream", &mock.url()])
        .env("GATEWAY_DATABASE_URL", db_url(dir.path()))
        .env("GATEWAY_HOST", "127.0.0.1")
        .env("GPU_STREAMING_PORT", port.to_string())
        .env_remove("GATEWAY_ADMIN_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut printed = String::new();
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            printed.push_str(&line);
            printed.push('\n');
            if line.contains("Ctrl-C stops it.") {
                break;
            }
        }
    });
    read.await.expect("the demo printed its banner within 60 s");
    let field = |label: &str| -> String {
        let line = printed.lines().find(|l| l.trim_start().starts_with(label)).unwrap_or_else(|| panic!("no {label} in:\n{printed}"));
        line.split_whitespace().nth(label.split_whitespace().count()).unwrap().to_owned()
    };
    let (free, premium, admin) = (field("user key:"), field("premium key:"), field("admin key:"));
    let base = format!("http://127.0.0.1:{port}");
    assert!(printed.contains(&format!("{base}/admin")), "{printed}");
    let http = reqwest::Client::new();
    let r = http.get(format!("{base}/api/admin/overview")).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(r.status(), 200, "the printed admin key opens the admin API");
    let r = http.get(format!("{base}/admin")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let keys: Value = http.get(format!("{base}/api/admin/keys")).bearer_auth(&admin).send().await.unwrap().json().await.unwrap();
    let tiers: Vec<&str> = keys["data"].as_array().unwrap().iter().map(|k| k["tier"].as_str().unwrap()).collect();
    assert!(tiers.contains(&"free") && tiers.contains(&"premium"), "{keys}");
    // Both keys answer; the premium one pays from its credit.
    for key in [&free, &premium] {
        let r = http.post(format!("{base}/v1/chat/completions")).bearer_auth(key)
            .json(&json!({"model": "mock-model", "messages": [{"role": "user", "content": "Hi"}]}))
            .send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    let balance: Value = http.get(format!("{base}/api/llm/balance")).bearer_auth(&premium).send().await.unwrap().json().await.unwrap();
    let left = balance["balance"].as_f64().unwrap();
    assert!(left > 9.9 && left < 10.0, "{balance}");
    let _ = child.start_kill();
}

/// Two `gateway serve` replicas on one database and Redis, a provider with
/// `maxConcurrentStreams: 2`: replica one holds both slots with long streams and is
/// killed with SIGKILL; replica two finds the provider full while the dead replica's
/// leases live, and is served once they expire (25 s after their last renewal, at
/// most `capacity::LEASE`).
#[tokio::test]
async fn cli_a_killed_replicas_provider_slots_come_back_within_30_s() {
    let dir = tempfile::tempdir().unwrap();
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let prefix = format!("gs-test-{}:", uuid::Uuid::new_v4().simple());
    let env = [
        ("GATEWAY_REDIS_URL", "redis://127.0.0.1:6379"),
        ("GATEWAY_REDIS_PREFIX", prefix.as_str()),
        ("GATEWAY_PROVIDER_REFRESH_SECS", "1"),
        ("GATEWAY_QUEUE_TIMEOUT_MS", "0"),
    ];
    let (p1, p2) = (free_port().unwrap(), free_port().unwrap());
    let mut one = serve_with(dir.path(), p1, &env).await;
    let _two = serve_with(dir.path(), p2, &env).await;
    let (b1, b2) = (format!("http://127.0.0.1:{p1}"), format!("http://127.0.0.1:{p2}"));
    let http = reqwest::Client::new();
    let reg: Value = http
        .post(format!("{b1}/api/gpu/register"))
        .json(&json!({"capabilities": {"models": ["mock-model"], "maxConcurrentStreams": 2}, "pricing": {"perToken": 0.000002}, "baseUrl": mock.url()}))
        .send().await.unwrap().json().await.unwrap();
    let r = http.post(format!("{b1}/api/gpu/stream/start")).bearer_auth(reg["providerKey"].as_str().unwrap())
        .json(&json!({"providerId": reg["providerId"], "model": "mock-model", "quality": "standard"})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let key: Value = http.post(format!("{b1}/api/admin/keys")).bearer_auth(ADMIN)
        .json(&json!({"name": "k", "tier": "premium"})).send().await.unwrap().json().await.unwrap();
    http.post(format!("{b1}/api/admin/users/{}/credit", key["userId"].as_str().unwrap())).bearer_auth(ADMIN)
        .json(&json!({"amount": 100})).send().await.unwrap();
    let key = key["key"].as_str().unwrap().to_owned();
    let chat = |base: &str, content: &str| {
        http.post(format!("{base}/v1/chat/completions")).bearer_auth(&key)
            .json(&json!({"model": "mock-model", "stream": true, "max_tokens": 4, "messages": [{"role": "user", "content": content}]}))
            .send()
    };
    // Two streams through replica one that stay open (`[idle]`): both slots, fleet-wide.
    let held = [chat(&b1, "[idle] hi").await.unwrap(), chat(&b1, "[idle] hi").await.unwrap()];
    assert!(held.iter().all(|r| r.status() == 200));
    // Replica two knows the provider (reload every second) and finds it full.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_ne!(chat(&b2, "hi").await.unwrap().status(), 200, "the provider is full fleet-wide");
    one.kill().await.unwrap();
    let killed = std::time::Instant::now();
    drop(held);
    let mut refused_after_kill = 0;
    let served_after = loop {
        let r = chat(&b2, "hi").await.unwrap();
        if r.status() == 200 {
            let body = r.text().await.unwrap();
            assert!(body.contains("[DONE]"), "{body}");
            break killed.elapsed();
        }
        refused_after_kill += 1;
        assert!(killed.elapsed() < Duration::from_secs(40), "the dead replica's slots never came back");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("served {:.1} s after the kill ({refused_after_kill} refused before)", served_after.as_secs_f64());
    assert!(refused_after_kill > 0, "the dead replica's leases held its slots for a while");
    assert!(served_after <= Duration::from_secs(30), "slots came back within 30 s: {served_after:?}");
}
