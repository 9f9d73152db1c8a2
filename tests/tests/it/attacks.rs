//! The marketplace against its own participants: what a provider, a free user or a
//! thief with a provider key could take before these safeguards, each shown from the
//! client's side with a clean ledger afterwards. (`bounds.rs` holds the stream bounds,
//! the egress rules and the WebSocket limits.)

use std::time::Duration;

use serde_json::{json, Value};
use tests::{spawn_mock, MockConfig};

use crate::ads::{ad_campaign, wait_impressions, TECH_QUESTION};
use crate::inproc::{Gateway, ADMIN};

fn ask(max_tokens: u32) -> Value {
    json!({"model": "mock-model", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hello there"}]})
}

/// Registers `mock` at `per_token` USD, on line at `standard`; with `admin`, registered
/// by an admin (trusted at once). Returns the provider id.
async fn register(gw: &Gateway, mock: &tests::MockProvider, per_token: f64, admin: bool) -> String {
    let mut req = gw.http.post(gw.url("/api/gpu/register")).json(&json!({
        "capabilities": {"models": ["mock-model"], "maxConcurrentStreams": 64},
        "pricing": {"perToken": per_token}, "baseUrl": mock.url()}));
    if admin {
        req = req.bearer_auth(ADMIN);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    assert!(v["relaySecret"].as_str().unwrap().starts_with("rs-"), "{v}");
    let id = v["providerId"].as_str().unwrap().to_owned();
    let r = gw.http.post(gw.url("/api/gpu/stream/start")).bearer_auth(v["providerKey"].as_str().unwrap())
        .json(&json!({"providerId": id, "model": "mock-model", "quality": "standard"})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    id
}

async fn admin_provider(gw: &Gateway, id: &str) -> Value {
    let v: Value = gw.http.get(gw.url("/api/admin/providers")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    v["data"].as_array().unwrap().iter().find(|p| p["id"] == id).cloned().unwrap()
}

/// A dear provider that is eligible but not chosen (its breaker is open) no longer
/// prices a paying user's hold: the hold is taken at the provider actually chosen.
/// Before, the user below got 429 `insufficient_quota` although the cheap provider
/// would have cost them a fraction of a cent.
#[tokio::test]
async fn inproc_attack_a_dear_provider_does_not_price_everyones_holds() {
    let gw = Gateway::start_with(|c| {
        c.health_check_secs = 0;
        c.breaker_cooldown_ms = 60_000;
    })
    .await;
    let dear = spawn_mock(MockConfig { fail_status: Some(500), ..MockConfig::default() }).await.unwrap();
    register(&gw, &dear, 0.0009, true).await;
    // Its failures open its breaker: it stays eligible but is not picked.
    let rich = gw.create_key("premium").await;
    for _ in 0..3 {
        assert_eq!(gw.chat(&rich, ask(50)).await.status(), 502);
    }
    let cheap = spawn_mock(MockConfig::default()).await.unwrap();
    register(&gw, &cheap, 0.000002, true).await;
    // 10,000 µUSD covers the cheap provider's hold (~0.6 ¢) but not the dear one's (~$0.2).
    let (key, user) = gw.create_unfunded_key("premium").await;
    gw.credit(&user, 10_000).await;
    let r = gw.chat(&key, ask(100)).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(cheap.request_count(), 1);
    gw.ledger_is_clean().await;
}

/// A failover to a dearer provider is held again at its price; every hold is closed
/// afterwards and each request paid once.
#[tokio::test]
async fn inproc_attack_a_failover_to_a_dearer_provider_is_held_again() {
    let gw = Gateway::start_with(|c| {
        c.health_check_secs = 0;
        c.breaker_failures = 1_000;
    })
    .await;
    let failing = spawn_mock(MockConfig { fail_status: Some(500), ..MockConfig::default() }).await.unwrap();
    register(&gw, &failing, 0.000001, true).await;
    let dear = spawn_mock(MockConfig::default()).await.unwrap();
    register(&gw, &dear, 0.0005, true).await;
    let key = gw.create_key("premium").await;
    for _ in 0..6 {
        let r = gw.chat(&key, ask(50)).await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(dear.request_count(), 6);
    let open: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM holds WHERE status = 'held'").fetch_one(&gw.state.store.pool).await.unwrap();
    assert_eq!(open, 0);
    if let Some(book) = &gw.state.store.book {
        assert_eq!(book.open(), 0);
    }
    gw.ledger_is_clean().await;
}

/// Free keys cost the platform at most `free_tier_daily_budget` a day: once it is
/// claimed, free requests get 429 `insufficient_quota` saying so, paying users are
/// served, and `ledger check`'s budget report is clean. 0 turns the free tier off.
#[tokio::test]
async fn inproc_attack_free_keys_cannot_drain_ad_revenue() {
    let gw = Gateway::start_with(|c| {
        c.free_tier_daily_budget = 0.002;
        c.free_requests_per_minute = 1_000;
    })
    .await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    register(&gw, &mock, 0.000004, true).await;
    let free = gw.create_key("free").await;
    let mut served = 0;
    let mut refusal = None;
    for _ in 0..60 {
        let r = gw.chat(&free, ask(200)).await;
        if r.status() == 200 {
            served += 1;
            continue;
        }
        assert_eq!(r.status(), 429);
        refusal = Some(r.json::<Value>().await.unwrap());
        break;
    }
    let refusal = refusal.expect("the budget ran out");
    assert!(served >= 1, "the budget admits some free requests");
    assert_eq!(refusal["error"]["type"], "insufficient_quota");
    assert_eq!(refusal["error"]["code"], "free_tier_budget_exhausted");
    assert!(refusal["error"]["message"].as_str().unwrap().contains("free-tier budget"), "{refusal}");
    let spent: i64 = sqlx::query_scalar("SELECT CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT) FROM usage_records WHERE payer = 'ad_revenue'")
        .fetch_one(&gw.state.store.pool)
        .await
        .unwrap();
    assert!(spent > 0 && spent <= 2_000, "free requests cost {spent} µUSD of a 2,000 µUSD budget");
    // A paying user is not affected.
    let premium = gw.create_key("premium").await;
    assert_eq!(gw.chat(&premium, ask(200)).await.status(), 200);
    gw.ledger_is_clean().await;
    assert!(gateway::money::free_budget::days_over(&gw.state.store, 2_000).await.unwrap().is_empty());
    // The report names a day whose free cost went past a (lower) budget.
    assert_eq!(gateway::money::free_budget::days_over(&gw.state.store, spent - 1).await.unwrap().len(), 1);

    let off = Gateway::start_with(|c| c.free_tier_daily_budget = 0.0).await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    register(&off, &mock, 0.000004, true).await;
    let free = off.create_key("free").await;
    let r = off.chat(&free, ask(10)).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("free tier is off"), "{v}");
    assert_eq!(mock.request_count(), 0);
    assert!(off.usage_rows().await.is_empty(), "a refused request leaves no usage row");
    off.ledger_is_clean().await;
}

/// A provider that registers itself is on probation: beside a trusted provider it gets
/// at most `probation_max_share` of the model's requests; alone it serves; after
/// `probation_requests` good requests it is trusted. An admin's registration skips it.
#[tokio::test]
async fn inproc_attack_new_providers_serve_a_bounded_share_on_probation() {
    let gw = Gateway::start_with(|c| {
        c.probation_requests = 50;
        c.probation_max_share = 0.1;
    })
    .await;
    let key = gw.create_key("premium").await;
    let newcomer = spawn_mock(MockConfig::default()).await.unwrap();
    let id = register(&gw, &newcomer, 0.000002, false).await;
    assert_eq!(admin_provider(&gw, &id).await["probationRemaining"], 50);
    let trusted = spawn_mock(MockConfig::default()).await.unwrap();
    let trusted_id = register(&gw, &trusted, 0.000002, true).await;
    assert_eq!(admin_provider(&gw, &trusted_id).await["probationRemaining"], 0);
    for _ in 0..30 {
        assert_eq!(gw.chat(&key, ask(20)).await.status(), 200);
    }
    assert!(newcomer.request_count() <= 3, "probation share: {} of 30", newcomer.request_count());
    assert_eq!(newcomer.request_count() + trusted.request_count(), 30);

    // Alone, a provider on probation serves every request, and graduates.
    let gw = Gateway::start_with(|c| c.probation_requests = 3).await;
    let alone = spawn_mock(MockConfig::default()).await.unwrap();
    let id = register(&gw, &alone, 0.000002, false).await;
    let key = gw.create_key("premium").await;
    for _ in 0..3 {
        assert_eq!(gw.chat(&key, ask(20)).await.status(), 200);
    }
    let mut left = Value::Null;
    for _ in 0..100 {
        gw.state.registry.reload().await.unwrap();
        left = admin_provider(&gw, &id).await["probationRemaining"].clone();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(left, 0, "three good requests end a probation of three");
    gw.ledger_is_clean().await;
}

/// A thief with a provider key cannot redirect its earnings at once: a changed payout
/// method takes effect after `payout_method_delay_secs`, and a withdrawal cannot name
/// another method meanwhile.
#[tokio::test]
async fn inproc_attack_a_stolen_provider_key_cannot_redirect_payouts_at_once() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let (id, key) = gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let set = |email: &str| {
        gw.http.put(gw.url("/api/payment/method")).bearer_auth(&key)
            .json(&json!({"providerId": id, "method": {"type": "paypal", "email": email}})).send()
    };
    let now = gateway::store::now_ms();
    let first: Value = set("owner@example.com").await.unwrap().json().await.unwrap();
    assert!(first["effectiveAt"].as_i64().unwrap() <= now + 5_000, "a first method applies at once: {first}");
    let changed: Value = set("thief@example.com").await.unwrap().json().await.unwrap();
    assert!(changed["effectiveAt"].as_i64().unwrap() >= now + 86_000_000, "a change waits a day: {changed}");
    let r = gw.http.post(gw.url("/api/payment/withdraw")).bearer_auth(&key)
        .json(&json!({"providerId": id, "amount": 50, "method": {"type": "paypal", "email": "thief@example.com"}}))
        .send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "method", "{v}");
    gw.ledger_is_clean().await;
}

/// A provider stored with an inside address (under a config that allowed it) is taken
/// off line when the gateway starts with the egress rules on, with the reason shown.
#[tokio::test]
async fn inproc_attack_stored_inside_addresses_are_taken_off_line_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::inproc::fresh_database(&dir).await.0;
    let first = Gateway::start_on(url.clone(), tempfile::tempdir().unwrap(), |_| {}).await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let (id, _) = first.add_provider(&mock, "mock-model", None, &["standard"]).await;
    drop(first);
    let gw = Gateway::start_on(url, dir, |c| c.allow_private_providers = false).await;
    let p = admin_provider(&gw, &id).await;
    assert_eq!(p["status"], "pending", "{p}");
    assert_eq!(p["online"], false);
    assert!(p["statusReason"].as_str().unwrap().contains("baseUrl refused at start-up"), "{p}");
    let key = gw.create_key("premium").await;
    assert_ne!(gw.chat(&key, ask(10)).await.status(), 200);
    assert_eq!(mock.request_count(), 0);
    // An admin cannot put it back on line while its address breaks the rules.
    let r = gw.admin_post(&format!("/api/admin/providers/{id}/approve"), json!({})).await;
    assert_eq!(r.status(), 400);
    gw.ledger_is_clean().await;
}

/// Colluding providers cannot link a user: each provider sees its own pseudonym for
/// the same account (and always the same one).
#[tokio::test]
async fn inproc_attack_providers_see_different_pseudonyms_for_one_user() {
    let gw = Gateway::start().await;
    let a = spawn_mock(MockConfig { models: vec!["model-a".into()], ..MockConfig::default() }).await.unwrap();
    let b = spawn_mock(MockConfig { models: vec!["model-b".into()], ..MockConfig::default() }).await.unwrap();
    gw.add_provider(&a, "model-a", None, &["standard"]).await;
    gw.add_provider(&b, "model-b", None, &["standard"]).await;
    let key = gw.create_key("premium").await;
    for model in ["model-a", "model-b", "model-a", "model-b"] {
        let r = gw.chat(&key, json!({"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})).await;
        assert_eq!(r.status(), 200);
    }
    let users = |m: &tests::MockProvider| -> Vec<String> {
        m.bodies.lock().iter().map(|b| b["user"].as_str().unwrap().to_owned()).collect()
    };
    let (ua, ub) = (users(&a), users(&b));
    assert_eq!((ua.len(), ub.len()), (2, 2));
    assert!(ua[0] == ua[1] && ub[0] == ub[1], "stable per provider: {ua:?} {ub:?}");
    assert_ne!(ua[0], ub[0], "different per provider");
    assert!(ua[0].starts_with("u_") && ua[0].len() == ub[0].len());
}

/// `/api/llm/inference` and the WebSocket follow the ad rules of `/v1/*`: a free
/// answer carries the labelled ad (in the body, and as a `stream:ad` event).
#[tokio::test]
async fn inproc_attack_every_door_carries_the_free_tiers_ad() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    ad_campaign(&gw, 5_000_000, json!({})).await;
    let free = gw.create_key("free").await;
    let r = gw.http.post(gw.url("/api/llm/inference")).bearer_auth(&free)
        .json(&json!({"model": "mock-model", "prompt": TECH_QUESTION})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["ad"]["label"], "Sponsored", "{v}");
    assert!(v["result"].as_str().unwrap().contains("[Sponsored]"), "{v}");
    wait_impressions(&gw, 1).await;

    let ws_url = format!("{}/api/llm/ws?api_key={free}", gw.url("").replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    let next = |m: Message| -> Value { serde_json::from_str(m.to_text().unwrap()).unwrap() };
    assert_eq!(next(ws.next().await.unwrap().unwrap())["event"], "connected");
    ws.send(Message::Text(json!({"id": 1, "prompt": TECH_QUESTION, "model": "mock-model"}).to_string().into())).await.unwrap();
    let mut events = Vec::new();
    loop {
        let v = next(ws.next().await.unwrap().unwrap());
        let name = v["event"].as_str().unwrap().to_owned();
        if name == "stream:ad" {
            assert_eq!(v["data"]["ad"]["label"], "Sponsored", "{v}");
        }
        if name == "stream:end" {
            assert_eq!(v["data"]["ad"]["label"], "Sponsored", "{v}");
        }
        let done = name == "stream:end" || name == "error";
        events.push(name);
        if done {
            break;
        }
    }
    assert_eq!(events.iter().rev().take(2).collect::<Vec<_>>(), ["stream:end", "stream:ad"], "{events:?}");
    wait_impressions(&gw, 2).await;
    // A premium key's answer carries none.
    let premium = gw.create_key("premium").await;
    let v: Value = gw.http.post(gw.url("/api/llm/inference")).bearer_auth(&premium)
        .json(&json!({"model": "mock-model", "prompt": TECH_QUESTION})).send().await.unwrap().json().await.unwrap();
    assert!(v.get("ad").is_none(), "{v}");
    gw.ledger_is_clean().await;
}

/// A body trickled in slower than `body_read_timeout_secs` gets a 408 in the OpenAI
/// shape instead of holding a connection and a task for as long as the client likes.
#[tokio::test]
async fn inproc_attack_a_trickled_body_times_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let gw = Gateway::start_with(|c| c.body_read_timeout_secs = 1).await;
    let key = gw.create_key("premium").await;
    let addr = gw.url("").trim_start_matches("http://").to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = String::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = tcp.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            answer.push_str(&String::from_utf8_lossy(&buf[..n]));
            if answer.contains("request_timeout") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the gateway answered within 10 s");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
}

/// One address cannot hold every connection: past `max_connections_per_ip` new
/// connections from it are closed at once, and served again when others end.
#[tokio::test]
async fn inproc_attack_connections_per_ip_are_capped() {
    let gw = Gateway::start_with(|c| c.max_connections_per_ip = 4).await;
    let addr = gw.url("").trim_start_matches("http://").to_owned();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    // Give the accept loop time to count them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = gw.http.get(gw.url("/health")).send().await;
    assert!(r.is_err(), "a fifth connection is refused");
    drop(held);
    let mut ok = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if reqwest::Client::new().get(gw.url("/health")).send().await.is_ok_and(|r| r.status() == 200) {
            ok = true;
            break;
        }
    }
    assert!(ok, "served again once the others closed");
}

/// With Redis, a key revoked on one replica stops working on another within a second
/// (before, the other kept it for `key_cache_ttl_secs`).
#[tokio::test]
async fn inproc_attack_a_revoked_key_dies_on_every_replica_within_a_second() {
    let redis = "redis://127.0.0.1:6379".to_owned();
    let dir = tempfile::tempdir().unwrap();
    let url = crate::inproc::fresh_database(&dir).await.0;
    let tweak = |c: &mut gateway::ops::config::Config| {
        c.redis_url = Some(redis.clone());
        c.key_cache_ttl_secs = 300;
    };
    let one = Gateway::start_on(url.clone(), dir, tweak).await;
    let two = Gateway::start_on(url, tempfile::tempdir().unwrap(), tweak).await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    one.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let v: Value = one.admin_post("/api/admin/keys", json!({"name": "r", "tier": "premium"})).await.json().await.unwrap();
    let (key, key_id) = (v["key"].as_str().unwrap().to_owned(), v["id"].as_str().unwrap().to_owned());
    // Replica two caches the key.
    let models = |gw: &Gateway| gw.http.get(gw.url("/v1/models")).bearer_auth(&key).send();
    assert_eq!(models(&two).await.unwrap().status(), 200);
    let r = one.admin_post(&format!("/api/admin/keys/{key_id}/revoke"), json!({})).await;
    assert_eq!(r.status(), 200);
    let revoked = std::time::Instant::now();
    let mut status = 200;
    while revoked.elapsed() < Duration::from_secs(1) {
        status = models(&two).await.unwrap().status().as_u16();
        if status == 401 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 401, "replica two refused the revoked key within 1 s");
}

/// A provider that answers with a redirect (to an inside address, say) is not followed:
/// the redirect target never sees the call, and the client gets a provider error.
#[tokio::test]
async fn inproc_attack_a_provider_redirect_is_not_followed() {
    use axum::http::{header, StatusCode};

    let gw = Gateway::start().await;
    let inside = spawn_mock(MockConfig::default()).await.unwrap();
    let target = format!("{}/v1/chat/completions", inside.url());
    let app = axum::Router::new().fallback(move || {
        let target = target.clone();
        async move { (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, target)]) }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redirector = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let r = gw.http.post(gw.url("/api/gpu/register")).json(&json!({
        "capabilities": {"models": ["mock-model"], "maxConcurrentStreams": 8},
        "pricing": {"perToken": 0.000002}, "baseUrl": redirector})).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    let id = v["providerId"].as_str().unwrap();
    let r = gw.http.post(gw.url("/api/gpu/stream/start")).bearer_auth(v["providerKey"].as_str().unwrap())
        .json(&json!({"providerId": id, "model": "mock-model", "quality": "standard"})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let key = gw.create_key("premium").await;
    let r = gw.chat(&key, ask(10)).await;
    assert_eq!(r.status(), 502, "{}", r.text().await.unwrap());
    assert_eq!(inside.request_count(), 0, "the redirect was not followed");
    gw.ledger_is_clean().await;
}
