//! Money through the gateway: charges and holds in the ledger, the free tier, spending
//! limits, volume discounts, payouts and their webhook, top-ups, reservations, history
//! and analytics.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use gateway::ops::config::Secret;
use serde_json::{json, Value};
use sqlx::Row;
use tests::{spawn_mock, MockConfig, MockProvider};

use crate::inproc::*;

/// Mock pricing: $0.000002 per token = 2 µUSD; "hi" is 1 prompt token + 6 completion.
pub(crate) const HI_COST: i64 = 14;

#[tokio::test]
async fn inproc_ledger_paying_user_is_charged_exactly_once() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let (provider, _) = gw.add_provider(&mock, "mock-model", None, &["standard", "low", "ultra"]).await;
    let (key, uid) = gw.create_unfunded_key("premium").await;
    // No credit: refused before any provider is called.
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi")})).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-should-retry"], "false");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "insufficient_quota");
    assert_eq!(v["error"]["type"], "insufficient_quota");
    assert_eq!(mock.request_count(), 0);
    let v = gw.credit(&uid, 1_000_000).await;
    assert_eq!(v["balanceMicros"], 1_000_000);
    // Non-stream: usage.cost in USD, balance down by exactly that.
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi")})).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["total_tokens"], 7);
    assert!((v["usage"]["cost"].as_f64().unwrap() - HI_COST as f64 / 1e6).abs() < 1e-12, "{v}");
    let account = format!("user:{uid}");
    assert_eq!(gw.balance(&account).await, 1_000_000 - HI_COST, "durable before the response");
    // Stream: the usage chunk carries the cost too.
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "stream": true, "stream_options": {"include_usage": true}})).await;
    let events = sse_events(&r.text().await.unwrap());
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!((usage["usage"]["cost"].as_f64().unwrap() - HI_COST as f64 / 1e6).abs() < 1e-12);
    assert_eq!(gw.balance(&account).await, 1_000_000 - 2 * HI_COST, "settled before [DONE]");
    // Tiers: low is 0.8×, ultra 2.0×.
    gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "quality": "low"})).await;
    assert_eq!(gw.balance(&account).await, 1_000_000 - 2 * HI_COST - 12, "0.8 × 14 = 11.2 → 12 (rounded up)");
    gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "quality": "ultra"})).await;
    let spent = 2 * HI_COST + 12 + 28;
    assert_eq!(gw.balance(&account).await, 1_000_000 - spent);
    // The provider earns the charge less the 10% platform fee (rounded down per request).
    let fees = 1 + 1 + 1 + 2;
    assert_eq!(gw.balance(&format!("provider:{provider}")).await, spent - fees);
    assert_eq!(gw.balance("platform:fees").await, fees);
    // Held funds as the ledger sees them: rows on PostgreSQL, the hold book on SQLite.
    assert_eq!(gw.state.ledger.balance(&account).await.unwrap().held, 0, "every hold was released");
    // The provider sees its balance with its own key.
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_ledger_free_tier_is_paid_from_ad_revenue() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let (provider, pkey) = gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let key = gw.create_key("free").await;
    for _ in 0..3 {
        assert_eq!(gw.chat(&key, json!({"model": "mock-model", "messages": user("hi")})).await.status(), 200);
    }
    assert_eq!(gw.balance("platform:ad_revenue").await, -3 * HI_COST);
    assert_eq!(gw.balance(&format!("provider:{provider}")).await, 3 * (HI_COST - 1));
    let r = gw.http.get(gw.url(&format!("/api/payment/balance/{provider}"))).bearer_auth(&pkey).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["balanceMicros"], 3 * (HI_COST - 1));
    let r = gw.http.get(gw.url(&format!("/api/payment/balance/{provider}"))).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 401, "a user key cannot read a provider's balance");
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_ledger_concurrent_requests_never_overspend() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider_with(&mock, "mock-model", None, &["standard"], 1_000).await;
    let body = json!({"model": "mock-model", "messages": user("[idle]"), "max_tokens": 10, "stream": true});
    // Learn the hold one such request takes (another user, same body size)...
    let (probe_key, probe_user) = gw.create_unfunded_key("premium").await;
    gw.credit(&probe_user, 1_000_000).await;
    let probe = gw.chat(&probe_key, body.clone()).await;
    assert_eq!(probe.status(), 200);
    let hold = gw.state.ledger.balance(&format!("user:{probe_user}")).await.unwrap().held;
    assert!(hold > 0, "the open stream holds funds");
    if let Some(book) = &gw.state.store.book {
        // SQLite: request holds live in memory; the request path wrote no hold row.
        assert_eq!(book.open(), 1);
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM holds").fetch_one(&gw.state.store.pool).await.unwrap();
        assert_eq!(rows, 0);
    }
    drop(probe);
    // ...then fund exactly 100 of them.
    let (key, uid) = gw.create_unfunded_key("premium").await;
    let account = format!("user:{uid}");
    gw.credit(&uid, 100 * hold).await;
    let mut handles = Vec::new();
    for _ in 0..200 {
        let (http, url, key, body) = (gw.http.clone(), gw.url("/v1/chat/completions"), key.clone(), body.clone());
        handles.push(tokio::spawn(async move { http.post(url).bearer_auth(key).json(&body).send().await.unwrap() }));
    }
    let mut open = Vec::new();
    let mut refused = 0;
    for h in handles {
        let r = h.await.unwrap();
        match r.status().as_u16() {
            200 => open.push(r),
            429 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(open.len(), 100, "exactly the funded number run at once");
    assert_eq!(refused, 100);
    drop(open);
    wait_until_no_holds(&gw, &account).await;
    let after = gw.balance(&account).await;
    assert!(after >= 0 && after < 100 * hold, "delivered tokens were billed: {after}");
    gw.ledger_is_clean().await;
}

pub(crate) async fn wait_until_no_holds(gw: &Gateway, account: &str) {
    for _ in 0..300 {
        if gw.state.ledger.balance(account).await.unwrap().held == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("holds were not released");
}

#[tokio::test]
async fn inproc_ledger_cut_streams_bill_delivered_tokens() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let (provider, _) = gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let (key, uid) = gw.create_unfunded_key("premium").await;
    gw.credit(&uid, 1_000_000).await;
    let account = format!("user:{uid}");
    // The client leaves after the first token.
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("[idle]"), "stream": true})).await;
    let mut body = r.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    wait_until_no_holds(&gw, &account).await;
    // The provider dies after two tokens.
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("[fail-mid]"), "stream": true})).await;
    assert!(r.text().await.unwrap().contains("\"error\""));
    wait_until_no_holds(&gw, &account).await;
    let state = gw.state.clone();
    let rows: Vec<(String, i64, i64, String)> = sqlx::query("SELECT status, completion_tokens, cost_micros, usage_source FROM usage_records ORDER BY created_at")
        .fetch_all(&state.store.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("status"), r.get("completion_tokens"), r.get("cost_micros"), r.get("usage_source")))
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!((rows[0].0.as_str(), rows[0].1), ("client_disconnected", 1));
    assert_eq!((rows[1].0.as_str(), rows[1].1), ("provider_failed", 2));
    assert!(rows.iter().all(|r| r.2 > 0 && r.3 == "gateway"), "billed on our own count: {rows:?}");
    let charged: i64 = rows.iter().map(|r| r.2).sum();
    assert_eq!(gw.balance(&account).await, 1_000_000 - charged, "exactly the delivered tokens");
    assert!(gw.balance(&format!("provider:{provider}")).await > 0);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_ledger_admin_credit_validation() {
    let gw = Gateway::start().await;
    let (_, uid) = gw.create_unfunded_key("premium").await;
    for (body, status) in [
        (json!({"amount": -5}), 400),
        (json!({}), 400),
        (json!({"amount": "ten"}), 400),
        (json!({"amount": 12.5}), 200),
    ] {
        let r = gw.admin_post(&format!("/api/admin/users/{uid}/credit"), body.clone()).await;
        assert_eq!(r.status(), status, "{body}");
    }
    let r = gw.admin_post("/api/admin/users/user_nope/credit", json!({"amount": 1})).await;
    assert_eq!(r.status(), 404);
    let v: Value = gw.http.get(gw.url(&format!("/api/admin/users/{uid}/balance"))).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["balanceMicros"], 12_500_000);
    assert_eq!(v["balance"], 12.5);
    gw.ledger_is_clean().await;
}

/// A provider with `usd` of earnings (posted as an adjustment from outside).
pub(crate) async fn provider_with_earnings(gw: &Gateway, usd: i64) -> (String, String) {
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let (id, key) = gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    gw.state.ledger.credit(&format!("provider:{id}"), usd * 1_000_000, "adjustment", "test earnings").await.unwrap();
    (id, key)
}

/// A suspended provider's balance is frozen, not lost: no withdrawal and no automatic
/// payout until an admin approves it again.
#[tokio::test]
async fn inproc_payouts_a_suspended_provider_cannot_withdraw() {
    let gw = Gateway::start().await;
    let (id, pkey) = provider_with_earnings(&gw, 40).await;
    let r = gw.http.put(gw.url("/api/payment/method")).bearer_auth(&pkey)
        .json(&json!({"providerId": id, "method": {"type": "paypal", "email": "gpu@example.com"}})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = gw.admin_post(&format!("/api/admin/providers/{id}/suspend"), json!({})).await;
    assert_eq!(r.status(), 200);
    let withdraw = || gw.http.post(gw.url("/api/payment/withdraw")).bearer_auth(&pkey).json(&json!({"providerId": id, "amount": 10.0})).send();
    let r = withdraw().await.unwrap();
    assert_eq!(r.status(), 403);
    let e: Value = r.json().await.unwrap();
    assert!(e["error"]["message"].as_str().unwrap().contains("frozen"), "{e}");
    let r = gw.admin_post("/api/admin/payouts/auto", json!({})).await;
    assert_eq!(r.status(), 200);
    let made: Value = r.json().await.unwrap();
    assert!(!made.to_string().contains(&id), "no automatic payout for a suspended provider: {made}");
    assert_eq!(gw.balance(&format!("provider:{id}")).await, 40_000_000, "the balance is kept");
    let r = gw.admin_post(&format!("/api/admin/providers/{id}/approve"), json!({})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(withdraw().await.unwrap().status(), 201);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_payouts_withdraw_idempotent_state_machine() {
    let gw = Gateway::start().await;
    let (id, pkey) = provider_with_earnings(&gw, 20).await;
    let account = format!("provider:{id}");
    let post = |path: &str, body: Value, idem: Option<&str>| {
        let mut req = gw.http.post(gw.url(path)).bearer_auth(&pkey).json(&body);
        if let Some(k) = idem {
            req = req.header("idempotency-key", k);
        }
        req.send()
    };
    // A payout method first; bad details are refused.
    let r = gw.http.put(gw.url("/api/payment/method")).bearer_auth(&pkey)
        .json(&json!({"providerId": id, "method": {"type": "paypal", "email": "nope"}})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = gw.http.put(gw.url("/api/payment/method")).bearer_auth(&pkey)
        .json(&json!({"providerId": id, "method": {"type": "paypal", "email": "gpu@example.com"}})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = post("/api/payment/withdraw", json!({"providerId": id, "amount": 3.0}), None).await.unwrap();
    assert_eq!(r.status(), 400, "below the 5.00 minimum");
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], "amount");
    let r = post("/api/payment/withdraw", json!({"providerId": id, "amount": 10.0}), Some("k1")).await.unwrap();
    assert_eq!(r.status(), 201);
    let first: Value = r.json().await.unwrap();
    assert_eq!(first["status"], "requested");
    assert_eq!(first["fee"], 0.25, "2.5% processing fee");
    assert_eq!(first["net"], 9.75);
    let again: Value = post("/api/payment/withdraw", json!({"providerId": id, "amount": 10.0}), Some("k1")).await.unwrap().json().await.unwrap();
    assert_eq!(again["id"], first["id"], "same key, same result");
    let r = post("/api/payment/withdraw", json!({"providerId": id, "amount": 11.0}), Some("k1")).await.unwrap();
    assert_eq!(r.status(), 409, "same key, different body");
    assert_eq!(gw.balance(&account).await, 10_000_000, "paid out once");
    let r = post("/api/payment/withdraw", json!({"providerId": id, "amount": 10.01}), None).await.unwrap();
    assert_eq!(r.status(), 400, "more than available");
    // Another provider's key cannot withdraw from this one.
    let (_, other_key) = provider_with_earnings(&gw, 1).await;
    let r = gw.http.post(gw.url("/api/payment/withdraw")).bearer_auth(&other_key).json(&json!({"providerId": id, "amount": 5.0})).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // requested → processing → paid; paid is final.
    let wid = first["id"].as_str().unwrap();
    for (action, status) in [("processing", 200), ("paid", 200), ("failed", 409)] {
        let r = gw.admin_post(&format!("/api/admin/payouts/{wid}/{action}"), json!({})).await;
        assert_eq!(r.status(), status, "{action}");
    }
    assert_eq!(gw.balance("platform:payouts").await, 0);
    assert_eq!(gw.balance("platform:fees").await, 250_000);
    // A failed withdrawal returns the funds.
    let w: Value = post("/api/payment/withdraw", json!({"providerId": id, "amount": 6.0}), Some("k2")).await.unwrap().json().await.unwrap();
    assert_eq!(gw.balance(&account).await, 4_000_000);
    let r = gw.admin_post(&format!("/api/admin/payouts/{}/failed", w["id"].as_str().unwrap()), json!({"reason": "bank said no"})).await;
    assert_eq!(r.json::<Value>().await.unwrap()["failureReason"], "bank said no");
    assert_eq!(gw.balance(&account).await, 10_000_000);
    // Concurrent retries of one request pay once.
    let mut handles = Vec::new();
    for _ in 0..10 {
        let (http, url, pkey, id) = (gw.http.clone(), gw.url("/api/payment/withdraw"), pkey.clone(), id.clone());
        handles.push(tokio::spawn(async move {
            http.post(url).bearer_auth(pkey).header("idempotency-key", "k3").json(&json!({"providerId": id, "amount": 5.0})).send().await.unwrap().json::<Value>().await.unwrap()
        }));
    }
    let mut ids = Vec::new();
    for h in handles {
        ids.push(h.await.unwrap()["id"].clone());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(gw.balance(&account).await, 5_000_000);
    let list: Value = gw.http.get(gw.url(&format!("/api/payment/withdrawals/{id}"))).bearer_auth(&pkey).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 3);
    let pending: Value = gw.http.get(gw.url("/api/admin/payouts?status=requested")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(pending["data"].as_array().unwrap().len(), 1);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_payout_settings_and_auto_payouts() {
    let gw = Gateway::start().await;
    let v: Value = gw.http.get(gw.url("/api/admin/settings")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(v, json!({"minimumWithdrawal": 5.0, "autoPayoutThreshold": 25.0, "processingFee": 2.5}));
    let patch = |body: Value| gw.http.patch(gw.url("/api/admin/settings")).bearer_auth(ADMIN).json(&body).send();
    assert_eq!(patch(json!({"processingFee": 90})).await.unwrap().status(), 400);
    assert_eq!(patch(json!({"minimumWithdrawl": 1})).await.unwrap().status(), 400, "unknown setting");
    let v: Value = patch(json!({"autoPayoutThreshold": 30, "processingFee": 1})).await.unwrap().json().await.unwrap();
    assert_eq!(v["autoPayoutThreshold"], 30.0);
    let (rich, rich_key) = provider_with_earnings(&gw, 40).await;
    let (_poor, poor_key) = provider_with_earnings(&gw, 20).await;
    for (id, key) in [(&rich, &rich_key), (&_poor, &poor_key)] {
        gw.http.put(gw.url("/api/payment/method")).bearer_auth(key)
            .json(&json!({"providerId": id, "method": {"type": "crypto", "address": "bc1qxy2kgdygjrsqtzq2n0yrf2493p83kkfjhx0wlh"}})).send().await.unwrap();
    }
    let made: Value = gw.admin_post("/api/admin/payouts/auto", json!({})).await.json().await.unwrap();
    let made = made["data"].as_array().unwrap();
    assert_eq!(made.len(), 1, "only the provider above the threshold");
    assert_eq!(made[0]["providerId"], rich.as_str());
    assert_eq!(made[0]["amount"], 40.0);
    assert_eq!(made[0]["fee"], 0.4);
    assert_eq!(made[0]["automatic"], true);
    let again: Value = gw.admin_post("/api/admin/payouts/auto", json!({})).await.json().await.unwrap();
    assert_eq!(again["data"], json!([]), "no second payout while one is open");
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_topup_webhook_is_signed_and_applied_once() {
    use hmac::{Hmac, Mac};
    let gw = Gateway::start_with(|c| c.topup_webhook_secret = Some(Secret::new("whsec-test"))).await;
    let (_, uid) = gw.create_unfunded_key("premium").await;
    let body = json!({"eventId": "evt_1", "userId": uid, "amount": 25.0}).to_string();
    let sign = |b: &str| {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"whsec-test").unwrap();
        mac.update(b.as_bytes());
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    };
    let send = |sig: String| gw.http.post(gw.url("/api/payment/topup")).header("content-type", "application/json").header("x-signature", sig).body(body.clone()).send();
    assert_eq!(send("sha256=00".into()).await.unwrap().status(), 401);
    let v: Value = send(sign(&body)).await.unwrap().json().await.unwrap();
    assert_eq!(v["applied"], true);
    let v: Value = send(sign(&body)).await.unwrap().json().await.unwrap();
    assert_eq!(v["applied"], false, "a retried event applies once");
    assert_eq!(gw.balance(&format!("user:{uid}")).await, 25_000_000);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_history_and_analytics() {
    let (gw, _mock, key) = setup().await;
    let free = gw.create_key("free").await;
    for k in [&key, &key, &key, &free] {
        assert_eq!(gw.chat(k, json!({"model": "mock-model", "messages": user("hi")})).await.status(), 200);
    }
    gw.chat(&key, json!({"model": "mock-model", "messages": user("[fail-mid]")})).await;
    let keys: Value = gw.http.get(gw.url("/api/admin/keys")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    let uid = keys["data"].as_array().unwrap().iter().find(|k| k["tier"] == "premium").unwrap()["userId"].as_str().unwrap().to_owned();
    // The failed request is settled without anyone waiting for it.
    wait_until_no_holds(&gw, &format!("user:{uid}")).await;
    let page: Value = gw.http.get(gw.url(&format!("/api/admin/users/{uid}/transactions?limit=2"))).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    assert_eq!(page["data"][0]["kind"], "usage");
    let cursor = page["nextCursor"].as_str().unwrap();
    let rest: Value = gw.http.get(gw.url(&format!("/api/admin/users/{uid}/transactions?limit=50&before={cursor}"))).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    let rest = rest["data"].as_array().unwrap();
    assert_eq!(rest.len(), 3, "2 more usage entries and the credit: {rest:?}");
    assert_eq!(rest.last().unwrap()["kind"], "credit");
    let revenue: Value = gw.http.get(gw.url("/api/analytics/revenue")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert!(revenue["total"]["fees"].as_f64().unwrap() > 0.0, "{revenue}");
    assert!(revenue["bySource"]["ads"].as_f64().unwrap() < 0.0, "free-tier tokens were paid from ad revenue");
    // Every USD amount comes with its exact micro-USD twin.
    let ads_micros = revenue["bySource"]["adsMicros"].as_i64().unwrap();
    assert!((ads_micros as f64 / 1e6 - revenue["bySource"]["ads"].as_f64().unwrap()).abs() < 1e-9, "{revenue}");
    assert_eq!(revenue["daily"][0]["adsMicros"], ads_micros);
    assert_eq!(revenue["byModel"][0]["key"], "mock-model");
    assert_eq!(revenue["daily"].as_array().unwrap().len(), 1);
    let usage: Value = gw.http.get(gw.url("/api/analytics/usage")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(usage["requests"], 5);
    assert!((usage["errorRate"].as_f64().unwrap() - 0.2).abs() < 1e-9);
    assert_eq!(usage["activeProviders"], 1);
    assert_eq!(usage["byModelAndQuality"][0]["quality"], "standard");
    let r = gw.http.get(gw.url("/api/analytics/usage")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 401, "analytics are admin-only");
}

#[tokio::test]
async fn inproc_ledger_spending_limits_per_key() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let r = gw.admin_post("/api/admin/keys", json!({"name": "capped", "tier": "premium", "dailyLimit": 0.001})).await;
    let v: Value = r.json().await.unwrap();
    let (key, uid) = (v["key"].as_str().unwrap().to_owned(), v["userId"].as_str().unwrap().to_owned());
    gw.credit(&uid, 1_000_000).await;
    // Each request holds about (body + 100 tokens) × 2 µUSD ≈ 0.0007 USD; the limit is 0.001 USD.
    let body = json!({"model": "mock-model", "messages": user("hi"), "max_tokens": 100});
    let mut served = 0;
    let mut refused = None;
    for _ in 0..40 {
        let r = gw.chat(&key, body.clone()).await;
        match r.status().as_u16() {
            200 => served += 1,
            429 => {
                refused = Some(r.json::<Value>().await.unwrap());
                break;
            }
            s => panic!("status {s}"),
        }
    }
    let refused = refused.expect("the daily limit stops the key");
    assert_eq!(refused["error"]["code"], "spending_limit_exceeded");
    assert!(served > 0);
    let spent: i64 = sqlx::query_scalar("SELECT CAST(SUM(cost_micros) AS BIGINT) FROM usage_records").fetch_one(&gw.state.store.pool).await.unwrap();
    assert!(spent <= 1_000, "never above the limit: {spent}");
    // Another key of the same user has no limit.
    let other: Value = gw.admin_post("/api/admin/keys", json!({"name": "free-hand", "tier": "premium", "userId": uid})).await.json().await.unwrap();
    assert_eq!(gw.chat(other["key"].as_str().unwrap(), body).await.status(), 200);
    let r = gw.admin_post("/api/admin/keys", json!({"name": "bad", "dailyLimit": -1})).await;
    assert_eq!(r.status(), 400);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_reservations_lease_a_provider_by_the_hour() {
    let gw = Gateway::start().await;
    let a = spawn_mock(MockConfig::default()).await.unwrap();
    let b = spawn_mock(MockConfig::default()).await.unwrap();
    // Provider A: $3.60/hour = 1000 µUSD per second.
    let register = |mock: &MockProvider, per_hour: f64| {
        let body = json!({"capabilities": {"models": ["mock-model"], "maxConcurrentStreams": 8}, "pricing": {"perToken": 0.000002, "perHour": per_hour}, "baseUrl": mock.url()});
        gw.http.post(gw.url("/api/gpu/register")).json(&body).send()
    };
    let mut ids = Vec::new();
    for (mock, price) in [(&a, 3.6), (&b, 7.2)] {
        let v: Value = register(mock, price).await.unwrap().json().await.unwrap();
        let r = gw.http.post(gw.url("/api/gpu/stream/start")).bearer_auth(v["providerKey"].as_str().unwrap())
            .json(&json!({"providerId": v["providerId"], "model": "mock-model", "quality": "standard"})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        ids.push(v["providerId"].as_str().unwrap().to_owned());
    }
    let (key, uid) = gw.create_unfunded_key("premium").await;
    let reserve = |body: Value, key: String| gw.http.post(gw.url("/api/llm/reservations")).bearer_auth(key).json(&body).send();
    let r = reserve(json!({"model": "mock-model", "hours": 1}), key.clone()).await.unwrap();
    assert_eq!(r.status(), 429, "the hour must be covered by the balance");
    gw.credit(&uid, 10_000_000).await;
    let r = reserve(json!({"model": "mock-model", "hours": 0}), key.clone()).await.unwrap();
    assert_eq!(r.status(), 400);
    let r = reserve(json!({"model": "mock-model", "hours": 1}), key.clone()).await.unwrap();
    assert_eq!(r.status(), 201);
    let rsv: Value = r.json().await.unwrap();
    assert_eq!(rsv["providerId"], ids[0].as_str(), "the cheapest free provider");
    assert_eq!(rsv["maxCost"], 3.6);
    let rid = rsv["id"].as_str().unwrap().to_owned();
    let account = format!("user:{uid}");
    // Requests on the reservation go only to A and are not billed per token.
    for _ in 0..3 {
        let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "reservation": rid})).await;
        assert_eq!(r.status(), 200);
    }
    let r = gw.http.post(gw.url("/v1/chat/completions")).bearer_auth(&key).header("x-reservation-id", &rid)
        .json(&json!({"model": "mock-model", "messages": user("hi")})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(a.request_count(), 4);
    // Everyone else's traffic avoids the reserved provider.
    let other = gw.create_key("premium").await;
    for _ in 0..4 {
        assert_eq!(gw.chat(&other, json!({"model": "mock-model", "messages": user("hi")})).await.status(), 200);
    }
    assert_eq!(a.request_count(), 4);
    assert_eq!(b.request_count(), 4);
    let r = gw.chat(&other, json!({"model": "mock-model", "messages": user("hi"), "reservation": rid})).await;
    assert_eq!(r.status(), 400, "someone else's reservation");
    let r = reserve(json!({"providerId": ids[0], "hours": 1}), other.clone()).await.unwrap();
    assert_eq!(r.status(), 400, "already reserved");
    let r = reserve(json!({"model": "no-such-model", "hours": 1}), other.clone()).await.unwrap();
    assert_eq!(r.status(), 404, "a model nobody serves");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // The stale-hold sweeper (here with a zero TTL) leaves a live reservation's hold alone:
    // a lease may last longer than the TTL, and a voided hold would never be charged.
    gateway::money::ledger::Ledger::new(gw.state.store.clone()).sweep_stale_holds(0).await.unwrap();
    let r = gw.http.delete(gw.url(&format!("/api/llm/reservations/{rid}"))).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let done: Value = r.json().await.unwrap();
    assert_eq!(done["status"], "released");
    let charged = (done["charged"].as_f64().unwrap() * 1e6).round() as i64;
    assert!((1_500..=3_000).contains(&charged), "billed per second of use: {charged}");
    assert_eq!(gw.balance(&account).await, 10_000_000 - charged, "the rest is refunded, tokens were not billed");
    assert_eq!(gw.balance(&format!("provider:{}", ids[0])).await, charged - charged / 10);
    let r = gw.http.delete(gw.url(&format!("/api/llm/reservations/{rid}"))).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 409);
    // After release, A serves everyone again.
    gw.chat(&other, json!({"model": "mock-model", "messages": user("hi")})).await;
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "reservation": rid})).await;
    assert_eq!(r.status(), 400, "an ended reservation cannot be used");
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_reservation_expires_and_charges_the_full_period() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let body = json!({"capabilities": {"models": ["mock-model"], "maxConcurrentStreams": 8}, "pricing": {"perToken": 0.000002, "perHour": 3.6}, "baseUrl": mock.url()});
    let v: Value = gw.http.post(gw.url("/api/gpu/register")).json(&body).send().await.unwrap().json().await.unwrap();
    gw.http.post(gw.url("/api/gpu/stream/start")).bearer_auth(v["providerKey"].as_str().unwrap())
        .json(&json!({"providerId": v["providerId"], "model": "mock-model", "quality": "standard"})).send().await.unwrap();
    let (key, uid) = gw.create_unfunded_key("premium").await;
    gw.credit(&uid, 1_000_000).await;
    // 0.0003 h = 1.08 s at 1000 µUSD/s.
    let rsv: Value = gw.http.post(gw.url("/api/llm/reservations")).bearer_auth(&key)
        .json(&json!({"model": "mock-model", "hours": 0.0003})).send().await.unwrap().json().await.unwrap();
    assert_eq!(rsv["maxCost"], 0.00108);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(gateway::money::reservations::expire(&gw.state).await.unwrap(), 1);
    let list: Value = gw.http.get(gw.url("/api/llm/reservations")).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["data"][0]["status"], "released");
    assert_eq!(list["data"][0]["charged"], 0.00108);
    assert_eq!(gw.balance(&format!("user:{uid}")).await, 1_000_000 - 1_080);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_payout_webhook_connector_retries_and_reports() {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    // A payout service that fails twice, then accepts; it records what it got.
    let calls = Arc::new(AtomicUsize::new(0));
    let seen: Arc<parking_lot::Mutex<Vec<(String, String, String)>>> = Arc::default();
    let (c, s) = (calls.clone(), seen.clone());
    let service = axum::Router::new().route(
        "/payouts",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let (c, s) = (c.clone(), s.clone());
            async move {
                let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                s.lock().push((header("x-signature"), header("idempotency-key"), body));
                if c.fetch_add(1, Ordering::SeqCst) < 2 { axum::http::StatusCode::SERVICE_UNAVAILABLE } else { axum::http::StatusCode::OK }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service_url = format!("http://{}/payouts", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, service).await.unwrap() });
    let gw = Gateway::start_with(|c| {
        c.payout_webhook_url = Some(service_url);
        c.payout_webhook_secret = Some(Secret::new("payout-secret"));
    })
    .await;
    let (id, pkey) = provider_with_earnings(&gw, 10).await;
    let body = json!({"providerId": id, "amount": 8.0, "method": {"type": "bank_transfer", "iban": "DE89370400440532013000"}});
    let w: Value = gw.http.post(gw.url("/api/payment/withdraw")).bearer_auth(&pkey).json(&body).send().await.unwrap().json().await.unwrap();
    let wid = w["id"].as_str().unwrap().to_owned();
    let mut status = String::new();
    for _ in 0..100 {
        let list: Value = gw.http.get(gw.url(&format!("/api/payment/withdrawals/{id}"))).bearer_auth(&pkey).send().await.unwrap().json().await.unwrap();
        status = list["data"][0]["status"].as_str().unwrap().to_owned();
        if status == "processing" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, "processing", "accepted on the third try");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    {
        let seen = seen.lock();
        assert!(seen.iter().all(|(sig, idem, body)| {
            *idem == wid && *sig == gateway::money::payout_connector::sign("payout-secret", body.as_bytes())
        }), "every delivery is signed and carries the idempotency key");
        assert!(seen[0].2.contains("DE89370400440532013000"));
    }
    // The service reports the outcome, signed; a replay changes nothing; a forgery is refused.
    let report = json!({"withdrawalId": wid, "status": "paid"}).to_string();
    let send = |sig: String| gw.http.post(gw.url("/api/payment/payout-webhook")).header("content-type", "application/json").header("x-signature", sig).body(report.clone()).send();
    assert_eq!(send("sha256=abcd".into()).await.unwrap().status(), 401);
    for _ in 0..2 {
        let v: Value = send(gateway::money::payout_connector::sign("payout-secret", report.as_bytes())).await.unwrap().json().await.unwrap();
        assert_eq!(v["status"], "paid");
    }
    assert_eq!(gw.balance("platform:payouts").await, 0);
    assert_eq!(gw.balance(&format!("provider:{id}")).await, 2_000_000);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_ledger_volume_discount_applies_past_the_tier() {
    let gw = Gateway::start_with(|c| c.volume_discounts = vec![gateway::ops::config::VolumeDiscount { monthly_tokens: 10, discount_bp: 5_000 }]).await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let (key, uid) = gw.create_unfunded_key("premium").await;
    gw.credit(&uid, 1_000_000).await;
    let account = format!("user:{uid}");
    let mut costs = Vec::new();
    for _ in 0..3 {
        let before = gw.balance(&account).await;
        let v: Value = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi")})).await.json().await.unwrap();
        costs.push(before - gw.balance(&account).await);
        assert_eq!((v["usage"]["cost"].as_f64().unwrap() * 1e6).round() as i64, *costs.last().unwrap());
    }
    assert_eq!(costs, vec![HI_COST, HI_COST, HI_COST / 2], "7, 14 tokens so far: full price; from 10 tokens on: 50% off");
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_ledger_overreported_usage_is_not_billed_and_flagged() {
    let gw = Gateway::start().await;
    let liar = spawn_mock(MockConfig { overreport: Some(100), ..MockConfig::default() }).await.unwrap();
    let (provider, _) = gw.add_provider(&liar, "mock-model", None, &["standard"]).await;
    let key = gw.create_key("premium").await;
    let v: Value = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi")})).await.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 6, "our own count of delivered tokens wins");
    assert_eq!((v["usage"]["cost"].as_f64().unwrap() * 1e6).round() as i64, HI_COST);
    let providers: Value = gw.http.get(gw.url("/api/admin/providers")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(providers["data"][0]["id"], provider.as_str());
    assert_eq!(providers["data"][0]["usageFlags"], 1);
    // The user sees their own balance and history.
    let b: Value = gw.http.get(gw.url("/api/llm/balance")).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
    assert!((b["balance"].as_f64().unwrap() - (10.0 - HI_COST as f64 / 1e6)).abs() < 1e-9, "{b}");
    let h: Value = gw.http.get(gw.url("/api/llm/transactions")).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
    assert_eq!(h["data"].as_array().unwrap().len(), 2, "the credit and one request");
    gw.ledger_is_clean().await;
}
