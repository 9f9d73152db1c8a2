//! Routing and operations: rate limits, chaos across providers, usage checked against the
//! model's tokenizer, quality levels and precision, request ids, metrics.

use std::collections::HashMap;
use std::time::Duration;

use gateway::ops::server::Running;
use gateway::store::Store;
use serde_json::{json, Value};
use sqlx::Row;
use tests::{spawn_mock, MockConfig};

use crate::billing::{wait_until_no_holds, HI_COST};
use crate::inproc::*;

#[tokio::test]
async fn inproc_rate_limits_per_key_with_openai_headers() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let v: Value = gw.admin_post("/api/admin/keys", json!({"name": "rl", "tier": "free", "requestsPerMinute": 3, "tokensPerMinute": 100000})).await.json().await.unwrap();
    let key = v["key"].as_str().unwrap().to_owned();
    let body = json!({"model": "mock-model", "messages": user("hi"), "max_tokens": 10});
    for i in 0..3u64 {
        let r = gw.chat(&key, body.clone()).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-ratelimit-limit-requests"], "3");
        assert_eq!(r.headers()["x-ratelimit-remaining-requests"], (2 - i).to_string().as_str());
        assert_eq!(r.headers()["x-ratelimit-limit-tokens"], "100000");
        assert!(r.headers().get("x-ratelimit-reset-requests").is_some());
    }
    let r = gw.chat(&key, body.clone()).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    let retry_ms: u64 = r.headers()["retry-after-ms"].to_str().unwrap().parse().unwrap();
    assert!((19_000..=20_000).contains(&retry_ms), "one request frees every 20 s: {retry_ms}");
    assert_eq!(retry, retry_ms.div_ceil(1000));
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(v["error"]["type"], "requests");
    assert_eq!(mock.request_count(), 3, "a limited request never reaches a provider");

    // Tokens: the estimate (prompt bytes / 4 + max_tokens) is charged up front and corrected after.
    let v: Value = gw.admin_post("/api/admin/keys", json!({"name": "tl", "tier": "free", "tokensPerMinute": 3000})).await.json().await.unwrap();
    let tkey = v["key"].as_str().unwrap().to_owned();
    let big = json!({"model": "mock-model", "messages": user("hi"), "max_tokens": 2000});
    let r = gw.chat(&tkey, big.clone()).await;
    assert_eq!(r.status(), 200);
    let after_first: u64 = r.headers()["x-ratelimit-remaining-tokens"].to_str().unwrap().parse().unwrap();
    assert!(after_first < 1000, "the estimate was charged: {after_first}");
    // The refund of the unused estimate lands right after the response.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = gw.chat(&tkey, big.clone()).await;
    assert_eq!(r.status(), 200, "the first request's unused tokens were given back");
    let r = gw.chat(&tkey, json!({"model": "mock-model", "messages": user("hi"), "max_tokens": 5000})).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["type"], "tokens");
}

#[tokio::test]
async fn inproc_registration_is_limited_per_ip() {
    let gw = Gateway::start_with(|c| c.ip_requests_per_minute = 2).await;
    let body = json!({"capabilities": {"models": ["m"], "maxConcurrentStreams": 1}, "pricing": {"perToken": 0.0}, "baseUrl": "http://127.0.0.1:9"});
    for expected in [201, 201, 429] {
        let r = gw.http.post(gw.url("/api/gpu/register")).json(&body).send().await.unwrap();
        assert_eq!(r.status(), expected);
    }
    assert_eq!(gw.http.get(gw.url("/health")).send().await.unwrap().status(), 200, "health is never limited");
}

/// Chaos: one slow, one failing a third of its requests, one dying mid-stream, one
/// over-reporting usage, and one healthy provider serve the same model. Routing samples
/// at random, so the test seeds it (`routing_seed`; `GS_ROUTING_SEED` tries another):
/// the same seed routes the same way, instead of a coin toss near the bounds.
#[tokio::test]
async fn inproc_chaos_traffic_shifts_to_the_healthy_provider() {
    let seed = std::env::var("GS_ROUTING_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20_261_206);
    let gw = Gateway::start_with(|c| {
        c.routing_seed = Some(seed);
        // Active health checks would add timing to the routing inputs.
        c.health_check_secs = 0;
    })
    .await;
    let slow = spawn_mock(MockConfig { first_chunk_delay: Duration::from_millis(400), ..MockConfig::default() }).await.unwrap();
    let flaky = spawn_mock(MockConfig { fail_every: Some(3), ..MockConfig::default() }).await.unwrap();
    let dying = spawn_mock(MockConfig { die_mid_stream: true, ..MockConfig::default() }).await.unwrap();
    let liar = spawn_mock(MockConfig { overreport: Some(100), ..MockConfig::default() }).await.unwrap();
    let healthy = spawn_mock(MockConfig::default()).await.unwrap();
    for m in [&slow, &flaky, &dying, &liar, &healthy] {
        gw.add_provider(m, "mock-model", None, &["standard"]).await;
    }
    let key = gw.create_key("premium").await;
    let mut errors_before_first_token = 0;
    let mut mid_stream_errors = 0;
    for _ in 0..80 {
        let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "stream": true, "max_tokens": 20})).await;
        if r.status() != 200 {
            errors_before_first_token += 1;
            continue;
        }
        let body = r.text().await.unwrap();
        if body.contains("\"error\"") {
            mid_stream_errors += 1;
        }
    }
    assert_eq!(errors_before_first_token, 0, "no client sees an error before the first token while a healthy provider exists");
    let counts: Vec<usize> = [&slow, &flaky, &dying, &liar, &healthy].iter().map(|m| m.request_count()).collect();
    eprintln!("seed {seed}: requests per provider (slow, flaky, dying, liar, healthy): {counts:?}; mid-stream errors: {mid_stream_errors}");
    // Traffic shifts away: each bad provider gets only a handful of the 80 requests.
    for (name, n) in ["slow", "flaky", "dying", "liar"].iter().zip(&counts) {
        assert!(*n <= 12, "{name} still got {n} of 80 requests");
    }
    assert!(counts[4] >= 40, "the healthy provider carries the traffic: {counts:?}");
    assert!(mid_stream_errors <= counts[2], "only the dying provider's streams broke");
    // Billing matches delivered tokens: the liar's reports were not billed.
    let flagged: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_records WHERE usage_source = 'gateway_flagged'").fetch_one(&gw.state.store.pool).await.unwrap();
    assert_eq!(usize::try_from(flagged).unwrap(), counts[3], "every over-report was caught");
    let user_acct: String = sqlx::query_scalar("SELECT id FROM accounts WHERE kind = 'user'").fetch_one(&gw.state.store.pool).await.unwrap();
    wait_until_no_holds(&gw, &user_acct).await;
    gw.ledger_is_clean().await;
}

/// One provider's usage report against the gateway's count of the mock's reply, "The
/// capital of France is Paris.": 7 tokens with the default model's tokenizer (The,
/// Ġcapital, Ġof, ĠFrance, Ġis, ĠParis, .), 6 content chunks without one.
pub(crate) struct UsageCase {
    model: &'static str,
    /// Whether the gateway has the model's tokenizer.
    tokenizer: bool,
    /// The provider's `completion_tokens` (`None`: no usage chunk).
    reported: Option<usize>,
    /// What is billed, and the usage source recorded.
    billed: u64,
    source: &'static str,
}

pub(crate) const USAGE_CASES: [UsageCase; 9] = [
    // Honest providers are billed their own count, also when it differs from ours by
    // an end-of-sequence token or so.
    UsageCase { model: "tok-exact", tokenizer: true, reported: Some(7), billed: 7, source: "provider" },
    UsageCase { model: "tok-with-eos", tokenizer: true, reported: Some(8), billed: 8, source: "provider" },
    UsageCase { model: "tok-one-under", tokenizer: true, reported: Some(6), billed: 6, source: "provider" },
    // Over-reporting that content chunks cannot catch (≤ 4 per chunk + 16) is caught by
    // the tokenizer and billed on its count.
    UsageCase { model: "tok-double", tokenizer: true, reported: Some(14), billed: 7, source: "gateway_flagged" },
    UsageCase { model: "tok-chunk-max", tokenizer: true, reported: Some(40), billed: 7, source: "gateway_flagged" },
    // Without a usage chunk the gateway's count is billed.
    UsageCase { model: "tok-no-usage", tokenizer: true, reported: None, billed: 7, source: "gateway" },
    UsageCase { model: "plain-no-usage", tokenizer: false, reported: None, billed: 6, source: "gateway" },
    // Without a tokenizer the chunk count is the (looser) fallback.
    UsageCase { model: "plain-double", tokenizer: false, reported: Some(14), billed: 14, source: "provider" },
    UsageCase { model: "plain-over-max", tokenizer: false, reported: Some(41), billed: 6, source: "gateway_flagged" },
];

#[tokio::test]
async fn inproc_usage_is_checked_against_the_models_tokenizer() {
    let model_path = crate::real_worker::default_model_path().await;
    let gw = Gateway::start_with(|c| {
        for case in USAGE_CASES.iter().filter(|c| c.tokenizer) {
            c.tokenizers.insert(case.model.to_owned(), model_path.clone());
        }
    })
    .await;
    let key = gw.create_key("premium").await;
    let mut providers = HashMap::new();
    for case in &USAGE_CASES {
        let config = MockConfig {
            models: vec![case.model.to_owned()],
            completion_tokens: case.reported,
            omit_usage: case.reported.is_none(),
            ..MockConfig::default()
        };
        let mock = spawn_mock(config).await.unwrap();
        let (provider, _) = gw.add_provider(&mock, case.model, None, &["standard"]).await;
        providers.insert(provider, case);
        let r = gw.chat(&key, json!({"model": case.model, "messages": user("What is the capital of France?")})).await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "The capital of France is Paris.");
        assert_eq!(v["usage"]["completion_tokens"], case.billed, "{}: billed completion tokens", case.model);
    }
    let rows: Vec<(String, String, i64)> = sqlx::query("SELECT model, usage_source, completion_tokens FROM usage_records")
        .fetch_all(&gw.state.store.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("model"), r.get("usage_source"), r.get("completion_tokens")))
        .collect();
    assert_eq!(rows.len(), USAGE_CASES.len());
    for (model, source, tokens) in &rows {
        let case = USAGE_CASES.iter().find(|c| c.model == model).unwrap();
        assert_eq!((source.as_str(), u64::try_from(*tokens).unwrap()), (case.source, case.billed), "{model}");
    }
    // The admin sees each flag, and a flagged provider's honesty (and so its score) drops.
    let listed: Value = gw.http.get(gw.url("/api/admin/providers")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    for p in listed["data"].as_array().unwrap() {
        let case = providers[p["id"].as_str().unwrap()];
        let flagged = case.source == "gateway_flagged";
        assert_eq!(p["usageFlags"], u64::from(flagged), "{}", case.model);
        let honesty = p["health"]["honesty"].as_f64().unwrap();
        // A request without a usage report says nothing about honesty.
        assert_eq!(honesty < 1.0, flagged, "{}: honesty {honesty}", case.model);
    }
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_a_tokenizer_that_cannot_be_loaded_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(fresh_database(&dir).await.0);
    config.tokenizers.insert("mock-model".to_owned(), dir.path().join("missing.gguf"));
    let store = Store::connect(&config.database_url).await.unwrap();
    let err = Running::start_with_store(config, store).await.err().unwrap().to_string();
    assert!(err.contains(r#"`tokenizers."mock-model"`"#) && err.contains("missing.gguf"), "{err}");
}

#[tokio::test]
async fn inproc_repeated_client_request_ids_are_each_billed() {
    let (gw, _mock, key) = setup().await;
    for _ in 0..3 {
        let r = gw.http.post(gw.url("/v1/chat/completions")).bearer_auth(&key).header("x-request-id", "same-id")
            .json(&json!({"model": "mock-model", "messages": user("hi")})).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let state = gw.shutdown().await;
    let rows = usage_rows(&state).await;
    assert_eq!(rows.len(), 3, "one usage record per request even when the client repeats its id");
    assert!(rows.iter().all(|r| r.0 == "ok"));
}

#[tokio::test]
async fn inproc_quality_levels_custom_fallback_and_adaptive() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard", "low"]).await;
    let key = gw.create_key("premium").await;
    // A custom level: served on standard streams with its own parameters and price.
    let level = json!({"name": "turbo", "multiplier": 1.0, "latencyMultiplier": 0.5, "costMultiplier": 3.0, "maxTokens": 64});
    let r = gw.admin_post("/api/admin/quality-levels", level.clone()).await;
    assert_eq!(r.status(), 201);
    assert_eq!(gw.admin_post("/api/admin/quality-levels", level).await.status(), 409);
    assert_eq!(gw.admin_post("/api/admin/quality-levels", json!({"name": "high", "multiplier": 1.0, "latencyMultiplier": 1.0, "costMultiplier": 1.0, "maxTokens": 1})).await.status(), 409);
    assert_eq!(gw.admin_post("/api/admin/quality-levels", json!({"name": "x", "multiplier": -1.0, "latencyMultiplier": 1.0, "costMultiplier": 1.0, "maxTokens": 1})).await.status(), 400);
    let levels: Value = gw.http.get(gw.url("/api/admin/quality-levels")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(levels["data"].as_array().unwrap().len(), 5);
    let r = gw.chat(&key, json!({"model": "mock-model:turbo", "messages": user("hi"), "max_tokens": 1000})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-quality-served"], "turbo");
    let v: Value = r.json().await.unwrap();
    assert_eq!(mock.last_body().unwrap()["max_tokens"], 64, "the level's cap");
    assert_eq!((v["usage"]["cost"].as_f64().unwrap() * 1e6).round() as i64, 3 * HI_COST, "billed at 3.0x");
    // No provider streams `high`: refused unless the request allows a fallback.
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "quality": "high"})).await;
    assert_eq!(r.status(), 503);
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "quality": "high", "quality_fallback": true})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-quality-served"], "standard", "the next tier down that has a provider");
    let v: Value = r.json().await.unwrap();
    assert_eq!((v["usage"]["cost"].as_f64().unwrap() * 1e6).round() as i64, HI_COST, "billed at the served tier");
    // Adaptive: the highest tier whose expected latency fits; only standard and low run here.
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "max_latency_ms": 10000})).await;
    assert_eq!(r.headers()["x-quality-served"], "standard");
    // A custom level survives a restart of the level cache (it is persisted).
    gw.state.qualities.reload().await.unwrap();
    assert!(gw.state.qualities.get("turbo").is_some());
}

/// Precision per tier (DESIGN.md: low and standard allow reduced precision, high and
/// ultra need full): what providers are asked for, who may serve, what registration
/// accepts.
#[tokio::test]
async fn inproc_quality_levels_precision_reaches_providers_and_routes() {
    let gw = Gateway::start().await;
    let key = gw.create_key("premium").await;
    let all = ["low", "standard", "high", "ultra"];
    // Registration: an unknown precision names the entry, an empty list the field.
    let register = |precisions: Value| {
        gw.http.post(gw.url("/api/gpu/register")).json(&json!({"capabilities": {"models": ["m"], "maxConcurrentStreams": 2, "precisions": precisions},
            "pricing": {"perToken": 0.000002}, "baseUrl": "http://127.0.0.1:9"})).send()
    };
    for (precisions, param) in [(json!(["full", "half"]), "capabilities.precisions[1]"), (json!([]), "capabilities.precisions"), (json!("full"), "capabilities.precisions")] {
        let r = register(precisions.clone()).await.unwrap();
        assert_eq!(r.status(), 400, "{precisions}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["type"], "invalid_request_error");
        assert_eq!(e["error"]["param"], param, "{precisions}: {e}");
    }
    // A provider that makes no claim serves full precision (its model as loaded), so
    // it serves every tier; each tier's precision reaches it in the body.
    let plain = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&plain, "mock-model", None, &all).await;
    for (quality, precision) in [("low", "reduced"), ("standard", "reduced"), ("high", "full"), ("ultra", "full")] {
        let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "quality": quality})).await;
        assert_eq!(r.status(), 200, "{quality}");
        assert_eq!(plain.last_body().unwrap()["precision"], precision, "{quality}");
    }
    // The levels list says what each level requires; a custom level follows its multiplier.
    for (name, multiplier) in [("eco", 1.0), ("turbo", 2.0)] {
        let level = json!({"name": name, "multiplier": multiplier, "latencyMultiplier": 1.0, "costMultiplier": 1.0, "maxTokens": 64});
        assert_eq!(gw.admin_post("/api/admin/quality-levels", level).await.status(), 201);
    }
    let levels: Value = gw.http.get(gw.url("/api/admin/quality-levels")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    let listed: Vec<(&str, &str)> =
        levels["data"].as_array().unwrap().iter().map(|l| (l["name"].as_str().unwrap(), l["precision"].as_str().unwrap())).collect();
    assert_eq!(listed, [("low", "reduced"), ("standard", "reduced"), ("high", "full"), ("ultra", "full"), ("eco", "reduced"), ("turbo", "full")]);

    // A second model served only at reduced precision, on line at every tier.
    let reduced = spawn_mock(MockConfig { models: vec!["fast-model".into()], ..MockConfig::default() }).await.unwrap();
    let caps = json!({"models": ["fast-model"], "maxConcurrentStreams": 64, "precisions": ["reduced"]});
    let (reduced_id, _) = gw.add_provider_caps(&reduced, caps, &all).await;
    let providers: Value = gw.http.get(gw.url("/api/admin/providers")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    let precisions_of = |id: &str| providers["data"].as_array().unwrap().iter().find(|p| p["id"] == id).unwrap()["capabilities"]["precisions"].clone();
    assert_eq!(precisions_of(&reduced_id), json!(["reduced"]));
    let r = gw.chat(&key, json!({"model": "fast-model", "messages": user("hi"), "quality": "low"})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(reduced.last_body().unwrap()["precision"], "reduced");
    // Full-precision levels (built-in or custom) have no provider for it...
    for quality in ["high", "ultra", "turbo"] {
        let r = gw.chat(&key, json!({"model": "fast-model", "messages": user("hi"), "quality": quality})).await;
        assert_eq!(r.status(), 503, "{quality}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "no_provider_available");
    }
    assert_eq!(reduced.request_count(), 1, "a reduced-precision provider never gets a full-precision request");
    // ...unless the request allows a fallback: the next tier down that allows reduced precision.
    let r = gw.chat(&key, json!({"model": "fast-model", "messages": user("hi"), "quality": "ultra", "quality_fallback": true})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-quality-served"], "standard");
    assert_eq!(reduced.last_body().unwrap()["precision"], "reduced");
    assert_eq!(reduced.last_body().unwrap()["priority"], 1, "standard's parameters, not ultra's");

    // With a full-precision provider beside it, every ultra request goes there.
    let full = spawn_mock(MockConfig { models: vec!["fast-model".into()], ..MockConfig::default() }).await.unwrap();
    let caps = json!({"models": ["fast-model"], "maxConcurrentStreams": 64, "precisions": ["full", "reduced"]});
    gw.add_provider_caps(&full, caps, &all).await;
    for _ in 0..10 {
        let r = gw.chat(&key, json!({"model": "fast-model", "messages": user("hi"), "quality": "ultra"})).await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(full.request_count(), 10);
    assert!(full.bodies.lock().iter().all(|b| b["precision"] == "full"));
    assert!(reduced.bodies.lock().iter().all(|b| b["precision"] == "reduced"));
    assert_eq!(reduced.request_count(), 2);
}

/// Parses Prometheus text format: `name{labels} value` → (name with labels, value);
/// every line must be a comment or a well-formed sample.
pub(crate) fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix('#') {
            let kind = rest.trim_start();
            assert!(kind.starts_with("HELP ") || kind.starts_with("TYPE "), "bad comment line: {line}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        assert!(series[..name_end].chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "bad name: {line}");
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unclosed labels: {line}");
        }
        samples.insert(series.to_owned(), value);
    }
    samples
}

#[tokio::test]
async fn inproc_metrics_after_traffic() {
    let (gw, _mock, key) = setup().await;
    for _ in 0..3 {
        assert_eq!(gw.chat(&key, json!({"model": "mock-model", "messages": user("hi")})).await.status(), 200);
    }
    assert_eq!(gw.chat(&key, json!({"model": "nope", "messages": user("hi")})).await.status(), 404);
    let r = gw.http.get(gw.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let m = parse_prometheus(&r.text().await.unwrap());
    assert_eq!(m["gs_http_requests_total{path=\"/v1/chat/completions\",status=\"200\"}"], 3.0);
    assert_eq!(m["gs_http_requests_total{path=\"/v1/chat/completions\",status=\"404\"}"], 1.0);
    assert_eq!(m["gs_completions_total{status=\"ok\"}"], 3.0);
    assert_eq!(m["gs_tokens_total{kind=\"completion\"}"], 18.0);
    assert_eq!(m["gs_time_to_first_token_seconds_count"], 3.0);
    assert!(m["gs_http_request_duration_seconds_count"] >= 4.0);
    assert!((m["gs_ledger_charged_usd_total"] - 3.0 * HI_COST as f64 / 1e6).abs() < 1e-12);
    assert_eq!(m["gs_providers_online"], 1.0);
    assert_eq!(m["gs_active_streams"], 0.0);
    let scores: Vec<f64> = m.iter().filter(|(k, _)| k.starts_with("gs_provider_score{")).map(|(_, v)| *v).collect();
    assert_eq!(scores.len(), 1);
    assert!(scores[0] > 0.5 && scores[0] <= 1.0);
}
