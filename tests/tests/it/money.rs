//! One money convention across the HTTP API: USD in the named field, the exact
//! integer in its `…Micros` twin (`…PerMillionMicros` for per-token prices); either is
//! accepted, both are returned, and an ambiguous amount is refused naming the field.

use serde_json::{json, Value};
use tests::{spawn_mock, MockConfig};

use crate::inproc::{Gateway, ADMIN};

async fn register(gw: &Gateway, pricing: Value) -> reqwest::Response {
    gw.http
        .post(gw.url("/api/gpu/register"))
        .json(&json!({"capabilities": {"models": ["mock-model"], "maxConcurrentStreams": 8}, "pricing": pricing, "baseUrl": "http://127.0.0.1:9"}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn inproc_money_prices_take_usd_or_their_exact_twins() {
    let gw = Gateway::start().await;
    // The twin alone, or both agreeing: the same provider prices.
    for pricing in [
        json!({"perTokenPerMillionMicros": 2_000_000, "perHourMicros": 500_000, "minimumPayoutMicros": 5_000_000}),
        json!({"perToken": 0.000002, "perTokenPerMillionMicros": 2_000_000, "perHour": 0.5, "minimumPayout": 5}),
    ] {
        let r = register(&gw, pricing.clone()).await;
        assert_eq!(r.status(), 201, "{pricing}");
    }
    let list: Value = gw.http.get(gw.url("/api/admin/providers")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    for p in list["data"].as_array().unwrap() {
        let pricing = &p["pricing"];
        assert_eq!(pricing["perTokenPerMillionMicros"], 2_000_000, "{pricing}");
        assert!((pricing["perToken"].as_f64().unwrap() - 0.000002).abs() < 1e-15, "{pricing}");
        assert_eq!((pricing["perHour"].clone(), pricing["perHourMicros"].clone()), (json!(0.5), json!(500_000)));
        assert_eq!(pricing["minimumPayoutMicros"], 5_000_000);
    }
    for (pricing, param) in [
        (json!({"perToken": 0.000002, "perTokenPerMillionMicros": 3_000_000}), "pricing.perToken"),
        (json!({"perToken": 0.000002, "perHour": 1, "perHourMicros": 2}), "pricing.perHour"),
        (json!({"perHour": 0.5}), "pricing.perToken"),
        (json!({"perTokenPerMillionMicros": -1}), "pricing.perTokenPerMillionMicros"),
    ] {
        let r = register(&gw, pricing.clone()).await;
        assert_eq!(r.status(), 400, "{pricing}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], param, "{pricing}: {e}");
    }
}

#[tokio::test]
async fn inproc_money_credits_and_withdrawals_take_either_form() {
    let gw = Gateway::start().await;
    let (_, user) = gw.create_unfunded_key("premium").await;
    let path = format!("/api/admin/users/{user}/credit");
    let credit = |body: Value| gw.admin_post(&path, body);
    let v: Value = credit(json!({"amount": 1.5, "amountMicros": 1_500_000})).await.json().await.unwrap();
    assert_eq!((v["balance"].clone(), v["balanceMicros"].clone()), (json!(1.5), json!(1_500_000)));
    for (body, param) in [
        (json!({"amount": 1.5, "amountMicros": 1_000_000}), "amount"),
        // A micro-USD amount in the USD field is over the $1,000,000 a credit may add.
        (json!({"amount": 10_000_000}), "amount"),
        (json!({"amount": 0.000_000_1}), "amount"),
    ] {
        let r = credit(body.clone()).await;
        assert_eq!(r.status(), 400, "{body}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], param, "{body}: {e}");
    }
    assert_eq!(gw.balance(&format!("user:{user}")).await, 1_500_000, "nothing refused was credited");

    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let (id, key) = gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let withdraw = |body: Value| gw.http.post(gw.url("/api/payment/withdraw")).bearer_auth(&key).json(&body).send();
    let r = withdraw(json!({"providerId": id, "amount": 10.0, "amountMicros": 9_000_000})).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], "amount");
    gw.ledger_is_clean().await;
}
