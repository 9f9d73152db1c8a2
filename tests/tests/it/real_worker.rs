//! The real worker (default model) behind the real gateway: quality tiers change what
//! runs on the worker (its queue priority, precision and max-tokens cap, visible in its metrics)
//! and what is billed (0.8× for low, 2.0× for ultra); the worker's reported usage agrees
//! with the gateway's count of the delivered text with the model's tokenizer.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::process::Command;

use crate::cli::{serve_with, ADMIN};
use crate::sdk::{free_port, gateway_bin};

/// The id the worker serves the default model under (its file name without the
/// quantization suffix).
const DEFAULT_MODEL_ID: &str = "smollm2-135m-instruct";

/// The `worker` binary next to the gateway's.
fn worker_bin() -> PathBuf {
    let worker = gateway_bin().unwrap().with_file_name("worker");
    assert!(worker.is_file(), "{} is missing: run scripts/test.sh", worker.display());
    worker
}

/// The default model's GGUF, fetched by `worker fetch-model` unless it is there already.
pub(crate) async fn default_model_path() -> PathBuf {
    let fetched = Command::new(worker_bin()).arg("fetch-model").output().await.unwrap();
    assert!(fetched.status.success(), "worker fetch-model failed: {}", String::from_utf8_lossy(&fetched.stderr));
    PathBuf::from(String::from_utf8_lossy(&fetched.stdout).lines().last().unwrap_or_default().trim())
}

/// Starts `worker serve` with the default model (and `extra` flags), joined to the
/// gateway at `base` with its key file in `dir`; returns it and its URL.
fn start_worker(model_path: &std::path::Path, extra: &[&std::ffi::OsStr], base: &str, dir: &std::path::Path) -> (tokio::process::Child, String) {
    let worker_port = free_port().unwrap();
    let worker_url = format!("http://127.0.0.1:{worker_port}");
    let child = Command::new(worker_bin())
        .args(["serve", "--model"])
        .arg(model_path)
        .args(extra)
        .args(["--port", &worker_port.to_string(), "--host", "127.0.0.1"])
        .args(["--gateway", base, "--public-url", &worker_url])
        .arg("--key-file")
        .arg(dir.join("provider.json"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    (child, worker_url)
}

/// The real gateway (`gateway serve` on SQLite in `dir`, counting with the default
/// model's tokenizer and `more_tokenizers`, `"model" = 'path'` TOML pairs) and the real
/// worker (with `worker_args`) joined to it.
struct Up {
    _gateway: tokio::process::Child,
    _worker: tokio::process::Child,
    worker_url: String,
    base: String,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

async fn up(model_path: &std::path::Path, more_tokenizers: &str, worker_args: &[&std::ffi::OsStr]) -> Up {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    // A TOML literal string: the path is taken as it is.
    let tokenizers = format!("{{ \"{DEFAULT_MODEL_ID}\" = '{}'{more_tokenizers} }}", model_path.display());
    let gateway = serve_with(dir.path(), port, &[("GATEWAY_TOKENIZERS", &tokenizers)]).await;
    let base = format!("http://127.0.0.1:{port}");
    let (worker, worker_url) = start_worker(model_path, worker_args, &base, dir.path());
    Up { _gateway: gateway, _worker: worker, worker_url, base, dir, http: reqwest::Client::new() }
}

/// A premium key with $10 of credit.
async fn premium_key(http: &reqwest::Client, base: &str) -> String {
    let key: Value = http.post(format!("{base}/api/admin/keys")).bearer_auth(ADMIN)
        .json(&json!({"name": "real-worker", "tier": "premium"})).send().await.unwrap().json().await.unwrap();
    let r = http.post(format!("{base}/api/admin/users/{}/credit", key["userId"].as_str().unwrap())).bearer_auth(ADMIN)
        .json(&json!({"amount": 10})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    key["key"].as_str().unwrap().to_owned()
}

/// Waits (up to a minute) until `/v1/models` lists `model`.
async fn wait_listed(http: &reqwest::Client, base: &str, key: &str, model: &str) {
    for _ in 0..600 {
        let models: Value = http.get(format!("{base}/v1/models")).bearer_auth(key).send().await.unwrap().json().await.unwrap_or_default();
        if models["data"].as_array().is_some_and(|m| m.iter().any(|m| m["id"] == model)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{model} did not come on line");
}

/// Runs a script of `tests/sdk/python` with the venv's Python against the gateway at
/// `base` with `key` (and `env`); fails the test with its output when it fails.
async fn run_python(script: &str, base: &str, key: &str, env: &[(&str, &str)]) -> String {
    let python = repo_root().join(".venv/bin/python");
    assert!(python.is_file(), "{} is missing: run scripts/test.sh", python.display());
    run_sdk(&python, &format!("tests/sdk/python/{script}"), base, key, env).await
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap()
}

/// Runs an SDK test script (`program script`, from the repository's root) against the
/// gateway at `base` with `key` (and `env`); fails the test with its output when it
/// fails, else returns what it printed.
async fn run_sdk(program: &std::path::Path, script: &str, base: &str, key: &str, env: &[(&str, &str)]) -> String {
    let out = Command::new(program)
        .arg(script)
        .current_dir(repo_root())
        .env("GATEWAY_BASE_URL", format!("{base}/v1"))
        .env("GATEWAY_API_KEY", key)
        .envs(env.iter().copied())
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[tokio::test]
async fn real_worker_low_and_ultra_run_differently_and_bill_their_multipliers() {
    let model_path = default_model_path().await;
    // The gateway counts the worker's tokens with the model's tokenizer.
    let Up { base, worker_url, dir, http, .. } = &up(&model_path, "", &[]).await;
    let (base, worker_url) = (base.as_str(), worker_url.as_str());
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
    assert_eq!(model, DEFAULT_MODEL_ID, "the model id the gateway has a tokenizer for");
    let key = premium_key(http, base).await;
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

    // The worker's reported completion tokens agree with the gateway's count of the
    // delivered text with the model's tokenizer, so no request was flagged.
    let r = http.post(format!("{base}/v1/chat/completions")).bearer_auth(&key)
        .json(&json!({"model": model, "temperature": 0, "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}))
        .send().await.unwrap();
    let body = r.text().await.unwrap();
    let (mut answer, mut reported) = (String::new(), None);
    for data in body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).filter(|d| *d != "[DONE]") {
        let v: Value = serde_json::from_str(data).unwrap();
        answer.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or_default());
        reported = v["usage"]["completion_tokens"].as_u64().or(reported);
    }
    assert!(answer.contains("Paris"), "{body}");
    let counted = tokenize::load(&model_path).unwrap().encode_text(&answer).len() as u64;
    // The worker also counts the end-of-sequence token it generated, which is no text.
    assert_eq!(reported, Some(counted + 1), "{answer:?}: the worker's count against the tokenizer's");
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&format!("sqlite://{}", dir.path().join("gw.db").display())).await.unwrap();
    let sources: Vec<String> = sqlx::query_scalar("SELECT usage_source FROM usage_records ORDER BY created_at").fetch_all(&pool).await.unwrap();
    assert_eq!(sources, ["provider"; 3], "every request billed on the worker's own report");
    let providers: Value = http.get(format!("{base}/api/admin/providers")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(providers["data"][0]["usageFlags"], 0);
    assert_eq!(providers["data"][0]["health"]["honesty"], 1.0);

    // The Responses API with both official SDKs against the real model: a plain answer,
    // then a streamed one continuing it with `previous_response_id`.
    run_python("responses_real_worker.py", base, &key, &[("GATEWAY_MODEL", &model)]).await;
    run_sdk("node".as_ref(), "tests/sdk/node/responses-real-worker.mjs", base, &key, &[("GATEWAY_MODEL", &model)]).await;
    let endpoints: Vec<String> =
        sqlx::query_scalar("SELECT endpoint FROM usage_records WHERE endpoint = 'responses'").fetch_all(&pool).await.unwrap();
    assert_eq!(endpoints.len(), 4, "two responses per SDK, each with its usage record");
}

/// The real worker serving all-MiniLM-L6-v2 beside the default chat model, through the
/// real gateway, called by the OpenAI Python SDK and LangChain's `OpenAIEmbeddings`:
/// normalised 384-wide vectors, related sentences closer, errors as OpenAI's, and every
/// request billed on the worker's own count, which agrees with the gateway's WordPiece.
#[tokio::test]
async fn real_worker_serves_embeddings_to_the_sdk_and_langchain() {
    let model_path = default_model_path().await;
    let embedding_dir = crate::embeddings::minilm_dir();
    let embedding_model = "all-minilm-l6-v2";
    let more = format!(", \"{embedding_model}\" = '{}'", embedding_dir.display());
    let Up { base, dir, http, .. } = &up(&model_path, &more, &["--embedding-model".as_ref(), embedding_dir.as_os_str()]).await;
    let base = base.as_str();
    let key = premium_key(http, base).await;
    wait_listed(http, base, &key, embedding_model).await;
    run_python("embeddings_real_worker.py", base, &key, &[("GATEWAY_EMBEDDING_MODEL", embedding_model)]).await;

    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&format!("sqlite://{}", dir.path().join("gw.db").display())).await.unwrap();
    let rows: Vec<(String, String, i64)> = sqlx::query_as("SELECT status, usage_source, completion_tokens FROM usage_records WHERE endpoint = 'embeddings'")
        .fetch_all(&pool)
        .await
        .unwrap();
    // Three SDK calls and two LangChain calls; the two refusals left no row.
    assert_eq!(rows.len(), 5, "{rows:?}");
    assert!(rows.iter().all(|(status, source, completion)| status == "ok" && source == "provider" && *completion == 0), "{rows:?}");
}

/// Structured outputs on the real worker through the real gateway: the OpenAI Python
/// SDK's `chat.completions.parse` with five pydantic schemas (flat, nested, an enum, an
/// array of objects, an optional field), `json_object`, a schema keyword refused by
/// name, and LangChain's `with_structured_output`; every answer not cut by
/// `max_tokens` parses and validates. Then tool calls (`tool_choice: required`
/// streamed and not, a named function through `parse`, LangChain's `bind_tools`) whose
/// arguments validate against their tool, and `n = 3` (one gateway and worker for both).
#[tokio::test]
async fn real_worker_structured_outputs_tools_and_n_work_with_the_sdk_and_langchain() {
    let model_path = default_model_path().await;
    let Up { base, http, .. } = &up(&model_path, "", &[]).await;
    let base = base.as_str();
    let key = premium_key(http, base).await;
    wait_listed(http, base, &key, DEFAULT_MODEL_ID).await;
    eprintln!("{}", run_python("structured_real_worker.py", base, &key, &[("GATEWAY_MODEL", DEFAULT_MODEL_ID)]).await);
    eprintln!("{}", run_python("tools_real_worker.py", base, &key, &[("GATEWAY_MODEL", DEFAULT_MODEL_ID)]).await);
}
