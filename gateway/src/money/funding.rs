//! Who pays for a request, decided in two calls the relay makes: `reserve` before each
//! provider attempt, at that provider's price (a paying user's hold, a free key's claim
//! on today's free budget, or nothing), and `Funding::settle` when the request ends (the
//! charge for what was delivered, capped by what was reserved, as the ledger billing
//! the usage writer commits). The relay moves bytes and fails over; prices, holds and
//! limits live here.

use std::sync::Arc;

use crate::edge::error::ApiError;
use crate::money::free_budget::{self, Claim};
use crate::edge::keys::{AuthedKey, Tier};
use crate::money::ledger::{self, Billing, Payer, Settlement};
use crate::money::units::Micros;
use crate::money::holds::Hold;
use crate::store::now_ms;
use crate::state::AppState;

/// Who pays, decided before a provider is called.
pub enum Funding {
    /// A paying user's hold, and their volume discount in basis points.
    User(Hold, u32),
    /// Free tier: the platform's ad revenue pays, within today's free budget.
    AdRevenue(Claim),
    /// Nothing to bill (a free provider, or a reservation billed by the hour).
    Nothing,
}

/// What `reserve` needs to know of a request.
pub struct Ask<'a> {
    pub key: &'a AuthedKey,
    pub request_id: &'a str,
    /// The most tokens it can be billed for: the prompt's bound and every completion token.
    pub max_tokens: u64,
    /// The quality tier's price multiplier, in basis points.
    pub multiplier_bp: u32,
    /// It runs on the user's reservation (billed by the hour, not per token).
    pub reserved: bool,
}

/// Funds `ask` at `per_mtok` (micro-USD per million tokens): a paying user's hold of
/// the most it can cost there, or a free key's claim on as much of today's free budget.
/// `current` is the funding of an earlier attempt: kept when it covers this price, else
/// released and replaced.
pub async fn reserve(state: &AppState, ask: &Ask<'_>, per_mtok: i64, current: Option<Funding>) -> Result<Funding, ApiError> {
    let key = ask.key;
    if key.tier == Tier::Free && state.config.free_tier_daily_budget <= 0.0 {
        return Err(free_tier_off());
    }
    let amount = ledger::price(ask.max_tokens, per_mtok, ask.multiplier_bp);
    match current {
        Some(Funding::User(hold, discount)) if hold.amount >= amount => return Ok(Funding::User(hold, discount)),
        Some(Funding::AdRevenue(claim)) if claim.amount >= amount => return Ok(Funding::AdRevenue(claim)),
        Some(Funding::User(hold, _)) => state.ledger.release(&hold).await?,
        // A claim is given back when it is dropped.
        _ => {}
    }
    if amount == 0 || ask.reserved {
        return Ok(Funding::Nothing);
    }
    if key.tier == Tier::Free {
        return state.free_budget.claim(amount).await.map(Funding::AdRevenue).map_err(|refusal| match refusal {
            free_budget::Refusal::Off => free_tier_off(),
            free_budget::Refusal::Spent { limit } => ApiError::FreeTierClosed(format!(
                "Today's free-tier budget of ${:.2} is spent; free requests resume at 00:00 UTC, or use a paid key.",
                crate::money::units::usd(limit)
            )),
        });
    }
    let account = ledger::user_account(&key.user_id);
    let (day_start, month_start) = crate::money::analytics::day_and_month_start(now_ms());
    let limits: Vec<(Micros, i64, &'static str)> = [(key.daily_limit_micros, day_start, "daily"), (key.monthly_limit_micros, month_start, "monthly")]
        .into_iter()
        .filter_map(|(limit, since, period)| limit.map(|l| (l, since, period)))
        .collect();
    if state.store.book.is_none() && !limits.is_empty() {
        // PostgreSQL: the check and the hold are one transaction under the key's lock,
        // so no replica's request squeezes in between (`Ledger::hold_within_limits`).
        let discount = volume_discount(state, &key.user_id, month_start).await?;
        let bounds: Vec<(Micros, i64)> = limits.iter().map(|&(l, since, _)| (l, since)).collect();
        return match state.ledger.hold_within_limits(&account, amount, ask.request_id, &key.key_id, &bounds).await? {
            ledger::Limited::Held(hold) => Ok(Funding::User(hold, discount)),
            ledger::Limited::Over(i) => Err(ApiError::SpendingLimit { period: limits[i].2, limit: limits[i].0 }),
            ledger::Limited::Unfunded => {
                let available = state.ledger.balance(&account).await?.available;
                Err(ApiError::InsufficientQuota { needed: amount, available })
            }
        };
    }
    // SQLite (one process): limits are checked and the hold taken under a per-key lock,
    // so concurrent requests of one key cannot both squeeze under the limit.
    let lock = (key.daily_limit_micros.is_some() || key.monthly_limit_micros.is_some())
        .then(|| state.key_locks.get_with(key.key_id.clone(), || Arc::new(tokio::sync::Mutex::new(()))));
    let _serial = match &lock {
        Some(l) => Some(l.lock().await),
        None => None,
    };
    for &(limit, since, period) in &limits {
        if state.ledger.key_commitments(&key.key_id, since).await? + amount > limit {
            return Err(ApiError::SpendingLimit { period, limit });
        }
    }
    let discount = volume_discount(state, &key.user_id, month_start).await?;
    match state.ledger.hold(&account, amount, ask.request_id, Some(&key.key_id)).await? {
        Some(hold) => Ok(Funding::User(hold, discount)),
        None => {
            let available = state.ledger.balance(&account).await?.available;
            Err(ApiError::InsufficientQuota { needed: amount, available })
        }
    }
}

fn free_tier_off() -> ApiError {
    ApiError::FreeTierClosed("The free tier is off on this gateway; use a paid key.".to_owned())
}

/// The best bulk-usage discount the user's month-to-date tokens reach (0 without tiers).
async fn volume_discount(state: &AppState, user_id: &str, month_start: i64) -> Result<u32, ApiError> {
    let tiers = &state.config.volume_discounts;
    if tiers.is_empty() {
        return Ok(0);
    }
    let tokens = ledger::user_tokens_since(&state.store, user_id, month_start).await?;
    Ok(tiers.iter().filter(|t| tokens >= t.monthly_tokens).map(|t| t.discount_bp).max().unwrap_or(0))
}

impl Funding {
    /// The charge for `tokens` at `per_mtok`, capped by what was reserved.
    pub fn charge(&self, tokens: u64, per_mtok: i64, multiplier_bp: u32) -> Micros {
        match self {
            Funding::User(hold, discount) => ledger::price_discounted(tokens, per_mtok, multiplier_bp, *discount).min(hold.amount),
            Funding::AdRevenue(claim) => ledger::price(tokens, per_mtok, multiplier_bp).min(claim.amount),
            Funding::Nothing => 0,
        }
    }

    /// The ledger billing of a request that ends: `charge` settled to `provider` when one
    /// delivered (less the platform's `fee_bp`), else the hold voided. Returns it and who
    /// paid (the usage row's `payer`).
    pub fn settle(self, request_id: &str, provider: Option<&str>, charge: Micros, fee_bp: u32) -> (Option<Billing>, Option<&'static str>) {
        let settlement = |payer, provider_id: &str| {
            Billing::Settle(Settlement {
                request_id: request_id.to_owned(),
                payer,
                provider_id: provider_id.to_owned(),
                charge,
                fee: ledger::fee(charge, fee_bp),
            })
        };
        match (self, provider) {
            (Funding::User(hold, _), Some(p)) => (Some(settlement(Payer::User(hold), p)), Some("user")),
            (Funding::User(hold, _), None) => (Some(Billing::Void(hold)), None),
            (Funding::AdRevenue(claim), Some(p)) => {
                claim.settle(charge);
                (Some(settlement(Payer::AdRevenue, p)), Some("ad_revenue"))
            }
            // An unused claim is given back when it is dropped.
            (Funding::AdRevenue(_) | Funding::Nothing, _) => (None, None),
        }
    }
}
