//! Joining a gateway: register (once; the provider key is kept in a local file and
//! replaced when the gateway no longer accepts it), go on line per quality,
//! heartbeat every 10 s, and go off line on shutdown.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::engine::Engine;
use crate::host::GpuInfo;

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("gateway request to {url} failed: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("gateway answered {status} to {url}: {body}")]
    Status { url: String, status: u16, body: String },
    #[error("cannot use key file {path}: {detail}")]
    KeyFile { path: String, detail: String },
    #[error("{0}")]
    Config(String),
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub url: String,
    /// Optional key presented at registration (for admin-approved sign-ups), or,
    /// together with `provider_id`, credentials that skip registration.
    pub provider_key: Option<String>,
    pub provider_id: Option<String>,
    /// With `provider_id` and `provider_key`: the relay secret the gateway gave at
    /// registration (the gateway presents it on every call).
    pub relay_secret: Option<String>,
    /// Where the gateway reaches this worker; `None`: the worker dials out to the
    /// gateway and serves over that link (no reachable address needed).
    pub public_url: Option<String>,
    /// PEM certificates trusted for an `https` gateway besides the Mozilla roots.
    pub gateway_ca: Option<PathBuf>,
    pub name: String,
    pub per_token_usd: f64,
    pub per_hour_usd: f64,
    pub minimum_payout_usd: f64,
    pub qualities: Vec<String>,
    pub key_file: PathBuf,
    /// Embedding models served on `/v1/embeddings` (`--embedding-model`), registered
    /// as `capabilities.embeddingModels`.
    pub embedding_models: Vec<String>,
}

/// What the gateway gave us at registration; stored in the key file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Credentials {
    pub gateway: String,
    pub provider_id: String,
    pub provider_key: String,
    /// What the gateway presents on every call; `/v1/*` refuses everyone else.
    #[serde(default)]
    pub relay_secret: String,
    /// How the provider was registered (`direct` or `dialOut`): a worker that changes
    /// how it is reached registers anew.
    #[serde(default = "direct")]
    pub connection: String,
    /// The `capabilities` registered: a worker that now serves something else (another
    /// model, an embedding model, other qualities) registers anew.
    #[serde(default)]
    pub capabilities: serde_json::Value,
}

fn direct() -> String {
    "direct".to_owned()
}

impl GatewayConfig {
    /// How the gateway reaches this worker, as registration names it.
    pub fn connection(&self) -> &'static str {
        if self.public_url.is_some() { "direct" } else { "dialOut" }
    }
}

/// Default key file: `~/.config/gpu-streaming/worker-provider.json`.
pub fn default_key_file() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".config").join("gpu-streaming").join("worker-provider.json")
}

fn load_credentials(path: &Path, gateway: &str, connection: &str, capabilities: &serde_json::Value) -> Option<Credentials> {
    let text = std::fs::read_to_string(path).ok()?;
    let c: Credentials = serde_json::from_str(&text).ok()?;
    // A key file from before capabilities were kept says nothing about them.
    if c.gateway == gateway && c.connection == connection && !c.capabilities.is_null() && c.capabilities != *capabilities {
        tracing::info!("this worker serves other capabilities than the saved provider registered; registering anew");
        return None;
    }
    // A key file from before relay secrets cannot admit the gateway: register anew.
    (c.gateway == gateway && !c.relay_secret.is_empty() && c.connection == connection).then_some(c)
}

fn save_credentials(path: &Path, c: &Credentials) -> Result<(), RegistrationError> {
    let err = |e: std::io::Error| RegistrationError::KeyFile { path: path.display().to_string(), detail: e.to_string() };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let text = serde_json::to_string_pretty(c).map_err(|e| RegistrationError::KeyFile {
        path: path.display().to_string(),
        detail: e.to_string(),
    })?;
    std::fs::write(path, text).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(())
}

/// The client for the gateway's HTTP API, trusting `ca` (PEM) besides the usual roots.
fn gateway_client(ca: Option<&Path>) -> Result<reqwest::Client, RegistrationError> {
    let mut builder = reqwest::Client::builder();
    if let Some(path) = ca {
        let err = |detail: String| RegistrationError::Config(format!("--gateway-ca {}: {detail}", path.display()));
        let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| err(e.to_string()))? {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| RegistrationError::Config(format!("cannot build the gateway client: {e}")))
}

pub struct GatewayClient {
    http: reqwest::Client,
    cfg: GatewayConfig,
    pub creds: Credentials,
    model_id: String,
    /// The credentials came from the key file (so they may be stale).
    from_file: bool,
}

async fn post(
    http: &reqwest::Client,
    url: String,
    key: Option<&str>,
    body: serde_json::Value,
) -> Result<serde_json::Value, RegistrationError> {
    let mut req = http.post(&url).json(&body).timeout(Duration::from_secs(10));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.map_err(|source| RegistrationError::Http { url: url.clone(), source })?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        return Err(RegistrationError::Status { url, status: status.as_u16(), body: text.chars().take(500).collect() });
    }
    Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
}

impl GatewayClient {
    /// Registers with the gateway unless the key file (or flags) already hold
    /// credentials for it.
    pub async fn join(cfg: GatewayConfig, engine: &Engine, model_id: &str, gpu: &GpuInfo) -> Result<GatewayClient, RegistrationError> {
        let client = GatewayClient::credentials(cfg, engine, model_id, gpu, true).await?;
        match client.start_streams().await {
            // Saved credentials the gateway no longer knows (e.g. a fresh database):
            // register anew once.
            Err(RegistrationError::Status { status: 401 | 403 | 404, .. }) if client.from_file => {
                tracing::warn!("the gateway rejected the saved provider key; registering again");
                let client = GatewayClient::credentials(client.cfg, engine, model_id, gpu, false).await?;
                client.start_streams().await?;
                Ok(client)
            }
            Err(e) => Err(e),
            Ok(()) => Ok(client),
        }
    }

    async fn credentials(
        cfg: GatewayConfig,
        engine: &Engine,
        model_id: &str,
        gpu: &GpuInfo,
        use_saved: bool,
    ) -> Result<GatewayClient, RegistrationError> {
        let http = gateway_client(cfg.gateway_ca.as_deref())?;
        let base = cfg.url.trim_end_matches('/').to_string();
        let mut from_file = false;
        let capabilities = json!({
            "models": [model_id],
            "maxConcurrentStreams": engine.config.max_seqs,
            "supportedQualities": cfg.qualities,
            "features": crate::server::FEATURES,
            // Precision is chosen per request (`precision` in the body); a burn model
            // in bf16/f16 serves `reduced` only.
            "precisions": engine.forward.device().precisions(),
            // `axum::serve` also speaks h2c on the same port, so the gateway can
            // multiplex our streams over one connection; hyper's HTTP/2 server allows
            // 200 concurrent streams on it, so only up to that many.
            "http2": engine.config.max_seqs <= 200,
            "embeddingModels": cfg.embedding_models,
        });
        let saved = if use_saved { load_credentials(&cfg.key_file, &base, cfg.connection(), &capabilities) } else { None };
        let creds = if let (Some(id), Some(key)) = (&cfg.provider_id, &cfg.provider_key) {
            let Some(relay_secret) = cfg.relay_secret.clone() else {
                return Err(RegistrationError::KeyFile {
                    path: "--provider-id/--provider-key".into(),
                    detail: "credentials given as flags need --relay-secret too (registration returned it)".into(),
                });
            };
            Credentials {
                gateway: base.clone(),
                provider_id: id.clone(),
                provider_key: key.clone(),
                relay_secret,
                connection: cfg.connection().to_owned(),
                capabilities,
            }
        } else if let Some(c) = saved {
            tracing::info!(provider_id = %c.provider_id, "using saved provider credentials");
            from_file = true;
            c
        } else {
            let mut body = json!({
                "name": cfg.name,
                "gpuInfo": gpu,
                "capabilities": capabilities.clone(),
                "pricing": {
                    "perToken": cfg.per_token_usd,
                    "perHour": cfg.per_hour_usd,
                    "minimumPayout": cfg.minimum_payout_usd,
                },
                "connection": cfg.connection(),
            });
            if let Some(url) = &cfg.public_url {
                body["baseUrl"] = json!(url);
            }
            let v = post(&http, format!("{base}/api/gpu/register"), cfg.provider_key.as_deref(), body).await?;
            let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
            let (Some(provider_id), Some(provider_key), Some(relay_secret)) =
                (field("providerId"), field("providerKey"), field("relaySecret").filter(|s| !s.is_empty()))
            else {
                return Err(RegistrationError::Status {
                    url: format!("{base}/api/gpu/register"),
                    status: 201,
                    body: "response lacks providerId/providerKey/relaySecret".into(),
                });
            };
            let c = Credentials { gateway: base.clone(), provider_id, provider_key, relay_secret, connection: cfg.connection().to_owned(), capabilities };
            save_credentials(&cfg.key_file, &c)?;
            tracing::info!(provider_id = %c.provider_id, key_file = %cfg.key_file.display(), "registered with the gateway");
            c
        };
        Ok(GatewayClient { http, cfg, creds, model_id: model_id.to_string(), from_file })
    }

    async fn stream_call(&self, what: &str) -> Result<(), RegistrationError> {
        for q in &self.cfg.qualities {
            let body = json!({"providerId": self.creds.provider_id, "model": self.model_id, "quality": q});
            post(&self.http, format!("{}/api/gpu/stream/{what}", self.creds.gateway), Some(&self.creds.provider_key), body)
                .await?;
        }
        Ok(())
    }

    /// Goes on line for every quality (`join` already did this once).
    pub async fn start_streams(&self) -> Result<(), RegistrationError> {
        self.stream_call("start").await
    }

    pub async fn stop_streams(&self) -> Result<(), RegistrationError> {
        self.stream_call("stop").await
    }

    /// How this worker dials its gateway when it has no public URL.
    pub fn dial(&self) -> Result<Option<link::Dial>, link::DialError> {
        if self.cfg.public_url.is_some() {
            return Ok(None);
        }
        let extra_roots = match &self.cfg.gateway_ca {
            Some(path) => link::load_roots(path)?,
            None => Vec::new(),
        };
        Ok(Some(link::Dial {
            gateway: self.creds.gateway.clone(),
            provider_id: self.creds.provider_id.clone(),
            provider_key: self.creds.provider_key.clone(),
            proxy: link::proxy_from_env(&self.creds.gateway),
            extra_roots,
        }))
    }

    pub async fn heartbeat(&self, engine: &Engine) -> Result<(), RegistrationError> {
        let s = engine.stats();
        let device = engine.forward.device();
        // `freeMemoryMb` is the compute device's (host RAM only for the CPU); `backend`,
        // `engine` and `device` are optional extras the gateway may ignore.
        let body = json!({
            "providerId": self.creds.provider_id,
            "activeStreams": s.active.load(Relaxed),
            "queueLength": s.queued.load(Relaxed),
            "freeMemoryMb": device.memory_free_mb,
            "backend": device.kind,
            "engine": device.engine,
            "device": device.name,
        });
        post(&self.http, format!("{}/api/gpu/heartbeat", self.creds.gateway), Some(&self.creds.provider_key), body)
            .await
            .map(drop)
    }

    /// Heartbeats every 10 s until the task is dropped.
    pub async fn heartbeat_loop(&self, engine: Engine) {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tick.tick().await;
            if let Err(e) = self.heartbeat(&engine).await {
                tracing::warn!("heartbeat failed: {e}");
            }
        }
    }
}
