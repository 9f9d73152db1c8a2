//! Property tests of the billing ledger (issue 4), on a fresh database per case
//! (`GS_TEST_DB`: SQLite by default; `scripts/test.sh` runs them again on PostgreSQL,
//! which is why every test's name starts with `inproc_`).
//!
//! Random sequences of credits, holds, settlements and voids through the real
//! group-commit writer (`usage::spawn`, acks awaited as the relay does before `[DONE]`),
//! free-tier settlements, withdrawals (with retried and conflicting Idempotency-Keys),
//! withdrawal transitions and stale-hold sweeps. After every operation the ledger's
//! balances must equal an in-test model's; after every sequence `Ledger::check` must
//! find nothing and holds, usage costs and withdrawals must match the model too.
//! Then the concurrency properties: parallel holds never spend more than the balance,
//! and parallel withdrawals (and parallel retries of one key) never overdraw or pay twice.

// Clippy's `allow-unwrap-in-tests` covers `#[test]` functions only; the helpers below
// run only inside tests, where a failed unwrap is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gateway::money::ledger::{self, Billing, Ledger, Payer, Settlement};
use gateway::money::units::Micros;
use gateway::money::holds::Hold;
use gateway::money::payments::{PaymentError, Payments, PayoutMethod};
use gateway::store::{now_ms, Store};
use gateway::money::usage::{self, Completion, UsageRecord, UsageSink, UsageStatus, UsageWriter};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::Config as ProptestConfig;
use sqlx::Row;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::inproc::PG_URL;

const USERS: usize = 2;
const PROVIDERS: usize = 2;
/// The gateway's default platform fee (10%).
const FEE_BP: u32 = 1_000;
/// The default processing fee on withdrawals (2.5%) and minimum withdrawal ($5.00).
const WITHDRAWAL_FEE_BP: i64 = 250;
const MINIMUM_WITHDRAWAL: Micros = 5_000_000;

// --- database -------------------------------------------------------------------------

/// A fresh database from `inproc::fresh_database`, whose PostgreSQL schema is dropped
/// again when the case passes, so that hundreds of cases do not pile up schemas.
struct Db {
    store: Store,
    schema: Option<String>,
    _dir: tempfile::TempDir,
}

impl Db {
    async fn fresh() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (url, schema) = crate::inproc::fresh_database(&dir).await;
        let store = Store::connect(&url).await.unwrap();
        Self { store, schema, _dir: dir }
    }

    async fn dispose(self) {
        self.store.pool.close().await;
        if let Some(schema) = self.schema {
            let pool = sqlx::AnyPool::connect(PG_URL).await.unwrap();
            sqlx::query(&format!("DROP SCHEMA {schema} CASCADE")).execute(&pool).await.unwrap();
            pool.close().await;
        }
    }

    /// A provider row (withdrawals reference it) with a payout method on file.
    async fn add_provider(&self, id: &str) {
        sqlx::query(
            "INSERT INTO providers (id, name, key_hash, base_url, status, gpu_info, capabilities, price_per_mtok_micros, \
             price_per_hour_micros, minimum_payout_micros, created_at) VALUES ($1, $1, $2, 'http://127.0.0.1:9', 'online', '{}', '{}', 2000000, 0, 0, $3)",
        )
        .bind(id)
        .bind(format!("hash-{id}"))
        .bind(now_ms())
        .execute(&self.store.pool)
        .await
        .unwrap();
        Payments::new(self.store.clone())
            .set_method(id, &PayoutMethod::Paypal { email: format!("{id}@example.com") }, 0)
            .await
            .unwrap();
    }

    /// `(posted, held)` of every account that has either; held counts the SQLite
    /// store's in-memory request holds too.
    async fn balances(&self) -> BTreeMap<String, (Micros, Micros)> {
        sqlx::query("SELECT id, posted, held FROM accounts")
            .fetch_all(&self.store.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| {
                let id = r.get::<String, _>("id");
                let in_memory = self.store.book.as_ref().map_or(0, |b| b.held(&id));
                (id, (r.get::<i64, _>("posted"), r.get::<i64, _>("held") + in_memory))
            })
            .filter(|(_, b)| *b != (0, 0))
            .collect()
    }

    async fn assert_check_is_clean(&self) {
        let report = Ledger::new(self.store.clone()).check().await.unwrap();
        assert!(report.violations.is_empty(), "ledger check: {:#?}", report.violations);
    }
}

// --- the writer -----------------------------------------------------------------------

/// The real group-commit writer with the gateway's default batch size and no extra wait.
struct Writer {
    sink: UsageSink,
    writer: UsageWriter,
    stop: CancellationToken,
}

impl Writer {
    fn spawn(store: &Store) -> Self {
        let stop = CancellationToken::new();
        let (sink, writer) = usage::spawn(std::sync::Arc::default(), store.clone(), 512, Duration::ZERO, stop.clone());
        Self { sink, writer, stop }
    }

    /// Submits every completion back to back (so they share batches), then waits for
    /// every ack, as requests waiting to send `[DONE]` do.
    async fn submit(&self, completions: Vec<(String, Option<String>, Option<Billing>)>) {
        let mut acks = Vec::new();
        for (request_id, user, billing) in completions {
            let (tx, rx) = oneshot::channel();
            self.sink.record(Completion { record: record(&request_id, user), billing, ack: Some(tx) });
            acks.push((request_id, rx));
        }
        for (request_id, rx) in acks {
            assert_eq!(rx.await, Ok(true), "settlement of {request_id} was not committed");
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.writer.handle.await.unwrap();
    }
}

fn record(request_id: &str, user_id: Option<String>) -> UsageRecord {
    UsageRecord {
        request_id: request_id.to_owned(),
        key_id: None,
        user_id,
        endpoint: "chat",
        model: "m".into(),
        provider_id: None,
        quality: "standard".into(),
        prompt_tokens: 3,
        completion_tokens: 5,
        ttft_us: Some(1_000),
        latency_ms: 2,
        status: UsageStatus::Ok,
        error_code: None,
        created_at: now_ms(),
        cost_micros: 0,
        payer: None,
        usage_source: "provider",
    }
}

fn user(i: usize) -> String {
    ledger::user_account(&format!("u{i}"))
}

fn provider_id(i: usize) -> String {
    format!("p{i}")
}

// --- operations and the model ---------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum To {
    Processing,
    Paid,
    Failed,
}

impl To {
    fn as_str(self) -> &'static str {
        match self {
            Self::Processing => "processing",
            Self::Paid => "paid",
            Self::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Credit { user: usize, amount: Micros },
    Hold { user: usize, amount: Micros },
    /// Settles an open hold for `percent` of it (0 included: nothing was delivered).
    Settle { hold: Index, provider: usize, percent: i64 },
    Void { hold: Index },
    /// Several open holds settled in one burst: they share a group commit.
    SettleMany { count: usize, provider: usize, percent: i64 },
    /// A settlement and a void of the same hold back to back: the first one wins.
    SettleThenVoid { hold: Index, provider: usize, percent: i64 },
    /// A request ends after the sweeper (or another settlement) resolved its hold:
    /// nothing is charged.
    SettleResolved { hold: Index, provider: usize },
    /// Free tier: the platform's ad revenue pays the provider.
    FreeTier { provider: usize, charge: Micros },
    Withdraw { provider: usize, amount: Micros, key: Option<u8> },
    /// A client retrying a withdrawal it made with an Idempotency-Key, same body.
    RetryWithdraw { withdrawal: Index },
    Transition { withdrawal: Index, to: To },
    Sweep,
}

/// A sequence: every user funded and every provider with some free-tier earnings first
/// (so that holds and withdrawals are often granted, not only refused), then 20-60
/// random operations. The funding is part of the sequence, so it shrinks too.
fn sequence() -> impl Strategy<Value = Vec<Op>> {
    let credits = proptest::collection::vec(1..30_000_000i64, USERS);
    let earnings = proptest::collection::vec(0..15_000_000i64, PROVIDERS);
    (credits, earnings, proptest::collection::vec(op(), 20..60)).prop_map(|(credits, earnings, ops)| {
        let funding = credits.into_iter().enumerate().map(|(user, amount)| Op::Credit { user, amount });
        let earnings = earnings.into_iter().enumerate().map(|(provider, charge)| Op::FreeTier { provider, charge });
        funding.chain(earnings).chain(ops).collect()
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..USERS, 1..20_000_000i64).prop_map(|(user, amount)| Op::Credit { user, amount }),
        6 => (0..USERS, 1..3_000_000i64).prop_map(|(user, amount)| Op::Hold { user, amount }),
        5 => (any::<Index>(), 0..PROVIDERS, 0..=100i64).prop_map(|(hold, provider, percent)| Op::Settle { hold, provider, percent }),
        2 => any::<Index>().prop_map(|hold| Op::Void { hold }),
        1 => (1..6usize, 0..PROVIDERS, 0..=100i64).prop_map(|(count, provider, percent)| Op::SettleMany { count, provider, percent }),
        1 => (any::<Index>(), 0..PROVIDERS, 0..=100i64).prop_map(|(hold, provider, percent)| Op::SettleThenVoid { hold, provider, percent }),
        1 => (any::<Index>(), 0..PROVIDERS).prop_map(|(hold, provider)| Op::SettleResolved { hold, provider }),
        2 => (0..PROVIDERS, 0..5_000_000i64).prop_map(|(provider, charge)| Op::FreeTier { provider, charge }),
        3 => (0..PROVIDERS, 2_000_000..9_000_000i64, proptest::option::of(0..3u8))
            .prop_map(|(provider, amount, key)| Op::Withdraw { provider, amount, key }),
        2 => any::<Index>().prop_map(|withdrawal| Op::RetryWithdraw { withdrawal }),
        2 => (any::<Index>(), prop_oneof![Just(To::Processing), Just(To::Paid), Just(To::Failed)])
            .prop_map(|(withdrawal, to)| Op::Transition { withdrawal, to }),
        1 => Just(Op::Sweep),
    ]
}

struct ModelWithdrawal {
    id: String,
    provider: usize,
    amount: Micros,
    status: &'static str,
}

/// What the ledger should hold, computed without it.
#[derive(Default)]
struct Model {
    posted: HashMap<String, Micros>,
    held: HashMap<String, Micros>,
    open: Vec<Hold>,
    /// Every hold ever taken and its expected status.
    holds: HashMap<String, &'static str>,
    resolved: Vec<Hold>,
    /// Expected `cost_micros` of every usage record.
    costs: HashMap<String, Micros>,
    withdrawals: Vec<ModelWithdrawal>,
    /// `(provider, key)` → `(amount, withdrawal id)` of the request that first used it.
    keys: BTreeMap<(usize, u8), (Micros, String)>,
    requests: u64,
}

impl Model {
    fn post(&mut self, lines: &[(&str, Micros)]) {
        assert_eq!(lines.iter().map(|(_, a)| a).sum::<Micros>(), 0, "the model posted an unbalanced entry");
        for (account, amount) in lines {
            *self.posted.entry((*account).to_owned()).or_default() += amount;
        }
    }

    fn available(&self, account: &str) -> Micros {
        self.posted.get(account).copied().unwrap_or(0) - self.held.get(account).copied().unwrap_or(0)
    }

    fn request_id(&mut self) -> String {
        self.requests += 1;
        format!("req-{}", self.requests)
    }

    /// Takes the open hold `pick` points at, if any.
    fn take_open(&mut self, pick: &Index) -> Option<Hold> {
        if self.open.is_empty() {
            return None;
        }
        Some(self.open.remove(pick.index(self.open.len())))
    }

    fn resolve(&mut self, hold: &Hold, status: &'static str) {
        *self.held.entry(hold.account_id.clone()).or_default() -= hold.amount;
        self.holds.insert(hold.id.clone(), status);
        self.resolved.push(hold.clone());
    }

    /// A user settlement of an open hold: the hold is released and the charge posted.
    fn settle(&mut self, hold: &Hold, provider: usize, charge: Micros, request_id: &str) -> Billing {
        self.resolve(hold, "settled");
        let fee = ledger::fee(charge, FEE_BP);
        let provider_account = ledger::provider_account(&provider_id(provider));
        self.post(&[(&hold.account_id, -charge), (&provider_account, charge - fee), (ledger::FEES, fee)]);
        self.costs.insert(request_id.to_owned(), charge);
        Billing::Settle(Settlement {
            request_id: request_id.to_owned(),
            payer: Payer::User(hold.clone()),
            provider_id: provider_id(provider),
            charge,
            fee,
        })
    }

    fn expected_balances(&self) -> BTreeMap<String, (Micros, Micros)> {
        let mut all: BTreeMap<String, (Micros, Micros)> = BTreeMap::new();
        for (account, posted) in &self.posted {
            all.entry(account.clone()).or_default().0 = *posted;
        }
        for (account, held) in &self.held {
            all.entry(account.clone()).or_default().1 = *held;
        }
        all.retain(|_, b| *b != (0, 0));
        all
    }
}

fn charge_of(hold: &Hold, percent: i64) -> Micros {
    hold.amount * percent / 100
}

/// Runs one operation against the ledger and the model.
async fn apply(op: &Op, db: &Db, writer: &Writer, model: &mut Model) {
    let ledger = Ledger::new(db.store.clone());
    let payments = Payments::new(db.store.clone());
    match op {
        Op::Credit { user: u, amount } => {
            let balance = ledger.credit(&user(*u), *amount, "grant", "property test").await.unwrap();
            model.post(&[(ledger::EXTERNAL, -amount), (&user(*u), *amount)]);
            assert_eq!(balance.available, model.available(&user(*u)));
        }
        Op::Hold { user: u, amount } => {
            let account = user(*u);
            let request_id = model.request_id();
            let fits = model.available(&account) >= *amount;
            match ledger.hold(&account, *amount, &request_id, None).await.unwrap() {
                Some(hold) => {
                    assert!(fits, "hold of {amount} granted with only {} available", model.available(&account));
                    assert_eq!((hold.account_id.as_str(), hold.amount), (account.as_str(), *amount));
                    *model.held.entry(account).or_default() += amount;
                    model.holds.insert(hold.id.clone(), "held");
                    model.open.push(hold);
                }
                None => assert!(!fits, "hold of {amount} refused with {} available", model.available(&account)),
            }
        }
        Op::Settle { hold, provider, percent } => {
            let Some(hold) = model.take_open(hold) else { return };
            let request_id = model.request_id();
            let billing = model.settle(&hold, *provider, charge_of(&hold, *percent), &request_id);
            writer.submit(vec![(request_id, Some(hold.account_id.clone()), Some(billing))]).await;
        }
        Op::Void { hold } => {
            let Some(hold) = model.take_open(hold) else { return };
            let request_id = model.request_id();
            model.resolve(&hold, "voided");
            model.costs.insert(request_id.clone(), 0);
            writer.submit(vec![(request_id, Some(hold.account_id.clone()), Some(Billing::Void(hold)))]).await;
        }
        Op::SettleMany { count, provider, percent } => {
            let holds: Vec<Hold> = model.open.drain(..(*count).min(model.open.len())).collect();
            let mut burst = Vec::new();
            for hold in holds {
                let request_id = model.request_id();
                let billing = model.settle(&hold, *provider, charge_of(&hold, *percent), &request_id);
                burst.push((request_id, Some(hold.account_id.clone()), Some(billing)));
            }
            writer.submit(burst).await;
        }
        Op::SettleThenVoid { hold, provider, percent } => {
            let Some(hold) = model.take_open(hold) else { return };
            let (settle_id, void_id) = (model.request_id(), model.request_id());
            let billing = model.settle(&hold, *provider, charge_of(&hold, *percent), &settle_id);
            model.costs.insert(void_id.clone(), 0);
            let user = Some(hold.account_id.clone());
            writer.submit(vec![(settle_id, user.clone(), Some(billing)), (void_id, user, Some(Billing::Void(hold)))]).await;
        }
        Op::SettleResolved { hold, provider } => {
            if model.resolved.is_empty() {
                return;
            }
            let hold = model.resolved[hold.index(model.resolved.len())].clone();
            let request_id = model.request_id();
            model.costs.insert(request_id.clone(), 0);
            let billing = Billing::Settle(Settlement {
                request_id: request_id.clone(),
                payer: Payer::User(hold.clone()),
                provider_id: provider_id(*provider),
                charge: hold.amount,
                fee: ledger::fee(hold.amount, FEE_BP),
            });
            writer.submit(vec![(request_id, Some(hold.account_id.clone()), Some(billing))]).await;
        }
        Op::FreeTier { provider, charge } => {
            let request_id = model.request_id();
            let fee = ledger::fee(*charge, FEE_BP);
            model.post(&[(ledger::AD_REVENUE, -charge), (&ledger::provider_account(&provider_id(*provider)), charge - fee), (ledger::FEES, fee)]);
            model.costs.insert(request_id.clone(), *charge);
            let billing = Billing::Settle(Settlement {
                request_id: request_id.clone(),
                payer: Payer::AdRevenue,
                provider_id: provider_id(*provider),
                charge: *charge,
                fee,
            });
            writer.submit(vec![(request_id, None, Some(billing))]).await;
        }
        Op::Withdraw { provider, amount, key } => {
            let key_text = key.map(|k| format!("key-{k}"));
            let result = payments.withdraw(&provider_id(*provider), *amount, None, key_text.as_deref(), false).await;
            let account = ledger::provider_account(&provider_id(*provider));
            if let Some((first_amount, first_id)) = key.and_then(|k| model.keys.get(&(*provider, k))) {
                // A retry: the first result again, and no money moves; another body is a 409.
                match result {
                    Ok(w) if first_amount == amount => assert_eq!(&w.id, first_id, "a retried key made a second withdrawal"),
                    Err(PaymentError::IdempotencyConflict) if first_amount != amount => {}
                    other => panic!("retry of key {key:?} (first {first_amount}, now {amount}): {other:?}"),
                }
                return;
            }
            if *amount < MINIMUM_WITHDRAWAL {
                assert!(matches!(result, Err(PaymentError::Invalid(..))), "{amount} is under the minimum: {result:?}");
                return;
            }
            if model.available(&account) < *amount {
                assert!(matches!(result, Err(PaymentError::Insufficient)), "{amount} over {}: {result:?}", model.available(&account));
                return;
            }
            let w = result.unwrap();
            assert_eq!((w.amount_micros, w.fee_micros, w.status.as_str()), (*amount, amount * WITHDRAWAL_FEE_BP / 10_000, "requested"));
            model.post(&[(&account, -amount), (ledger::PAYOUTS, *amount)]);
            if let Some(k) = key {
                model.keys.insert((*provider, *k), (*amount, w.id.clone()));
            }
            model.withdrawals.push(ModelWithdrawal { id: w.id, provider: *provider, amount: *amount, status: "requested" });
        }
        Op::RetryWithdraw { withdrawal } => {
            if model.keys.is_empty() {
                return;
            }
            let Some((&(provider, key), (amount, id))) = model.keys.iter().nth(withdrawal.index(model.keys.len())) else { return };
            let w = payments.withdraw(&provider_id(provider), *amount, None, Some(&format!("key-{key}")), false).await.unwrap();
            assert_eq!(&w.id, id, "a retried Idempotency-Key made a second withdrawal");
            let status = model.withdrawals.iter().find(|m| &m.id == id).map(|m| m.status);
            assert_eq!(Some(w.status.as_str()), status, "a retry returns the withdrawal as it is now");
        }
        Op::Transition { withdrawal, to } => {
            if model.withdrawals.is_empty() {
                return;
            }
            let i = withdrawal.index(model.withdrawals.len());
            let (id, from, amount, provider) = {
                let w = &model.withdrawals[i];
                (w.id.clone(), w.status, w.amount, w.provider)
            };
            let allowed = matches!((from, to), ("requested", To::Processing) | ("requested" | "processing", To::Paid | To::Failed));
            let result = payments.transition(&id, to.as_str(), Some("property test".into())).await;
            if !allowed {
                assert!(matches!(result, Err(PaymentError::BadTransition { .. })), "{from} → {}: {result:?}", to.as_str());
                return;
            }
            assert_eq!(result.unwrap().status, to.as_str());
            model.withdrawals[i].status = to.as_str();
            match to {
                To::Processing => {}
                To::Paid => {
                    let fee = amount * WITHDRAWAL_FEE_BP / 10_000;
                    model.post(&[(ledger::PAYOUTS, -amount), (ledger::EXTERNAL, amount - fee), (ledger::FEES, fee)]);
                }
                To::Failed => {
                    model.post(&[(ledger::PAYOUTS, -amount), (&ledger::provider_account(&provider_id(provider)), amount)]);
                }
            }
        }
        Op::Sweep => {
            // Every hold taken so far is older than `now` once a few milliseconds pass.
            tokio::time::sleep(Duration::from_millis(3)).await;
            let swept = ledger.sweep_stale_holds(0).await.unwrap();
            assert_eq!(swept, model.open.len() as u64, "the sweeper voided a different number of holds");
            for hold in std::mem::take(&mut model.open) {
                model.resolve(&hold, "voided");
            }
        }
    }
}

async fn run_sequence(ops: Vec<Op>) {
    let db = Db::fresh().await;
    for p in 0..PROVIDERS {
        db.add_provider(&provider_id(p)).await;
    }
    let writer = Writer::spawn(&db.store);
    let mut model = Model::default();
    for (i, op) in ops.iter().enumerate() {
        apply(op, &db, &writer, &mut model).await;
        assert_eq!(db.balances().await, model.expected_balances(), "balances differ from the model after op {i}: {op:?}");
    }
    writer.stop().await;

    db.assert_check_is_clean().await;
    assert_eq!(db.balances().await, model.expected_balances(), "balances differ from the model at the end");
    let total: Micros = db.balances().await.values().map(|(posted, _)| posted).sum();
    assert_eq!(total, 0, "money was created or destroyed");
    for (account, (posted, held)) in db.balances().await {
        let kind = account.split(':').next().unwrap_or_default();
        if kind == "user" || kind == "provider" {
            assert!(posted >= 0 && posted - held >= 0, "{account} is below zero: posted {posted}, held {held}");
        }
    }

    let costs: HashMap<String, Micros> = sqlx::query("SELECT request_id, cost_micros FROM usage_records")
        .fetch_all(&db.store.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("request_id"), r.get("cost_micros")))
        .collect();
    assert_eq!(costs, model.costs, "usage records' costs differ from what was settled");

    let holds: HashMap<String, String> = sqlx::query("SELECT id, status FROM holds")
        .fetch_all(&db.store.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("id"), r.get("status")))
        .collect();
    match &db.store.book {
        // SQLite: request holds live in memory; only the open ones are there to count.
        Some(book) => {
            assert!(holds.is_empty(), "request holds wrote rows: {holds:?}");
            assert_eq!(book.open(), model.holds.values().filter(|s| **s == "held").count(), "open holds differ from the model");
        }
        None => {
            let expected: HashMap<String, String> = model.holds.iter().map(|(id, s)| (id.clone(), (*s).to_owned())).collect();
            assert_eq!(holds, expected, "hold statuses differ from the model");
        }
    }

    let withdrawals: HashMap<String, String> = Payments::new(db.store.clone())
        .list(None, None)
        .await
        .unwrap()
        .into_iter()
        .map(|w| (w.id, w.status))
        .collect();
    let expected: HashMap<String, String> = model.withdrawals.iter().map(|w| (w.id.clone(), w.status.to_owned())).collect();
    assert_eq!(withdrawals, expected, "withdrawals differ from the model");

    db.dispose().await;
}

proptest! {
    // Each case builds a database, so the count is modest; shrinking is bounded in time
    // so that a failure still reports within a minute or two. Failures print the minimal
    // sequence; nothing is persisted into the source tree.
    #![proptest_config(ProptestConfig {
        cases: 48,
        max_shrink_time: 60_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn inproc_ledger_props_random_sequences_keep_every_invariant(ops in sequence()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run_sequence(ops));
    }
}

// --- concurrency ----------------------------------------------------------------------

/// Watches `account` from the side until stopped: its available balance must never be
/// negative at any moment, not just at the end. Returns how many samples it took.
fn watch(store: Store, account: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let ledger = Ledger::new(store);
        let mut samples = 0;
        while !stop.load(Ordering::Relaxed) {
            let b = ledger.balance(&account).await.unwrap();
            assert!(b.posted >= 0 && b.available >= 0, "{account} went below zero: {b:?}");
            samples += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        samples
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inproc_ledger_props_200_parallel_holds_against_100_fit_exactly_100() {
    const PRICE: Micros = 12_345;
    let db = Db::fresh().await;
    let ledger = Ledger::new(db.store.clone());
    let account = user(0);
    ledger.credit(&account, 100 * PRICE, "grant", "covers exactly 100 requests").await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch(db.store.clone(), account.clone(), stop.clone());
    let start = Arc::new(tokio::sync::Barrier::new(200));
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (ledger, account, start) = (ledger.clone(), account.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                ledger.hold(&account, PRICE, &format!("req-{i}"), None).await.unwrap()
            })
        })
        .collect();
    let mut holds = Vec::new();
    for t in tasks {
        holds.extend(t.await.unwrap());
    }
    assert_eq!(holds.len(), 100, "exactly the 100 requests the balance covers get a hold");
    let b = ledger.balance(&account).await.unwrap();
    assert_eq!((b.posted, b.held, b.available), (100 * PRICE, 100 * PRICE, 0));
    assert_eq!(ledger.hold(&account, 1, "one-more", None).await.unwrap(), None, "a 201st hold of 1 µUSD must not fit");

    // The 100 requests end at once: half used their whole hold, half a third of it.
    db.add_provider(&provider_id(0)).await;
    let writer = Writer::spawn(&db.store);
    let mut charged = 0;
    let mut burst = Vec::new();
    for (i, hold) in holds.into_iter().enumerate() {
        let charge = if i % 2 == 0 { hold.amount } else { hold.amount / 3 };
        charged += charge;
        let request_id = format!("req-settle-{i}");
        let billing = Billing::Settle(Settlement {
            request_id: request_id.clone(),
            payer: Payer::User(hold),
            provider_id: provider_id(0),
            charge,
            fee: ledger::fee(charge, FEE_BP),
        });
        burst.push((request_id, Some(account.clone()), Some(billing)));
    }
    writer.submit(burst).await;
    writer.stop().await;
    stop.store(true, Ordering::Relaxed);
    let samples = watcher.await.unwrap();
    assert!(samples > 0, "the watcher never looked at the balance");

    let b = ledger.balance(&account).await.unwrap();
    assert_eq!((b.posted, b.held), (100 * PRICE - charged, 0), "the user paid exactly what was settled");
    let cost: i64 = sqlx::query_scalar("SELECT CAST(SUM(cost_micros) AS BIGINT) FROM usage_records").fetch_one(&db.store.pool).await.unwrap();
    assert_eq!(cost, charged);
    db.assert_check_is_clean().await;
    db.dispose().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inproc_ledger_props_parallel_withdrawals_never_overdraw_or_pay_twice() {
    let db = Db::fresh().await;
    let ledger = Ledger::new(db.store.clone());
    let payments = Payments::new(db.store.clone());
    let provider = provider_id(0);
    let account = ledger::provider_account(&provider);
    db.add_provider(&provider).await;
    ledger.credit(&account, 50_000_000, "grant", "earnings").await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch(db.store.clone(), account.clone(), stop.clone());

    // A client retrying one withdrawal 16 times at once: one withdrawal, paid once.
    let retries: Vec<_> = (0..16)
        .map(|_| {
            let (payments, provider) = (payments.clone(), provider.clone());
            tokio::spawn(async move { payments.withdraw(&provider, 6_000_000, None, Some("retry-me"), false).await })
        })
        .collect();
    let mut ids = Vec::new();
    for t in retries {
        ids.push(t.await.unwrap().unwrap().id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 1, "parallel retries of one key made several withdrawals: {ids:?}");
    assert_eq!(ledger.balance(&account).await.unwrap().posted, 44_000_000);

    // 20 different withdrawals of $5.00 against $44.00: exactly 8 fit.
    let start = Arc::new(tokio::sync::Barrier::new(20));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (payments, provider, start) = (payments.clone(), provider.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                payments.withdraw(&provider, 5_000_000, None, None, false).await
            })
        })
        .collect();
    let (mut made, mut refused) = (Vec::new(), 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(w) => made.push(w),
            Err(PaymentError::Insufficient) => refused += 1,
            Err(e) => panic!("unexpected withdrawal error: {e}"),
        }
    }
    assert_eq!((made.len(), refused), (8, 12));
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    let b = ledger.balance(&account).await.unwrap();
    assert_eq!((b.posted, b.available), (4_000_000, 4_000_000));
    assert_eq!(ledger.balance(ledger::PAYOUTS).await.unwrap().posted, 46_000_000);

    // Paying one twice at once (two admins clicking): one payout entry.
    let id = made[0].id.clone();
    let (a, b) = tokio::join!(payments.transition(&id, "paid", None), payments.transition(&id, "paid", None));
    assert!(a.is_ok() != b.is_ok(), "exactly one of two parallel `paid` transitions succeeds: {a:?} / {b:?}");
    let entries: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ledger_entries WHERE kind = 'payout' AND request_id = $1")
        .bind(&id)
        .fetch_one(&db.store.pool)
        .await
        .unwrap();
    assert_eq!(entries, 1);
    db.assert_check_is_clean().await;
    db.dispose().await;
}
