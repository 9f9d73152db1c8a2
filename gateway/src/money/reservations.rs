//! Per-hour reservations: a user leases one provider exclusively for a period, paid by
//! the second at the provider's `perHour`. Creating one holds the whole period's price;
//! releasing early charges the elapsed seconds and returns the rest; at the end the
//! sweeper charges the full period. Requests that name the reservation run only on its
//! provider and are not billed per token; nobody else's requests go there meanwhile.

use serde::Serialize;
use sqlx::Row;

use crate::edge::error::ApiError;
use crate::edge::keys::{AuthedKey, Tier};
use crate::money::ledger::{self, Billing, Payer, Settlement};
use crate::money::units::Micros;
use crate::money::holds::Hold;
use crate::store::{new_id, now_ms};
use crate::state::AppState;

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Reservation {
    pub id: String,
    pub provider_id: String,
    pub model: String,
    pub starts_at: i64,
    pub ends_at: i64,
    pub price_per_hour: f64,
    pub max_cost: f64,
    pub status: String,
    pub charged: Option<f64>,
}

const HOUR_MS: i64 = 3_600_000;

/// What `elapsed_ms` of a lease costs at `per_hour` micro-USD, rounded up to the micro-USD.
pub fn lease_cost(per_hour: Micros, elapsed_ms: i64) -> Micros {
    let numerator = i128::from(per_hour) * i128::from(elapsed_ms.max(0));
    i64::try_from((numerator + i128::from(HOUR_MS) - 1) / i128::from(HOUR_MS)).unwrap_or(i64::MAX)
}

pub async fn create(
    state: &AppState,
    key: &AuthedKey,
    model: Option<String>,
    provider_id: Option<String>,
    hours: f64,
) -> Result<Reservation, ApiError> {
    if key.tier != Tier::Premium {
        return Err(ApiError::PermissionDenied("reservations need a paid (premium) key".into()));
    }
    if !hours.is_finite() || hours <= 0.0 || hours > 24.0 * 31.0 {
        return Err(ApiError::param("`hours` must be more than 0 and at most 744", "hours"));
    }
    // A lease is billed by the second: a shorter one would hold nothing.
    if hours * 3600.0 < 1.0 {
        return Err(ApiError::param("`hours` must be at least one second (1/3600)", "hours"));
    }
    let now = now_ms();
    let stale_ms = state.config.stale_after_ms();
    let snapshot = state.registry.snapshot();
    // Only providers that sell hours (a `perHour` price) can be reserved.
    let free = |p: &&std::sync::Arc<crate::inference::providers::Provider>| {
        p.is_live(now, stale_ms) && p.reservation.as_ref().is_none_or(|r| r.ends_at <= now) && p.pricing.per_hour > 0.0
    };
    let provider = match (&provider_id, &model) {
        (Some(id), _) => snapshot.get(id).filter(free).cloned().ok_or_else(|| {
            ApiError::param(format!("provider {id} is not on line, is already reserved, or sells no hours (no perHour price)"), "providerId")
        })?,
        (None, Some(m)) => {
            let mut options: Vec<_> = snapshot.values().filter(free).filter(|p| p.streams.iter().any(|(sm, _)| sm == m)).cloned().collect();
            options.sort_by_key(|p| p.pricing.per_hour.to_bits());
            // A model nobody serves is the client's mistake (404, as for completions); a
            // served model whose providers are all reserved is worth retrying (503).
            let served = snapshot.values().any(|p| p.is_live(now, stale_ms) && p.streams.iter().any(|(sm, _)| sm == m));
            match options.into_iter().next() {
                Some(p) => p,
                None if served => return Err(ApiError::NoProvider { model: m.clone() }),
                None => return Err(ApiError::ModelNotFound { model: m.clone() }),
            }
        }
        (None, None) => return Err(ApiError::param("give `model` or `providerId`", "model")),
    };
    let model = model.or_else(|| provider.streams.iter().next().map(|(m, _)| m.clone())).unwrap_or_default();
    let per_hour = (provider.pricing.per_hour * 1e6).round() as i64;
    let duration_ms = (hours * HOUR_MS as f64).round() as i64;
    let max_cost = lease_cost(per_hour, duration_ms);
    let id = new_id("rsv");
    let account = ledger::user_account(&key.user_id);
    let hold = state
        .ledger
        .hold_durable(&account, max_cost, &id, Some(&key.key_id))
        .await?
        .ok_or(ApiError::InsufficientQuota { needed: max_cost, available: state.ledger.balance(&account).await?.available })?;
    // One active reservation per provider: the insert re-checks under the database's lock.
    let mut tx = state.store.pool.begin().await?;
    let taken: Option<String> = sqlx::query_scalar("SELECT id FROM reservations WHERE provider_id = $1 AND status = 'active'")
        .bind(&provider.id)
        .fetch_optional(&mut *tx)
        .await?;
    if taken.is_some() {
        drop(tx);
        void(state, hold).await?;
        return Err(ApiError::Conflict(format!("provider {} was reserved a moment ago", provider.id)));
    }
    sqlx::query(
        "INSERT INTO reservations (id, user_id, key_id, provider_id, model, hold_id, price_per_hour_micros, starts_at, ends_at, status) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'active')",
    )
    .bind(&id)
    .bind(&key.user_id)
    .bind(&key.key_id)
    .bind(&provider.id)
    .bind(&model)
    .bind(&hold.id)
    .bind(per_hour)
    .bind(now)
    .bind(now + duration_ms)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    state.registry.reload().await?;
    get(state, &key.user_id, &id).await
}

async fn void(state: &AppState, hold: Hold) -> Result<(), sqlx::Error> {
    let mut tx = state.store.pool.begin().await?;
    ledger::apply(&mut tx, &Billing::Void(hold), "reservation", None).await?;
    tx.commit().await
}

pub async fn get(state: &AppState, user_id: &str, id: &str) -> Result<Reservation, ApiError> {
    list(state, user_id).await?.into_iter().find(|r| r.id == id).ok_or_else(|| ApiError::NotFound(format!("reservation {id} does not exist")))
}

pub async fn list(state: &AppState, user_id: &str) -> Result<Vec<Reservation>, ApiError> {
    let rows = sqlx::query(
        "SELECT r.*, h.amount FROM reservations r JOIN holds h ON h.id = r.hold_id WHERE r.user_id = $1 ORDER BY r.starts_at DESC",
    )
    .bind(user_id)
    .fetch_all(&state.store.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Reservation {
                id: r.try_get("id")?,
                provider_id: r.try_get("provider_id")?,
                model: r.try_get("model")?,
                starts_at: r.try_get("starts_at")?,
                ends_at: r.try_get("ends_at")?,
                price_per_hour: r.try_get::<i64, _>("price_per_hour_micros")? as f64 / 1e6,
                max_cost: r.try_get::<i64, _>("amount")? as f64 / 1e6,
                status: r.try_get("status")?,
                charged: r.try_get::<Option<i64>, _>("charged_micros")?.map(|c| c as f64 / 1e6),
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(ApiError::from)
}

/// Ends a reservation now (or at its end), charging the elapsed time and releasing the rest.
pub async fn finish(state: &AppState, id: &str, user_id: Option<&str>, at: i64) -> Result<(), ApiError> {
    let row = sqlx::query(
        "SELECT r.user_id, r.provider_id, r.hold_id, r.price_per_hour_micros, r.starts_at, r.ends_at, r.status, h.account_id, h.amount \
         FROM reservations r JOIN holds h ON h.id = r.hold_id WHERE r.id = $1",
    )
    .bind(id)
    .fetch_optional(&state.store.pool)
    .await?;
    let Some(row) = row else { return Err(ApiError::NotFound(format!("reservation {id} does not exist"))) };
    let owner: String = row.try_get("user_id")?;
    if user_id.is_some_and(|u| u != owner) {
        return Err(ApiError::NotFound(format!("reservation {id} does not exist")));
    }
    if row.try_get::<String, _>("status")? != "active" {
        return Err(ApiError::Conflict(format!("reservation {id} has already ended")));
    }
    let (starts, ends): (i64, i64) = (row.try_get("starts_at")?, row.try_get("ends_at")?);
    let hold = Hold { id: row.try_get("hold_id")?, account_id: row.try_get("account_id")?, amount: row.try_get("amount")?, in_memory: false };
    let charge = lease_cost(row.try_get("price_per_hour_micros")?, at.min(ends) - starts).min(hold.amount);
    let mut tx = state.store.pool.begin().await?;
    let moved = sqlx::query("UPDATE reservations SET status = 'released', released_at = $1, charged_micros = $2 WHERE id = $3 AND status = 'active'")
        .bind(at)
        .bind(charge)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    if moved.rows_affected() == 0 {
        return Err(ApiError::Conflict(format!("reservation {id} has already ended")));
    }
    let settlement = Settlement {
        request_id: id.to_owned(),
        payer: Payer::User(hold),
        provider_id: row.try_get("provider_id")?,
        charge,
        fee: ledger::fee(charge, state.config.platform_fee_bp),
    };
    ledger::apply(&mut tx, &Billing::Settle(settlement), "reservation", None).await?;
    tx.commit().await?;
    state.registry.reload().await?;
    Ok(())
}

/// Ends every reservation whose period is over, charging the full period.
pub async fn expire(state: &AppState) -> Result<usize, ApiError> {
    let now = now_ms();
    let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM reservations WHERE status = 'active' AND ends_at <= $1")
        .bind(now)
        .fetch_all(&state.store.pool)
        .await?;
    for id in &ids {
        finish(state, id, None, now).await?;
    }
    Ok(ids.len())
}
