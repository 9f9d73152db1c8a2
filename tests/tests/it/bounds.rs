//! Hostile providers are bounded: an event without an end, a response without an end,
//! a stream that never stops, and calls the provider refuses for its own reasons. Each
//! ends with what the client can see (an error event or a failover) and a clean ledger.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::{spawn_mock, MockConfig};

use crate::inproc::Gateway;

/// Streams `text` on a premium key through one mock; returns the SSE body, the usage
/// row's `(status, completion tokens)` and how long the stream took.
async fn stream_through_one_mock(gw: &Gateway, text: &str) -> (String, (String, i64), Duration) {
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let key = gw.create_key("premium").await;
    let started = Instant::now();
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": [{"role": "user", "content": text}], "stream": true})).await;
    assert_eq!(r.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(30), r.text()).await.expect("the stream ended").unwrap();
    let took = started.elapsed();
    let mut row = None;
    for _ in 0..200 {
        if let Some((status, _, _, completion)) = gw.usage_rows().await.into_iter().next() {
            row = Some((status, completion));
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gw.ledger_is_clean().await;
    (body, row.expect("a usage row"), took)
}

/// Chunks that carried a word (the first chunk's empty `content` carries none).
fn words(body: &str) -> i64 {
    i64::try_from(body.matches("\"content\":\"").count() - body.matches("\"content\":\"\"").count()).unwrap()
}

fn last_error(body: &str) -> Value {
    let last = body.split("\n\n").filter(|e| !e.trim().is_empty()).last().unwrap();
    let v: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert!(v["error"].is_object(), "the stream ends with an error event: {last}");
    v
}

#[tokio::test]
async fn inproc_bounds_an_event_without_an_end_ends_the_stream_and_bills_what_was_delivered() {
    // Defaults: events up to 1 MiB; the mock sends up to 256 MiB without a blank line.
    let gw = Gateway::start().await;
    let (body, (status, completion), _) = stream_through_one_mock(&gw, "[flood] hi").await;
    assert!(body.contains("\"content\":\"The\""), "the first word was delivered: {}", &body[..body.len().min(300)]);
    let e = last_error(&body);
    assert!(e["error"]["message"].as_str().unwrap().contains("larger than 1048576 bytes"), "{e}");
    assert_eq!(status, "provider_failed");
    assert_eq!(completion, 1, "the delivered word is billed");
}

#[tokio::test]
async fn inproc_bounds_a_response_without_an_end_stops_at_its_size_limit() {
    let gw = Gateway::start_with(|c| {
        c.provider_max_event_bytes = 1024;
        c.provider_max_response_bytes = 8 * 1024;
    })
    .await;
    let (body, (status, completion), _) = stream_through_one_mock(&gw, "[endless] hi").await;
    let e = last_error(&body);
    assert!(e["error"]["message"].as_str().unwrap().contains("larger than 8192 bytes"), "{e}");
    assert_eq!(status, "provider_failed");
    let delivered = words(&body);
    assert!(delivered > 10, "{delivered} chunks");
    assert_eq!(completion, delivered, "every delivered chunk is billed, nothing more");
}

#[tokio::test]
async fn inproc_bounds_a_stream_that_never_stops_ends_at_the_request_deadline() {
    let gw = Gateway::start_with(|c| c.request_deadline_secs = 1).await;
    let (body, (status, completion), took) = stream_through_one_mock(&gw, "[endless] hi").await;
    let e = last_error(&body);
    assert!(e["error"]["message"].as_str().unwrap().contains("deadline"), "{e}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(status, "provider_failed");
    assert_eq!(completion, words(&body));
}

#[tokio::test]
async fn inproc_bounds_a_provider_that_refuses_our_call_is_failed_over_not_blamed_on_the_client() {
    for code in [401, 403, 404, 405, 415] {
        let gw = Gateway::start().await;
        let refusing = spawn_mock(MockConfig { fail_status: Some(code), ..MockConfig::default() }).await.unwrap();
        gw.add_provider(&refusing, "mock-model", None, &["standard"]).await;
        let key = gw.create_key("premium").await;
        // Alone, it fails as a provider failure (502), not as the client's bad request.
        let r = gw.chat(&key, json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]})).await;
        assert_eq!(r.status(), 502, "{code}");
        // With a healthy provider beside it, every request is served.
        let healthy = spawn_mock(MockConfig::default()).await.unwrap();
        gw.add_provider(&healthy, "mock-model", None, &["standard"]).await;
        for _ in 0..6 {
            let r = gw.chat(&key, json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]})).await;
            assert_eq!(r.status(), 200, "{code}");
        }
        gw.ledger_is_clean().await;
    }
}

/// A registration outside the market's bounds is refused naming the field: $999 per
/// token, $1,000 per hour, 4e9 streams. A `[price_bounds]` entry lifts the ceiling for
/// its model only.
#[tokio::test]
async fn inproc_bounds_registrations_outside_the_market_are_refused() {
    let gw = Gateway::start_with(|c| {
        c.price_bounds.insert("big-model".to_owned(), gateway::ops::config::PriceBound { per_token: Some(0.01), per_hour: None });
    })
    .await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let register = |models: Value, streams: u64, pricing: Value| {
        gw.http
            .post(gw.url("/api/gpu/register"))
            .json(&json!({"capabilities": {"models": models, "maxConcurrentStreams": streams}, "pricing": pricing, "baseUrl": mock.url()}))
            .send()
    };
    let cases = [
        (json!(["mock-model"]), 8, json!({"perToken": 999}), "pricing.perToken"),
        (json!(["mock-model"]), 8, json!({"perToken": 0.0011}), "pricing.perToken"),
        (json!(["mock-model"]), 8, json!({"perToken": 0.000002, "perHour": 1000}), "pricing.perHour"),
        (json!(["mock-model"]), 4_000_000_000, json!({"perToken": 0.000002}), "capabilities.maxConcurrentStreams"),
        (json!(["mock-model"]), 1_025, json!({"perToken": 0.000002}), "capabilities.maxConcurrentStreams"),
        // The override is per model: a provider of both is held to the lower ceiling.
        (json!(["big-model", "mock-model"]), 8, json!({"perToken": 0.005}), "pricing.perToken"),
        (json!(["big-model"]), 8, json!({"perToken": 0.02}), "pricing.perToken"),
    ];
    for (models, streams, pricing, param) in cases {
        let r = register(models.clone(), streams, pricing.clone()).await.unwrap();
        assert_eq!(r.status(), 400, "{models} {streams} {pricing}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], param, "{e}");
    }
    let providers: Value = gw.http.get(gw.url("/api/admin/providers")).bearer_auth(crate::inproc::ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(providers["data"].as_array().unwrap().len(), 0, "nothing refused was registered");
    // At the ceilings, and above the global one where the model's bound allows it.
    for (models, streams, pricing) in [
        (json!(["mock-model"]), 1_024, json!({"perToken": 0.001, "perHour": 100})),
        (json!(["big-model"]), 8, json!({"perToken": 0.005})),
    ] {
        let r = register(models, streams, pricing).await.unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
}

/// Without `allow_private_providers`, a provider's base URL must be `https://` to public
/// addresses: every spelling of an inside address, user info, a query and a name that
/// resolves to loopback are refused at registration, naming `baseUrl`.
#[tokio::test]
async fn inproc_bounds_provider_urls_cannot_reach_inside() {
    let gw = Gateway::start_with(|c| c.allow_private_providers = false).await;
    for url in [
        "http://169.254.169.254/latest/meta-data/?",
        "https://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:6379/",
        "https://127.0.0.1:6379/",
        "https://[::1]:5432/",
        "https://[::ffff:127.0.0.1]:5432/",
        "https://10.0.0.5:2375/",
        "https://0.0.0.0/",
        "https://2130706433/",
        "https://localhost:8080/",
        "https://user:pw@8.8.8.8/",
        "https://8.8.8.8/v1?key=1",
    ] {
        let r = gw
            .http
            .post(gw.url("/api/gpu/register"))
            .json(&json!({"capabilities": {"models": ["m"], "maxConcurrentStreams": 8}, "pricing": {"perToken": 0.000002}, "baseUrl": url}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{url}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], "baseUrl", "{url}: {e}");
    }
    let providers: Value = gw.http.get(gw.url("/api/admin/providers")).bearer_auth(crate::inproc::ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(providers["data"].as_array().unwrap().len(), 0);
}

/// A provider stored with an inside address (registered before the rules, or by a
/// deployment that allowed it) is not called once the gateway refuses such addresses:
/// the check also runs at every connection.
#[tokio::test]
async fn inproc_bounds_an_inside_address_is_refused_at_connection_too() {
    let gw = Gateway::start_with(|c| c.allow_private_providers = false).await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let request: openapi::platform::RegisterProviderRequest = serde_json::from_value(
        json!({"capabilities": {"models": ["mock-model"], "maxConcurrentStreams": 8}, "pricing": {"perToken": 0.000002}, "baseUrl": mock.url()}),
    )
    .unwrap();
    let created = gw.state.registry.register(request, gateway::inference::providers::ProviderStatus::Active, 0).await.unwrap().0;
    gw.state.registry.start_stream(&created.provider_id, "mock-model", "standard").await.unwrap();
    let key = gw.create_key("premium").await;
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(r.status(), 502);
    assert_eq!(mock.request_count(), 0, "the gateway never connected");
    assert!(gw.usage_rows().await.iter().all(|(_, _, _, completion)| *completion == 0));
    gw.ledger_is_clean().await;
}

/// A provider can replace a leaked key: the old one stops working at once.
#[tokio::test]
async fn inproc_bounds_a_provider_key_can_be_rotated() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let (id, old) = gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let heartbeat = |key: String| {
        gw.http.post(gw.url("/api/gpu/heartbeat")).bearer_auth(key).json(&json!({"providerId": id, "activeStreams": 0})).send()
    };
    assert_eq!(heartbeat(old.clone()).await.unwrap().status(), 200);
    let r = gw.http.post(gw.url("/api/gpu/keys/rotate")).bearer_auth(&old).json(&json!({"providerId": id})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let new = v["providerKey"].as_str().unwrap().to_owned();
    assert!(new.starts_with("pk-") && new != old);
    assert_eq!(heartbeat(old.clone()).await.unwrap().status(), 401, "the old key no longer works");
    assert_eq!(heartbeat(new.clone()).await.unwrap().status(), 200);
    // Only the provider's own key rotates it.
    let r = gw.http.post(gw.url("/api/gpu/keys/rotate")).bearer_auth(&old).json(&json!({"providerId": id})).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

/// The WebSocket is a door like any other: each message counts against the key's
/// requests per minute, a revoked key closes the socket, messages are capped at the
/// body limit, and a session ends after `ws_max_session_secs`.
#[tokio::test]
async fn inproc_bounds_the_websocket_counts_every_message_and_rechecks_the_key() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let gw = Gateway::start_with(|c| c.max_body_bytes = 64 * 1024).await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let v: Value = gw.admin_post("/api/admin/keys", json!({"name": "ws", "tier": "free", "requestsPerMinute": 3, "tokensPerMinute": 100000})).await.json().await.unwrap();
    let (key, key_id) = (v["key"].as_str().unwrap().to_owned(), v["id"].as_str().unwrap().to_owned());
    let ws_url = format!("{}/api/llm/ws?api_key={key}", gw.url("").replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    let next = |m: Message| -> Value { serde_json::from_str(m.to_text().unwrap()).unwrap() };
    assert_eq!(next(ws.next().await.unwrap().unwrap())["event"], "connected");
    // The upgrade was the first of 3 requests this minute: two messages are served, the
    // rest refused (the socket stays open).
    let mut outcomes = Vec::new();
    for id in 0..4 {
        ws.send(Message::Text(json!({"id": id, "prompt": "hi", "model": "mock-model"}).to_string().into())).await.unwrap();
        loop {
            let v = next(ws.next().await.unwrap().unwrap());
            match v["event"].as_str().unwrap() {
                "stream:token" => continue,
                "stream:end" => outcomes.push("served".to_owned()),
                "error" => outcomes.push(v["data"]["error"]["code"].as_str().unwrap().to_owned()),
                other => panic!("{other}"),
            }
            break;
        }
    }
    assert_eq!(outcomes, ["served", "served", "rate_limit_exceeded", "rate_limit_exceeded"]);
    assert_eq!(mock.request_count(), 2);

    // A message over the body limit closes the socket (the frame is refused).
    let premium = gw.create_key("premium").await;
    let premium_url = format!("{}/api/llm/ws?api_key={premium}", gw.url("").replace("http://", "ws://"));
    let (mut ws2, _) = tokio_tungstenite::connect_async(&premium_url).await.unwrap();
    let big = "x".repeat(128 * 1024);
    let _ = ws2.send(Message::Text(big.into())).await;
    let mut closed = false;
    while let Some(m) = ws2.next().await {
        if matches!(m, Err(_) | Ok(Message::Close(_))) {
            closed = true;
            break;
        }
    }
    assert!(closed, "an oversized message ends the session");

    // Revoked while open: the next message is refused and the socket closed.
    let r = gw.admin_post(&format!("/api/admin/keys/{key_id}/revoke"), json!({})).await;
    assert_eq!(r.status(), 200);
    ws.send(Message::Text(json!({"id": 9, "prompt": "hi", "model": "mock-model"}).to_string().into())).await.unwrap();
    let v = next(ws.next().await.unwrap().unwrap());
    assert_eq!(v["data"]["error"]["code"], "invalid_api_key", "{v}");
    assert!(matches!(ws.next().await, Some(Ok(Message::Close(_))) | None | Some(Err(_))));
    assert_eq!(mock.request_count(), 2);
    gw.ledger_is_clean().await;
}

/// `?api_key=` is for the WebSocket only (browsers cannot set its headers); on other
/// routes a key in the URL is refused unless `allow_query_api_key`.
#[tokio::test]
async fn inproc_bounds_query_keys_only_on_the_websocket() {
    let gw = Gateway::start().await;
    let key = gw.create_key("premium").await;
    let r = gw.http.get(gw.url(&format!("/v1/models?api_key={key}"))).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let gw = Gateway::start_with(|c| c.allow_query_api_key = true).await;
    let key = gw.create_key("premium").await;
    let r = gw.http.get(gw.url(&format!("/v1/models?api_key={key}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn inproc_bounds_a_websocket_session_ends_after_its_limit() {
    use futures::StreamExt;
    let gw = Gateway::start_with(|c| c.ws_max_session_secs = 1).await;
    let key = gw.create_key("premium").await;
    let url = format!("{}/api/llm/ws?api_key={key}", gw.url("").replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let started = Instant::now();
    let mut saw_error = false;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        if let Ok(text) = m.to_text() {
            saw_error |= text.contains("ws_max_session_secs");
        }
        if m.is_close() {
            break;
        }
    }
    assert!(saw_error, "the client is told why");
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
}

/// A provider that ignores `max_tokens` is cut at the limit (+16 chunks of slack): the
/// client sees a `length` finish and usage, the user pays and the provider earns for
/// the limit only, and the provider is flagged.
#[tokio::test]
async fn inproc_bounds_a_provider_past_max_tokens_is_cut_and_paid_for_the_limit() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let key = gw.create_key("premium").await;
    let r = gw
        .chat(&key, json!({"model": "mock-model", "messages": [{"role": "user", "content": "[overrun] hi"}], "max_tokens": 5,
            "stream": true, "stream_options": {"include_usage": true}}))
        .await;
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    let events: Vec<Value> = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(body.ends_with("data: [DONE]\n\n"));
    let words = words(&body);
    assert!(words <= 5 + 16 + 1, "{words} chunks relayed");
    let finishes: Vec<&str> = events.iter().filter_map(|e| e["choices"][0]["finish_reason"].as_str()).collect();
    assert_eq!(finishes, ["length"]);
    let usage = &events.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 5, "{usage}");
    let flagged: String = sqlx::query_scalar("SELECT usage_source FROM usage_records").fetch_one(&gw.state.store.pool).await.unwrap();
    assert_eq!(flagged, "gateway_flagged");
    let (_, _, _, completion) = gw.usage_rows().await.into_iter().next().unwrap();
    assert_eq!(completion, 5);
    gw.ledger_is_clean().await;
    // Not streamed: the same cut.
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": [{"role": "user", "content": "[overrun] hi"}], "max_tokens": 5})).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
}
