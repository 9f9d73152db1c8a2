//! `gateway`: serve (default), demo, keys, ledger, openapi.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gateway::ops::config::Config;
use gateway::edge::keys::{Keys, NewKey, Tier};
use gateway::ops::server::{self, Running};
use gateway::store::Store;

#[derive(Parser)]
#[command(name = "gateway", about = "GPU Streaming: an OpenAI-compatible gateway over a GPU marketplace")]
struct Cli {
    /// TOML config file; every key can also be set by env (`GATEWAY_<KEY>`).
    #[arg(long, global = true, env = "GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve {
        #[arg(long)]
        tls_cert: Option<PathBuf>,
        #[arg(long)]
        tls_key: Option<PathBuf>,
    },
    /// Gateway + a model on an embedded database, with a demo key and a curl line.
    Demo {
        /// Register this OpenAI-compatible server instead of spawning a local worker.
        #[arg(long)]
        upstream: Option<String>,
        #[arg(long)]
        worker_bin: Option<PathBuf>,
        #[arg(long)]
        model: Option<PathBuf>,
        /// The local worker's embedding model (a sentence-transformers directory);
        /// default: all-MiniLM-L6-v2, fetched by `worker fetch-model --embedding`.
        #[arg(long)]
        embedding_model: Option<PathBuf>,
        #[arg(long, default_value_t = 3003)]
        worker_port: u16,
    },
    /// The billing ledger.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Manage user API keys on the configured database.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Print the OpenAPI 3.1 document (checked in as `openapi/openapi.json`).
    Openapi,
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Verify every ledger invariant on the configured database; exit 1 on a violation.
    Check,
}

#[derive(Subcommand)]
enum KeysCommand {
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "free")]
        tier: String,
        #[arg(long)]
        user_id: Option<String>,
    },
    Revoke {
        id: String,
    },
    List,
}

#[tokio::main]
#[allow(clippy::print_stdout)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The document depends on the code only, not on the configuration.
    if matches!(cli.command, Some(Command::Openapi)) {
        print!("{}", gateway::api::spec::json());
        return Ok(());
    }
    let mut config = Config::load(cli.config.as_deref())?;
    // Dropped at the end of `main`: flushes the span exporter.
    let _telemetry = gateway::ops::telemetry::init(&config)?;
    match cli.command.unwrap_or(Command::Serve { tls_cert: None, tls_key: None }) {
        Command::Serve { tls_cert, tls_key } => {
            if tls_cert.is_some() || tls_key.is_some() {
                config.tls_cert = tls_cert;
                config.tls_key = tls_key;
                config.validate()?;
            }
            let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
                .await
                .with_context(|| format!("cannot listen on {}:{}", config.host, config.port))?;
            tracing::info!(addr = %listener.local_addr()?, db = %server::redact_url(&config.database_url), "gateway listening");
            let running = Running::start(config).await?;
            server::serve(running, listener, server::shutdown_signal()).await
        }
        Command::Demo { upstream, worker_bin, model, embedding_model, worker_port } => {
            if std::env::var_os("GATEWAY_DATABASE_URL").is_none() && cli.config.is_none() {
                config.database_url = "sqlite://gpu-streaming-demo.db".to_owned();
            }
            if std::env::var_os("GATEWAY_HOST").is_none() && cli.config.is_none() {
                config.host = "127.0.0.1".to_owned();
            }
            gateway::ops::demo::run(config, gateway::ops::demo::DemoOptions { upstream, worker_bin, model, embedding_model, worker_port }).await
        }
        Command::Ledger { command: LedgerCommand::Check } => {
            let store = Store::connect(&config.database_url).await?;
            let mut report = gateway::money::ledger::Ledger::new(store.clone()).check().await?;
            println!("ledger check: {} entries, {} accounts, usage total {} µUSD", report.entries, report.accounts, report.usage_total);
            // Free requests may cost the platform at most `free_tier_daily_budget` a day.
            #[allow(clippy::cast_possible_truncation)]
            let budget = (config.free_tier_daily_budget * 1e6).round() as i64;
            for (day, cost) in gateway::money::free_budget::days_over(&store, budget).await? {
                let date = gateway::money::analytics::day_string(day.div_euclid(86_400_000));
                report.violations.push(format!("free requests cost {cost} µUSD on {date}, over free_tier_daily_budget ({budget} µUSD)"));
            }
            if report.violations.is_empty() {
                println!("OK: every entry sums to zero, cached balances and holds match, no user or provider below zero, usage records match the ledger, no day's free requests over the free-tier budget");
                Ok(())
            } else {
                for v in &report.violations {
                    println!("VIOLATION: {v}");
                }
                std::process::exit(1);
            }
        }
        Command::Keys { command } => {
            let store = Store::connect(&config.database_url).await?;
            let keys = Keys::new(store, std::time::Duration::from_secs(1));
            match command {
                KeysCommand::Create { name, tier, user_id } => {
                    let tier = Tier::parse(&tier).context("--tier must be free or premium")?;
                    let created = keys
                        .create(NewKey { name, tier: Some(tier), user_id, ..NewKey::default() })
                        .await?;
                    println!("{}", serde_json::to_string_pretty(&created)?);
                    eprintln!("The key is shown only once; store it now.");
                }
                KeysCommand::Revoke { id } => {
                    keys.revoke(&id).await?;
                    println!("revoked {id}");
                }
                KeysCommand::List => {
                    for k in keys.list().await? {
                        println!("{}\t{}\t{}\t{}\t{}", k.id, k.prefix, k.tier, k.name, if k.revoked_at.is_some() { "revoked" } else { "active" });
                    }
                }
            }
            Ok(())
        }
        // Printed above, before the configuration is loaded.
        Command::Openapi => Ok(()),
    }
}
