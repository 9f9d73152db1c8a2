//! Provider payouts and user top-ups.
//!
//! A withdrawal moves the amount from the provider's account to `platform:payouts`
//! (requested), then an admin (the manual connector) moves it on: `processing`, then
//! `paid` (the amount leaves to `external`, less the processing fee, which the platform
//! keeps) or `failed` (the amount goes back to the provider). `Idempotency-Key` makes a
//! retried request return the first result; the same key with another body is a 409.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::money::ledger::{self, PAYOUTS};
use crate::money::units::Micros;
use crate::store::{new_id, now_ms, Store};
use crate::money::units::usd;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PayoutSettings {
    pub minimum_withdrawal_micros: Micros,
    pub auto_payout_threshold_micros: Micros,
    /// Processing fee in basis points (250 = 2.5%).
    pub processing_fee_bp: u32,
}

impl Default for PayoutSettings {
    fn default() -> Self {
        Self { minimum_withdrawal_micros: 5_000_000, auto_payout_threshold_micros: 25_000_000, processing_fee_bp: 250 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PayoutMethod {
    BankTransfer {
        #[schema(min_length = 15, max_length = 34, pattern = "^[A-Za-z0-9 ]+$")]
        iban: String,
        #[serde(default)]
        holder: Option<String>,
    },
    Paypal {
        #[schema(max_length = 254, pattern = "@")]
        email: String,
    },
    Crypto {
        #[schema(min_length = 20, max_length = 128, pattern = "^[A-Za-z0-9]+$")]
        address: String,
        #[serde(default)]
        network: Option<String>,
    },
}

impl PayoutMethod {
    pub fn validate(&self) -> Result<(), &'static str> {
        let ok = match self {
            Self::BankTransfer { iban, .. } => iban.len() >= 15 && iban.len() <= 34 && iban.chars().all(|c| c.is_ascii_alphanumeric() || c == ' '),
            Self::Paypal { email } => email.contains('@') && email.len() <= 254,
            Self::Crypto { address, .. } => address.len() >= 20 && address.len() <= 128 && address.chars().all(|c| c.is_ascii_alphanumeric()),
        };
        if ok { Ok(()) } else { Err("the payout method's details are not valid") }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Withdrawal {
    pub id: String,
    pub provider_id: String,
    pub amount: f64,
    pub fee: f64,
    pub net: f64,
    #[schema(value_type = i64)]
    pub amount_micros: Micros,
    #[schema(value_type = i64)]
    pub fee_micros: Micros,
    pub status: String,
    pub method: PayoutMethod,
    pub automatic: bool,
    pub failure_reason: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    #[error("{0}")]
    Invalid(String, &'static str),
    #[error("insufficient available balance for this withdrawal")]
    Insufficient,
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyConflict,
    #[error("withdrawal {0} does not exist")]
    UnknownWithdrawal(String),
    /// A suspended provider's balance is frozen (kept, not paid out) until an admin
    /// approves it again.
    #[error("provider {0} is suspended: its balance is frozen until an admin approves it again")]
    Frozen(String),
    #[error("a withdrawal in state `{from}` cannot become `{to}`")]
    BadTransition { from: String, to: String },
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

#[derive(Clone)]
pub struct Payments {
    store: Store,
}

const SETTINGS_KEY: &str = "payout_settings";


impl Payments {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    pub async fn settings(&self) -> Result<PayoutSettings, sqlx::Error> {
        Ok(self.store.setting(SETTINGS_KEY).await?.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default())
    }

    pub async fn update_settings(&self, settings: PayoutSettings) -> Result<PayoutSettings, PaymentError> {
        if settings.minimum_withdrawal_micros < 0 || settings.auto_payout_threshold_micros < 0 {
            return Err(PaymentError::Invalid("amounts must not be negative".into(), "minimumWithdrawal"));
        }
        if settings.processing_fee_bp > 5_000 {
            return Err(PaymentError::Invalid("processingFee must be at most 50%".into(), "processingFee"));
        }
        let text = serde_json::to_string(&settings).map_err(|e| PaymentError::Invalid(e.to_string(), "settings"))?;
        sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2")
            .bind(SETTINGS_KEY)
            .bind(text)
            .execute(&self.store.pool)
            .await?;
        Ok(settings)
    }

    /// Sets a provider's payout method: a first one at once, a change `delay_ms` later
    /// (until then withdrawals go to the old one). Returns when it takes effect.
    pub async fn set_method(&self, provider_id: &str, method: &PayoutMethod, delay_ms: i64) -> Result<i64, PaymentError> {
        method.validate().map_err(|m| PaymentError::Invalid(m.into(), "method"))?;
        let text = serde_json::to_string(method).map_err(|e| PaymentError::Invalid(e.to_string(), "method"))?;
        let now = now_ms();
        let current = self.method(provider_id).await?;
        if current.is_none() || delay_ms == 0 {
            sqlx::query("UPDATE providers SET payout_method = $1, next_payout_method = NULL, next_payout_method_at = NULL WHERE id = $2")
                .bind(text)
                .bind(provider_id)
                .execute(&self.store.pool)
                .await?;
            return Ok(now);
        }
        let at = now.saturating_add(delay_ms);
        sqlx::query("UPDATE providers SET next_payout_method = $1, next_payout_method_at = $2 WHERE id = $3")
            .bind(text)
            .bind(at)
            .bind(provider_id)
            .execute(&self.store.pool)
            .await?;
        tracing::info!(provider = %provider_id, effective_at = at, "payout method change scheduled");
        Ok(at)
    }

    /// The payout method in effect; a scheduled change whose time has come takes over.
    async fn method(&self, provider_id: &str) -> Result<Option<PayoutMethod>, sqlx::Error> {
        let row: Option<(Option<String>, Option<String>, Option<i64>)> =
            sqlx::query_as("SELECT payout_method, next_payout_method, next_payout_method_at FROM providers WHERE id = $1")
                .bind(provider_id)
                .fetch_optional(&self.store.pool)
                .await?;
        let Some((current, next, at)) = row else { return Ok(None) };
        let text = match (next, at) {
            (Some(next), Some(at)) if at <= now_ms() => {
                sqlx::query("UPDATE providers SET payout_method = $1, next_payout_method = NULL, next_payout_method_at = NULL WHERE id = $2 AND next_payout_method_at = $3")
                    .bind(&next)
                    .bind(provider_id)
                    .bind(at)
                    .execute(&self.store.pool)
                    .await?;
                Some(next)
            }
            _ => current,
        };
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }

    /// Requests a withdrawal. With an idempotency key, a retry returns the first result.
    pub async fn withdraw(
        &self,
        provider_id: &str,
        amount: Micros,
        method: Option<PayoutMethod>,
        idempotency_key: Option<&str>,
        automatic: bool,
    ) -> Result<Withdrawal, PaymentError> {
        let request_hash = hex::encode(Sha256::digest(format!("{provider_id}|{amount}|{}", serde_json::to_string(&method).unwrap_or_default())));
        if let Some(key) = idempotency_key {
            if let Some(existing) = self.by_idempotency_key(provider_id, key).await? {
                let (w, hash) = existing;
                return if hash == request_hash { Ok(w) } else { Err(PaymentError::IdempotencyConflict) };
            }
        }
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM providers WHERE id = $1").bind(provider_id).fetch_optional(&self.store.pool).await?;
        if status.as_deref() == Some("suspended") {
            return Err(PaymentError::Frozen(provider_id.to_owned()));
        }
        let settings = self.settings().await?;
        if amount < settings.minimum_withdrawal_micros {
            return Err(PaymentError::Invalid(
                format!("the minimum withdrawal is ${:.2}", usd(settings.minimum_withdrawal_micros)),
                "amount",
            ));
        }
        let on_file = self.method(provider_id).await?;
        let method = match (method, on_file) {
            // A withdrawal goes to the method on file: naming another would skip the
            // delay a change of method waits.
            (Some(m), Some(on_file)) if m != on_file => {
                return Err(PaymentError::Invalid(
                    "withdrawals go to the payout method on file; a new method takes effect `payout_method_delay_secs` after it is set (PUT /api/payment/method)".into(),
                    "method",
                ));
            }
            (Some(m), _) => {
                m.validate().map_err(|e| PaymentError::Invalid(e.into(), "method"))?;
                m
            }
            (None, Some(on_file)) => on_file,
            (None, None) => return Err(PaymentError::Invalid("no payout method: set one first or send `method`".into(), "method")),
        };
        let fee = amount * i64::from(settings.processing_fee_bp) / 10_000;
        let id = new_id("wd");
        let now = now_ms();
        let mut tx = self.store.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO withdrawals (id, provider_id, amount, fee, status, method, idempotency_key, request_hash, automatic, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, 'requested', $5, $6, $7, $8, $9, $9) ON CONFLICT (provider_id, idempotency_key) DO NOTHING",
        )
        .bind(&id)
        .bind(provider_id)
        .bind(amount)
        .bind(fee)
        .bind(serde_json::to_string(&method).unwrap_or_default())
        .bind(idempotency_key)
        .bind(&request_hash)
        .bind(i64::from(automatic))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            // A concurrent retry with the same key won the race.
            drop(tx);
            let key = idempotency_key.unwrap_or_default();
            let (w, hash) = self.by_idempotency_key(provider_id, key).await?.ok_or(PaymentError::IdempotencyConflict)?;
            return if hash == request_hash { Ok(w) } else { Err(PaymentError::IdempotencyConflict) };
        }
        let account = ledger::provider_account(provider_id);
        if !ledger::transfer_available(&mut tx, &account, PAYOUTS, amount, "withdrawal", Some(&id), "withdrawal requested").await? {
            return Err(PaymentError::Insufficient);
        }
        tx.commit().await?;
        self.get(&id).await
    }

    async fn by_idempotency_key(&self, provider_id: &str, key: &str) -> Result<Option<(Withdrawal, String)>, PaymentError> {
        let row = sqlx::query("SELECT id, request_hash FROM withdrawals WHERE provider_id = $1 AND idempotency_key = $2")
            .bind(provider_id)
            .bind(key)
            .fetch_optional(&self.store.pool)
            .await?;
        match row {
            Some(r) => {
                let id: String = r.try_get("id")?;
                Ok(Some((self.get(&id).await?, r.try_get("request_hash")?)))
            }
            None => Ok(None),
        }
    }

    pub async fn get(&self, id: &str) -> Result<Withdrawal, PaymentError> {
        let row = sqlx::query("SELECT * FROM withdrawals WHERE id = $1").bind(id).fetch_optional(&self.store.pool).await?;
        let row = row.ok_or_else(|| PaymentError::UnknownWithdrawal(id.to_owned()))?;
        Ok(withdrawal(&row)?)
    }

    pub async fn list(&self, provider_id: Option<&str>, status: Option<&str>) -> Result<Vec<Withdrawal>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT * FROM withdrawals WHERE ($1 IS NULL OR provider_id = $1) AND ($2 IS NULL OR status = $2) ORDER BY created_at DESC, id DESC LIMIT 500",
        )
        .bind(provider_id)
        .bind(status)
        .fetch_all(&self.store.pool)
        .await?;
        rows.iter().map(withdrawal).collect()
    }

    /// Moves a withdrawal along its state machine: requested → processing → paid | failed
    /// (`failed` also from requested). Paid and failed are final.
    pub async fn transition(&self, id: &str, to: &str, reason: Option<String>) -> Result<Withdrawal, PaymentError> {
        let w = self.get(id).await?;
        let allowed = matches!((w.status.as_str(), to), ("requested", "processing") | ("requested" | "processing", "paid" | "failed"));
        if !allowed {
            return Err(PaymentError::BadTransition { from: w.status, to: to.to_owned() });
        }
        let mut tx = self.store.pool.begin().await?;
        let moved = sqlx::query("UPDATE withdrawals SET status = $1, updated_at = $2, failure_reason = $3 WHERE id = $4 AND status = $5")
            .bind(to)
            .bind(now_ms())
            .bind(reason)
            .bind(id)
            .bind(&w.status)
            .execute(&mut *tx)
            .await?;
        if moved.rows_affected() == 0 {
            return Err(PaymentError::BadTransition { from: w.status, to: to.to_owned() });
        }
        let provider = ledger::provider_account(&w.provider_id);
        match to {
            "paid" => {
                let net = w.amount_micros - w.fee_micros;
                ledger::post_entry(&mut tx, "payout", Some(id), "withdrawal paid", &[(PAYOUTS, -w.amount_micros), (ledger::EXTERNAL, net), (ledger::FEES, w.fee_micros)]).await?;
            }
            "failed" => {
                ledger::post_entry(&mut tx, "payout_failed", Some(id), "withdrawal failed; funds returned", &[(PAYOUTS, -w.amount_micros), (&provider, w.amount_micros)]).await?;
            }
            _ => {}
        }
        tx.commit().await?;
        self.get(id).await
    }

    /// Requests a withdrawal of the whole available balance for every provider whose
    /// balance reached max(auto-payout threshold, its own minimum payout), has a payout
    /// method, and has no withdrawal open. Returns the withdrawals made.
    pub async fn auto_payouts(&self) -> Result<Vec<Withdrawal>, PaymentError> {
        let settings = self.settings().await?;
        let rows = sqlx::query(
            "SELECT p.id, p.minimum_payout_micros, a.posted - a.held AS available FROM providers p JOIN accounts a ON a.id = 'provider:' || p.id \
             WHERE p.payout_method IS NOT NULL AND p.status <> 'suspended' AND NOT EXISTS (SELECT 1 FROM withdrawals w WHERE w.provider_id = p.id AND w.status IN ('requested', 'processing'))",
        )
        .fetch_all(&self.store.pool)
        .await?;
        let mut made = Vec::new();
        for r in rows {
            let id: String = r.try_get("id")?;
            let min_payout: i64 = r.try_get("minimum_payout_micros")?;
            let available: i64 = r.try_get("available")?;
            if available >= settings.auto_payout_threshold_micros.max(min_payout).max(settings.minimum_withdrawal_micros) && available > 0 {
                match self.withdraw(&id, available, None, None, true).await {
                    Ok(w) => made.push(w),
                    Err(e) => tracing::warn!(provider = %id, error = %e, "automatic payout failed"),
                }
            }
        }
        Ok(made)
    }

    /// Applies a signed top-up from a payment processor once per event id.
    pub async fn top_up(&self, event_id: &str, user_id: &str, amount: Micros) -> Result<bool, PaymentError> {
        if amount <= 0 {
            return Err(PaymentError::Invalid("amount must be positive".into(), "amount"));
        }
        let mut tx = self.store.pool.begin().await?;
        let fresh = sqlx::query("INSERT INTO webhook_events (id, kind, created_at) VALUES ($1, 'topup', $2) ON CONFLICT (id) DO NOTHING")
            .bind(event_id)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        if fresh.rows_affected() == 0 {
            return Ok(false);
        }
        let account = ledger::user_account(user_id);
        ledger::post_entry(&mut tx, "topup", Some(event_id), "top-up", &[(ledger::EXTERNAL, -amount), (&account, amount)]).await?;
        tx.commit().await?;
        Ok(true)
    }
}

fn withdrawal(r: &sqlx::any::AnyRow) -> Result<Withdrawal, sqlx::Error> {
    let amount: i64 = r.try_get("amount")?;
    let fee: i64 = r.try_get("fee")?;
    let method: String = r.try_get("method")?;
    Ok(Withdrawal {
        id: r.try_get("id")?,
        provider_id: r.try_get("provider_id")?,
        amount: usd(amount),
        fee: usd(fee),
        net: usd(amount - fee),
        amount_micros: amount,
        fee_micros: fee,
        status: r.try_get("status")?,
        method: serde_json::from_str(&method).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        automatic: r.try_get::<i64, _>("automatic")? != 0,
        failure_reason: r.try_get("failure_reason")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}
