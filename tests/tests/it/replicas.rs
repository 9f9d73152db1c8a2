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
    fleet_with(n, redis, |_| {}).await
}

/// `n` replicas on a fresh database, each with `tweak` applied to its config too.
async fn fleet_with(n: usize, redis: &str, tweak: fn(&mut gateway::ops::config::Config)) -> Vec<Gateway> {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database(&dir).await.0;
    fleet_on(url, dir, n, redis, tweak).await
}

async fn fleet_on(url: String, dir: tempfile::TempDir, n: usize, redis: &str, tweak: fn(&mut gateway::ops::config::Config)) -> Vec<Gateway> {
    let prefix = format!("gs-test-{}:", uuid::Uuid::new_v4().simple());
    let start = |i: usize, dir: tempfile::TempDir| {
        let base = replica(&prefix, redis, i);
        Gateway::start_on(url.clone(), dir, move |c| {
            base(c);
            tweak(c);
        })
    };
    let mut out = vec![start(0, dir).await];
    for i in 1..n {
        out.push(start(i, tempfile::tempdir().unwrap()).await);
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
    assert!(metrics.contains("gs_replica_info{replica=\"replica-1\",capacity=\"shared\",health=\"shared\"} 1"), "{metrics}");
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
    // Provider health: each replica judges alone meanwhile.
    while health(&fleet[0]).await["replica"]["health"] != "alone" {
        assert!(waited.elapsed() < Duration::from_secs(10), "replica 0 judges provider health alone without Redis");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    while health(&fleet[0]).await["replica"]["capacity"] != "shared" || health(&fleet[0]).await["replica"]["health"] != "shared" {
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
    let fleet = fleet_on(crate::inproc::fresh_postgres().await.0, tempfile::tempdir().unwrap(), 3, REDIS, |_| {}).await;
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

/// The value of `gs_provider_breaker_open` for `provider` in a replica's metrics.
async fn breaker_open(gw: &Gateway, provider: &str) -> bool {
    let text = gw.http.get(gw.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().any(|l| l == format!("gs_provider_breaker_open{{provider=\"{provider}\"}} 1"))
}

/// A provider that fails every request opens its breaker on the replica that met the
/// failures, and every other replica avoids it within 5 s without sending it anything
/// (each judging alone, the other two would each have sent it requests until their own
/// breakers opened).
#[tokio::test]
async fn inproc_replicas_avoid_a_failing_provider_within_5_s() {
    // The first failure opens the breaker (the score alone would also steer
    // traffic away, more slowly).
    let fleet = fleet_with(3, REDIS, |c| {
        c.breaker_failures = 1;
    })
    .await;
    let failing = spawn_mock(MockConfig { fail_status: Some(500), ..MockConfig::default() }).await.unwrap();
    let good = spawn_mock(MockConfig::default()).await.unwrap();
    let (bad_id, _) = fleet[0].add_provider(&failing, "mock-model", None, &["standard"]).await;
    fleet[0].add_provider(&good, "mock-model", None, &["standard"]).await;
    let key = fleet[0].create_key("premium").await;
    wait_routable(&fleet, &key).await;
    for gw in &fleet {
        assert_eq!(health(gw).await["replica"]["health"], "shared");
    }
    let ask = json!({"model": "mock-model", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
    // Replica 0 alone meets the failures (each fails over to the good provider).
    for _ in 0..200 {
        if breaker_open(&fleet[0], &bad_id).await {
            break;
        }
        assert_eq!(fleet[0].chat(&key, ask.clone()).await.status(), 200);
    }
    let opened = std::time::Instant::now();
    assert!(breaker_open(&fleet[0], &bad_id).await, "replica 0 never opened the failing provider's breaker");
    let sent_before = failing.request_count();
    for gw in &fleet[1..] {
        while !breaker_open(gw, &bad_id).await {
            assert!(opened.elapsed() < Duration::from_secs(5), "another replica still routes to the failing provider after 5 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let shared_after = opened.elapsed();
    for i in 0..20 {
        assert_eq!(fleet[1 + i % 2].chat(&key, ask.clone()).await.status(), 200);
    }
    eprintln!("failing provider: {sent_before} requests, all from replica 0; breaker open on every replica {:.2} s after replica 0's", shared_after.as_secs_f64());
    assert_eq!(failing.request_count(), sent_before, "the other replicas sent the failing provider requests");
}

/// A provider's score inputs survive a restart: they are written to the database
/// while the gateway runs (and when it stops) and read back when it starts.
#[tokio::test]
async fn inproc_provider_health_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database(&dir).await.0;
    let gw = Gateway::start_on(url.clone(), tempfile::tempdir().unwrap(), |c| c.provider_refresh_secs = 1).await;
    let flaky = spawn_mock(MockConfig { fail_every: Some(2), ..MockConfig::default() }).await.unwrap();
    let (id, _) = gw.add_provider(&flaky, "mock-model", None, &["standard"]).await;
    let key = gw.create_key("premium").await;
    for _ in 0..6 {
        gw.chat(&key, json!({"model": "mock-model", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})).await;
    }
    let before = gw.state.registry.snapshot()[&id].load.health.inputs();
    assert!(before.failures > 0 && before.success < 1.0, "{before:?}");
    gw.shutdown().await;
    let again = Gateway::start_on(url, tempfile::tempdir().unwrap(), |c| c.provider_refresh_secs = 1).await;
    let after = again.state.registry.snapshot()[&id].load.health.inputs();
    eprintln!("before the restart {before:?}, after {after:?}");
    assert_eq!(after, before, "the restarted gateway forgot the provider's record");
}

/// Three replicas, a campaign whose total budget pays for ten impressions, 60
/// concurrent free requests that each may carry its ad: the fleet charges the
/// campaign at most its budget (each replica's snapshot says nothing was spent, so
/// without the shared counters every impression would be charged).
/// (On PostgreSQL: replicas share one; an embedded SQLite file belongs to one process.)
#[tokio::test]
async fn replicas_on_postgres_never_overspend_a_campaign_and_share_frequency_caps() {
    let fleet = fleet_on(crate::inproc::fresh_postgres().await.0, tempfile::tempdir().unwrap(), 3, REDIS, |_| {}).await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    fleet[0].add_provider(&mock, "mock-model", None, &["standard"]).await;
    // A bid at the reserve (0.1 USD CPM) pays 100 µUSD an impression: ten fit.
    let budget = 1_000;
    let campaign_body = json!({"cpmBidMicros": 100_000, "totalBudgetMicros": budget, "dailyBudgetMicros": 100_000});
    let (_, campaign) = crate::ads::ad_campaign(&fleet[0], 1_000_000, campaign_body).await;
    let keys: Vec<String> = join_all((0..20).map(|_| fleet[0].create_key("free"))).await;
    wait_routable(&fleet, &keys[0]).await;
    // Every replica's inventory has the campaign.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let ask = json!({"model": "mock-model", "messages": crate::inproc::user(crate::ads::TECH_QUESTION)});
    let answers = join_all((0..60).map(|i| {
        let (gw, key, ask) = (&fleet[i % 3], keys[i % 20].clone(), ask.clone());
        async move { gw.chat(&key, ask).await.text().await.unwrap() }
    }))
    .await;
    let with_ad = answers.iter().filter(|a| a.contains("[Sponsored]")).count();
    let rows = crate::ads::wait_impressions(&fleet[0], with_ad).await;
    let charged: i64 = rows.iter().map(|r| r.1).sum();
    let paid = rows.iter().filter(|r| r.1 > 0).count();
    let spent: i64 = sqlx::query_scalar("SELECT spent_total FROM campaigns WHERE id = $1")
        .bind(&campaign)
        .fetch_one(&fleet[0].state.store.pool)
        .await
        .unwrap();
    eprintln!("{with_ad} ads delivered, {paid} charged: {charged} µUSD of a {budget} µUSD budget (counter {spent})");
    assert!(with_ad > 10, "the auction offered the campaign more often than its budget pays for: {with_ad}");
    assert!(charged <= budget, "the fleet charged {charged} µUSD against a {budget} µUSD budget");
    assert_eq!(charged, spent);
    assert_eq!(paid, 10, "the budget was spent to the last impression");
    fleet[0].ledger_is_clean().await;

    // A frequency cap of 2 a day: one user asking every replica three times sees the ad twice.
    let (_, capped) = crate::ads::ad_campaign(&fleet[0], 1_000_000, json!({"frequencyCap": 2, "cpmBidMicros": 9_000_000})).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let user = fleet[0].create_key("free").await;
    wait_routable(&fleet, &user).await;
    let mut seen = 0;
    for i in 0..9 {
        let text = fleet[i % 3].chat(&user, ask.clone()).await.text().await.unwrap();
        seen += usize::from(text.contains("[Sponsored]"));
    }
    eprintln!("capped campaign {capped}: {seen} ads of 9 answers");
    assert_eq!(seen, 2, "a frequency cap of 2 across three replicas");
}

/// The free tier's daily budget holds across replicas: 30 concurrent free requests
/// over three replicas against a budget that fits about four claims.
#[tokio::test]
async fn inproc_replicas_share_the_free_tier_budget() {
    let fleet = fleet_with(3, REDIS, |c| {
        c.free_tier_daily_budget = 0.003;
        c.ads_enabled = false;
    })
    .await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    fleet[0].add_provider(&mock, "mock-model", None, &["standard"]).await;
    let key = fleet[0].create_key("free").await;
    wait_routable(&fleet, &key).await;
    let body = json!({"model": "mock-model", "messages": [{"role": "user", "content": "[slow] hi"}], "max_tokens": 100});
    let statuses = join_all((0..30).map(|i| {
        let (gw, key, body) = (&fleet[i % 3], key.clone(), body.clone());
        async move { gw.chat(&key, body).await.status().as_u16() }
    }))
    .await;
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert!(served > 0 && statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    let spent: i64 = sqlx::query_scalar("SELECT CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT) FROM usage_records WHERE payer = 'ad_revenue'")
        .fetch_one(&fleet[0].state.store.pool)
        .await
        .unwrap();
    eprintln!("free tier: served {served} of 30, spent {spent} µUSD of a 3000 µUSD day");
    assert!(spent <= 3_000);
    // Claims of about 700 µUSD overlap: four fit fleet-wide (about four per replica
    // when each counted alone).
    assert!(served <= 4, "{served} free requests ran at once against a budget that fits four");
}

/// Active health checks go out once per provider per period across the fleet: three
/// replicas checking every second send a provider about one check a second, not three.
#[tokio::test]
async fn inproc_replicas_check_a_provider_once_per_period() {
    let fleet = fleet_with(3, REDIS, |c| {
        c.health_check_secs = 1;
    })
    .await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    fleet[0].add_provider(&mock, "mock-model", None, &["standard"]).await;
    let key = fleet[0].create_key("premium").await;
    wait_routable(&fleet, &key).await;
    let from = mock.health_checks.load(std::sync::atomic::Ordering::Relaxed);
    let window = Duration::from_secs(6);
    tokio::time::sleep(window).await;
    let checks = mock.health_checks.load(std::sync::atomic::Ordering::Relaxed) - from;
    eprintln!("{checks} health checks in {} s from 3 replicas checking every second", window.as_secs());
    // One a second (+1 for a period boundary); alone, each replica would send six.
    assert!((5..=8).contains(&checks), "{checks} checks in 6 s");
}
