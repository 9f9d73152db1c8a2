//! Logs and traces: `tracing` to stderr (text or JSON by `log_format`), and, when
//! `otel_endpoint` is set, every span (the per-request span carries the request id)
//! exported over OTLP/HTTP (protobuf) to `<otel_endpoint>/v1/traces` by a batch
//! processor on its own thread. The standard `OTEL_*` variables (batch delay, headers,
//! timeout) apply.

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::ops::config::{Config, LogFormat};

/// Flushes and stops the span exporter when dropped (at the end of `main`).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // Shutting down blocks on the last export; keep it off the async runtime.
            let _ = std::thread::spawn(move || provider.shutdown()).join();
        }
    }
}

fn tracer_provider(endpoint: &str, service: &str) -> anyhow::Result<SdkTracerProvider> {
    let endpoint = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let service = service.to_owned();
    // The exporter's blocking HTTP client must not be built (or dropped) on the async
    // runtime's threads.
    std::thread::spawn(move || -> anyhow::Result<SdkTracerProvider> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .build()
            .context("cannot build the OTLP span exporter")?;
        Ok(SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(service).build())
            .build())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("building the OTLP exporter panicked"))?
}

/// Installs the global subscriber.
pub fn init(config: &Config) -> anyhow::Result<Telemetry> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match config.log_format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let provider = match &config.otel_endpoint {
        Some(endpoint) => Some(tracer_provider(endpoint, &config.otel_service_name)?),
        None => None,
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("gpu-streaming-gateway")));
    tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init().context("cannot install the log subscriber")?;
    Ok(Telemetry { provider })
}
