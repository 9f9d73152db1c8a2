//! The real `worker serve` binary joined to a mock gateway: registration, streams on
//! and off line, heartbeats, and a SIGTERM during a stream that lets it finish.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::post;
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::model_path;

type Calls = Arc<Mutex<Vec<(String, Option<String>, Value)>>>;

async fn record(State(calls): State<Calls>, uri: Uri, headers: HeaderMap, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
    calls.lock().unwrap().push((uri.path().to_string(), auth.clone(), body));
    // A key from an earlier life of the gateway (e.g. its database was reset).
    if auth.as_deref() == Some("Bearer pk-stale") {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": {"message": "invalid provider key"}})));
    }
    if uri.path() == "/api/gpu/register" {
        return (StatusCode::CREATED, Json(json!({"providerId": "prov-1", "providerKey": "pk-test", "relaySecret": "rs-test"})));
    }
    (StatusCode::OK, Json(json!({"ok": true})))
}

/// Waits (up to 20 s) until the worker at `base` answers `/health`.
async fn wait_healthy(http: &reqwest::Client, base: &str) {
    for _ in 0..200 {
        if http.get(format!("{base}/health")).send().await.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("worker did not come up");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn mock_gateway() -> (String, Calls) {
    let calls: Calls = Arc::default();
    let gw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw_url = format!("http://{}", gw.local_addr().unwrap());
    let router = Router::new().fallback(post(record)).with_state(calls.clone());
    tokio::spawn(async move { axum::serve(gw, router).await });
    (gw_url, calls)
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_saved_key_is_replaced_by_a_new_registration() {
    let (gw_url, calls) = mock_gateway().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("provider.json");
    let stale = json!({"gateway": gw_url, "providerId": "prov-old", "providerKey": "pk-stale", "relaySecret": "rs-old"});
    std::fs::write(&key_file, stale.to_string()).unwrap();
    let port = free_port();
    let public = format!("http://127.0.0.1:{port}");
    let mut child = spawn_worker(port, &gw_url, &key_file, &["--public-url", &public, "--qualities", "standard"]);
    let mut paths = Vec::new();
    for _ in 0..300 {
        paths = calls.lock().unwrap().iter().map(|c| (c.0.clone(), c.1.clone())).collect::<Vec<_>>();
        if paths.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    let bearer = |k: &str| Some(format!("Bearer {k}"));
    assert_eq!(
        paths[..3],
        [
            ("/api/gpu/stream/start".to_string(), bearer("pk-stale")),
            ("/api/gpu/register".to_string(), None),
            ("/api/gpu/stream/start".to_string(), bearer("pk-test")),
        ]
    );
    assert!(status.success(), "worker exited with {status}");
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
    assert_eq!(saved["providerKey"], "pk-test");
    assert_eq!(saved["relaySecret"], "rs-test");
}

/// A key file saved for other capabilities (here: before the worker served an embedding
/// model) is not reused: the worker registers anew and saves what it registered, which
/// the next start reuses.
#[tokio::test(flavor = "multi_thread")]
async fn changed_capabilities_register_anew_and_same_ones_reuse_the_key() {
    let (gw_url, calls) = mock_gateway().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("provider.json");
    let old = json!({"gateway": gw_url, "providerId": "prov-0", "providerKey": "pk-old", "relaySecret": "rs-old",
        "capabilities": {"models": ["smollm2-135m-instruct"], "embeddingModels": []}});
    std::fs::write(&key_file, old.to_string()).unwrap();
    let embedding = crate::embeddings::minilm_dir();
    let run = |calls: Calls| {
        let port = free_port();
        let public = format!("http://127.0.0.1:{port}");
        let embedding = embedding.clone();
        let (gw_url, key_file) = (gw_url.clone(), key_file.clone());
        async move {
            let args = ["--public-url", &public, "--qualities", "standard", "--embedding-model", embedding.to_str().unwrap()];
            let mut child = spawn_worker(port, &gw_url, &key_file, &args);
            for _ in 0..300 {
                if calls.lock().unwrap().iter().any(|c| c.0 == "/api/gpu/stream/start") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
            std::mem::take(&mut *calls.lock().unwrap())
        }
    };
    let first = run(calls.clone()).await;
    assert_eq!(first[0].0, "/api/gpu/register", "{:?}", first.iter().map(|c| &c.0).collect::<Vec<_>>());
    assert_eq!(first[0].2["capabilities"]["embeddingModels"], json!(["all-minilm-l6-v2"]));
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
    assert_eq!((saved["providerKey"].as_str(), &saved["capabilities"]), (Some("pk-test"), &first[0].2["capabilities"]));
    let second = run(calls.clone()).await;
    assert_eq!(second[0].0, "/api/gpu/stream/start", "the same capabilities reuse the saved key");
    assert_eq!(second[0].1.as_deref(), Some("Bearer pk-test"));
}

#[tokio::test(flavor = "multi_thread")]
async fn registers_streams_and_drains_on_sigterm() {
    let (gw_url, calls) = mock_gateway().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("provider.json");
    let port = free_port();
    let public = format!("http://127.0.0.1:{port}");
    let mut child = spawn_worker(port, &gw_url, &key_file, &["--public-url", &public, "--qualities", "standard,ultra", "--name", "test-worker"]);
    let http = reqwest::Client::new();
    wait_healthy(&http, &public).await;
    // Registration happens before the stream calls; give them a moment.
    for _ in 0..50 {
        if calls.lock().unwrap().len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    {
        let calls = calls.lock().unwrap();
        let (path, _, reg) = &calls[0];
        assert_eq!(path, "/api/gpu/register");
        assert_eq!(reg["name"], "test-worker");
        assert_eq!(reg["baseUrl"], public);
        // `--backend auto` in a build without `cuda`: the native CPU path, reported as such.
        assert_eq!(reg["gpuInfo"]["backend"], "cpu");
        assert_eq!(reg["gpuInfo"]["engine"], "native-cpu");
        assert!(reg["gpuInfo"]["memoryMb"].as_u64().unwrap() > 0);
        assert_eq!(reg["capabilities"]["models"], json!(["smollm2-135m-instruct"]));
        assert_eq!(reg["capabilities"]["maxConcurrentStreams"], 32);
        assert!(reg["capabilities"]["features"].as_array().unwrap().contains(&json!("seed")));
        assert_eq!(reg["capabilities"]["precisions"], json!(["full", "reduced"]), "precision is chosen per request");
        assert!(reg["pricing"]["perToken"].as_f64().unwrap() > 0.0);
        let starts: Vec<_> = calls.iter().filter(|c| c.0 == "/api/gpu/stream/start").collect();
        assert_eq!(starts.len(), 2);
        assert_eq!(starts[0].1.as_deref(), Some("Bearer pk-test"));
        assert_eq!(starts[0].2, json!({"providerId": "prov-1", "model": "smollm2-135m-instruct", "quality": "standard"}));
    }
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
    assert_eq!(saved["providerKey"], "pk-test");

    // A stream as the gateway sends it; SIGTERM arrives after its first token.
    let body = json!({"model": "smollm2-135m-instruct", "stream": true, "stream_options": {"include_usage": true},
        "user": "anon-1", "priority": 1, "max_tokens": 40, "temperature": 0,
        "messages": [{"role": "user", "content": "Tell me a story about a fox."}]});
    // Only the gateway may call: a stranger who finds the port gets a 401, and so does
    // an old secret.
    for bearer in [None, Some("rs-old"), Some("pk-test")] {
        let mut req = http.post(format!("{public}/v1/chat/completions")).json(&body);
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{bearer:?}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    let models = http.get(format!("{public}/v1/models")).send().await.unwrap();
    assert_eq!(models.status(), 401);
    let resp = http.post(format!("{public}/v1/chat/completions")).bearer_auth("rs-test").json(&body).send().await.unwrap();
    assert!(resp.status().is_success());
    let mut stream = resp.bytes_stream();
    let mut text = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "stream did not finish: {text}");
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    assert!(text.contains("\"completion_tokens\":40"), "{text}");
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "worker exited with {status}");
    let calls = calls.lock().unwrap();
    let stops: Vec<_> = calls.iter().filter(|c| c.0 == "/api/gpu/stream/stop").collect();
    assert_eq!(stops.len(), 2, "stream/stop not called for each quality");
}

/// `worker serve` on 127.0.0.1:`port` with the default model, joined to `gateway`.
fn spawn_worker(port: u16, gateway: &str, key_file: &std::path::Path, extra: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string(), "--gateway", gateway])
        .args(extra)
        .arg("--model")
        .arg(model_path())
        .arg("--key-file")
        .arg(key_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A worker without a gateway refuses to start unless given `--api-key` or `--open`;
/// with `--api-key` it answers only that key.
#[tokio::test(flavor = "multi_thread")]
async fn a_standalone_worker_needs_a_key_or_open() {
    let port = free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["serve", "--port", &port.to_string(), "--model"])
        .arg(model_path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--api-key"), "{}", String::from_utf8_lossy(&out.stderr));

    let mut child = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["serve", "--port", &port.to_string(), "--api-key", "sk-owner", "--model"])
        .arg(model_path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}");
    wait_healthy(&http, &url).await;
    assert_eq!(http.get(format!("{url}/v1/models")).send().await.unwrap().status(), 401);
    assert_eq!(http.get(format!("{url}/v1/models")).bearer_auth("sk-other").send().await.unwrap().status(), 401);
    assert_eq!(http.get(format!("{url}/v1/models")).bearer_auth("sk-owner").send().await.unwrap().status(), 200);
    // It listens on 127.0.0.1 only, unless told otherwise.
    let listening = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let hex_port = format!(":{port:04X}");
    assert!(listening.lines().any(|l| l.contains(&format!("0100007F{hex_port}"))), "bound to 127.0.0.1");
    assert!(!listening.lines().any(|l| l.contains(&format!("00000000{hex_port}"))), "not bound to 0.0.0.0");
    let _ = child.kill();
    let _ = child.wait();
}
