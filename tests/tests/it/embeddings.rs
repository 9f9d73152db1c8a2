//! `/v1/embeddings` through the gateway, in front of embedding test doubles that encode
//! with all-MiniLM-L6-v2's real WordPiece tokenizer (their vectors are a checksum of
//! the token ids, eight numbers wide): routing only to providers that list the model in
//! `embeddingModels`, the hold and the charge on prompt tokens only (counted by the
//! gateway with the same tokenizer), every refusal with nothing recorded, and hostile
//! providers (a wrong number of vectors, an endless answer, no usage, an inflated count).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Value};
use tokenize::embeddings::Inputs;
use tokenize::wordpiece::WordPiece;

use crate::inproc::Gateway;

/// Where `worker fetch-model --embedding` (run by scripts/test.sh) puts the model.
pub(crate) fn minilm_dir() -> PathBuf {
    let models = std::env::var_os("GPU_STREAMING_MODEL_DIR").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into())).join(".cache/gpu-streaming/models"),
        PathBuf::from,
    );
    let dir = models.join("all-MiniLM-L6-v2");
    assert!(dir.join("tokenizer.json").is_file(), "{} is missing: run `cargo run -p worker -- fetch-model --embedding`", dir.display());
    dir
}

/// How a test double misbehaves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Honest,
    /// Reports 100 prompt tokens more than it encoded.
    Overreports,
    /// One vector fewer than inputs.
    WrongCount,
    /// An answer that never ends (well past the gateway's bound).
    Endless,
    NoUsage,
}

#[derive(Clone)]
struct Double {
    behaviour: Behaviour,
    tokenizer: Arc<WordPiece>,
    requests: Arc<AtomicUsize>,
}

const WIDTH: usize = 8;

async fn embeddings(State(d): State<Double>, Json(body): Json<Value>) -> Response {
    d.requests.fetch_add(1, Ordering::SeqCst);
    if body["dimensions"].as_u64().is_some_and(|n| n != WIDTH as u64) {
        let error = json!({"error": {"message": "this model has 8 dimensions", "type": "invalid_request_error", "param": "dimensions", "code": null}});
        return (axum::http::StatusCode::BAD_REQUEST, Json(error)).into_response();
    }
    let inputs = Inputs::parse(body.get("input")).unwrap();
    let sequences = inputs.sequences(&d.tokenizer, 512, body["truncate"] == true).unwrap();
    let tokens: usize = sequences.iter().map(Vec::len).sum();
    let base64 = body["encoding_format"] == "base64";
    let mut data: Vec<Value> = sequences
        .iter()
        .enumerate()
        .map(|(i, ids)| {
            let v = vector(ids);
            let embedding = if base64 {
                json!(base64::engine::general_purpose::STANDARD.encode(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    match d.behaviour {
        Behaviour::WrongCount => {
            data.pop();
        }
        Behaviour::Endless => {
            let chunk = bytes::Bytes::from(vec![b' '; 64 * 1024]);
            let stream = futures::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
            return axum::body::Body::from_stream(stream).into_response();
        }
        _ => {}
    }
    let reported = if d.behaviour == Behaviour::Overreports { tokens + 100 } else { tokens };
    let mut answer = json!({"object": "list", "data": data, "model": body["model"], "usage": {"prompt_tokens": reported, "total_tokens": reported}});
    if d.behaviour == Behaviour::NoUsage {
        answer.as_object_mut().unwrap().remove("usage");
    }
    Json(answer).into_response()
}

/// Eight numbers that depend on every token id and its place.
fn vector(ids: &[u32]) -> Vec<f32> {
    (0..WIDTH).map(|k| ids.iter().enumerate().map(|(i, &id)| ((id as usize * (i + 1) * (k + 3)) % 97) as f32).sum::<f32>() / 97.0).collect()
}

/// Starts a double on 127.0.0.1 and registers it for `embedding_models`, with a chat
/// model of its own on line at `standard` (what makes a provider live).
async fn add_double(gw: &Gateway, behaviour: Behaviour, tokenizer: &Arc<WordPiece>, embedding_models: &[&str]) -> (String, Arc<AtomicUsize>) {
    let double = Double { behaviour, tokenizer: tokenizer.clone(), requests: Arc::default() };
    let requests = double.requests.clone();
    let app = Router::new().route("/v1/embeddings", post(embeddings)).with_state(double);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let caps = json!({"models": [format!("chat-of-{}", embedding_models[0])], "maxConcurrentStreams": 8, "embeddingModels": embedding_models});
    let r = gw
        .http
        .post(gw.url("/api/gpu/register"))
        .json(&json!({"capabilities": caps, "pricing": {"perToken": 0.000002}, "baseUrl": url}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    let (id, key) = (v["providerId"].as_str().unwrap().to_owned(), v["providerKey"].as_str().unwrap());
    let r = gw
        .http
        .post(gw.url("/api/gpu/stream/start"))
        .bearer_auth(key)
        .json(&json!({"providerId": id, "model": format!("chat-of-{}", embedding_models[0]), "quality": "standard"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    (id, requests)
}

async fn embed(gw: &Gateway, key: &str, body: Value) -> (u16, Value) {
    let r = gw.http.post(gw.url("/v1/embeddings")).bearer_auth(key).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn embedding_rows(gw: &Gateway) -> Vec<(String, i64, i64, i64, String)> {
    use sqlx::Row;
    sqlx::query("SELECT status, prompt_tokens, completion_tokens, cost_micros, usage_source FROM usage_records WHERE endpoint = 'embeddings' ORDER BY created_at")
        .fetch_all(&gw.state.store.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("status"), r.get("prompt_tokens"), r.get("completion_tokens"), r.get("cost_micros"), r.get("usage_source")))
        .collect()
}

/// The gateway, with the MiniLM tokenizer for each of `models`.
async fn gateway(models: &[&str], tweak: impl FnOnce(&mut gateway::ops::config::Config)) -> (Gateway, Arc<WordPiece>) {
    let dir = minilm_dir();
    let tokenizer = Arc::new(WordPiece::load(&dir.join("tokenizer.json")).unwrap());
    let gw = Gateway::start_with(|c| {
        for m in models {
            c.tokenizers.insert((*m).to_owned(), dir.clone());
        }
        tweak(c);
    })
    .await;
    (gw, tokenizer)
}

#[tokio::test]
async fn inproc_embeddings_are_routed_held_and_billed_on_prompt_tokens_only() {
    let (gw, tokenizer) = gateway(&["minilm"], |_| {}).await;
    let (provider, requests) = add_double(&gw, Behaviour::Honest, &tokenizer, &["minilm"]).await;
    let chat_mock = tests::spawn_mock(tests::MockConfig::default()).await.unwrap();
    gw.add_provider(&chat_mock, "mock-model", None, &["standard"]).await;
    let (key, user) = gw.create_unfunded_key("premium").await;
    gw.credit(&user, 10_000_000).await;
    let count = |texts: &[&str]| texts.iter().map(|t| tokenizer.encode(t).len() as i64).sum::<i64>();

    // Two sentences: a vector each, billed 2 µUSD per prompt token, nothing for output.
    let texts = ["The cat sits on the mat.", "Stock markets fell sharply today."];
    let (status, v) = embed(&gw, &key, json!({"model": "minilm", "input": texts})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!((v["object"].as_str(), v["model"].as_str()), (Some("list"), Some("minilm")));
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (i, item) in data.iter().enumerate() {
        assert_eq!((item["object"].as_str(), item["index"].as_u64()), (Some("embedding"), Some(i as u64)));
        let want = vector(&tokenizer.encode(texts[i]));
        let got: Vec<f32> = item["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        assert_eq!(got, want, "input {i}'s own vector, in order");
    }
    let tokens = count(&texts);
    assert_eq!(v["usage"]["prompt_tokens"].as_i64(), Some(tokens));
    assert_eq!(v["usage"]["total_tokens"].as_i64(), Some(tokens));
    assert_eq!((v["usage"]["cost"].as_f64().unwrap() * 1e6).round() as i64, tokens * 2);
    assert!(v.get("ad").is_none(), "{v}");
    let mut spent = tokens * 2;
    assert_eq!(gw.balance(&format!("user:{user}")).await, 10_000_000 - spent);
    assert_eq!(embedding_rows(&gw).await, [("ok".to_owned(), tokens, 0, tokens * 2, "provider".to_owned())]);
    assert!(gw.balance(&format!("provider:{provider}")).await > 0, "the provider earned its share");

    // base64 carries the same numbers; token ids count as sent plus [CLS] and [SEP].
    let (status, b) = embed(&gw, &key, json!({"model": "minilm", "input": texts[0], "encoding_format": "base64"})).await;
    assert_eq!(status, 200, "{b}");
    let bytes = base64::engine::general_purpose::STANDARD.decode(b["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let floats: Vec<f32> = bytes.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(floats, vector(&tokenizer.encode(texts[0])));
    spent += count(&texts[..1]) * 2;
    let (status, t) = embed(&gw, &key, json!({"model": "minilm", "input": [[7592, 2088], [2088]]})).await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["usage"]["prompt_tokens"], 4 + 3);
    spent += 7 * 2;

    // Longer than the model's context (512 tokens with [CLS] and [SEP], from its
    // config.json): refused, unless the request asks to truncate.
    let long = "word ".repeat(600);
    let (status, e) = embed(&gw, &key, json!({"model": "minilm", "input": long})).await;
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("input")), "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("512"), "{e}");
    let (status, cut) = embed(&gw, &key, json!({"model": "minilm", "input": long, "truncate": true})).await;
    assert_eq!((status, cut["usage"]["prompt_tokens"].as_i64()), (200, Some(512)), "{cut}");
    spent += 512 * 2;
    assert_eq!(requests.load(Ordering::SeqCst), 4);

    // Every refusal: the right status, the parameter named, the provider not called,
    // nothing held, charged or recorded.
    let too_many: Vec<&str> = vec!["a"; 2049];
    for (body, status, param) in [
        (json!({"model": "minilm"}), 400, Some("input")),
        (json!({"model": "minilm", "input": ""}), 400, Some("input")),
        (json!({"model": "minilm", "input": []}), 400, Some("input")),
        (json!({"model": "minilm", "input": [[]]}), 400, Some("input")),
        (json!({"model": "minilm", "input": too_many}), 400, Some("input")),
        (json!({"model": "minilm", "input": [[30522]]}), 400, Some("input")),
        (json!({"model": "minilm", "input": [1, "a"]}), 400, Some("input")),
        (json!({"model": "minilm", "input": "a", "encoding_format": "hex"}), 400, Some("encoding_format")),
        (json!({"model": "minilm", "input": "a", "dimensions": 0}), 400, Some("dimensions")),
        (json!({"model": "", "input": "a"}), 400, Some("model")),
        (json!({"model": "nope", "input": "a"}), 404, Some("model")),
        // A chat model is not an embedding model.
        (json!({"model": "mock-model", "input": "a"}), 404, Some("model")),
    ] {
        let (got, e) = embed(&gw, &key, body.clone()).await;
        assert_eq!((got, e["error"]["param"].as_str()), (status, param), "{body}: {e}");
        assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    }
    // The provider judges `dimensions` (it knows its widths): its 400 reaches the client.
    let (status, e) = embed(&gw, &key, json!({"model": "minilm", "input": "a", "dimensions": 16})).await;
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("dimensions")), "{e}");
    assert_eq!(requests.load(Ordering::SeqCst), 5, "only the dimensions request reached the provider");
    // Not JSON, and chat with an embedding model.
    let r = gw.http.post(gw.url("/v1/embeddings")).bearer_auth(&key).header("content-type", "text/plain").body("x").send().await.unwrap();
    assert_eq!(r.status(), 415);
    let r = gw.chat(&key, json!({"model": "minilm", "messages": crate::inproc::user("hi")})).await;
    assert_eq!(r.status(), 404, "chat never goes to an embedding model");
    assert_eq!(embedding_rows(&gw).await.len(), 4, "refusals leave no usage row");
    assert_eq!(gw.balance(&format!("user:{user}")).await, 10_000_000 - spent);

    // A free key embeds too (from the free tier's budget), and no ad rides on it.
    let free = gw.create_key("free").await;
    let (status, f) = embed(&gw, &free, json!({"model": "minilm", "input": texts[1]})).await;
    assert_eq!(status, 200, "{f}");
    assert!(!f.to_string().contains("Sponsored") && f.get("ad").is_none(), "{f}");

    // /v1/models lists it with the chat models.
    let models: Value = gw.http.get(gw.url("/v1/models")).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert!(ids.contains(&"minilm") && ids.contains(&"mock-model"), "{ids:?}");
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn embeddings_from_hostile_providers_fail_over_or_fail_with_nothing_charged() {
    let models = ["mixed", "wrong-count", "endless", "no-usage", "inflated"];
    let (gw, tokenizer) = gateway(&models, |c| {
        c.provider_max_response_bytes = 256 * 1024;
        c.routing_seed = Some(7);
    })
    .await;
    let (_, honest) = add_double(&gw, Behaviour::Honest, &tokenizer, &["mixed"]).await;
    let (_, bad) = add_double(&gw, Behaviour::WrongCount, &tokenizer, &["mixed", "wrong-count"]).await;
    let (_, endless) = add_double(&gw, Behaviour::Endless, &tokenizer, &["endless"]).await;
    let (_, no_usage) = add_double(&gw, Behaviour::NoUsage, &tokenizer, &["no-usage"]).await;
    let (_, inflated) = add_double(&gw, Behaviour::Overreports, &tokenizer, &["inflated"]).await;
    let (key, user) = gw.create_unfunded_key("premium").await;
    gw.credit(&user, 10_000_000).await;
    let texts = ["one sentence", "and another one"];
    let tokens: i64 = texts.iter().map(|t| tokenizer.encode(t).len() as i64).sum();

    // A provider with a vector missing fails over to an honest one, every time.
    for _ in 0..6 {
        let (status, v) = embed(&gw, &key, json!({"model": "mixed", "input": texts})).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["data"].as_array().unwrap().len(), 2);
    }
    assert_eq!(honest.load(Ordering::SeqCst), 6);
    assert!(bad.load(Ordering::SeqCst) >= 1, "the bad provider was tried");
    let charged = gw.balance(&format!("user:{user}")).await;
    assert_eq!(charged, 10_000_000 - 6 * tokens * 2);

    // Alone, a provider that sends too few vectors, an endless answer or no usage
    // fails the request: a 502, nothing charged.
    for model in ["wrong-count", "endless", "no-usage"] {
        let (status, e) = embed(&gw, &key, json!({"model": model, "input": texts})).await;
        assert_eq!(status, 502, "{model}: {e}");
        assert_eq!(e["error"]["type"], "server_error", "{e}");
    }
    assert!(endless.load(Ordering::SeqCst) >= 1 && no_usage.load(Ordering::SeqCst) >= 1);
    assert_eq!(gw.balance(&format!("user:{user}")).await, charged, "failed requests are not charged");

    // A provider that inflates its count is billed the gateway's count and flagged.
    let (status, v) = embed(&gw, &key, json!({"model": "inflated", "input": texts})).await;
    assert_eq!((status, v["usage"]["prompt_tokens"].as_i64()), (200, Some(tokens)), "{v}");
    assert_eq!(inflated.load(Ordering::SeqCst), 1);
    let rows = embedding_rows(&gw).await;
    assert_eq!(rows.last().unwrap().4, "gateway_flagged");
    assert_eq!(rows.iter().filter(|r| r.0 == "ok").count(), 7);
    assert!(rows.iter().filter(|r| r.0 != "ok").all(|r| r.3 == 0), "{rows:?}");
    gw.ledger_is_clean().await;
}
