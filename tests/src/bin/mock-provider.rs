//! Runs the mock provider on a port, for SDK tests and the benchmark.
//! `mock-provider [--port P] [--model ID]...`

use tests::{spawn_mock_on, MockConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut port = 0u16;
    let mut config = MockConfig::default();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => port = args.next().unwrap_or_default().parse()?,
            "--model" => config.models.push(args.next().unwrap_or_default()),
            "--omit-usage" => config.omit_usage = true,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let mock = spawn_mock_on(&format!("127.0.0.1:{port}"), config).await?;
    eprintln!("mock provider listening on {}", mock.url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
