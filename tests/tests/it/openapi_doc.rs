//! The OpenAPI document: the checked-in copy matches the code, every route `app()`
//! registers is documented, and schemathesis finds the live gateway keeping to it
//! (no 5xx, documented statuses, content types and response schemas).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use serde_json::{json, Value};
use tests::{spawn_mock, MockConfig};
use tokio::process::Command;

use crate::observability::Served;

const ADMIN_KEY: &str = "openapi-test-admin-key-0123456789";
/// The model the document's request examples name, so schemathesis's examples phase
/// reaches the provider and checks real completions against the response schemas.
const MODEL: &str = "llama-3.1-8b-instruct";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

#[test]
fn openapi_checked_in_document_matches_the_code() {
    let path = repo_root().join("openapi/openapi.json");
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = gateway::api::spec::json();
    if checked_in != generated {
        let line = checked_in
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map_or_else(|| "the end".to_owned(), |i| format!("line {}", i + 1));
        panic!(
            "{} differs from the document the code generates (first difference at {line}); \
             regenerate it with `cargo run -p gateway -- openapi > openapi/openapi.json` and commit it",
            path.display()
        );
    }
}

/// `(method, path)` of every `.route(…)` in `gateway/src/edge/mod.rs`, with axum's wildcard
/// `{*id}` written as OpenAPI's `{id}`.
fn registered_routes() -> Vec<(String, String)> {
    let source = std::fs::read_to_string(repo_root().join("gateway/src/edge/mod.rs")).unwrap_or_default();
    let mut routes = Vec::new();
    for call in source.split(".route(\"").skip(1) {
        let Some((path, rest)) = call.split_once('"') else { continue };
        // The method routers of this call: up to the line's end.
        let handlers = rest.lines().next().unwrap_or("");
        // The console's static files (`/admin…`) are a web page, not part of the API.
        if path == "/admin" || path.starts_with("/admin/") {
            continue;
        }
        let path = path.replace("{*", "{");
        for method in ["get", "post", "put", "patch", "delete"] {
            let plain = format!(" {method}(");
            let qualified = format!("::{method}(");
            let chained = format!(".{method}(");
            if handlers.contains(&plain) || handlers.contains(&qualified) || handlers.contains(&chained) {
                routes.push((method.to_owned(), path.clone()));
            }
        }
    }
    routes
}

#[test]
fn openapi_documents_every_registered_route() {
    let doc: Value = serde_json::from_str(&gateway::api::spec::json()).unwrap();
    let routes = registered_routes();
    assert!(routes.len() > 40, "found only {} routes in gateway/src/edge/mod.rs: {routes:?}", routes.len());
    let missing: Vec<String> = routes
        .iter()
        .filter(|(method, path)| doc["paths"][path][method].is_null())
        .map(|(method, path)| format!("{} {path}", method.to_uppercase()))
        .collect();
    assert!(
        missing.is_empty(),
        "routes without an operation in the OpenAPI document (add `#[utoipa::path]` to the handler and list it in \
         `gateway/src/api/spec.rs`, then regenerate openapi/openapi.json): {missing:?}"
    );
    let documented: usize = doc["paths"].as_object().map_or(0, |p| p.values().map(|ops| ops.as_object().map_or(0, |o| o.len())).sum());
    assert_eq!(documented, routes.len(), "the document has operations that no route serves");
}

async fn post(http: &reqwest::Client, url: String, bearer: Option<&str>, body: Value) -> anyhow::Result<Value> {
    let mut request = http.post(&url).json(&body);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    ensure!(status.is_success(), "POST {url}: {status} {body}");
    Ok(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_schemathesis_finds_no_violations() -> anyhow::Result<()> {
    let root = repo_root();
    let schemathesis = root.join(".venv/bin/schemathesis");
    ensure!(
        schemathesis.is_file(),
        "{} is missing: run scripts/test.sh, which makes the venv from tests/sdk/python/requirements.txt",
        schemathesis.display()
    );
    let mock = spawn_mock(MockConfig { models: vec![MODEL.to_owned()], ..MockConfig::default() }).await?;
    let dir = tempfile::tempdir()?;
    let gw = Served::start(
        dir.path(),
        ADMIN_KEY,
        &[
            // Schemathesis sends thousands of requests; the limits are tested elsewhere.
            ("GATEWAY_IP_REQUESTS_PER_MINUTE", "1000000"),
            ("GATEWAY_TOPUP_WEBHOOK_SECRET", "openapi-test-topup-secret"),
            ("GATEWAY_PAYOUT_WEBHOOK_SECRET", "openapi-test-payout-secret"),
            // Nothing listens there: no withdrawal succeeds (the provider earns nothing).
            ("GATEWAY_PAYOUT_WEBHOOK_URL", "http://127.0.0.1:9/payouts"),
            ("RUST_LOG", "warn"),
        ],
    )
    .await?;
    let base = gw.base.clone();
    let log_text = || gw.log_text();
    let http = reqwest::Client::new();

    // The served document is the generated one, without a key.
    let served: Value = http.get(format!("{base}/openapi.json")).send().await?.error_for_status()?.json().await?;
    ensure!(served == serde_json::from_str::<Value>(&gateway::api::spec::json())?, "GET /openapi.json is not the generated document");

    let registered = post(
        &http,
        format!("{base}/api/gpu/register"),
        None,
        json!({"capabilities": {"models": [MODEL], "maxConcurrentStreams": 64}, "pricing": {"perToken": 0.000002, "perHour": 1.0}, "baseUrl": mock.url()}),
    )
    .await?;
    let provider_id = registered["providerId"].as_str().context("no providerId")?.to_owned();
    let provider_key = registered["providerKey"].as_str().context("no providerKey")?.to_owned();
    post(
        &http,
        format!("{base}/api/gpu/stream/start"),
        Some(&provider_key),
        json!({"providerId": provider_id, "model": MODEL, "quality": "standard"}),
    )
    .await?;
    let key = post(
        &http,
        format!("{base}/api/admin/keys"),
        Some(ADMIN_KEY),
        json!({"name": "schemathesis", "tier": "premium", "requestsPerMinute": 1_000_000, "tokensPerMinute": 1_000_000_000}),
    )
    .await?;
    let user_id = key["userId"].as_str().context("no userId")?;
    post(&http, format!("{base}/api/admin/users/{user_id}/credit"), Some(ADMIN_KEY), json!({"amount": 1000})).await?;
    let user_key = key["key"].as_str().context("no key")?;

    // Each security scheme of the document gets its key; provider-scoped paths, the user
    // paths and half of the bodies name our provider, user and model so they reach more
    // than the 401 and 404.
    let config = format!(
        "[auth.openapi.user_key]\nbearer = \"{user_key}\"\n\
         [auth.openapi.provider_key]\nbearer = \"{provider_key}\"\n\
         [auth.openapi.admin_key]\nbearer = \"{ADMIN_KEY}\"\n\
         [dictionaries.provider]\nvalues = [\"{provider_id}\"]\n\
         [dictionaries.model]\nvalues = [\"{MODEL}\"]\n\
         [parameters]\n\"path.provider_id\" = \"{provider_id}\"\n\
         \"body.providerId\" = {{ dictionary = \"provider\", probability = 0.5 }}\n\
         \"body.model\" = {{ dictionary = \"model\", probability = 0.5 }}\n\
         [[operations]]\ninclude-path-regex = \"^/api/admin/users/\"\n\
         parameters = {{ \"path.id\" = \"{user_id}\" }}\n"
    );
    let config_path = dir.path().join("schemathesis.toml");
    std::fs::write(&config_path, config)?;
    let started = Instant::now();
    // Operations that can take the test's own key or provider away (schemathesis reuses
    // ids it saw in responses, and half the bodies name our provider and model) run
    // last, so the others are tested with a key that works and a provider on line
    // instead of answering only 401, 404, or 503 while the provider is reserved.
    let destructive = ["admin_revoke_key", "admin_delete_key", "admin_provider_suspend", "stream_stop", "rotate_key"];
    let all_checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance";
    let mut main_run: Vec<String> = vec!["--max-time".into(), "100".into(), "--exclude-operation-id".into(), "create_reservation".into()];
    let mut last_run: Vec<String> = vec!["--max-time".into(), "15".into()];
    for id in destructive {
        main_run.extend(["--exclude-operation-id".into(), id.into()]);
        last_run.extend(["--include-operation-id".into(), id.into()]);
    }
    // A reservation takes the only provider for itself, after which the next one is
    // rightly a 503 (no provider free; documented, with `retry-after`): this operation
    // runs on its own, held to the document but not to "no 5xx".
    let reservation_run: Vec<String> = vec!["--max-time".into(), "10".into(), "--include-operation-id".into(), "create_reservation".into()];
    let mut report = String::new();
    for (filters, checks) in [
        (main_run, all_checks),
        (reservation_run, "status_code_conformance,content_type_conformance,response_schema_conformance"),
        (last_run, all_checks),
    ] {
        let output = tokio::time::timeout(
            Duration::from_secs(300),
            Command::new(&schemathesis)
                .arg("--config-file")
                .arg(&config_path)
                .arg("--no-color")
                .args(["run", &format!("{base}/openapi.json")])
                .args([
                    "--checks",
                    checks,
                    // Stateful testing needs links between operations, which the document
                    // does not declare; the other phases cover every operation.
                    "--phases",
                    "examples,coverage,fuzzing",
                    "--max-examples",
                    "8",
                    // One worker: with two, hypothesis sometimes trips over CPython 3.11's
                    // "AST constructor recursion depth mismatch" (concurrent `ast.parse`)
                    // and the run reports a tool error rather than a finding.
                    "--workers",
                    "1",
                    "--request-timeout",
                    "10",
                    "--suppress-health-check",
                    "all",
                ])
                .args(&filters)
                .current_dir(dir.path())
                .env("NO_PROXY", "127.0.0.1,localhost")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .context("schemathesis did not finish within 300 s")?
        .with_context(|| format!("cannot run {}", schemathesis.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            output.status.success(),
            "schemathesis {} found violations ({})\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- gateway log\n{}",
            filters.join(" "),
            output.status,
            log_text()
        );
        report.push_str(&stdout);
    }
    eprintln!("schemathesis passed in {:.0} s\n{report}", started.elapsed().as_secs_f64());
    Ok(())
}
