//! The request-end writer: one usage row per request plus its ledger settlement (or
//! hold void), written by a background task in batches: one transaction per batch
//! (group commit), so the hot path only pushes onto a channel. A request that must be
//! durable before it answers (`[DONE]`) waits for its batch's commit. On shutdown the
//! writer drains the channel before the process exits, so none are lost.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::money::ledger::{Billing, Payer, Settlement};
use crate::store::{Param, Script, Store, WriteTx, WriterLease};

#[derive(Debug, Clone)]
pub struct UsageRecord {
    pub request_id: String,
    pub key_id: Option<String>,
    pub user_id: Option<String>,
    pub endpoint: &'static str,
    pub model: String,
    pub provider_id: Option<String>,
    pub quality: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Time to first token in microseconds (the row stores whole milliseconds).
    pub ttft_us: Option<u64>,
    pub latency_ms: u64,
    pub status: UsageStatus,
    pub error_code: Option<String>,
    pub created_at: i64,
    /// What the request cost its payer, micro-USD.
    pub cost_micros: i64,
    /// `user`, `ad_revenue`, or none when nothing was billed.
    pub payer: Option<&'static str>,
    /// Whose token count was billed: `provider`; `gateway` when the provider sent none
    /// (the stream was cut); `gateway_flagged` when its report was implausible.
    pub usage_source: &'static str,
}

/// One finished request: its usage row, its billing, and who waits for the commit.
pub struct Completion {
    pub record: UsageRecord,
    pub billing: Option<crate::money::ledger::Billing>,
    pub ack: Option<tokio::sync::oneshot::Sender<bool>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageStatus {
    /// The response was delivered in full.
    Ok,
    /// The client went away before the end.
    ClientDisconnected,
    /// The provider failed after the first token.
    ProviderFailed,
    /// Refused or failed before any token (no provider, provider error, bad request upstream).
    Failed,
}

impl UsageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::ClientDisconnected => "client_disconnected",
            Self::ProviderFailed => "provider_failed",
            Self::Failed => "failed",
        }
    }
}

#[derive(Clone)]
pub struct UsageSink {
    tx: mpsc::UnboundedSender<Completion>,
}

impl UsageSink {
    /// Never blocks and never drops: the channel is unbounded and drained in batches.
    pub fn record(&self, completion: Completion) {
        if let Err(e) = self.tx.send(completion) {
            tracing::error!(request_id = %e.0.record.request_id, "usage writer is gone; a usage record was lost");
            if let Some(ack) = e.0.ack {
                let _ = ack.send(false);
            }
        }
    }
}

pub struct UsageWriter {
    pub handle: tokio::task::JoinHandle<()>,
}

pub fn spawn(
    metrics: std::sync::Arc<crate::ops::metrics::Metrics>,
    store: Store,
    batch_max: usize,
    flush_every: Duration,
    stop: CancellationToken,
) -> (UsageSink, UsageWriter) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Completion>();
    let (store, metrics) = (store, metrics);
    let handle = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(batch_max);
        let mut known = crate::money::ledger::Known::default();
        let mut lease = Lease::default();
        loop {
            tokio::select! {
                n = rx.recv_many(&mut batch, batch_max) => {
                    if n == 0 { break; }
                    // Group commit needs no timer: what arrives while a batch commits
                    // forms the next batch. An optional short wait trades latency for
                    // bigger batches.
                    if batch.len() < batch_max && !flush_every.is_zero() {
                        tokio::time::sleep(flush_every).await;
                        while batch.len() < batch_max {
                            match rx.try_recv() { Ok(r) => batch.push(r), Err(_) => break }
                        }
                    }
                    write_batch(&store, &metrics, &mut batch, &mut known, &mut lease).await;
                    lease.idle_since = Instant::now();
                    if lease.held_since.elapsed() >= LEASE_MAX || lease.writer.as_ref().is_some_and(WriterLease::wanted) {
                        lease.writer = None;
                    }
                }
                () = tokio::time::sleep_until(lease.idle_since + LEASE_IDLE), if lease.writer.is_some() => {
                    lease.writer = None;
                }
                () = stop.cancelled() => {
                    rx.close();
                    while let Some(r) = rx.recv().await {
                        batch.push(r);
                        if batch.len() >= batch_max { write_batch(&store, &metrics, &mut batch, &mut known, &mut lease).await; }
                    }
                    write_batch(&store, &metrics, &mut batch, &mut known, &mut lease).await;
                    break;
                }
            }
        }
    });
    (UsageSink { tx }, UsageWriter { handle })
}

/// The writer's hold on `Store::lease_writer` (SQLite files). Back-to-back batches
/// share one lease; it goes back to the pool after `LEASE_IDLE` without a batch, after
/// the batch that ends `LEASE_MAX` of holding it (the gateway's other writes: keys,
/// heartbeats, payouts, wait at most about that long), or after the batch during which
/// the WAL checkpoint began to wait for it (`Store::checkpoint`).
struct Lease {
    writer: Option<WriterLease>,
    held_since: Instant,
    idle_since: Instant,
}

impl Default for Lease {
    fn default() -> Self {
        Self { writer: None, held_since: Instant::now(), idle_since: Instant::now() }
    }
}

const LEASE_IDLE: Duration = Duration::from_millis(5);
const LEASE_MAX: Duration = Duration::from_millis(25);

async fn write_batch(store: &Store, metrics: &crate::ops::metrics::Metrics, batch: &mut Vec<Completion>, known: &mut crate::money::ledger::Known, lease: &mut Lease) {
    if batch.is_empty() {
        return;
    }
    let mut ok = false;
    for attempt in 0..5u32 {
        match commit(store, lease, batch, known).await {
            Ok(()) => {
                known.committed();
                ok = true;
                break;
            }
            Err(e) => {
                known.rolled_back();
                // Other writers may go first while this one waits to retry.
                lease.writer = None;
                tracing::warn!(error = %e, attempt, rows = batch.len(), "usage batch failed; retrying");
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            }
        }
    }
    if !ok {
        tracing::error!(rows = batch.len(), "usage batch could not be written");
    }
    if let Some(book) = &store.book {
        // In-memory holds are released only now, after their charge committed (see
        // `holds` for why the order matters); a batch that could not be written
        // charged nothing.
        for c in batch.iter() {
            let hold = match &c.billing {
                Some(Billing::Settle(Settlement { payer: Payer::User(hold), .. })) | Some(Billing::Void(hold)) => hold,
                _ => continue,
            };
            if hold.in_memory {
                book.finish(hold, if ok { c.record.cost_micros } else { 0 });
            }
        }
    }
    for c in batch.drain(..) {
        if ok {
            let r = &c.record;
            metrics.record_completion(r.status.as_str(), r.prompt_tokens, r.completion_tokens, r.ttft_us);
            metrics.charged_micros.fetch_add(u64::try_from(r.cost_micros).unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(ack) = c.ack {
            let _ = ack.send(ok);
        }
    }
}

/// One transaction for the batch: every settlement, then every usage row. On an SQLite
/// file it runs on the direct connection, the whole batch in this one call without
/// waiting on another thread (`store::Direct`); elsewhere through sqlx.
async fn commit(store: &Store, lease: &mut Lease, batch: &mut [Completion], known: &mut crate::money::ledger::Known) -> Result<(), sqlx::Error> {
    if lease.writer.is_none() {
        lease.writer = store.lease_writer().await?;
        lease.held_since = Instant::now();
    }
    if let Some(writer) = &lease.writer {
        let mut tx = writer.begin()?;
        write(&mut WriteTx::Direct(&mut tx), store, batch, known).await?;
        return tx.commit();
    }
    let mut tx = store.pool.begin().await?;
    write(&mut WriteTx::Sqlx(&mut tx), store, batch, known).await?;
    tx.commit().await
}

/// The batch's settlements and usage rows.
async fn write(tx: &mut WriteTx<'_, '_>, store: &Store, batch: &mut [Completion], known: &mut crate::money::ledger::Known) -> Result<(), sqlx::Error> {
    let billings: Vec<Option<&Billing>> = batch.iter().map(|c| c.billing.as_ref()).collect();
    let mut script = Script::for_tx(tx);
    let charges = crate::money::ledger::apply_batch(tx, &billings, "usage", store.book.as_deref(), known, &mut script).await?;
    for (c, charge) in batch.iter_mut().zip(charges) {
        if c.billing.is_some() {
            c.record.cost_micros = charge;
        }
    }
    let rows: Vec<Vec<Param<'_>>> = batch.iter().map(|c| row(&c.record)).collect();
    script.insert_rows(
        "INSERT INTO usage_records (request_id, key_id, user_id, endpoint, model, provider_id, quality, \
         prompt_tokens, completion_tokens, ttft_ms, latency_ms, status, error_code, created_at, cost_micros, payer, usage_source) VALUES",
        " ON CONFLICT (request_id) DO NOTHING",
        &rows,
    );
    tx.run(script).await
}

fn row(r: &UsageRecord) -> Vec<Param<'_>> {
    vec![
        Param::Str(&r.request_id),
        Param::OptStr(r.key_id.as_deref()),
        Param::OptStr(r.user_id.as_deref()),
        Param::Str(r.endpoint),
        Param::Str(&r.model),
        Param::OptStr(r.provider_id.as_deref()),
        Param::Str(&r.quality),
        Param::Int(i64::from(r.prompt_tokens)),
        Param::Int(i64::from(r.completion_tokens)),
        Param::OptInt(r.ttft_us.map(|v| i64::try_from(v / 1000).unwrap_or(i64::MAX))),
        Param::Int(i64::try_from(r.latency_ms).unwrap_or(i64::MAX)),
        Param::Str(r.status.as_str()),
        Param::OptStr(r.error_code.as_deref()),
        Param::Int(r.created_at),
        Param::Int(r.cost_micros),
        Param::OptStr(r.payer),
        Param::Str(r.usage_source),
    ]
}
