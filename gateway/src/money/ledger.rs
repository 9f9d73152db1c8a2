//! The double-entry ledger: accounts, an append-only journal whose entries sum to zero,
//! and two-phase holds. Money is integer micro-USD everywhere.
//!
//! Holds are taken on the request path so that concurrent requests can never spend
//! more than the balance: on PostgreSQL one short transaction with a conditional update
//! of the `holds` table; on the embedded SQLite store in memory (`holds::HoldBook`, no
//! database write on the request path). Long-lived holds (reservations) are always
//! rows (`hold_durable`). Settlements and voids are written by the usage writer in
//! batches (group commit) together with the request's usage record; see `usage`.

use sqlx::{Any, Row, Transaction};

use crate::money::holds::{Hold, HoldBook};
use crate::money::units::Micros;
use crate::store::{new_id, now_ms, placeholders, Param, Script, Store, WriteTx};

pub const FEES: &str = "platform:fees";
pub const AD_REVENUE: &str = "platform:ad_revenue";
pub const EXTERNAL: &str = "external";

pub fn user_account(user_id: &str) -> String {
    format!("user:{user_id}")
}

pub fn provider_account(provider_id: &str) -> String {
    format!("provider:{provider_id}")
}

pub fn advertiser_account(advertiser_id: &str) -> String {
    format!("advertiser:{advertiser_id}")
}

/// The most one credit may add: $1,000,000 (balances stay far from `i64` overflow).
pub const MAX_CREDIT: Micros = 1_000_000_000_000;

/// Who pays for a request's tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payer {
    /// A paying user, against their hold.
    User(Hold),
    /// Free tier: the platform's ad-revenue account pays the provider.
    AdRevenue,
}

/// What one request owes, computed from what was delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub request_id: String,
    pub payer: Payer,
    pub provider_id: String,
    pub charge: Micros,
    pub fee: Micros,
}

/// The outcome the writer applies with the usage record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Billing {
    Settle(Settlement),
    Void(Hold),
}

/// Price of `tokens` at `per_mtok` micro-USD per million tokens and a tier multiplier
/// in basis points, rounded up to the micro-USD.
pub fn price(tokens: u64, per_mtok: Micros, multiplier_bp: u32) -> Micros {
    let numerator = i128::from(tokens) * i128::from(per_mtok) * i128::from(multiplier_bp);
    let denominator: i128 = 1_000_000 * 10_000;
    i64::try_from((numerator + denominator - 1) / denominator).unwrap_or(i64::MAX)
}

/// `price` less a discount in basis points, rounded up once at the end.
pub fn price_discounted(tokens: u64, per_mtok: Micros, multiplier_bp: u32, discount_bp: u32) -> Micros {
    let numerator = i128::from(tokens) * i128::from(per_mtok) * i128::from(multiplier_bp) * i128::from(10_000 - discount_bp.min(10_000));
    let denominator: i128 = 1_000_000 * 10_000 * 10_000;
    i64::try_from((numerator + denominator - 1) / denominator).unwrap_or(i64::MAX)
}

/// Tokens a user was billed for since `since_ms` (for volume discounts).
pub async fn user_tokens_since(store: &Store, user_id: &str, since_ms: i64) -> Result<u64, sqlx::Error> {
    let n: i64 = store
        .read_one(
            "SELECT CAST(COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS BIGINT) FROM usage_records WHERE user_id = $1 AND created_at >= $2 AND payer = 'user'",
            &[Param::Str(user_id), Param::Int(since_ms)],
        )
        .await?
        .unwrap_or(0);
    Ok(u64::try_from(n).unwrap_or(0))
}

/// The platform fee out of a charge, rounded down (the provider keeps the rounding).
pub fn fee(charge: Micros, fee_bp: u32) -> Micros {
    charge * i64::from(fee_bp) / 10_000
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("amount must be positive")]
    NonPositive,
    /// Over `MAX_CREDIT`: balances are `i64` micro-USD and must never overflow.
    #[error("amount is larger than one credit may be")]
    TooLarge,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Balance {
    pub posted: Micros,
    pub held: Micros,
    pub available: Micros,
}

/// What `Ledger::hold_within_limits` did.
#[derive(Debug)]
pub enum Limited {
    Held(Hold),
    /// The account's available balance does not cover the amount.
    Unfunded,
    /// The amount would take the key past the limit at this index.
    Over(usize),
}

#[derive(Clone)]
pub struct Ledger {
    store: Store,
}

async fn ensure_account(tx: &mut Transaction<'_, Any>, id: &str) -> Result<(), sqlx::Error> {
    let (kind, owner) = account_kind(id);
    sqlx::query("INSERT INTO accounts (id, kind, owner_id, posted, held, created_at) VALUES ($1, $2, $3, 0, 0, $4) ON CONFLICT (id) DO NOTHING")
        .bind(id)
        .bind(kind)
        .bind(owner)
        .bind(now_ms())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Posts one balanced entry: `lines` must sum to zero (checked).
pub async fn post_entry(
    tx: &mut Transaction<'_, Any>,
    kind: &str,
    request_id: Option<&str>,
    memo: &str,
    lines: &[(&str, Micros)],
) -> Result<String, sqlx::Error> {
    let sum: i128 = lines.iter().map(|(_, a)| i128::from(*a)).sum();
    if sum != 0 {
        return Err(sqlx::Error::Protocol(format!("unbalanced ledger entry ({kind}): sum {sum}")));
    }
    let id = new_id("ent");
    sqlx::query("INSERT INTO ledger_entries (id, kind, request_id, memo, created_at) VALUES ($1, $2, $3, $4, $5)")
        .bind(&id)
        .bind(kind)
        .bind(request_id)
        .bind(memo)
        .bind(now_ms())
        .execute(&mut **tx)
        .await?;
    for (account, amount) in lines.iter().filter(|(_, a)| *a != 0) {
        ensure_account(tx, account).await?;
        sqlx::query("INSERT INTO ledger_lines (entry_id, account_id, amount) VALUES ($1, $2, $3)")
            .bind(&id)
            .bind(*account)
            .bind(*amount)
            .execute(&mut **tx)
            .await?;
        sqlx::query("UPDATE accounts SET posted = posted + $1 WHERE id = $2")
            .bind(*amount)
            .bind(*account)
            .execute(&mut **tx)
            .await?;
    }
    Ok(id)
}

/// Applies one settlement or void in `tx` (reservations, the sweeper's voids); see
/// `apply_batch`. Returns the charge.
pub async fn apply(tx: &mut Transaction<'_, Any>, billing: &Billing, kind: &str, book: Option<&HoldBook>) -> Result<Micros, sqlx::Error> {
    let mut known = Known::default();
    let mut tx = WriteTx::Sqlx(tx);
    let mut script = Script::for_tx(&tx);
    let charge = apply_batch(&mut tx, &[Some(billing)], kind, book, &mut known, &mut script).await?.first().copied().unwrap_or(0);
    tx.run(script).await?;
    Ok(charge)
}

/// Accounts known to exist (accounts are never deleted), so a batch need not insert
/// them again. Filled from committed batches only.
#[derive(Default)]
pub struct Known {
    accounts: std::collections::HashSet<String>,
    pending: Vec<String>,
}

impl Known {
    /// The batch that created `pending` accounts committed.
    pub fn committed(&mut self) {
        self.accounts.extend(self.pending.drain(..));
    }

    pub fn rolled_back(&mut self) {
        self.pending.clear();
    }
}

/// Applies a batch of settlements and voids inside the writer's transaction, set-wise:
/// a fixed handful of statements per batch (release the holds, insert entries, lines
/// and new accounts, one update of the cached balances) instead of a dozen per
/// settlement. Returns each item's charge, in order (0 for voids and `None`s).
///
/// A hold that is no longer open (voided by the sweeper) is not charged. In-memory
/// holds (`book`) are only marked as settling here; the caller releases them with
/// `HoldBook::finish` once the transaction committed. A settlement whose request
/// already has an entry of this `kind` is skipped: a batch retried after a commit whose
/// acknowledgement was lost must not pay twice.
///
/// The reads (and the durable holds' releases) run in `tx` at once; the journal's
/// inserts and the balance update go into `script`, which the caller runs in `tx`
/// before it commits (together with its own writes: one round trip on SQLite).
pub async fn apply_batch(
    tx: &mut WriteTx<'_, '_>,
    billings: &[Option<&Billing>],
    kind: &str,
    book: Option<&HoldBook>,
    known: &mut Known,
    script: &mut Script,
) -> Result<Vec<Micros>, sqlx::Error> {
    let mut charges = vec![0; billings.len()];
    let settled_ids: Vec<&str> = billings
        .iter()
        .filter_map(|b| match b {
            Some(Billing::Settle(s)) => Some(s.request_id.as_str()),
            _ => None,
        })
        .collect();
    let mut done = std::collections::HashSet::new();
    for chunk in settled_ids.chunks(64) {
        let sql = format!("SELECT request_id FROM ledger_entries WHERE kind = $1 AND request_id IN ({})", placeholders(2, chunk.len()));
        let params: Vec<Param<'_>> = std::iter::once(Param::Str(kind)).chain(chunk.iter().map(|id| Param::Str(id))).collect();
        done.extend(tx.fetch_all::<String>(&sql, &params).await?);
    }
    // Release the holds; only a hold still open may be charged. A hold named twice in
    // one batch is resolved by its first item, as if the items ran one by one.
    let mut first: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut released = vec![false; billings.len()];
    let mut rows: Vec<(usize, &Hold, &'static str)> = Vec::new();
    for (i, billing) in billings.iter().enumerate() {
        let (hold, status) = match billing {
            Some(Billing::Void(hold)) => (hold, "voided"),
            Some(Billing::Settle(Settlement { payer: Payer::User(hold), request_id, .. })) if !done.contains(request_id) => (hold, "settled"),
            _ => continue,
        };
        if !first.insert(hold.id.as_str()) {
            continue;
        }
        if hold.in_memory {
            let Some(book) = book else {
                return Err(sqlx::Error::Protocol(format!("hold {} is in memory but this store keeps no hold book", hold.id)));
            };
            released[i] = book.begin_close(hold);
        } else {
            rows.push((i, hold, status));
        }
    }
    for status in ["voided", "settled"] {
        let ids: Vec<&str> = rows.iter().filter(|(_, _, s)| *s == status).map(|(_, h, _)| h.id.as_str()).collect();
        let closed: std::collections::HashSet<String> = release_rows(tx, &ids, status).await?.into_iter().collect();
        for (i, hold, _) in rows.iter().filter(|(_, _, s)| *s == status) {
            released[*i] = closed.contains(&hold.id);
        }
    }
    // The journal: one entry per charged settlement.
    let now = now_ms();
    let mut entries: Vec<(String, &str)> = Vec::new();
    let mut lines: Vec<(usize, String, Micros)> = Vec::new();
    for (i, billing) in billings.iter().enumerate() {
        let Some(Billing::Settle(s)) = billing else { continue };
        if done.contains(&s.request_id) {
            continue;
        }
        let (payer_account, charge) = match &s.payer {
            Payer::User(hold) => {
                if !released[i] {
                    tracing::error!(request_id = %s.request_id, "hold was no longer open at settlement; not charged");
                    continue;
                }
                // Never more than was held: the user's balance cannot go below zero.
                (hold.account_id.clone(), s.charge.clamp(0, hold.amount))
            }
            Payer::AdRevenue => (AD_REVENUE.to_owned(), s.charge.max(0)),
        };
        if charge == 0 {
            continue;
        }
        let fee = s.fee.clamp(0, charge);
        charges[i] = charge;
        let entry = entries.len();
        entries.push((new_id("ent"), s.request_id.as_str()));
        for (account, amount) in [(payer_account, -charge), (provider_account(&s.provider_id), charge - fee), (FEES.to_owned(), fee)] {
            if amount != 0 {
                lines.push((entry, account, amount));
            }
        }
    }
    if entries.is_empty() {
        return Ok(charges);
    }
    let memo = if kind == "usage" { "tokens delivered" } else { "reserved capacity" };
    let entry_rows: Vec<Vec<Param<'_>>> = entries
        .iter()
        .map(|(id, request)| vec![Param::Str(id), Param::Str(kind), Param::Str(request), Param::Str(memo), Param::Int(now)])
        .collect();
    let line_rows: Vec<Vec<Param<'_>>> =
        lines.iter().map(|(e, account, amount)| vec![Param::Str(&entries[*e].0), Param::Str(account), Param::Int(*amount)]).collect();
    post_lines(script, &entry_rows, &line_rows, known)?;
    Ok(charges)
}

/// Adds to `script` the inserts of entries and their lines and of accounts seen for the
/// first time, and one update applying each account's summed delta to its cached balance.
fn post_lines(script: &mut Script, entries: &[Vec<Param<'_>>], lines: &[Vec<Param<'_>>], known: &mut Known) -> Result<(), sqlx::Error> {
    let mut deltas: Vec<(&str, Micros)> = Vec::new();
    for line in lines {
        let (Param::Str(account), Param::Int(amount)) = (&line[1], &line[2]) else {
            return Err(sqlx::Error::Protocol("ledger line without account and amount".into()));
        };
        match deltas.iter_mut().find(|(a, _)| a == account) {
            Some((_, d)) => *d += amount,
            None => deltas.push((account, *amount)),
        }
    }
    let sum: i128 = lines.iter().map(|l| if let Param::Int(a) = l[2] { i128::from(a) } else { 0 }).sum();
    if sum != 0 {
        return Err(sqlx::Error::Protocol(format!("unbalanced ledger batch: lines sum to {sum}")));
    }
    let now = now_ms();
    let new_accounts: Vec<(&str, String, Option<String>)> = deltas
        .iter()
        .filter(|(a, _)| !known.accounts.contains(*a))
        .map(|(a, _)| {
            let (kind, owner) = account_kind(a);
            (*a, kind, owner)
        })
        .collect();
    if !new_accounts.is_empty() {
        let rows: Vec<Vec<Param<'_>>> = new_accounts
            .iter()
            .map(|(id, kind, owner)| vec![Param::Str(id), Param::Str(kind), Param::OptStr(owner.as_deref()), Param::Int(now)])
            .collect();
        script.insert_rows("INSERT INTO accounts (id, kind, owner_id, created_at) VALUES", " ON CONFLICT (id) DO NOTHING", &rows);
        known.pending.extend(new_accounts.iter().map(|(a, _, _)| (*a).to_owned()));
    }
    script.insert_rows("INSERT INTO ledger_entries (id, kind, request_id, memo, created_at) VALUES", "", entries);
    script.insert_rows("INSERT INTO ledger_lines (entry_id, account_id, amount) VALUES", "", lines);
    for chunk in deltas.chunks(32) {
        let params: Vec<Param<'_>> = chunk.iter().flat_map(|(account, delta)| [Param::Str(account), Param::Int(*delta)]).collect();
        script.push(&params, |first| {
            let mut sql = String::from("UPDATE accounts SET posted = posted + CASE id");
            for i in 0..chunk.len() {
                sql.push_str(&format!(" WHEN ${} THEN CAST(${} AS BIGINT)", first + 2 * i, first + 2 * i + 1));
            }
            sql.push_str(" ELSE 0 END WHERE id IN (");
            sql.push_str(&(0..chunk.len()).map(|i| format!("${}", first + 2 * i)).collect::<Vec<_>>().join(", "));
            sql.push(')');
            sql
        });
    }
    Ok(())
}

/// An account id's kind and owner: `user:u1` → (`user`, `u1`); `platform:fees` → itself.
fn account_kind(id: &str) -> (String, Option<String>) {
    match id.split_once(':') {
        Some((kind, owner)) if kind != "platform" => (kind.to_owned(), Some(owner.to_owned())),
        _ => (id.to_owned(), None),
    }
}

/// Closes the still-open hold rows among `ids` with `status` and gives their funds
/// back to the accounts' available balance. Returns the ids it closed.
async fn release_rows(tx: &mut WriteTx<'_, '_>, ids: &[&str], status: &str) -> Result<Vec<String>, sqlx::Error> {
    let mut closed = Vec::new();
    for chunk in ids.chunks(64) {
        let sql = format!(
            "UPDATE holds SET status = $1, resolved_at = $2 WHERE status = 'held' AND id IN ({}) RETURNING id, account_id, amount",
            placeholders(3, chunk.len())
        );
        let params: Vec<Param<'_>> =
            [Param::Str(status), Param::Int(now_ms())].into_iter().chain(chunk.iter().map(|id| Param::Str(id))).collect();
        for (id, account, amount) in tx.fetch_all::<(String, String, i64)>(&sql, &params).await? {
            tx.execute("UPDATE accounts SET held = held - $1 WHERE id = $2", &[Param::Int(amount), Param::Str(&account)]).await?;
            closed.push(id);
        }
    }
    Ok(closed)
}

impl Ledger {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Reserves `amount` on `account` for one request; `None` when the available balance
    /// is too small. In memory on SQLite (one database read, no write), a row on PostgreSQL.
    pub async fn hold(&self, account: &str, amount: Micros, request_id: &str, key_id: Option<&str>) -> Result<Option<Hold>, sqlx::Error> {
        match &self.store.book {
            Some(book) => self.hold_in(book, account, amount, key_id).await,
            None => self.insert_hold(account, amount, request_id, key_id).await,
        }
    }

    async fn hold_in(&self, book: &HoldBook, account: &str, amount: Micros, key_id: Option<&str>) -> Result<Option<Hold>, sqlx::Error> {
        if amount <= 0 {
            return Err(sqlx::Error::Protocol(format!("hold amount must be positive, got {amount}")));
        }
        let mark = book.mark(account);
        let unheld: Option<i64> = self.store.read_one("SELECT posted - held FROM accounts WHERE id = $1", &[Param::Str(account)]).await?;
        Ok(book.try_hold(new_id("hold"), account, key_id, amount, unheld.unwrap_or(0), mark))
    }

    /// A hold written to the `holds` table: survives restarts (reservations) and is
    /// seen by every replica. On SQLite it also counts the book's holds.
    pub async fn hold_durable(&self, account: &str, amount: Micros, request_id: &str, key_id: Option<&str>) -> Result<Option<Hold>, sqlx::Error> {
        // On SQLite the amount is first reserved in the book, against the book's own
        // holds, then written as a row; the book's reservation is dropped only after
        // the row committed, so the funds are always counted at least once.
        let staged = match &self.store.book {
            Some(book) => match self.hold_in(book, account, amount, key_id).await? {
                Some(h) => Some(h),
                None => return Ok(None),
            },
            None => None,
        };
        let durable = self.insert_hold(account, amount, request_id, key_id).await;
        if let (Some(book), Some(staged)) = (&self.store.book, &staged) {
            book.finish(staged, 0);
        }
        durable
    }

    async fn insert_hold(&self, account: &str, amount: Micros, request_id: &str, key_id: Option<&str>) -> Result<Option<Hold>, sqlx::Error> {
        match self.insert_hold_within(account, amount, request_id, key_id, &[]).await? {
            Limited::Held(hold) => Ok(Some(hold)),
            Limited::Unfunded | Limited::Over(_) => Ok(None),
        }
    }

    /// PostgreSQL: a key's hold within its spending limits, across replicas. One
    /// transaction takes the key's advisory lock (every replica's holds for the key
    /// queue on it), reads what the key spent and holds in one statement (one snapshot:
    /// a settlement moving a hold into `usage_records` is seen on one side or the other,
    /// never neither), and writes the hold only when `amount` fits every `(limit,
    /// since)`.
    pub async fn hold_within_limits(&self, account: &str, amount: Micros, request_id: &str, key_id: &str, limits: &[(Micros, i64)]) -> Result<Limited, sqlx::Error> {
        self.insert_hold_within(account, amount, request_id, Some(key_id), limits).await
    }

    async fn insert_hold_within(
        &self,
        account: &str,
        amount: Micros,
        request_id: &str,
        key_id: Option<&str>,
        limits: &[(Micros, i64)],
    ) -> Result<Limited, sqlx::Error> {
        if amount <= 0 {
            // A hold reserves funds; a negative one would create them.
            return Err(sqlx::Error::Protocol(format!("hold amount must be positive, got {amount}")));
        }
        let mut tx = self.store.pool.begin().await?;
        if let (Some(key_id), false) = (key_id, limits.is_empty()) {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))::text").bind(key_id).execute(&mut *tx).await?;
            for (i, &(limit, since)) in limits.iter().enumerate() {
                let committed: i64 = sqlx::query_scalar(
                    "SELECT CAST((SELECT COALESCE(SUM(cost_micros), 0) FROM usage_records WHERE key_id = $1 AND created_at >= $2 AND payer = 'user') \
                     + (SELECT COALESCE(SUM(amount), 0) FROM holds WHERE key_id = $1 AND status = 'held') AS BIGINT)",
                )
                .bind(key_id)
                .bind(since)
                .fetch_one(&mut *tx)
                .await?;
                if committed + amount > limit {
                    return Ok(Limited::Over(i));
                }
            }
        }
        let reserved = sqlx::query("UPDATE accounts SET held = held + $1 WHERE id = $2 AND posted - held >= $1")
            .bind(amount)
            .bind(account)
            .execute(&mut *tx)
            .await?;
        if reserved.rows_affected() == 0 {
            return Ok(Limited::Unfunded);
        }
        let hold = Hold { id: new_id("hold"), account_id: account.to_owned(), amount, in_memory: false };
        sqlx::query("INSERT INTO holds (id, account_id, amount, status, request_id, created_at, key_id) VALUES ($1, $2, $3, 'held', $4, $5, $6)")
            .bind(&hold.id)
            .bind(account)
            .bind(amount)
            .bind(request_id)
            .bind(now_ms())
            .bind(key_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Limited::Held(hold))
    }

    /// Releases a hold that will not be charged (a request moved to a dearer provider
    /// and is held again there).
    pub async fn release(&self, hold: &Hold) -> Result<(), sqlx::Error> {
        match (&self.store.book, hold.in_memory) {
            (Some(book), true) => book.finish(hold, 0),
            _ => {
                let mut tx = self.store.pool.begin().await?;
                release_rows(&mut WriteTx::Sqlx(&mut tx), &[hold.id.as_str()], "voided").await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Adds funds from outside (admin grant, top-up) to an account.
    pub async fn credit(&self, account: &str, amount: Micros, kind: &str, memo: &str) -> Result<Balance, LedgerError> {
        if amount <= 0 {
            return Err(LedgerError::NonPositive);
        }
        if amount > MAX_CREDIT {
            return Err(LedgerError::TooLarge);
        }
        let mut tx = self.store.pool.begin().await?;
        post_entry(&mut tx, kind, None, memo, &[(EXTERNAL, -amount), (account, amount)]).await?;
        tx.commit().await?;
        Ok(self.balance(account).await?)
    }

    pub async fn balance(&self, account: &str) -> Result<Balance, sqlx::Error> {
        let (posted, mut held) =
            self.store.read_one("SELECT posted, held FROM accounts WHERE id = $1", &[Param::Str(account)]).await?.unwrap_or((0, 0));
        if let Some(book) = &self.store.book {
            // Holds being settled are left out: their charge may already be in
            // `posted` (the writer releases a hold only after its commit).
            held += book.held_unsettled(account);
        }
        Ok(Balance { posted, held, available: posted - held })
    }

    /// What a key has spent since `since_ms` plus what it holds right now (SQLite, whose
    /// process is the only one holding; PostgreSQL checks in `hold_within_limits`).
    pub async fn key_commitments(&self, key_id: &str, since_ms: i64) -> Result<Micros, sqlx::Error> {
        let spent: i64 = self
            .store
            .read_one(
                "SELECT CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT) FROM usage_records WHERE key_id = $1 AND created_at >= $2 AND payer = 'user'",
                &[Param::Str(key_id), Param::Int(since_ms)],
            )
            .await?
            .unwrap_or(0);
        let held: i64 = self
            .store
            .read_one("SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM holds WHERE key_id = $1 AND status = 'held'", &[Param::Str(key_id)])
            .await?
            .unwrap_or(0);
        let in_memory = self.store.book.as_ref().map_or(0, |b| b.held_by_key(key_id));
        Ok(spent + held + in_memory)
    }

    /// Voids holds older than `max_age_ms`: their requests died with a process (rows) or
    /// without finishing (in memory).
    pub async fn sweep_stale_holds(&self, max_age_ms: i64) -> Result<u64, sqlx::Error> {
        let swept = self.store.book.as_ref().map_or(0, |b| b.sweep(max_age_ms));
        // A reservation's hold lives as long as its lease, which may be longer than the TTL.
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM holds WHERE status = 'held' AND created_at < $1 \
             AND NOT EXISTS (SELECT 1 FROM reservations r WHERE r.hold_id = holds.id AND r.status = 'active')",
        )
        .bind(now_ms() - max_age_ms)
        .fetch_all(&self.store.pool)
        .await?;
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut tx = self.store.pool.begin().await?;
        let voided = swept + release_rows(&mut WriteTx::Sqlx(&mut tx), &ids, "voided").await?.len() as u64;
        tx.commit().await?;
        Ok(voided)
    }

    /// Verifies every invariant; returns the violations found (empty = healthy).
    pub async fn check(&self) -> Result<CheckReport, sqlx::Error> {
        // One snapshot for every query, so batches committing meanwhile cannot look like
        // a mismatch between two reads.
        let mut tx = self.store.pool.begin().await?;
        if self.store.backend == crate::store::Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
        }
        let pool = &mut *tx;
        let mut violations = Vec::new();
        let unbalanced: Vec<(String, i64)> = sqlx::query(
            "SELECT entry_id, CAST(SUM(amount) AS BIGINT) AS s FROM ledger_lines GROUP BY entry_id HAVING SUM(amount) <> 0",
        )
        .fetch_all(&mut *pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("entry_id")?, r.try_get("s")?)))
        .collect::<Result<_, sqlx::Error>>()?;
        for (id, sum) in &unbalanced {
            violations.push(format!("entry {id} sums to {sum}, not 0"));
        }
        let drift = sqlx::query(
            "SELECT a.id, a.posted, CAST(COALESCE((SELECT SUM(l.amount) FROM ledger_lines l WHERE l.account_id = a.id), 0) AS BIGINT) AS lines, \
             a.held, CAST(COALESCE((SELECT SUM(h.amount) FROM holds h WHERE h.account_id = a.id AND h.status = 'held'), 0) AS BIGINT) AS open_holds, a.kind \
             FROM accounts a",
        )
        .fetch_all(&mut *pool)
        .await?;
        let accounts = drift.len();
        for r in &drift {
            let (id, posted, lines, held, open, kind): (String, i64, i64, i64, i64, String) = (
                r.try_get("id")?,
                r.try_get("posted")?,
                r.try_get("lines")?,
                r.try_get("held")?,
                r.try_get("open_holds")?,
                r.try_get("kind")?,
            );
            if posted != lines {
                violations.push(format!("account {id}: cached balance {posted} but its lines sum to {lines}"));
            }
            if held != open {
                violations.push(format!("account {id}: cached holds {held} but open holds sum to {open}"));
            }
            if matches!(kind.as_str(), "user" | "provider" | "advertiser") && (posted < 0 || posted - held < 0) {
                violations.push(format!("account {id} ({kind}) is below zero: posted {posted}, held {held}"));
            }
        }
        let usage_total: i64 = sqlx::query_scalar("SELECT CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT) FROM usage_records")
            .fetch_one(&mut *pool)
            .await?;
        let ledger_usage: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(l.amount), 0) AS BIGINT) FROM ledger_lines l JOIN ledger_entries e ON e.id = l.entry_id \
             WHERE e.kind = 'usage' AND l.amount > 0",
        )
        .fetch_one(&mut *pool)
        .await?;
        if usage_total != ledger_usage {
            violations.push(format!(
                "usage records cost {usage_total} µUSD in total but usage entries pay out {ledger_usage} µUSD"
            ));
        }
        // Campaigns: the spending counters the replicas share (which the charges' budget
        // check reads) match what their impressions were charged. (A budget an admin
        // lowered later may be below them.)
        let campaigns = sqlx::query(
            "SELECT c.id, c.spent_total, \
             CAST(COALESCE((SELECT SUM(i.charged) FROM ad_impressions i WHERE i.campaign_id = c.id), 0) AS BIGINT) AS charged \
             FROM campaigns c",
        )
        .fetch_all(&mut *pool)
        .await?;
        for r in &campaigns {
            let (id, spent, charged): (String, i64, i64) = (r.try_get("id")?, r.try_get("spent_total")?, r.try_get("charged")?);
            if spent != charged {
                violations.push(format!("campaign {id}: spending counter {spent} but its impressions were charged {charged}"));
            }
        }
        let entries: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ledger_entries").fetch_one(&mut *pool).await?;
        tx.commit().await?;
        Ok(CheckReport { entries: u64::try_from(entries).unwrap_or(0), accounts: accounts as u64, usage_total, violations })
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    pub entries: u64,
    pub accounts: u64,
    pub usage_total: Micros,
    pub violations: Vec<String>,
}

pub const PAYOUTS: &str = "platform:payouts";

/// Moves `amount` from `from` to `to` only when `from` has that much available (not
/// held); `false` when it does not. The debit is one conditional update, so concurrent
/// transfers can never overdraw.
pub async fn transfer_available(
    tx: &mut Transaction<'_, Any>,
    from: &str,
    to: &str,
    amount: Micros,
    kind: &str,
    request_id: Option<&str>,
    memo: &str,
) -> Result<bool, sqlx::Error> {
    pay_out_of(tx, from, &[(to, amount)], kind, request_id, memo).await
}

/// Debits `from` by the sum of `to` and credits each, only when `from` has that much
/// available; `false` (and nothing posted) when it does not.
pub async fn pay_out_of(
    tx: &mut Transaction<'_, Any>,
    from: &str,
    to: &[(&str, Micros)],
    kind: &str,
    request_id: Option<&str>,
    memo: &str,
) -> Result<bool, sqlx::Error> {
    let amount: Micros = to.iter().map(|(_, a)| a).sum();
    // A no-op update as the guard: it locks the row (PostgreSQL re-checks the condition
    // after waiting for a concurrent writer; SQLite has one writer), so the balance cannot
    // move between this check and the entry below.
    let available = sqlx::query("UPDATE accounts SET posted = posted WHERE id = $2 AND posted - held >= $1")
        .bind(amount)
        .bind(from)
        .execute(&mut **tx)
        .await?;
    if available.rows_affected() == 0 {
        return Ok(false);
    }
    let mut lines = Vec::with_capacity(to.len() + 1);
    lines.push((from, -amount));
    lines.extend_from_slice(to);
    post_entry(tx, kind, request_id, memo, &lines).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pricing_rounds_up_and_fee_rounds_down() {
        // 2 µUSD per token (2e6 per million), 10 tokens, standard tier.
        assert_eq!(price(10, 2_000_000, 10_000), 20);
        assert_eq!(price(10, 2_000_000, 8_000), 16);
        assert_eq!(price(10, 2_000_000, 20_000), 40);
        // 0.5 µUSD per token: 3 tokens cost 1.5 → 2.
        assert_eq!(price(3, 500_000, 10_000), 2);
        assert_eq!(price(0, 2_000_000, 10_000), 0);
        assert_eq!(fee(20, 1_000), 2);
        assert_eq!(price_discounted(10, 2_000_000, 10_000, 0), 20);
        assert_eq!(price_discounted(10, 2_000_000, 10_000, 5_000), 10);
        assert_eq!(price_discounted(7, 2_000_000, 10_000, 5_000), 7);
        assert_eq!(fee(19, 1_000), 1);
    }
}
