//! Running the gateway: state and background tasks, plain HTTP or HTTPS/WSS (rustls),
//! and a graceful shutdown that lets open streams finish (bounded) and flushes usage.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rand::RngCore;
use tokio_util::sync::CancellationToken;

use crate::ops::config::{Config, Secret};
use crate::edge::keys::Keys;
use crate::inference::capacity::Capacity;
use crate::inference::providers::Registry;
use crate::edge::listener::{PerIp, PerIpAcceptor, HEAD_READ_TIMEOUT, MAX_HEAD_BYTES};
use crate::store::Store;
use crate::{edge::app, money::usage, state::AppState, state::Inner};

/// The state plus the background work that must be stopped in order.
pub struct Running {
    pub state: AppState,
    stop: CancellationToken,
    writer: usage::UsageWriter,
}

/// Providers stored before the egress rules (or under a config that allowed private
/// addresses) are checked again: one whose `baseUrl` breaks them is taken off line,
/// pending an admin, with the reason in its `statusReason`.
async fn revalidate_providers(registry: &Registry, allow_private: bool) -> anyhow::Result<()> {
    for provider in registry.snapshot().values() {
        if provider.status == crate::inference::providers::ProviderStatus::Suspended || provider.connection == openapi::platform::Connection::DialOut {
            continue;
        }
        if let Err(reason) = crate::inference::egress::check_base_url(&provider.base_url, allow_private).await {
            tracing::warn!(provider = %provider.id, %reason, "stored provider baseUrl refused; provider taken off line");
            registry.take_off_line(&provider.id, &format!("baseUrl refused at start-up: {reason}")).await?;
        }
    }
    Ok(())
}

/// A secret from the config, else the one stored in the database under `name`
/// (generated on first use, so it survives restarts and is shared by replicas).
async fn configured_or_stored(store: &Store, configured: Option<&Secret>, name: &str) -> Result<Secret, sqlx::Error> {
    if let Some(s) = configured {
        return Ok(s.clone());
    }
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    Ok(Secret::new(store.setting_or_insert(name, &hex::encode(bytes)).await?))
}

#[allow(clippy::cast_possible_truncation)]
fn usd_micros(usd: f64) -> i64 {
    (usd * 1e6).round() as i64
}

impl Running {
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let store = Store::connect(&config.database_url)
            .await
            .with_context(|| format!("cannot open the database at {}", redact_url(&config.database_url)))?;
        Self::start_with_store(config, store).await
    }

    pub async fn start_with_store(config: Config, store: Store) -> anyhow::Result<Self> {
        // A tokenizer that cannot be loaded stops the start, naming its config key.
        let tokenizers = Arc::new(crate::inference::tokenizers::Tokenizers::load(&config.tokenizers)?);
        let user_id_secret = configured_or_stored(&store, config.user_id_secret.as_ref(), "user_id_secret").await?;
        let relay_key = configured_or_stored(&store, config.relay_secret_key.as_ref(), "relay_secret_key").await?;
        let registry = Arc::new(Registry::load(store.clone(), config.replica_url.clone(), config.replica_peers.clone()).await?);
        revalidate_providers(&registry, config.allow_private_providers).await?;
        let stop = CancellationToken::new();
        let metrics = Arc::new(crate::ops::metrics::Metrics::default());
        let (sink, writer) = usage::spawn(
            metrics.clone(),
            store.clone(),
            config.usage_batch_max,
            Duration::from_millis(config.usage_flush_ms),
            stop.clone(),
        );
        let refresh = Duration::from_secs(config.provider_refresh_secs.max(1));
        let reg = registry.clone();
        let qualities = Arc::new(crate::inference::quality::Qualities::load(store.clone()).await?);
        let reload_qualities = qualities.clone();
        let redis = match &config.redis_url {
            Some(url) => {
                let client = redis::Client::open(url.as_str()).context("bad redis_url")?;
                // Reconnects quickly after an outage (the default backoff can wait
                // seconds per try): the replica is back on shared state soon after Redis.
                let retry = redis::aio::ConnectionManagerConfig::new()
                    .set_number_of_retries(2)
                    .set_factor(100)
                    .set_exponent_base(2)
                    .set_max_delay(1_000)
                    .set_connection_timeout(Duration::from_millis(500))
                    .set_response_timeout(Duration::from_secs(2));
                Some(redis::aio::ConnectionManager::new_with_config(client, retry).await.context("cannot connect to Redis (redis_url)")?)
            }
            None => None,
        };
        let replica = config.replica();
        let daily = usd_micros(config.free_tier_daily_budget);
        let free_budget = match &redis {
            // A claim lives as long as a request can, and a minute.
            Some(manager) => crate::money::free_budget::FreeBudget::shared(daily, manager.clone(), &config.redis_prefix, &replica,
                Duration::from_secs(config.request_deadline_secs.saturating_add(60))),
            None => crate::money::free_budget::FreeBudget::new(daily),
        };
        free_budget.refresh(&store).await?;
        // Only a shared (PostgreSQL) database has other replicas' free spending to learn;
        // an embedded one is this process's alone, whose counter is read at start-up.
        let refresh_budget = (store.backend == crate::store::Backend::Postgres).then(|| (free_budget.clone(), store.clone()));
        let ads = crate::ads::Ads::load(store.clone(), &config, redis.clone()).await?;
        let reload_ads = ads.clone();
        let sweeper = crate::money::ledger::Ledger::new(store.clone());
        let payouts = crate::money::payments::Payments::new(store.clone());
        // One client (one connection pool) for providers; the payout service, which the
        // operator configures and which may sit on a private network, has its own.
        let http = AppState::http_client(&config)?;
        let webhooks = AppState::webhook_client(&config)?;
        let connector_http = webhooks.clone();
        let connector_config = Arc::new(config.clone());
        let hold_ttl_ms = i64::try_from(config.hold_ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        let mut sweeps = 0u64;
        every(refresh, stop.clone(), move || {
            // Stale holds and automatic payouts every 12th refresh.
            sweeps += 1;
            let sweep = sweeps % 12 == 1;
            let (reg, qualities, ads) = (reg.clone(), reload_qualities.clone(), reload_ads.clone());
            let budget = refresh_budget.clone();
            let (sweeper, payouts, http, config) =
                (sweeper.clone(), payouts.clone(), connector_http.clone(), connector_config.clone());
            async move {
                if let Err(e) = reg.reload().await {
                    tracing::warn!(error = %e, "provider reload failed");
                }
                if let Err(e) = qualities.reload().await {
                    tracing::warn!(error = %e, "quality level reload failed");
                }
                if let Err(e) = ads.reload().await {
                    tracing::warn!(error = %e, "ad inventory reload failed");
                }
                // Other replicas' free spending.
                if let Some((budget, budget_store)) = budget {
                    if let Err(e) = budget.refresh(&budget_store).await {
                        tracing::warn!(error = %e, "free-tier budget refresh failed");
                    }
                }
                if !sweep {
                    return;
                }
                match sweeper.sweep_stale_holds(hold_ttl_ms).await {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(voided = n, "voided stale holds"),
                    Err(e) => tracing::warn!(error = %e, "hold sweep failed"),
                }
                match payouts.auto_payouts().await {
                    Ok(made) if !made.is_empty() => {
                        tracing::info!(count = made.len(), "automatic payouts requested");
                        for w in made {
                            crate::money::payout_connector::dispatch(http.clone(), &config, payouts.clone(), w);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "automatic payouts failed"),
                }
            }
        });
        crate::ops::replicas::join(&store, &replica, redis.is_some()).await?;
        let limiter = match &redis {
            Some(manager) => Arc::new(crate::edge::ratelimit::Limiter::redis(manager.clone(), &config.redis_prefix)),
            None => Arc::new(crate::edge::ratelimit::Limiter::memory()),
        };
        let capacity = Arc::new(match &redis {
            Some(manager) => Capacity::shared(replica.clone(), manager.clone(), &config.redis_prefix),
            None => Capacity::local(replica.clone()),
        });
        let fleet_health = Arc::new(crate::inference::fleet_health::Fleet::new(
            replica.clone(),
            redis.clone().map(|manager| (manager, config.redis_prefix.as_str())),
            config.breaking(),
        ));
        // What the fleet learnt of each provider before this start.
        let restored = crate::inference::fleet_health::restore(&store, &registry.snapshot()).await?;
        tracing::debug!(restored, "provider health restored");
        let config_seed = config.routing_seed;
        let links = Arc::new(crate::inference::open_links::Links::new(config.max_links_per_ip));
        let mut keys = Keys::new(store.clone(), Duration::from_secs(config.key_cache_ttl_secs));
        if let (Some(url), Some(manager)) = (&config.redis_url, &redis) {
            // A revoked key stops working on every replica at once, not after the cache TTL.
            keys = keys.with_redis(manager.clone(), &config.redis_prefix);
            tokio::spawn(keys.clone().listen_for_changes(url.clone(), stop.clone()));
        }
        let state = AppState::new(Inner {
            metrics: metrics.clone(),
            limiter,
            qualities,
            capacity: capacity.clone(),
            fleet_health,
            replica: replica.clone(),
            queued: Arc::new(AtomicU64::new(0)),
            keys,
            http,
            webhooks,
            h2c: AppState::h2c_client(&config)?,
            config,
            store: store.clone(),
            registry,
            usage: sink,
            ledger: crate::money::ledger::Ledger::new(store.clone()),
            user_id_secret,
            active_streams: Arc::new(AtomicU64::new(0)),
            ads,
            tokenizers,
            key_locks: moka::sync::Cache::builder().max_capacity(100_000).time_to_idle(Duration::from_secs(600)).build(),
            free_budget,
            probation: Arc::new(crate::inference::routing::Probation::default()),
            relay_key,
            links,
            routing_rng: config_seed.map(|seed| parking_lot::Mutex::new(<rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed))),
        });
        if state.config.health_check_secs > 0 {
            let checking = state.clone();
            every(Duration::from_secs(checking.config.health_check_secs), stop.clone(), move || {
                let checking = checking.clone();
                async move { check_providers(&checking).await }
            });
        }
        // SQLite: the WAL is checkpointed here, mostly off the writer's connection
        // (`Store::checkpoint`).
        if store.backend == crate::store::Backend::Sqlite {
            every(Duration::from_millis(state.config.sqlite_checkpoint_ms), stop.clone(), move || {
                let store = store.clone();
                async move {
                    if let Err(e) = store.checkpoint().await {
                        tracing::warn!(error = %e, "WAL checkpoint failed");
                    }
                }
            });
        }
        // Stored Responses API answers past `responses_retention_days` (reads already
        // ignore them; this frees the rows).
        let sweeping = state.clone();
        every(Duration::from_secs(3_600), stop.clone(), move || {
            let sweeping = sweeping.clone();
            async move {
                match crate::api::responses::sweep(&sweeping).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(deleted = n, "expired stored responses deleted"),
                    Err(e) => tracing::warn!(error = %e, "deleting expired stored responses failed"),
                }
            }
        });
        // Provider slots: leases renewed, fleet counts refreshed, live replicas counted;
        // provider health shared, and written to the database every `PERSIST`.
        let (counting, mut ticks) = (state.clone(), 0u64);
        every(crate::inference::capacity::REFRESH, stop.clone(), move || {
            ticks += 1;
            let counting = counting.clone();
            let nth = |period: Duration| (period.as_millis() / crate::inference::capacity::REFRESH.as_millis()).max(1) as u64;
            let renew = ticks % nth(crate::inference::capacity::RENEW) == 0;
            // The first tick beats (the replica counts itself at once).
            let beat = (ticks - 1) % nth(crate::ops::replicas::BEAT) == 0;
            let persist = ticks % nth(crate::inference::fleet_health::PERSIST) == 0;
            async move {
                let providers: Vec<_> = counting.registry.snapshot().values().cloned().collect();
                counting.capacity.track(&providers);
                if beat {
                    match crate::ops::replicas::beat(&counting.store, &counting.replica, counting.config.redis_url.is_some()).await {
                        Ok(live) => {
                            counting.capacity.set_replicas(live);
                            counting.limiter.set_replicas(live);
                            counting.free_budget.set_replicas(live);
                        }
                        Err(e) => tracing::warn!(error = %e, "replica heartbeat failed"),
                    }
                }
                counting.capacity.tick(&providers, renew).await;
                counting.fleet_health.sync(&providers).await;
                if persist && counting.fleet_health.writes().await {
                    if let Err(e) = crate::inference::fleet_health::persist(&counting.store, &providers).await {
                        tracing::warn!(error = %e, "writing provider health failed");
                    }
                }
            }
        });
        let expiring = state.clone();
        every(Duration::from_secs(5), stop.clone(), move || {
            let expiring = expiring.clone();
            async move {
                if let Err(e) = crate::money::reservations::expire(&expiring).await {
                    tracing::warn!(error = %e, "reservation expiry failed");
                }
            }
        });
        Ok(Self { state, stop, writer })
    }

    /// Stops background work and writes every pending usage record.
    pub async fn finish(self) {
        self.stop.cancel();
        // What this replica knows of provider health outlives it.
        if self.state.fleet_health.writes().await {
            let providers: Vec<_> = self.state.registry.snapshot().values().cloned().collect();
            if let Err(e) = crate::inference::fleet_health::persist(&self.state.store, &providers).await {
                tracing::warn!(error = %e, "writing provider health failed");
            }
        }
        crate::ops::replicas::leave(&self.state.store, &self.state.replica).await;
        drop(self.state);
        if let Err(e) = self.writer.handle.await {
            tracing::error!(error = %e, "usage writer ended badly");
        }
    }
}

/// Runs `task` every `period` (the first time at once) until `stop` is cancelled. A
/// run that overruns its period delays the next instead of being followed by a burst
/// of catch-up runs (a 1 s checkpoint would otherwise be followed by ten at 100 ms).
fn every<F, Fut>(period: Duration, stop: CancellationToken, mut task: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => task().await,
                () = stop.cancelled() => break,
            }
        }
    });
}

/// Active health checks: `GET {baseUrl}/health` of every provider with a stream on line,
/// concurrently, 2 s each. The result feeds uptime; a failure also counts toward the
/// circuit breaker. Dial-out providers are probed over their links instead (`links`).
/// With Redis each provider is checked by one replica per period (`Fleet::to_check`),
/// and the result reaches the others with the next health sync.
///
/// Only active providers are checked, at most `HEALTH_CHECKS_AT_ONCE` at a time, so
/// registrations cannot make the gateway send requests to many addresses at once.
async fn check_providers(state: &AppState) {
    use futures::StreamExt;
    const HEALTH_CHECKS_AT_ONCE: usize = 16;
    let snapshot = state.registry.snapshot();
    let active = snapshot
        .values()
        .filter(|p| !p.streams.is_empty() && p.status == crate::inference::providers::ProviderStatus::Active)
        .filter(|p| p.connection == openapi::platform::Connection::Direct)
        .cloned()
        .collect::<Vec<_>>();
    let active = state.fleet_health.to_check(active, Duration::from_secs(state.config.health_check_secs)).await;
    let allow_private = state.config.allow_private_providers;
    futures::stream::iter(active)
        .for_each_concurrent(HEALTH_CHECKS_AT_ONCE, |p| {
            let http = state.http.clone();
            let breaking = state.config.breaking();
            let secret = state.relay_secret(&p);
            async move {
                let url = format!("{}/health", p.base_url);
                let ok = crate::inference::egress::check_connect(&url, allow_private).is_ok()
                    && http
                        .get(url)
                        .bearer_auth(secret)
                        .timeout(Duration::from_secs(2))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                p.load.health.record_check(ok);
                if !ok {
                    p.load.health.record_failure(crate::store::now_ms(), breaking);
                }
            }
        })
        .await;
}

pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_owned(),
    }
}

/// Serves until `shutdown` resolves, then drains open streams for at most
/// `shutdown_grace_secs` and flushes usage records.
pub async fn serve(
    running: Running,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = running.state.config.clone();
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections; open streams may finish");
    };
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .context("cannot load the TLS certificate or key")?;
            let handle = axum_server::Handle::new();
            let h = handle.clone();
            tokio::spawn(async move {
                shutdown.await;
                h.graceful_shutdown(Some(grace));
            });
            let std_listener = listener.into_std()?;
            let router = app(running.state.clone()).into_make_service_with_connect_info::<SocketAddr>();
            // The per-address cap runs on the TCP stream, before the TLS handshake.
            let per_ip = PerIpAcceptor(PerIp::new(config.max_connections_per_ip));
            let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(tls).acceptor(per_ip);
            let mut server = axum_server::from_tcp(std_listener).acceptor(acceptor).handle(handle);
            // The plain listener's limit on reading a request's head (slowloris) here too.
            server.http_builder().http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEAD_READ_TIMEOUT);
            server.serve(router).await?;
        }
        _ => {
            let per_ip = PerIp::new(config.max_connections_per_ip);
            serve_plain(listener, app(running.state.clone()), shutdown, grace, per_ip).await;
        }
    }
    running.finish().await;
    tracing::info!("gateway stopped");
    Ok(())
}

/// Plain HTTP/1.1: our own accept loop over hyper's HTTP/1 connection instead of
/// `axum::serve`, for memory. An open stream is mostly connection state, and
/// `axum::serve` (hyper-util's HTTP/1+2 auto connection) spends ~8 KB on each
/// connection's task and lets the read buffer grow to 16 KB; this loop spawns the
/// smaller HTTP/1-only connection future and caps the read buffer at 8 KB (hyper's
/// minimum, which also bounds a request's head; bodies are read through it in pieces).
/// BENCHMARKS.md has the before and after. Plaintext HTTP/2 (h2c prior knowledge) is
/// not offered: OpenAI clients speak HTTP/1.1, and HTTPS (`--tls-cert`) keeps ALPN h2.
async fn serve_plain(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
    per_ip: PerIp,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;

    let mut http1 = hyper::server::conn::http1::Builder::new();
    // The timer lets hyper enforce its 30 s limit on reading a request's head
    // (slowloris); without one that limit is silently off.
    http1.max_buf_size(MAX_HEAD_BYTES).timer(TokioTimer::new()).header_read_timeout(HEAD_READ_TIMEOUT);
    // Connections watch `signal` to start their graceful shutdown and each hold a
    // `closed` receiver, so the drain below waits until all of them have ended.
    let (signal, _) = tokio::sync::watch::channel(());
    let (closed_tx, closed) = tokio::sync::watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(slot) = per_ip.admit(remote.ip()) else {
            tracing::debug!(ip = %remote.ip(), "connection refused: max_connections_per_ip reached");
            drop(tcp);
            continue;
        };
        // Without TCP_NODELAY every SSE chunk after the first waits for the client's
        // delayed ACK (~40 ms).
        let _ = tcp.set_nodelay(true);
        let service = router.clone().map_request(move |mut request: http::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(axum::extract::ConnectInfo(remote));
            request.map(axum::body::Body::new)
        });
        let connection = http1
            .serve_connection(TokioIo::new(tcp), hyper_util::service::TowerToHyperService::new(service))
            .with_upgrades();
        let (mut stopping, closed) = (signal.subscribe(), closed.clone());
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stopping.changed() => {
                    // Finish the request in flight (an open stream runs to its end),
                    // then close instead of keeping the connection alive.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::trace!(error = %e, "connection ended with an error");
            }
            drop(slot);
            drop(closed);
        });
    }
    drop(listener);
    drop(closed);
    let _ = signal.send(());
    tokio::select! {
        () = closed_tx.closed() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(grace_secs = grace.as_secs(), "streams still open after the grace period; closing them");
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
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
        () = ctrl_c => {},
        () = term => {},
    }
}
