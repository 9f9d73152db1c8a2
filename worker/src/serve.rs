//! `worker serve`: the HTTP server, optionally joined to a gateway, with a graceful
//! SIGTERM: stop taking work, finish open streams, go off line, exit.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crate::engine::Engine;
use crate::registration::{GatewayClient, GatewayConfig, RegistrationError};
use crate::server::{app, Access, AppState};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("server error: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Gateway(#[from] RegistrationError),
    #[error("{0}")]
    Config(String),
}

pub struct ServeConfig {
    /// Address to bind: 127.0.0.1 unless the owner opens it (`--host 0.0.0.0`).
    pub host: String,
    pub port: u16,
    pub gateway: Option<GatewayConfig>,
    /// A key callers other than the gateway may present (`--api-key`).
    pub api_key: Option<String>,
    /// Serve `/v1/*` to anyone (`--open`): only for a worker on a private network.
    pub open: bool,
    /// PEM certificate chain and key: serve HTTPS.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// The sentence encoder `/v1/embeddings` runs (`--embedding-model`).
    pub embedder: Option<Arc<crate::embeddings::Embedder>>,
}

/// Who may call `/v1/*`: a worker joined to a gateway accepts the gateway's relay
/// secret (and `--api-key`); a standalone one needs `--api-key` or an explicit `--open`.
fn access(cfg: &ServeConfig, relay_secret: Option<&str>) -> Result<Arc<Access>, ServeError> {
    if cfg.open {
        tracing::warn!("--open: /v1/* answers anyone who can reach this port");
        return Ok(Access::open());
    }
    let tokens: Vec<String> = relay_secret.map(str::to_owned).into_iter().chain(cfg.api_key.clone()).collect();
    if tokens.is_empty() {
        return Err(ServeError::Config(
            "a worker without --gateway needs --api-key KEY (callers send `Authorization: Bearer KEY`) or --open".into(),
        ));
    }
    Ok(Access::tokens(tokens))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

pub async fn run(engine: Engine, model_id: String, mut cfg: ServeConfig) -> Result<(), ServeError> {
    if cfg.gateway.is_none() {
        access(&cfg, None)?;
    }
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Bind { addr: addr.clone(), source })?;
    tracing::info!(%addr, model = %model_id, "serving the OpenAI API");

    let gateway = match cfg.gateway.take() {
        Some(g) => {
            let gpu = crate::host::GpuInfo::from_device(&engine.forward.device());
            let client = Arc::new(GatewayClient::join(g, &engine, &model_id, &gpu).await?);
            tracing::info!(provider_id = %client.creds.provider_id, "on line at the gateway");
            let hb = client.clone();
            let hb_engine = engine.clone();
            let task = tokio::spawn(async move { hb.heartbeat_loop(hb_engine).await });
            Some((client, task))
        }
        None => None,
    };
    let relay_secret = gateway.as_ref().map(|(client, _)| client.creds.relay_secret.as_str());
    let mut state = AppState::new(engine.clone(), model_id.clone()).with_access(access(&cfg, relay_secret)?);
    if let Some(e) = cfg.embedder.clone() {
        state = state.with_embedder(e);
    }
    let draining = state.draining.clone();
    let router = app(state);

    // Without a public URL the worker dials out and the gateway's requests come over
    // that link (see the `link` crate); the local listener stays on for local callers.
    let (stop_link, stopping) = tokio::sync::watch::channel(false);
    let dial = match &gateway {
        Some((client, _)) => client.dial().map_err(|e| ServeError::Config(format!("cannot dial the gateway: {e}")))?,
        None => None,
    };
    let link = dial.map(|dial| {
        tracing::info!(gateway = %dial.gateway, proxy = dial.proxy.is_some(), "dialing out to the gateway (no public URL)");
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(link::run(dial, service, stopping))
    });

    let shutdown = async move {
        shutdown_signal().await;
        tracing::info!("shutting down: refusing new requests, finishing open streams");
        draining.store(true, Relaxed);
        let _ = stop_link.send(true);
    };
    let result = match &cfg.tls {
        None => axum::serve(listener, router).with_graceful_shutdown(shutdown).await,
        Some((cert, key)) => serve_tls(listener, router, cert, key, shutdown).await,
    };
    // The link drains too: no new streams, the open ones finish.
    if let Some(link) = link {
        let _ = link.await;
    }
    if let Some((client, task)) = gateway {
        task.abort();
        match client.stop_streams().await {
            Ok(()) => tracing::info!("off line at the gateway"),
            Err(e) => tracing::warn!("stream/stop failed: {e}"),
        }
    }
    engine.shutdown();
    result.map_err(ServeError::Serve)
}

/// HTTPS with rustls; on `shutdown` open streams finish before the server returns.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    cert: &std::path::Path,
    key: &std::path::Path,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key).await?;
    let handle = axum_server::Handle::new();
    let h = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        h.graceful_shutdown(None);
    });
    axum_server::from_tcp_rustls(listener.into_std()?, tls).handle(handle).serve(router.into_make_service()).await
}
