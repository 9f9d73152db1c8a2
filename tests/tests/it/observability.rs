//! Logs of the real binary: with `log_format = "json"` every line is a JSON object and
//! what a request logs carries that request's id (the one its response returned).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use crate::sdk::{free_port, gateway_bin};

/// A `gateway serve` on a fresh SQLite file in `dir`, healthy; stderr goes to `log`.
pub(crate) struct Served {
    pub child: Child,
    pub base: String,
    pub log: PathBuf,
}

impl Served {
    pub async fn start(dir: &Path, admin_key: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let port = free_port()?;
        let log = dir.join("gateway.log");
        let bin = gateway_bin()?;
        let child = Command::new(&bin)
            .arg("serve")
            .env("GATEWAY_DATABASE_URL", format!("sqlite://{}", dir.join("gw.db").display()))
            .env("GATEWAY_ADMIN_KEY", admin_key)
            // The mock providers listen on 127.0.0.1.
            .env("GATEWAY_ALLOW_PRIVATE_PROVIDERS", "true")
            .env("GATEWAY_PROBATION_REQUESTS", "0")
            .env("GATEWAY_FREE_TIER_DAILY_BUDGET", "1000")
            .env("GATEWAY_HOST", "127.0.0.1")
            .env("GPU_STREAMING_PORT", port.to_string())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut served = Self { child, base: format!("http://127.0.0.1:{port}"), log };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = served.child.try_wait()? {
                bail!("the gateway exited with {status}; its log:\n{}", served.log_text());
            }
            if http.get(format!("{}/health", served.base)).send().await.is_ok_and(|r| r.status().is_success()) {
                return Ok(served);
            }
            ensure!(Instant::now() < deadline, "the gateway was not healthy within 30 s; its log:\n{}", served.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[tokio::test]
async fn observability_json_logs_carry_the_request_id() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let gw = Served::start(dir.path(), "obs-admin-key-0123456789", &[("GATEWAY_LOG_FORMAT", "json"), ("RUST_LOG", "info")]).await?;
    let response = reqwest::Client::new()
        .post(format!("{}/api/gpu/register", gw.base))
        .json(&json!({"capabilities": {"models": ["m"], "maxConcurrentStreams": 1}, "pricing": {"perToken": 0.000001}, "baseUrl": "http://127.0.0.1:9"}))
        .send()
        .await?;
    ensure!(response.status() == 201, "register: {}", response.status());
    let request_id = response.headers()["x-request-id"].to_str()?.to_owned();
    let provider_id = response.json::<Value>().await?["providerId"].as_str().context("no providerId")?.to_owned();

    // The line is written while the request runs; give the writer a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        let text = gw.log_text();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("a log line is not JSON: {l}")))
            .collect::<anyhow::Result<_>>()?;
        if let Some(line) = lines.into_iter().find(|l| l["fields"]["message"] == "provider registered") {
            break line;
        }
        ensure!(Instant::now() < deadline, "no `provider registered` line in the log:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(line["fields"]["provider"], provider_id.as_str(), "{line}");
    assert_eq!(line["span"]["request_id"], request_id.as_str(), "the request span carries the response's id: {line}");
    assert_eq!(line["span"]["path"], "/api/gpu/register", "{line}");
    assert_eq!(line["span"]["method"], "POST", "{line}");
    Ok(())
}

/// With `otel_endpoint` set, request spans reach an OTLP/HTTP collector (a test double
/// that records what it is sent): the protobuf carries the request id and the service.
#[tokio::test]
async fn observability_otlp_export_carries_the_request_span() -> anyhow::Result<()> {
    use std::sync::{Arc, Mutex};
    type Batches = Arc<Mutex<Vec<(String, Vec<u8>)>>>;
    let received: Batches = Arc::default();
    let sink = received.clone();
    let collector = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let kind = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                sink.lock().map(|mut s| s.push((kind, body.to_vec()))).ok();
                ([("content-type", "application/x-protobuf")], Vec::<u8>::new())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let dir = tempfile::tempdir()?;
    let gw = Served::start(
        dir.path(),
        "otel-admin-key-0123456789",
        &[("GATEWAY_OTEL_ENDPOINT", endpoint.as_str()), ("GATEWAY_OTEL_SERVICE_NAME", "gs-otel-test"), ("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .await?;
    let response = reqwest::Client::new().get(format!("{}/api/llm/models", gw.base)).send().await?;
    let request_id = response.headers()["x-request-id"].to_str()?.to_owned();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let batches = received.lock().map(|r| r.clone()).unwrap_or_default();
        let hit = batches.iter().find(|(_, body)| body.windows(request_id.len()).any(|w| w == request_id.as_bytes()));
        if let Some((kind, body)) = hit {
            ensure!(kind == "application/x-protobuf", "OTLP content type {kind}");
            ensure!(body.windows(12).any(|w| w == b"gs-otel-test"), "the service name is not in the exported batch");
            ensure!(body.windows(7).any(|w| w == b"request"), "the request span is not in the exported batch");
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "no span with request id {request_id} reached the collector in 15 s ({} batches); gateway log:\n{}",
            batches.len(),
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
