//! The double-entry ledger: accounts, an append-only journal whose entries sum to zero,
//! and two-phase holds. Money is integer micro-USD everywhere.
//!
//! Holds are taken on the request path (one short transaction with a conditional
//! update, so concurrent requests can never spend more than the balance, on SQLite and
//! PostgreSQL alike). Settlements and voids are written by the usage writer in batches
//! (group commit) together with the request's usage record; see `usage`.

use sqlx::{Any, Row, Transaction};

use crate::store::{new_id, now_ms, Store};

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

/// Micro-USD.
pub type Micros = i64;

/// The most one credit may add: $1,000,000 (balances stay far from `i64` overflow).
pub const MAX_CREDIT: Micros = 1_000_000_000_000;

/// Funds reserved for one request; consumed by a settlement or a void.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub id: String,
    pub account_id: String,
    pub amount: Micros,
}

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
    let n: i64 = sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS BIGINT) FROM usage_records WHERE user_id = $1 AND created_at >= $2 AND payer = 'user'",
    )
    .bind(user_id)
    .bind(since_ms)
    .fetch_one(&store.pool)
    .await?;
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

#[derive(Clone)]
pub struct Ledger {
    store: Store,
}

async fn ensure_account(tx: &mut Transaction<'_, Any>, id: &str) -> Result<(), sqlx::Error> {
    let (kind, owner) = match id.split_once(':') {
        Some((kind, owner)) if kind != "platform" => (kind.to_owned(), Some(owner.to_owned())),
        _ => (id.to_owned(), None),
    };
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

/// Applies a settlement or void inside the writer's transaction. A hold that is no
/// longer open (voided by the sweeper) is not charged.
pub async fn apply(tx: &mut Transaction<'_, Any>, billing: &Billing) -> Result<Micros, sqlx::Error> {
    apply_as(tx, billing, "usage").await
}

/// `apply` with the journal entry kind (`usage` for tokens, `reservation` for per-hour leases).
pub async fn apply_as(tx: &mut Transaction<'_, Any>, billing: &Billing, kind: &str) -> Result<Micros, sqlx::Error> {
    match billing {
        Billing::Void(hold) => {
            release(tx, hold, "voided").await?;
            Ok(0)
        }
        Billing::Settle(s) => {
            // A batch retried after a commit whose acknowledgement was lost must not pay twice.
            let done: Option<String> = sqlx::query_scalar("SELECT id FROM ledger_entries WHERE request_id = $1 AND kind = $2")
                .bind(&s.request_id)
                .bind(kind)
                .fetch_optional(&mut **tx)
                .await?;
            if done.is_some() {
                return Ok(0);
            }
            let (payer_account, charge) = match &s.payer {
                Payer::User(hold) => {
                    if !release(tx, hold, "settled").await? {
                        tracing::error!(request_id = %s.request_id, "hold was no longer open at settlement; not charged");
                        return Ok(0);
                    }
                    // Never more than was held: the user's balance cannot go below zero.
                    (hold.account_id.clone(), s.charge.clamp(0, hold.amount))
                }
                Payer::AdRevenue => (AD_REVENUE.to_owned(), s.charge.max(0)),
            };
            if charge == 0 {
                return Ok(0);
            }
            let fee = s.fee.clamp(0, charge);
            let provider = provider_account(&s.provider_id);
            post_entry(
                tx,
                kind,
                Some(&s.request_id),
                if kind == "usage" { "tokens delivered" } else { "reserved capacity" },
                &[(&payer_account, -charge), (&provider, charge - fee), (FEES, fee)],
            )
            .await?;
            Ok(charge)
        }
    }
}

async fn release(tx: &mut Transaction<'_, Any>, hold: &Hold, status: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("UPDATE holds SET status = $1, resolved_at = $2 WHERE id = $3 AND status = 'held'")
        .bind(status)
        .bind(now_ms())
        .bind(&hold.id)
        .execute(&mut **tx)
        .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query("UPDATE accounts SET held = held - $1 WHERE id = $2")
        .bind(hold.amount)
        .bind(&hold.account_id)
        .execute(&mut **tx)
        .await?;
    Ok(true)
}

impl Ledger {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Reserves `amount` on `account`; `None` when the available balance is too small.
    pub async fn hold(&self, account: &str, amount: Micros, request_id: &str, key_id: Option<&str>) -> Result<Option<Hold>, sqlx::Error> {
        if amount <= 0 {
            // A hold reserves funds; a negative one would create them.
            return Err(sqlx::Error::Protocol(format!("hold amount must be positive, got {amount}")));
        }
        let mut tx = self.store.pool.begin().await?;
        let reserved = sqlx::query("UPDATE accounts SET held = held + $1 WHERE id = $2 AND posted - held >= $1")
            .bind(amount)
            .bind(account)
            .execute(&mut *tx)
            .await?;
        if reserved.rows_affected() == 0 {
            return Ok(None);
        }
        let hold = Hold { id: new_id("hold"), account_id: account.to_owned(), amount };
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
        Ok(Some(hold))
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
        let row = sqlx::query("SELECT posted, held FROM accounts WHERE id = $1")
            .bind(account)
            .fetch_optional(&self.store.pool)
            .await?;
        let (posted, held) = match row {
            Some(r) => (r.try_get::<i64, _>("posted")?, r.try_get::<i64, _>("held")?),
            None => (0, 0),
        };
        Ok(Balance { posted, held, available: posted - held })
    }

    /// What a key has spent since `since_ms` plus what it holds right now.
    pub async fn key_commitments(&self, key_id: &str, since_ms: i64) -> Result<Micros, sqlx::Error> {
        let spent: i64 = sqlx::query_scalar("SELECT CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT) FROM usage_records WHERE key_id = $1 AND created_at >= $2 AND payer = 'user'")
            .bind(key_id)
            .bind(since_ms)
            .fetch_one(&self.store.pool)
            .await?;
        let held: i64 = sqlx::query_scalar("SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM holds WHERE key_id = $1 AND status = 'held'")
            .bind(key_id)
            .fetch_one(&self.store.pool)
            .await?;
        Ok(spent + held)
    }

    /// Voids holds older than `max_age_ms`: their requests died with a process.
    pub async fn sweep_stale_holds(&self, max_age_ms: i64) -> Result<u64, sqlx::Error> {
        let rows = sqlx::query("SELECT id, account_id, amount FROM holds WHERE status = 'held' AND created_at < $1")
            .bind(now_ms() - max_age_ms)
            .fetch_all(&self.store.pool)
            .await?;
        let mut voided = 0;
        for r in rows {
            let hold = Hold { id: r.try_get("id")?, account_id: r.try_get("account_id")?, amount: r.try_get("amount")? };
            let mut tx = self.store.pool.begin().await?;
            if release(&mut tx, &hold, "voided").await? {
                voided += 1;
            }
            tx.commit().await?;
        }
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
