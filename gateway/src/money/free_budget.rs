//! The free tier's daily budget (`free_tier_daily_budget`): what free keys' tokens may
//! cost the platform per UTC day. Free tokens are paid to providers from
//! `platform:ad_revenue`, so without a cap one busy day (or one hostile provider with
//! many free keys) could drain it without limit.
//!
//! A free request claims the most it can cost (its prompt bound and every completion
//! token at the chosen provider's price) before the provider is called; its charge is
//! capped at that claim and turns it into spending when the request settles. Claims and
//! spending are counted under one lock, so this replica never grants more than the day's
//! budget. The spending of other replicas (on PostgreSQL) reaches this one through
//! `refresh` (the sum of today's free usage records, every `provider_refresh_secs`), so a
//! fleet can overshoot by at most what the other replicas claimed since the last refresh;
//! the scale-out issue makes it exact. On SQLite it is read once, at start-up.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::money::units::Micros;
use crate::store::{now_ms, Store};

const DAY_MS: i64 = 86_400_000;

pub struct FreeBudget {
    /// Micro-USD per UTC day; 0 turns the free tier off.
    limit: Micros,
    day: Mutex<Day>,
}

#[derive(Default)]
struct Day {
    start: i64,
    /// Settled free charges of the day (this replica's, or the database's when larger).
    spent: Micros,
    /// Open claims of requests still running.
    claimed: Micros,
}

/// A running free request's share of the day's budget; dropped unsettled, it is
/// given back whole.
pub struct Claim {
    budget: Arc<FreeBudget>,
    pub amount: Micros,
    day_start: i64,
}

/// Why a free request may not run.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `free_tier_daily_budget` is 0.
    Off,
    /// Today's budget is spent (or claimed by running requests).
    Spent { limit: Micros },
}

fn day_start(now: i64) -> i64 {
    now - now.rem_euclid(DAY_MS)
}

impl FreeBudget {
    pub fn new(limit: Micros) -> Arc<Self> {
        Arc::new(Self { limit, day: Mutex::new(Day { start: day_start(now_ms()), ..Day::default() }) })
    }

    /// The day's state, started over when a new UTC day began.
    fn today(day: &mut Day, now: i64) {
        let start = day_start(now);
        if day.start != start {
            // Claims still open belong to requests that started yesterday; they settle
            // into yesterday, so only their claim is carried (and given back later).
            *day = Day { start, spent: 0, claimed: day.claimed };
        }
    }

    /// Claims `amount` of today's budget for one request.
    pub fn claim(self: &Arc<Self>, amount: Micros) -> Result<Claim, Refusal> {
        if self.limit <= 0 {
            return Err(Refusal::Off);
        }
        let now = now_ms();
        let mut day = self.day.lock();
        Self::today(&mut day, now);
        if day.spent + day.claimed + amount > self.limit {
            return Err(Refusal::Spent { limit: self.limit });
        }
        day.claimed += amount;
        Ok(Claim { budget: self.clone(), amount, day_start: day.start })
    }

    /// What free requests settled today, as far as this replica knows.
    pub fn spent_today(&self) -> Micros {
        let mut day = self.day.lock();
        Self::today(&mut day, now_ms());
        day.spent
    }

    /// Learns the fleet's settled free spending of today from the usage records.
    pub async fn refresh(&self, store: &Store) -> Result<(), sqlx::Error> {
        let start = day_start(now_ms());
        let settled = free_spent_since(store, start).await?;
        let mut day = self.day.lock();
        Self::today(&mut day, now_ms());
        if day.start == start {
            day.spent = day.spent.max(settled);
        }
        Ok(())
    }
}

impl Claim {
    /// The request settled with `charge` (at most the claim): it becomes spending.
    pub fn settle(self, charge: Micros) {
        let mut day = self.budget.day.lock();
        FreeBudget::today(&mut day, now_ms());
        day.claimed -= self.amount;
        if day.start == self.day_start {
            day.spent += charge.min(self.amount);
        }
        drop(day);
        std::mem::forget(self);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.budget.day.lock().claimed -= self.amount;
    }
}

/// Free requests' settled cost since `since_ms`, from the usage records.
async fn free_spent_since(store: &Store, since_ms: i64) -> Result<Micros, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT) FROM usage_records WHERE payer = 'ad_revenue' AND created_at >= $1",
    )
    .bind(since_ms)
    .fetch_one(&store.pool)
    .await
}

/// UTC days on which free requests cost more than `limit` (for `gateway ledger check`):
/// `(day start in ms, cost)`.
pub async fn days_over(store: &Store, limit: Micros) -> Result<Vec<(i64, Micros)>, sqlx::Error> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT CAST(created_at / 86400000 AS BIGINT) AS day, CAST(SUM(cost_micros) AS BIGINT) AS cost FROM usage_records \
         WHERE payer = 'ad_revenue' GROUP BY created_at / 86400000 HAVING SUM(cost_micros) > $1 ORDER BY day",
    )
    .bind(limit)
    .fetch_all(&store.pool)
    .await?;
    Ok(rows.into_iter().map(|(day, cost)| (day * DAY_MS, cost)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_never_exceed_the_day() {
        let budget = FreeBudget::new(100);
        let a = budget.claim(60).unwrap();
        assert_eq!(budget.claim(50).err(), Some(Refusal::Spent { limit: 100 }));
        let b = budget.claim(40).unwrap();
        a.settle(10);
        drop(b);
        assert_eq!(budget.spent_today(), 10);
        // 10 spent: 90 is left, not 91.
        assert!(budget.claim(91).is_err());
        assert!(budget.claim(90).is_ok());
    }

    #[test]
    fn a_charge_is_capped_at_its_claim() {
        let budget = FreeBudget::new(100);
        budget.claim(30).unwrap().settle(500);
        assert_eq!(budget.spent_today(), 30);
    }

    #[test]
    fn zero_turns_the_free_tier_off() {
        assert_eq!(FreeBudget::new(0).claim(1).err(), Some(Refusal::Off));
    }
}
