//! `worker serve`: the HTTP server, optionally joined to a gateway, with a graceful
//! SIGTERM: stop taking work, finish open streams, go off line, exit.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crate::engine::Engine;
use crate::registration::{GatewayClient, GatewayConfig, RegistrationError};
use crate::server::{app, AppState};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("server error: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Gateway(#[from] RegistrationError),
}

pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    pub gateway: Option<GatewayConfig>,
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

pub async fn run(engine: Engine, model_id: String, cfg: ServeConfig) -> Result<(), ServeError> {
    let state = AppState::new(engine.clone(), model_id.clone());
    let draining = state.draining.clone();
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Bind { addr: addr.clone(), source })?;
    tracing::info!(%addr, model = %model_id, "serving the OpenAI API");

    let gateway = match cfg.gateway {
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

    let shutdown = async move {
        shutdown_signal().await;
        tracing::info!("shutting down: refusing new requests, finishing open streams");
        draining.store(true, Relaxed);
    };
    let result = axum::serve(listener, app(state)).with_graceful_shutdown(shutdown).await;
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
