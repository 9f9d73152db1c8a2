//! Runs the mock provider on a port, for SDK tests and the benchmark.
//! `mock-provider [--port P] [--model ID]... [--dial GATEWAY --provider-id ID --provider-key KEY]`
//! With `--dial` it also serves over a dial-out link to that gateway (as a worker
//! without a public URL does), for `bench-overhead --upstream link`.

use tests::{mock_app, spawn_mock_on, MockConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut port = 0u16;
    let mut config = MockConfig::default();
    let (mut dial, mut provider_id, mut provider_key) = (None, String::new(), String::new());
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--dial" => dial = args.next(),
            "--provider-id" => provider_id = args.next().unwrap_or_default(),
            "--provider-key" => provider_key = args.next().unwrap_or_default(),
            "--port" => port = args.next().unwrap_or_default().parse()?,
            "--model" => config.models.push(args.next().unwrap_or_default()),
            "--omit-usage" => config.omit_usage = true,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    // The link lives as long as this sender (until Ctrl-C).
    let (_keep_link, stopping) = tokio::sync::watch::channel(false);
    if let Some(gateway) = dial {
        let (_, app) = mock_app(([0, 0, 0, 0], 0).into(), config.clone());
        let dial = link::Dial { gateway, provider_id, provider_key, proxy: None, extra_roots: Vec::new() };
        tokio::spawn(link::run(dial, hyper_util::service::TowerToHyperService::new(app), stopping));
    }
    let mock = spawn_mock_on(&format!("127.0.0.1:{port}"), config).await?;
    eprintln!("mock provider listening on {}", mock.url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
