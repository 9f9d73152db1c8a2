//! Three `gateway serve` replicas on one PostgreSQL and one Redis behind haproxy, driven
//! only through haproxy as a client would be: a provider's cap and a key's spending limit
//! hold across the fleet; a replica killed with SIGKILL under streaming load costs only
//! the streams it was relaying (haproxy retries what it had not answered, the others keep
//! serving, its provider slots come back within 30 s); with Redis stopped the
//! replicas fall back to cap ÷ replicas, and share leases again once it is back.
//!
//! The haproxy config is `haproxy_cfg`, the one README.md shows (a test checks that they
//! agree).

use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::{json, Value};
use tests::{spawn_mock, MockConfig, MockProvider};
use tokio::process::{Child, Command};

use crate::cli::{provision_with, run_on, serve_with, ADMIN};
use crate::inproc::fresh_postgres;
use crate::sdk::free_port;

const REDIS: &str = "redis://127.0.0.1:6379";
const REPLICAS: usize = 3;

/// haproxy's config for replicas on 127.0.0.1 at `ports`, served at `bind`. README.md
/// shows it for `:8080` and ports 3002 to 3004.
fn haproxy_cfg(bind: &str, ports: &[u16]) -> String {
    let mut cfg = format!(
        "\
defaults
    mode http
    timeout connect 2s
    timeout client 120s
    # A non-streamed answer says nothing until it is whole: as long as the gateway
    # lets a request run (request_deadline_secs).
    timeout server 600s
    # WebSocket sessions (/api/llm/ws) last up to ws_max_session_secs.
    timeout tunnel 1h
    # A request that a replica never answered (connection refused, or closed with
    # nothing sent back: a replica killed before its first byte) goes to another
    # replica; a replica bills a request only once it answers. No retry on a response
    # timeout: the first replica may still be running (and billing) that request.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response

frontend gateway
    bind {bind}
    default_backend replicas

backend replicas
    balance roundrobin
    # A replica whose database does not answer says 503 and is taken out.
    option httpchk GET /health
"
    );
    for (i, port) in ports.iter().enumerate() {
        cfg += &format!("    server replica-{} 127.0.0.1:{port} check inter 500 fall 2 rise 1\n", i + 1);
    }
    cfg
}

/// Three replicas on a fresh PostgreSQL schema and a Redis key prefix of their own,
/// behind haproxy.
pub(crate) struct Fleet {
    /// The replicas' processes, `None` once killed.
    replicas: Vec<Option<Child>>,
    ports: Vec<u16>,
    pub(crate) database_url: String,
    lb: String,
    pub(crate) http: reqwest::Client,
    _haproxy: Child,
    dir: tempfile::TempDir,
}

impl Fleet {
    pub(crate) async fn start(redis_url: &str) -> Fleet {
        Self::start_with(redis_url, &[]).await
    }

    /// With settings of the test's own (environment variables) on every replica.
    pub(crate) async fn start_with(redis_url: &str, settings: &[(&str, &str)]) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let database_url = fresh_postgres().await.0;
        let prefix = format!("gs-test-{}:", uuid::Uuid::new_v4().simple());
        let (mut replicas, mut ports) = (Vec::new(), Vec::new());
        // One after another: the first applies the migrations.
        for i in 1..=REPLICAS {
            let port = free_port().unwrap();
            let id = format!("replica-{i}");
            let env = [
                ("GATEWAY_DATABASE_URL", database_url.as_str()),
                ("GATEWAY_REDIS_URL", redis_url),
                ("GATEWAY_REDIS_PREFIX", prefix.as_str()),
                ("GATEWAY_REPLICA_ID", id.as_str()),
                ("GATEWAY_PROVIDER_REFRESH_SECS", "1"),
                // Requests wait for a provider slot rather than get 429 while the cap is full.
                ("GATEWAY_QUEUE_TIMEOUT_MS", "30000"),
            ];
            let env: Vec<(&str, &str)> = env.iter().chain(settings).copied().collect();
            replicas.push(Some(serve_with(dir.path(), port, &env).await));
            ports.push(port);
        }
        let lb_port = free_port().unwrap();
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg, haproxy_cfg(&format!("127.0.0.1:{lb_port}"), &ports)).unwrap();
        let check = Command::new("haproxy").arg("-c").arg("-f").arg(&cfg).output().await.expect("haproxy (scripts/test.sh installs it)");
        assert!(check.status.success(), "haproxy -c: {}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
        let log = std::fs::File::create(dir.path().join("haproxy.log")).unwrap();
        let haproxy = Command::new("haproxy")
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("haproxy (scripts/test.sh installs it)");
        let fleet = Fleet {
            replicas,
            ports,
            database_url,
            lb: format!("http://127.0.0.1:{lb_port}"),
            http: reqwest::Client::new(),
            _haproxy: haproxy,
            dir,
        };
        // haproxy answers, and round-robin reaches every replica.
        let waited = Instant::now();
        loop {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..REPLICAS {
                if let Ok(r) = fleet.http.get(fleet.lb("/health")).send().await {
                    if let Some(id) = r.json::<Value>().await.ok().and_then(|v| v["replica"]["id"].as_str().map(str::to_owned)) {
                        seen.insert(id);
                    }
                }
            }
            if seen.len() == REPLICAS {
                break;
            }
            assert!(waited.elapsed() < Duration::from_secs(10), "haproxy did not reach every replica ({seen:?}): {}", fleet.haproxy_log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        fleet
    }

    /// `path` through haproxy.
    pub(crate) fn lb(&self, path: &str) -> String {
        format!("{}{path}", self.lb)
    }

    /// `path` on replica `i` itself (for what only it can say: its `/health`, its metrics).
    fn replica(&self, i: usize, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports[i])
    }

    fn haproxy_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }

    /// SIGKILL to replica `i`.
    pub(crate) async fn kill_9(&mut self, i: usize) {
        let mut child = self.replicas[i].take().expect("replica still running");
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }

    async fn health(&self, i: usize) -> Value {
        self.http.get(self.replica(i, "/health")).send().await.unwrap().json().await.unwrap()
    }

    /// The sum of a metric's samples on replica `i`.
    async fn metric(&self, i: usize, name: &str) -> f64 {
        let text = self.http.get(self.replica(i, "/metrics")).send().await.unwrap().text().await.unwrap();
        text.lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Registers `mock` (through haproxy) with `streams` at once and returns a funded
    /// premium key once every replica routes its model.
    async fn provision(&self, mock: &MockProvider, streams: u32) -> String {
        let key = provision_with(&self.lb, &mock.url(), streams).await;
        for i in 0..REPLICAS {
            let waited = Instant::now();
            loop {
                let v: Value = self.http.get(self.replica(i, "/v1/models")).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
                if v["data"].as_array().is_some_and(|d| !d.is_empty()) {
                    break;
                }
                assert!(waited.elapsed() < Duration::from_secs(10), "replica {i} never routed the provider");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        key
    }

    async fn ledger_check(&self) {
        let (code, out) = run_on(&self.database_url, &["ledger", "check"]).await;
        assert_eq!(code, 0, "gateway ledger check: {out}");
        assert!(out.contains("OK"), "{out}");
    }

}

/// Waits until the mock has no stream open and clears its peak.
async fn quiet(mock: &MockProvider) {
    let waited = Instant::now();
    while mock.open_streams.load(Ordering::SeqCst) > 0 {
        assert!(waited.elapsed() < Duration::from_secs(10), "the mock's streams never closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mock.peak_streams.store(0, Ordering::SeqCst);
}

fn chat_body(content: &str, max_tokens: u32) -> Value {
    json!({"model": "mock-model", "stream": true, "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]})
}

/// One streamed chat through haproxy: its request id once it ended with `[DONE]`, else
/// what the client saw.
async fn stream(http: &reqwest::Client, url: &str, key: &str, content: &str) -> Result<String, String> {
    let r = http.post(url).bearer_auth(key).json(&chat_body(content, 6)).send().await.map_err(|e| format!("send: {e}"))?;
    let status = r.status();
    let id = r.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = r.text().await.map_err(|e| format!("{status}, body cut: {e}"))?;
    if status != 200 || !body.ends_with("data: [DONE]\n\n") {
        return Err(format!("{status}: {body}"));
    }
    id.ok_or_else(|| "no x-request-id".to_owned())
}

/// `n` streams through haproxy at once; panics unless every one ends with `[DONE]`.
async fn all_served(fleet: &Fleet, key: &str, n: usize) -> Vec<String> {
    let url = fleet.lb("/v1/chat/completions");
    let answers = join_all((0..n).map(|_| stream(&fleet.http, &url, key, "[slow] hello there"))).await;
    answers.into_iter().map(|a| a.unwrap_or_else(|e| panic!("a client saw an error through haproxy: {e}"))).collect()
}

/// Reads an open stream until its first word, within `within`.
async fn first_word(r: &mut reqwest::Response, within: Duration) -> bool {
    let mut seen = String::new();
    let read = async {
        while !seen.contains("\"The\"") {
            match r.chunk().await {
                Ok(Some(chunk)) => seen.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return false,
            }
        }
        true
    };
    tokio::time::timeout(within, read).await.unwrap_or(false)
}

/// Through haproxy: a provider that fails every request is avoided by every replica
/// within 5 s of its first failure (its breaker, opened on one replica, is open on all),
/// and a campaign whose total budget pays for ten impressions is charged for ten however
/// many of the 60 concurrent free answers carried it; the ledger balances.
#[tokio::test]
async fn cli_fleet_avoids_a_failing_provider_and_keeps_a_campaigns_budget() {
    let started = Instant::now();
    // The first failure opens a breaker (the score alone steers traffic away more slowly).
    let fleet = Fleet::start_with(REDIS, &[("GATEWAY_BREAKER_FAILURES", "1")]).await;
    let good = spawn_mock(MockConfig::default()).await.unwrap();
    let failing = spawn_mock(MockConfig { fail_status: Some(500), ..MockConfig::default() }).await.unwrap();
    let reg: Value = fleet.http.post(fleet.lb("/api/gpu/register"))
        .json(&json!({"capabilities": {"models": ["mock-model"], "maxConcurrentStreams": 64}, "pricing": {"perToken": 0.000002}, "baseUrl": failing.url()}))
        .send().await.unwrap().json().await.unwrap();
    let bad_id = reg["providerId"].as_str().unwrap().to_owned();
    let r = fleet.http.post(fleet.lb("/api/gpu/stream/start")).bearer_auth(reg["providerKey"].as_str().unwrap())
        .json(&json!({"providerId": bad_id, "model": "mock-model", "quality": "standard"})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let key = fleet.provision(&good, 64).await;
    // Every replica knows both providers.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let breaker = format!("gs_provider_breaker_open{{provider=\"{bad_id}\"}}");
    let url = fleet.lb("/v1/chat/completions");
    let first_failure = loop {
        let sent = failing.request_count();
        stream(&fleet.http, &url, &key, "hi").await.unwrap();
        if failing.request_count() > sent {
            break Instant::now();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no request ever reached the failing provider");
    };
    for i in 0..REPLICAS {
        while fleet.metric(i, &breaker).await != 1.0 {
            assert!(first_failure.elapsed() < Duration::from_secs(5), "replica {i} still routes to the failing provider 5 s after its first failure");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let everywhere = first_failure.elapsed();
    let sent = failing.request_count();
    all_served(&fleet, &key, 30).await;
    eprintln!("failing provider: open on all replicas {:.2} s after its first failure; {sent} requests sent it, none of the next 30", everywhere.as_secs_f64());
    assert_eq!(failing.request_count(), sent, "a replica sent the failing provider requests after its breaker was shared");

    // A campaign at the reserve price (0.1 USD CPM: 100 µUSD an impression), ten in its budget.
    let budget = 1_000i64;
    let adv: Value = fleet.http.post(fleet.lb("/api/admin/advertisers")).bearer_auth(ADMIN).json(&json!({"name": "Acme"}))
        .send().await.unwrap().json().await.unwrap();
    let adv = adv["id"].as_str().unwrap().to_owned();
    let r = fleet.http.post(fleet.lb(&format!("/api/admin/advertisers/{adv}/credit"))).bearer_auth(ADMIN)
        .json(&json!({"amountMicros": 1_000_000})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let campaign: Value = fleet.http.post(fleet.lb("/api/admin/campaigns")).bearer_auth(ADMIN)
        .json(&json!({"advertiserId": adv, "name": "IDE", "categories": ["technology"], "title": "FastIDE", "text": "The editor for Rust.",
            "url": "https://fastide.example/", "cpmBidMicros": 100_000, "dailyBudgetMicros": 100_000, "totalBudgetMicros": budget}))
        .send().await.unwrap().json().await.unwrap();
    let campaign = campaign["id"].as_str().unwrap().to_owned();
    let mut free = Vec::new();
    for _ in 0..20 {
        let k: Value = fleet.http.post(fleet.lb("/api/admin/keys")).bearer_auth(ADMIN).json(&json!({"name": "free", "tier": "free"}))
            .send().await.unwrap().json().await.unwrap();
        free.push(k["key"].as_str().unwrap().to_owned());
    }
    // Every replica's inventory has the campaign.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let ask = json!({"model": "mock-model", "messages": [{"role": "user", "content": crate::ads::TECH_QUESTION}]});
    let answers = join_all((0..60).map(|i| {
        let (http, url, key, ask) = (&fleet.http, &url, &free[i % 20], &ask);
        async move { http.post(url.as_str()).bearer_auth(key).json(ask).send().await.unwrap().text().await.unwrap() }
    }))
    .await;
    let with_ad = answers.iter().filter(|a| a.contains("[Sponsored]")).count();
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&fleet.database_url).await.unwrap();
    let waited = Instant::now();
    let (recorded, charged, paid) = loop {
        let (n, charged, paid): (i64, i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), CAST(COALESCE(SUM(charged), 0) AS BIGINT), COUNT(CASE WHEN charged > 0 THEN 1 END) FROM ad_impressions WHERE campaign_id = $1",
        )
        .bind(&campaign)
        .fetch_one(&pool)
        .await
        .unwrap();
        if usize::try_from(n).unwrap() >= with_ad {
            break (n, charged, paid);
        }
        assert!(waited.elapsed() < Duration::from_secs(10), "{n} of {with_ad} impressions recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let spent: i64 = sqlx::query_scalar("SELECT spent_total FROM campaigns WHERE id = $1").bind(&campaign).fetch_one(&pool).await.unwrap();
    pool.close().await;
    eprintln!("campaign: {with_ad} of 60 answers carried it ({recorded} impressions), {paid} charged: {charged} µUSD of a {budget} µUSD budget");
    assert!(with_ad > 10, "the auctions offered the campaign more often than its budget pays for: {with_ad}");
    assert!(charged <= budget, "the fleet charged {charged} µUSD against a {budget} µUSD budget");
    assert_eq!((charged, paid), (budget, 10), "the budget was spent to its last impression, no further");
    assert_eq!(spent, charged);
    fleet.ledger_check().await;
    eprintln!("wall time {:.1} s", started.elapsed().as_secs_f64());
}

/// The haproxy config in README.md is the one these tests run.
#[test]
fn cli_fleet_readme_shows_the_haproxy_config_the_tests_run() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let cfg = haproxy_cfg(":8080", &[3002, 3003, 3004]);
    assert!(readme.contains(&format!("```\n{cfg}```")), "README.md must show this haproxy.cfg:\n{cfg}");
}

/// Through haproxy only: 60 streams at once never give a
/// provider with `maxConcurrentStreams: 8` more than 8, and every replica served some;
/// a key's daily limit holds across the replicas; the ledger balances.
#[tokio::test]
async fn cli_fleet_three_replicas_behind_haproxy_keep_a_providers_cap_and_a_spending_limit() {
    let started = Instant::now();
    let fleet = Fleet::start(REDIS).await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let key = fleet.provision(&mock, 8).await;
    let ids = all_served(&fleet, &key, 60).await;
    let peak = mock.peak_streams.load(Ordering::SeqCst);
    let mut per_replica = Vec::new();
    for i in 0..REPLICAS {
        per_replica.push(fleet.metric(i, "gs_completions_total").await);
    }
    eprintln!("60 streams through haproxy: {} served, peak {peak} at the provider (cap 8), per replica {per_replica:?}", ids.len());
    assert!(peak <= 8, "the fleet sent {peak} streams at once to a provider with a cap of 8");
    assert!(peak >= 4, "the streams overlapped at the provider ({peak})");
    assert!(per_replica.iter().all(|n| *n > 0.0), "haproxy spread the streams over every replica: {per_replica:?}");

    // A key with a daily limit of 0.003 USD. Each request holds about 0.0007 USD (its
    // body's bytes and 100 tokens at 2 µUSD) from when it gets a slot until it is
    // settled at what it cost (16 µUSD): four holds fit at once, fleet-wide. Replicas
    // that checked the limit each on its own would let about four through each.
    quiet(&mock).await;
    let v: Value = fleet.http.post(fleet.lb("/api/admin/keys")).bearer_auth(ADMIN)
        .json(&json!({"name": "capped", "tier": "premium", "dailyLimit": 0.003})).send().await.unwrap().json().await.unwrap();
    let (capped, key_id) = (v["key"].as_str().unwrap().to_owned(), v["id"].as_str().unwrap().to_owned());
    let r = fleet.http.post(fleet.lb(&format!("/api/admin/users/{}/credit", v["userId"].as_str().unwrap()))).bearer_auth(ADMIN)
        .json(&json!({"amount": 100})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body = json!({"model": "mock-model", "messages": [{"role": "user", "content": "[slow] hi"}], "max_tokens": 100});
    let requests = (0..30).map(|_| async {
        let r = fleet.http.post(fleet.lb("/v1/chat/completions")).bearer_auth(&capped).json(&body).send().await.unwrap();
        r.status().as_u16()
    });
    let statuses = join_all(requests).await;
    let served = statuses.iter().filter(|s| **s == 200).count();
    let at_once = mock.peak_streams.load(Ordering::SeqCst);
    assert!(served > 0 && statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    assert!(served < 30, "the limit refused some requests: {statuses:?}");
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&fleet.database_url).await.unwrap();
    let (spent, rows): (i64, i64) =
        sqlx::query_as("SELECT CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT), COUNT(*) FROM usage_records WHERE key_id = $1")
            .bind(&key_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;
    eprintln!("capped key: {served} of 30 served, at most {at_once} at once, spent {spent} µUSD of a 3000 µUSD limit");
    assert_eq!(rows, i64::try_from(served).unwrap(), "one usage record per answered request");
    assert!(spent <= 3_000, "the fleet let the key spend {spent} µUSD past its 3000 µUSD limit");
    assert!((1..=4).contains(&at_once), "{at_once} requests ran on holds at once against a limit that fits four");
    fleet.ledger_check().await;
    eprintln!("wall time {:.1} s", started.elapsed().as_secs_f64());
}

/// Streams through haproxy, one replica killed with SIGKILL mid-run: only streams it
/// was relaying are cut (the rest, and requests it had not answered, are served by the
/// others); every stream that ended with `[DONE]` is settled; new requests 1.5 s later
/// all succeed; its provider slots come back within 30 s; the ledger balances.
#[tokio::test]
async fn cli_fleet_kill_9_of_a_replica_under_streaming_load() {
    const CAP: u32 = 48;
    let started = Instant::now();
    let mut fleet = Fleet::start(REDIS).await;
    // Streams of about a second (0.7 s to the first word, then 50 ms a word).
    let mock = spawn_mock(MockConfig { first_chunk_delay: Duration::from_millis(700), ..MockConfig::default() }).await.unwrap();
    let key = fleet.provision(&mock, CAP).await;
    let url = fleet.lb("/v1/chat/completions");
    let load: Vec<_> = (0..60u64)
        .map(|i| {
            let (http, url, key) = (fleet.http.clone(), url.clone(), key.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(25 * i)).await;
                stream(&http, &url, &key, "[slow] hello there").await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let victim = 1;
    let relaying = fleet.metric(victim, "gs_provider_in_flight").await;
    fleet.kill_9(victim).await;
    let killed = Instant::now();
    let mut done = Vec::new();
    let mut cut = Vec::new();
    for t in load {
        match t.await.unwrap() {
            Ok(id) => done.push(id),
            Err(e) => cut.push(e),
        }
    }
    eprintln!("kill -9 with {relaying} streams in flight on the victim: {} of 60 served, {} cut: {cut:?}", done.len(), cut.len());
    assert!(relaying > 0.0, "the victim was relaying streams when it was killed");
    // A stream the victim had begun to answer cannot move: it is cut mid-body. What it
    // had not answered yet haproxy sent to another replica: no client saw an error
    // status (without `retry-on empty-response` they see 502s). Nothing else may fail
    // (one more stream may have started between the count and the kill).
    let refused: Vec<_> = cut.iter().filter(|e| !e.starts_with("200 OK")).collect();
    assert!(refused.is_empty(), "requests the victim had not answered failed: {refused:?}");
    assert!(cut.len() as f64 <= relaying + 1.0, "{} streams failed, the victim was relaying {relaying}: {cut:?}", cut.len());

    // haproxy's check takes the dead replica out within about a second (fall 2, inter 500).
    tokio::time::sleep(Duration::from_millis(1_500).saturating_sub(killed.elapsed())).await;
    let after = all_served(&fleet, &key, 30).await;
    eprintln!("{} of 30 new requests served {:.1} s after the kill", after.len(), killed.elapsed().as_secs_f64());
    done.extend(after);

    // Every stream that got [DONE] is settled: its usage record and its ledger entry.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&fleet.database_url).await.unwrap();
    for id in &done {
        let records: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_records WHERE request_id = $1").bind(id).fetch_one(&pool).await.unwrap();
        let entries: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ledger_entries WHERE request_id = $1 AND kind = 'usage'")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!((records, entries), (1, 1), "request {id} got [DONE] but has {records} usage records and {entries} settlements");
    }
    pool.close().await;

    // The dead replica's leases still count against the provider (it cannot release
    // them) until they lapse, 25 s after its last renewal. (A replica's view of the
    // fleet's count is refreshed every second.)
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let held = fleet.metric(0, "gs_provider_fleet_in_flight").await;
    assert!(held > 0.0, "the dead replica's leases were still counted {:.1} s after the kill", killed.elapsed().as_secs_f64());
    loop {
        if fleet.metric(0, "gs_provider_fleet_in_flight").await == 0.0 {
            break;
        }
        assert!(killed.elapsed() < Duration::from_secs(33), "the dead replica's slots never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let back = killed.elapsed();
    // Every slot is usable again: CAP streams that stay open all get their first word
    // (which also shows that haproxy passes events on as they come: these streams
    // never end).
    let opens = (0..CAP).map(|_| async {
        let open = async {
            let mut r = fleet.http.post(&url).bearer_auth(&key).json(&chat_body("[idle] hi", 4)).send().await.ok()?;
            first_word(&mut r, Duration::from_secs(5)).await.then_some(r)
        };
        tokio::time::timeout(Duration::from_secs(5), open).await.ok().flatten()
    });
    let open: Vec<_> = join_all(opens).await.into_iter().flatten().collect();
    eprintln!("{held} dead leases lapsed {:.1} s after the kill; {} of {CAP} slots usable", back.as_secs_f64(), open.len());
    assert!(back <= Duration::from_secs(30), "slots came back within 30 s: {back:?}");
    assert_eq!(open.len(), CAP as usize, "every slot of the provider is usable once the dead replica's leases lapsed");
    // The books balance with these streams' holds open.
    fleet.ledger_check().await;
    drop(open);
    eprintln!("wall time {:.1} s", started.elapsed().as_secs_f64());
}

/// A Redis of the test's own, stopped mid-run: requests through haproxy keep
/// succeeding, every replica says `capacity: fallback` and together they keep the
/// provider within 3 × (8 ÷ 3) streams; Redis started again, they share leases again
/// within 15 s and requests succeed.
#[tokio::test]
async fn cli_fleet_redis_stopped_mid_run_caps_fall_back_and_come_back() {
    let started = Instant::now();
    let port = free_port().unwrap();
    let start_redis = || {
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server (scripts/test.sh installs it)")
    };
    let mut redis = start_redis();
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fleet = Fleet::start(&format!("redis://127.0.0.1:{port}")).await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let key = fleet.provision(&mock, 8).await;
    // Every replica counts the three (heartbeats every 5 s): its share in fallback is 8 ÷ 3.
    let waited = Instant::now();
    for i in 0..REPLICAS {
        while fleet.health(i).await["replica"]["liveReplicas"] != 3 {
            assert!(waited.elapsed() < Duration::from_secs(15), "replica {i} counted the three replicas");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(fleet.health(i).await["replica"]["capacity"], "shared");
    }
    all_served(&fleet, &key, 24).await;
    let shared_peak = mock.peak_streams.load(Ordering::SeqCst);
    assert!((1..=8).contains(&shared_peak), "{shared_peak}");

    // Redis stops while streams come and go; none of them may fail.
    let url = fleet.lb("/v1/chat/completions");
    let load = (0..30u64).map(|i| {
        let (http, url, key) = (&fleet.http, &url, &key);
        async move {
            tokio::time::sleep(Duration::from_millis(50 * i)).await;
            stream(http, url, key, "[slow] hello there").await
        }
    });
    // Stops Redis and says how long the replicas took to notice.
    let stop = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        redis.start_kill().unwrap();
        redis.wait().await.unwrap();
        let stopped = Instant::now();
        for i in 0..REPLICAS {
            while fleet.health(i).await["replica"]["capacity"] != "fallback" {
                assert!(stopped.elapsed() < Duration::from_secs(5), "replica {i} noticed Redis is gone");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        stopped.elapsed()
    };
    let (answers, noticed) = tokio::join!(join_all(load), stop);
    let failed: Vec<_> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(failed.is_empty(), "clients saw errors while Redis stopped: {failed:?}");
    quiet(&mock).await;
    all_served(&fleet, &key, 24).await;
    let fallback_peak = mock.peak_streams.load(Ordering::SeqCst);
    eprintln!(
        "Redis stopped: 30 of 30 served across the stop, every replica in fallback {:.1} s after it, peak {fallback_peak} in fallback (shared: {shared_peak})",
        noticed.as_secs_f64()
    );
    assert!(fallback_peak <= 6, "in fallback each of 3 replicas may use 8 ÷ 3 = 2 slots, but the provider had {fallback_peak} streams");
    assert!(fallback_peak >= 3, "more than one replica served at once in fallback ({fallback_peak})");

    let _redis = start_redis();
    let restarted = Instant::now();
    for i in 0..REPLICAS {
        while fleet.health(i).await["replica"]["capacity"] != "shared" {
            assert!(restarted.elapsed() < Duration::from_secs(15), "replica {i} noticed Redis is back");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let shared_again = restarted.elapsed();
    quiet(&mock).await;
    all_served(&fleet, &key, 24).await;
    let peak = mock.peak_streams.load(Ordering::SeqCst);
    eprintln!("Redis back: every replica shared again {:.1} s after it started, 24 of 24 served, peak {peak}", shared_again.as_secs_f64());
    assert!((1..=8).contains(&peak), "{peak}");
    fleet.ledger_check().await;
    eprintln!("wall time {:.1} s", started.elapsed().as_secs_f64());
}
