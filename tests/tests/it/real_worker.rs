//! The real worker (default model) behind the real gateway: quality tiers change what
//! runs on the worker (its queue priority, precision and max-tokens cap, visible in its metrics)
//! and what is billed (0.8× for low, 2.0× for ultra).

use std::time::Duration;

use serde_json::{json, Value};
use tokio::process::Command;

use crate::cli::{serve_with, ADMIN};
use crate::sdk::{free_port, gateway_bin};

#[tokio::test]
async fn real_worker_low_and_ultra_run_differently_and_bill_their_multipliers() {
    let worker = gateway_bin().unwrap().with_file_name("worker");
    assert!(worker.is_file(), "{} is missing: run scripts/test.sh", worker.display());
    let fetched = Command::new(&worker).arg("fetch-model").output().await.unwrap();
    assert!(fetched.status.success(), "worker fetch-model failed: {}", String::from_utf8_lossy(&fetched.stderr));
    let model_path = String::from_utf8_lossy(&fetched.stdout).lines().last().unwrap_or_default().trim().to_owned();

    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let _gateway = serve_with(dir.path(), port, &[]).await;
    let base = format!("http://127.0.0.1:{port}");
    let worker_port = free_port().unwrap();
    let worker_url = format!("http://127.0.0.1:{worker_port}");
    let _worker = Command::new(&worker)
        .args(["serve", "--model", &model_path, "--port", &worker_port.to_string(), "--host", "127.0.0.1"])
        .args(["--gateway", &base, "--public-url", &worker_url])
        .arg("--key-file")
        .arg(dir.path().join("provider.json"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let mut model = None;
    for _ in 0..600 {
        if let Ok(r) = http.get(format!("{base}/api/admin/providers")).bearer_auth(ADMIN).send().await {
            let v: Value = r.json().await.unwrap_or_default();
            let streams = v["data"][0]["streams"].as_array().map_or(0, Vec::len);
            if streams == 4 {
                model = v["data"][0]["streams"][0]["model"].as_str().map(str::to_owned);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let model = model.expect("the worker registered and went on line at all four tiers");
    let key: Value = http.post(format!("{base}/api/admin/keys")).bearer_auth(ADMIN)
        .json(&json!({"name": "tiers", "tier": "premium"})).send().await.unwrap().json().await.unwrap();
    let r = http.post(format!("{base}/api/admin/users/{}/credit", key["userId"].as_str().unwrap())).bearer_auth(ADMIN)
        .json(&json!({"amount": 10})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let key = key["key"].as_str().unwrap().to_owned();
    let mut usage = Vec::new();
    for quality in ["low", "ultra"] {
        let r = http.post(format!("{base}/v1/chat/completions")).bearer_auth(&key)
            .json(&json!({"model": model, "quality": quality, "temperature": 0, "max_tokens": 5000,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}))
            .send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-quality-served"], quality);
        let v: Value = r.json().await.unwrap();
        assert!(v["choices"][0]["message"]["content"].as_str().unwrap().contains("Paris"), "{v}");
        usage.push(v["usage"].clone());
    }
    // The worker saw each tier's priority (low 0, ultra 3).
    let metrics = http.get(format!("{worker_url}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("worker_requests_by_priority_total{priority=\"0\"} 1"), "{metrics}");
    assert!(metrics.contains("worker_requests_by_priority_total{priority=\"3\"} 1"), "{metrics}");
    // ... and each tier's precision: low allows reduced, ultra requires full.
    assert!(metrics.contains("worker_requests_by_precision_total{precision=\"reduced\"} 1\n"), "{metrics}");
    assert!(metrics.contains("worker_requests_by_precision_total{precision=\"full\"} 1\n"), "{metrics}");
    // Same greedy answer, billed at 0.8× and 2.0× of 2 µUSD per token.
    assert_eq!(usage[0]["total_tokens"], usage[1]["total_tokens"]);
    let tokens = usage[0]["total_tokens"].as_i64().unwrap();
    let cost = |u: &Value| (u["cost"].as_f64().unwrap() * 1e6).round() as i64;
    assert_eq!(cost(&usage[0]), (tokens * 2 * 8 + 9) / 10, "low: 0.8×, rounded up");
    assert_eq!(cost(&usage[1]), tokens * 2 * 2, "ultra: 2.0×");
}
