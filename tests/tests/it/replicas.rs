//! Replicas on one database and one Redis behave as one (`inference::capacity`,
//! `ops::replicas`): a provider's cap holds across the fleet, caps fall back to
//! cap ÷ replicas while Redis is away and come back with it, and a second replica
//! without Redis is refused on PostgreSQL. Each test uses its own Redis key prefix.

use std::time::Duration;

use futures::future::join_all;
use serde_json::{json, Value};
use tests::{spawn_mock, MockConfig};

use crate::inproc::{fresh_database, Gateway};

const REDIS: &str = "redis://127.0.0.1:6379";

fn slow_chat(words: u32) -> Value {
    json!({"model": "mock-model", "max_tokens": words, "messages": [{"role": "user", "content": "[slow] hello there"}]})
}

fn replica(prefix: &str, redis: &str, i: usize) -> impl FnOnce(&mut gateway::ops::config::Config) {
    let (prefix, redis) = (prefix.to_owned(), redis.to_owned());
    move |c| {
        c.redis_url = Some(redis);
        c.redis_prefix = prefix;
        c.replica_id = Some(format!("replica-{i}"));
        c.provider_refresh_secs = 1;
        c.queue_timeout_ms = 30_000;
        c.queue_max = 1_000;
    }
}

async fn fleet(n: usize, redis: &str) -> Vec<Gateway> {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database(&dir).await.0;
    fleet_on(url, dir, n, redis).await
}

async fn fleet_on(url: String, dir: tempfile::TempDir, n: usize, redis: &str) -> Vec<Gateway> {
    let prefix = format!("gs-test-{}:", uuid::Uuid::new_v4().simple());
    let mut out = vec![Gateway::start_on(url.clone(), dir, replica(&prefix, redis, 0)).await];
    for i in 1..n {
        out.push(Gateway::start_on(url.clone(), tempfile::tempdir().unwrap(), replica(&prefix, redis, i)).await);
    }
    out
}

/// Waits until every replica routes `model` (registry reloads every second here).
async fn wait_routable(fleet: &[Gateway], key: &str) {
    for gw in fleet {
        for _ in 0..100 {
            let v: Value = gw.http.get(gw.url("/v1/models")).bearer_auth(key).send().await.unwrap().json().await.unwrap();
            if v["data"].as_array().is_some_and(|d| !d.is_empty()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn health(gw: &Gateway) -> Value {
    gw.http.get(gw.url("/health")).send().await.unwrap().json().await.unwrap()
}

/// Three replicas, a provider with `maxConcurrentStreams: 8`, 60 concurrent streams
/// spread over the replicas: the provider never has more than 8 open, every stream is
/// served in full, and the ledger balances.
#[tokio::test]
async fn inproc_replicas_never_give_a_provider_more_than_its_cap() {
    let fleet = fleet(3, REDIS).await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    fleet[0].add_provider_with(&mock, "mock-model", None, &["standard"], 8).await;
    let key = fleet[0].create_key("premium").await;
    wait_routable(&fleet, &key).await;
    for gw in &fleet {
        let h = health(gw).await;
        assert_eq!(h["replica"]["capacity"], "shared", "{h}");
        assert!(h["replica"]["id"].as_str().unwrap().starts_with("replica-"), "{h}");
    }
    let streams = (0..60).map(|i| {
        let gw = &fleet[i % 3];
        let key = key.clone();
        async move {
            let r = gw.chat(&key, slow_chat(6)).await;
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        }
    });
    let answers = join_all(streams).await;
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
    }
    let peak = mock.peak_streams.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!("peak concurrent streams at the provider: {peak} (cap 8), requests {}", mock.request_count());
    assert!(peak <= 8, "the fleet sent {peak} streams at once to a provider with a cap of 8");
    assert!(peak >= 4, "the streams overlapped ({peak})");
    assert_eq!(mock.request_count(), 60);
    fleet[0].ledger_is_clean().await;
    // Every replica counts the others within a heartbeat (`ops::replicas::BEAT`).
    let waited = std::time::Instant::now();
    while fleet.iter().any(|gw| gw.state.capacity.replicas() != 3) {
        assert!(waited.elapsed() < Duration::from_secs(12), "the replicas counted each other");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = fleet[1].http.get(fleet[1].url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("gs_replica_info{replica=\"replica-1\",capacity=\"shared\"} 1"), "{metrics}");
    assert!(metrics.contains("gs_live_replicas 3"), "{metrics}");
}

/// A Redis of the test's own: stopped mid-run, each of two replicas falls back to
/// cap ÷ 2 (and says so in `/health` and `/metrics`); started again, slots are shared
/// leases again.
#[tokio::test]
async fn inproc_replicas_fall_back_to_a_share_of_the_cap_while_redis_is_away() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let start_redis = || {
        std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test.sh installs it)")
    };
    let mut redis = start_redis();
    let url = format!("redis://127.0.0.1:{port}");
    for _ in 0..50 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fleet = fleet(2, &url).await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    fleet[0].add_provider_with(&mock, "mock-model", None, &["standard"], 8).await;
    let key = fleet[0].create_key("premium").await;
    wait_routable(&fleet, &key).await;
    // Both replicas counted each other before Redis goes.
    let waited = std::time::Instant::now();
    while fleet.iter().any(|gw| gw.state.capacity.replicas() != 2) {
        assert!(waited.elapsed() < Duration::from_secs(12), "the replicas counted each other");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    redis.kill().unwrap();
    redis.wait().unwrap();
    let waited = std::time::Instant::now();
    while health(&fleet[0]).await["replica"]["capacity"] != "fallback" {
        assert!(waited.elapsed() < Duration::from_secs(10), "replica 0 noticed Redis is gone");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = fleet[0].http.get(fleet[0].url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("gs_capacity_fallback 1"), "{metrics}");
    // Twelve streams to one replica: it uses at most its share (8 ÷ 2), never unlimited.
    let streams = (0..12).map(|_| async {
        let r = fleet[0].chat(&key, slow_chat(4)).await;
        (r.status().as_u16(), r.text().await.unwrap())
    });
    for (status, body) in join_all(streams).await {
        assert_eq!(status, 200, "{body}");
    }
    let peak = mock.peak_streams.load(std::sync::atomic::Ordering::SeqCst);
    assert!((1..=4).contains(&peak), "one replica without Redis used {peak} of the cap of 8 (its share is 4)");
    // Redis back: shared again.
    let _redis = KillOnDrop(start_redis());
    let waited = std::time::Instant::now();
    while health(&fleet[0]).await["replica"]["capacity"] != "shared" {
        assert!(waited.elapsed() < Duration::from_secs(15), "replica 0 noticed Redis is back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = fleet[1].chat(&key, slow_chat(2)).await;
    assert_eq!(r.status(), 200);
    fleet[0].ledger_is_clean().await;
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// On PostgreSQL, a second replica without Redis is refused while another is live; a
/// single replica needs no Redis.
#[tokio::test]
async fn inproc_a_second_replica_without_redis_is_refused_on_postgres() {
    if std::env::var("GS_TEST_DB").as_deref() != Ok("postgres") {
        // The rule is PostgreSQL's (the shared database); SQLite runs one replica.
        let gw = Gateway::start().await;
        assert_eq!(health(&gw).await["replica"]["capacity"], "local");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database(&dir).await.0;
    let one = Gateway::start_on(url.clone(), dir, |c| c.replica_id = Some("solo-1".into())).await;
    assert_eq!(health(&one).await["replica"]["capacity"], "local");
    let mut config = crate::inproc::test_config(url);
    config.replica_id = Some("solo-2".into());
    let store = gateway::store::Store::connect(&config.database_url).await.unwrap();
    let refused = gateway::ops::server::Running::start_with_store(config, store).await.err().expect("refused");
    assert!(refused.to_string().contains("needs Redis"), "{refused}");
}

/// A key with a daily limit, 30 concurrent requests spread over three replicas on
/// PostgreSQL (the database replicas share; SQLite's holds belong to one process): the
/// key's holds and spending never pass the limit between them (the check and the hold
/// are one transaction under the key's lock), and the ledger balances.
#[tokio::test]
async fn replicas_on_postgres_keep_a_spending_limit_under_concurrency() {
    let fleet = fleet_on(crate::inproc::fresh_postgres().await.0, tempfile::tempdir().unwrap(), 3, REDIS).await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    fleet[0].add_provider(&mock, "mock-model", None, &["standard"]).await;
    let v: Value = fleet[0].admin_post("/api/admin/keys", json!({"name": "capped", "tier": "premium", "dailyLimit": 0.003})).await.json().await.unwrap();
    let (key, uid) = (v["key"].as_str().unwrap().to_owned(), v["userId"].as_str().unwrap().to_owned());
    fleet[0].credit(&uid, 1_000_000).await;
    wait_routable(&fleet, &key).await;
    // Each request holds about (body + 100 tokens) × 2 µUSD ≈ 0.0007 USD: four fit.
    let body = json!({"model": "mock-model", "messages": [{"role": "user", "content": "[slow] hi"}], "max_tokens": 100});
    let requests = (0..30).map(|i| {
        let (gw, key, body) = (&fleet[i % 3], key.clone(), body.clone());
        async move { gw.chat(&key, body).await.status().as_u16() }
    });
    let statuses = join_all(requests).await;
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert!(served > 0 && statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    let spent: i64 = sqlx::query_scalar("SELECT CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT) FROM usage_records")
        .fetch_one(&fleet[0].state.store.pool)
        .await
        .unwrap();
    eprintln!("served {served} of 30, spent {spent} µUSD of a 3000 µUSD limit");
    assert!(spent <= 3_000, "the fleet let the key spend {spent} µUSD past its 3000 µUSD limit");
    // The streams overlap, so what bounds them is the holds: four of about 700 µUSD fit
    // under 3000 µUSD fleet-wide (each replica checking alone would let about four
    // through each).
    assert!(served <= 4, "{served} requests were held at once against a limit that fits four");
    fleet[0].ledger_is_clean().await;
}
