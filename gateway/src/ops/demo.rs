//! `gateway demo`: the gateway on an embedded SQLite file, a demo user key, and a real
//! model behind it: either a local worker it spawns (default model) or any
//! OpenAI-compatible server given with `--upstream`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use openapi::platform::{Capabilities, Pricing, RegisterProviderRequest};

use crate::ops::config::Config;
use crate::edge::keys::{NewKey, Tier};
use crate::inference::providers::ProviderStatus;
use crate::ops::server::{self, Running};

pub struct DemoOptions {
    /// An OpenAI-compatible server to register as the provider instead of a local worker.
    pub upstream: Option<String>,
    /// The `worker` binary; defaults to the one next to this executable.
    pub worker_bin: Option<PathBuf>,
    /// A model file for the worker; defaults to the fetched default model.
    pub model: Option<PathBuf>,
    /// The worker's embedding model (a sentence-transformers directory); defaults to
    /// the fetched all-MiniLM-L6-v2. A default that cannot be fetched is left out.
    pub embedding_model: Option<PathBuf>,
    pub worker_port: u16,
}

const QUALITIES: [&str; 4] = ["low", "standard", "high", "ultra"];

/// What a demo premium key's user is credited with, so paid requests can be tried.
const PREMIUM_CREDIT_MICROS: i64 = 10_000_000;

pub async fn run(mut config: Config, options: DemoOptions) -> anyhow::Result<()> {
    let port = config.port;
    let base = format!("http://127.0.0.1:{port}");
    let listener = tokio::net::TcpListener::bind((config.host.as_str(), port))
        .await
        .with_context(|| format!("cannot listen on {}:{port}", config.host))?;
    // The console needs an admin key: a configured one is kept (and not printed), else
    // the demo makes one for this run.
    let admin_key = match &config.admin_key {
        Some(_) => None,
        None => {
            let made = format!("adm-demo-{}", uuid::Uuid::new_v4().simple());
            config.admin_key = Some(crate::ops::config::Secret::new(made.clone()));
            Some(made)
        }
    };
    // The demo's provider is a local worker (or upstream) at a private address.
    config.allow_private_providers = true;
    // The demo's own worker (or upstream) is trusted: no probation.
    config.probation_requests = 0;
    let running = Running::start(config).await?;
    let state = running.state.clone();
    // Both tiers at once: a free key (ads) and a premium key with credit (no ads).
    let key = state
        .keys
        .create(NewKey { name: "demo".into(), tier: Some(Tier::Free), ..NewKey::default() })
        .await?;
    let premium = state
        .keys
        .create(NewKey { name: "demo-premium".into(), tier: Some(Tier::Premium), ..NewKey::default() })
        .await?;
    state
        .ledger
        .credit(&crate::money::ledger::user_account(&premium.user_id), PREMIUM_CREDIT_MICROS, "credit", "demo credit")
        .await
        .map_err(|e| anyhow::anyhow!("crediting the demo premium key: {e}"))?;
    // Serve first: a spawned worker registers itself over HTTP.
    let server = tokio::spawn(server::serve(running, listener, server::shutdown_signal()));
    let mut worker_child = None;
    let model_id = match &options.upstream {
        Some(upstream) => register_upstream(&state, upstream).await?,
        None => {
            let (child, model_id, model_path) = spawn_worker(&state, &options, &base).await?;
            worker_child = Some(child);
            // Count the worker's tokens with its models' own tokenizers (unless configured).
            if !state.tokenizers.contains(&model_id) {
                state.tokenizers.load_for(&model_id, &model_path)?;
            }
            model_id
        }
    };
    // Wait until the model is routable through the gateway.
    for _ in 0..100 {
        if state.registry.snapshot().values().any(|p| p.streams.iter().any(|(m, _)| *m == model_id)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let admin = admin_key.as_deref().unwrap_or("(the configured GATEWAY_ADMIN_KEY)");
    let embedding = state.registry.snapshot().values().find_map(|p| p.capabilities.embedding_models.first().cloned());
    let embedding_line = match &embedding {
        Some(m) => format!("\n  embeddings:  {m} (POST {base}/v1/embeddings)"),
        None => String::new(),
    };
    let out = format!(
        "\nGPU Streaming demo is up at {base}\n  model:       {model_id}{embedding_line}\n  user key:    {key} (free tier: answers may end with a labelled ad)\n  premium key: {premium} (${credit:.2} of credit, no ads)\n  admin key:   {admin}\n  console:     {base}/admin (sign in with the admin key)\n\nTry it:\n  curl {base}/v1/chat/completions \\\n    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n    -d '{{\"model\":\"{model_id}\",\"messages\":[{{\"role\":\"user\",\"content\":\"What is the capital of France?\"}}],\"stream\":true}}'\n\nOpenAI SDKs: base_url={base}/v1 api_key={key}\nCtrl-C stops it.\n",
        key = key.key,
        premium = premium.key,
        credit = PREMIUM_CREDIT_MICROS as f64 / 1e6,
    );
    eprintln!("{out}");
    let result = server.await?;
    if let Some(mut child) = worker_child {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    result
}

/// Registers an OpenAI-compatible server as a provider and heartbeats on its behalf
/// while its `/v1/models` answers (the demo plays the provider's agent).
async fn register_upstream(state: &crate::state::AppState, upstream: &str) -> anyhow::Result<String> {
    let upstream = upstream.trim_end_matches('/').trim_end_matches("/v1").to_owned();
    let models: serde_json::Value = state
        .http
        .get(format!("{upstream}/v1/models"))
        .send()
        .await
        .with_context(|| format!("cannot reach {upstream}/v1/models"))?
        .json()
        .await
        .context("the upstream's /v1/models is not JSON")?;
    let ids: Vec<String> = models["data"]
        .as_array()
        .map(|a| a.iter().filter_map(|m| m["id"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let Some(first) = ids.first().cloned() else { bail!("{upstream}/v1/models lists no models") };
    let created = state
        .registry
        .register(
            RegisterProviderRequest {
                name: Some(format!("upstream {upstream}")),
                gpu_info: serde_json::json!({ "model": "unknown (external OpenAI-compatible server)" }),
                capabilities: Capabilities {
                    models: ids.clone(),
                    max_concurrent_streams: 64,
                    supported_qualities: QUALITIES.iter().map(|q| (*q).to_owned()).collect(),
                    features: None,
                    // An external server makes no claim: it serves its model as loaded.
                    precisions: vec![openapi::platform::Precision::Full],
                    // Unknown: an external server gets HTTP/1.1, which every one speaks.
                    http2: false,
                    // /v1/models does not say which models embed.
                    embedding_models: Vec::new(),
                },
                pricing: Pricing::usd(0.000_002, 0.5, 5.0),
                base_url: Some(upstream.clone()),
                connection: openapi::platform::Connection::Direct,
            },
            ProviderStatus::Active,
            0,
        )
        .await?
        .0;
    for model in &ids {
        for q in QUALITIES {
            state.registry.start_stream(&created.provider_id, model, q).await?;
        }
    }
    let (state, id) = (state.clone(), created.provider_id);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let ok = state.http.get(format!("{upstream}/v1/models")).send().await.is_ok_and(|r| r.status().is_success());
            if ok {
                let _ = state.registry.record_heartbeat(&id, 0, 0).await;
            }
        }
    });
    Ok(first)
}

/// Runs `worker fetch-model ARGS` and returns the path it printed.
async fn fetch_model(worker: &std::path::Path, args: &[&str]) -> anyhow::Result<PathBuf> {
    let out = tokio::process::Command::new(worker).arg("fetch-model").args(args).stderr(Stdio::inherit()).output().await?;
    if !out.status.success() {
        bail!("`worker fetch-model {}` failed", args.join(" "));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").trim()))
}

/// Starts `worker serve` with the default model; the worker registers itself. Returns
/// the worker, the model id it serves and the model's path.
async fn spawn_worker(state: &crate::state::AppState, options: &DemoOptions, gateway: &str) -> anyhow::Result<(tokio::process::Child, String, PathBuf)> {
    let worker = match &options.worker_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("worker"),
    };
    if !worker.exists() {
        bail!("no worker binary at {} (build it with `cargo build --release -p worker`) and no --upstream given", worker.display());
    }
    let model = match &options.model {
        Some(m) => m.clone(),
        None => fetch_model(&worker, &[]).await?,
    };
    let embedding = match &options.embedding_model {
        Some(dir) => Some(dir.clone()),
        None => match fetch_model(&worker, &["--embedding"]).await {
            Ok(dir) => Some(dir),
            Err(e) => {
                tracing::warn!("{e}; the demo serves no embedding model");
                None
            }
        },
    };
    let public = format!("http://127.0.0.1:{}", options.worker_port);
    let mut command = tokio::process::Command::new(&worker);
    command.arg("serve").arg("--model").arg(&model);
    command.args(["--port", &options.worker_port.to_string(), "--gateway", gateway, "--public-url", &public]);
    if let Some(dir) = &embedding {
        command.arg("--embedding-model").arg(dir);
    }
    let child = command.kill_on_drop(true).spawn().context("cannot start the worker")?;
    // Wait until the worker has registered and put its model on line.
    for _ in 0..600 {
        let snapshot = state.registry.snapshot();
        let provider = snapshot.values().find(|p| p.base_url == public && !p.streams.is_empty());
        if let Some((id, _)) = provider.and_then(|p| p.streams.iter().next().cloned()) {
            // Bill embeddings by the model's own WordPiece tokenizer.
            if let (Some(dir), Some(embedding_id)) = (&embedding, provider.and_then(|p| p.capabilities.embedding_models.first())) {
                if !state.tokenizers.contains(embedding_id) {
                    state.tokenizers.load_for(embedding_id, dir)?;
                }
            }
            return Ok((child, id, model));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("the worker did not come up within 5 minutes")
}
