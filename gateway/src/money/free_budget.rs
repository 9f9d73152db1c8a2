//! The free tier's daily budget (`free_tier_daily_budget`): what free keys' tokens may
//! cost the platform per UTC day. Free tokens are paid to providers from
//! `platform:ad_revenue`, so without a cap one busy day (or one hostile provider with
//! many free keys) could drain it without limit.
//!
//! A free request claims the most it can cost (its prompt bound and every completion
//! token at the chosen provider's price) before the provider is called; its charge is
//! capped at that claim and turns it into spending when the request settles, so the
//! day's spending never passes the budget.
//!
//! One replica counts claims and spending under one lock. Replicas that share Redis
//! count them there (`{redis_prefix}free:{day}:…`): a claim is one script that adds it
//! only while the day's spending plus every open claim leaves room, and settling moves
//! it into spending in one script, so the fleet never grants more than the budget.
//! A claim lives at most `request_deadline_secs` + a minute (a replica killed with
//! claims open does not shrink the day for long); the day's spending, if Redis lost it,
//! starts again from the usage records. While Redis does not answer, each replica may
//! claim its share (÷ live replicas) of what the records leave of the day, and learns
//! the fleet's settled spending from them (`refresh`, on PostgreSQL).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::money::units::Micros;
use crate::store::{now_ms, redis_answer, Store};

const DAY_MS: i64 = 86_400_000;

/// `KEYS`: the day's spending, its claims' expiries (ZSET) and amounts (hash, with the
/// running total in `_total`). `ARGV`: limit, amount, member, lease ms, spending to
/// start from when Redis has none. 1: claimed; 0: no room.
const CLAIM: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  local a = tonumber(redis.call('HGET', KEYS[3], m) or '0')
  redis.call('HINCRBY', KEYS[3], '_total', -a)
  redis.call('HDEL', KEYS[3], m)
  redis.call('ZREM', KEYS[2], m)
end
redis.call('SET', KEYS[1], ARGV[5], 'NX', 'PX', 172800000)
local spent = tonumber(redis.call('GET', KEYS[1]))
local claimed = tonumber(redis.call('HGET', KEYS[3], '_total') or '0')
local amount = tonumber(ARGV[2])
if spent + claimed + amount > tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[3])
redis.call('HSET', KEYS[3], ARGV[3], amount)
redis.call('HINCRBY', KEYS[3], '_total', amount)
redis.call('PEXPIRE', KEYS[2], 172800000)
redis.call('PEXPIRE', KEYS[3], 172800000)
return 1
";

/// Ends a claim (`ARGV[1]`), adding `ARGV[2]` (at most the claim) to the day's
/// spending, which starts from `ARGV[3]` when Redis has none.
const SETTLE: &str = r"
local a = redis.call('HGET', KEYS[3], ARGV[1])
local charge = tonumber(ARGV[2])
if a then
  redis.call('HINCRBY', KEYS[3], '_total', -tonumber(a))
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  charge = math.min(charge, tonumber(a))
end
if charge > 0 then
  redis.call('SET', KEYS[1], ARGV[3], 'NX', 'PX', 172800000)
  redis.call('INCRBY', KEYS[1], charge)
end
return 1
";

pub struct FreeBudget {
    /// Micro-USD per UTC day; 0 turns the free tier off.
    limit: Micros,
    day: Mutex<Day>,
    shared: Option<Shared>,
}

struct Shared {
    conn: redis::aio::ConnectionManager,
    prefix: String,
    replica: String,
    next: AtomicU64,
    /// How long a claim lives in Redis (a request's deadline and a minute).
    lease_ms: u64,
    claim: redis::Script,
    settle: redis::Script,
    /// Redis did not answer the last call: claims are this replica's share.
    away: AtomicBool,
    /// Live replicas, this one included (`replicas` table).
    replicas: AtomicU32,
}

#[derive(Default)]
struct Day {
    start: i64,
    /// Settled free charges of the day (this replica's, or the database's when larger).
    spent: Micros,
    /// Open claims of this replica's requests still running.
    claimed: Micros,
}

/// A running free request's share of the day's budget; dropped unsettled, it is
/// given back whole.
pub struct Claim {
    budget: Arc<FreeBudget>,
    pub amount: Micros,
    day_start: i64,
    /// Its member in Redis, when the fleet counts it.
    member: Option<String>,
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

/// The `KEYS` of `CLAIM` and `SETTLE` for the day starting at `start`: its spending,
/// its claims' expiries and their amounts.
fn day_keys(call: &mut redis::ScriptInvocation<'_>, prefix: &str, start: i64) {
    for k in ["spent", "claims", "amounts"] {
        call.key(format!("{prefix}{start}:{k}"));
    }
}

impl FreeBudget {
    pub fn new(limit: Micros) -> Arc<Self> {
        Self::counted(limit, None)
    }

    fn counted(limit: Micros, shared: Option<Shared>) -> Arc<Self> {
        Arc::new(Self { limit, day: Mutex::new(Day { start: day_start(now_ms()), ..Day::default() }), shared })
    }

    /// A budget the replicas sharing `conn` count together; a claim lives at most
    /// `lease` (a request's deadline and a minute).
    pub fn shared(limit: Micros, conn: redis::aio::ConnectionManager, prefix: &str, replica: &str, lease: std::time::Duration) -> Arc<Self> {
        let shared = Shared {
            conn,
            prefix: format!("{prefix}free:"),
            replica: replica.to_owned(),
            next: AtomicU64::new(0),
            lease_ms: u64::try_from(lease.as_millis()).unwrap_or(u64::MAX),
            claim: redis::Script::new(CLAIM),
            settle: redis::Script::new(SETTLE),
            away: AtomicBool::new(false),
            replicas: AtomicU32::new(1),
        };
        Self::counted(limit, Some(shared))
    }

    /// Live replicas, which divide what is left of the day while Redis is away.
    pub fn set_replicas(&self, n: u32) {
        if let Some(shared) = &self.shared {
            shared.replicas.store(n.max(1), Ordering::Relaxed);
        }
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
    pub async fn claim(self: &Arc<Self>, amount: Micros) -> Result<Claim, Refusal> {
        if self.limit <= 0 {
            return Err(Refusal::Off);
        }
        let now = now_ms();
        let (start, seed) = {
            let mut day = self.day.lock();
            Self::today(&mut day, now);
            (day.start, day.spent)
        };
        let mut member = None;
        // This replica's own count decides without Redis, or while it is away.
        let mut limit = self.limit;
        if let Some(shared) = &self.shared {
            let m = format!("{}:{}", shared.replica, shared.next.fetch_add(1, Ordering::Relaxed));
            let mut call = shared.claim.prepare_invoke();
            day_keys(&mut call, &shared.prefix, start);
            call.arg(self.limit).arg(amount).arg(&m).arg(shared.lease_ms).arg(seed);
            let mut conn = shared.conn.clone();
            match redis_answer(call.invoke_async::<i64>(&mut conn)).await {
                Ok(1) => {
                    shared.back();
                    member = Some(m);
                }
                Ok(_) => {
                    shared.back();
                    return Err(Refusal::Spent { limit: self.limit });
                }
                Err(error) => {
                    if !shared.away.swap(true, Ordering::Relaxed) {
                        tracing::error!(error, "Redis unreachable: each replica now claims its share of the free-tier budget");
                    }
                    let replicas = Micros::from(shared.replicas.load(Ordering::Relaxed).max(1));
                    limit = seed + (self.limit - seed).max(0) / replicas;
                }
            }
        }
        let mut day = self.day.lock();
        Self::today(&mut day, now);
        if member.is_none() && day.spent + day.claimed + amount > limit {
            return Err(Refusal::Spent { limit: self.limit });
        }
        day.claimed += amount;
        Ok(Claim { budget: self.clone(), amount, day_start: day.start, member })
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

    /// Ends a claim in Redis (settled with `charge`, or given back with 0), off the
    /// request's path. A claim Redis does not hear about expires with its lease.
    fn end_shared(&self, member: String, day_start: i64, charge: Micros) {
        let (Some(shared), Ok(rt)) = (&self.shared, tokio::runtime::Handle::try_current()) else { return };
        let (script, prefix, seed, mut conn) = (shared.settle.clone(), shared.prefix.clone(), self.spent_today(), shared.conn.clone());
        rt.spawn(async move {
            let mut call = script.prepare_invoke();
            day_keys(&mut call, &prefix, day_start);
            call.arg(member).arg(charge).arg(seed);
            if let Err(e) = redis_answer(call.invoke_async::<i64>(&mut conn)).await {
                tracing::warn!(error = %e, "a free-tier claim's end did not reach Redis; it expires on its own");
            }
        });
    }
}

impl Shared {
    /// Redis answered: leave the per-replica share if it was in use.
    fn back(&self) {
        if self.away.swap(false, Ordering::Relaxed) {
            tracing::warn!("Redis answers again: the free-tier budget is counted fleet-wide again");
        }
    }
}

impl Claim {
    /// The request settled with `charge` (at most the claim): it becomes spending.
    pub fn settle(mut self, charge: Micros) {
        let charge = charge.min(self.amount);
        let mut day = self.budget.day.lock();
        FreeBudget::today(&mut day, now_ms());
        day.claimed -= self.amount;
        if day.start == self.day_start {
            day.spent += charge;
        }
        drop(day);
        if let Some(member) = self.member.take() {
            self.budget.end_shared(member, self.day_start, charge);
        }
        std::mem::forget(self);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.budget.day.lock().claimed -= self.amount;
        if let Some(member) = self.member.take() {
            self.budget.end_shared(member, self.day_start, 0);
        }
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

    #[tokio::test]
    async fn claims_never_exceed_the_day() {
        let budget = FreeBudget::new(100);
        let a = budget.claim(60).await.unwrap();
        assert_eq!(budget.claim(50).await.err(), Some(Refusal::Spent { limit: 100 }));
        let b = budget.claim(40).await.unwrap();
        a.settle(10);
        drop(b);
        assert_eq!(budget.spent_today(), 10);
        // 10 spent: 90 is left, not 91.
        assert!(budget.claim(91).await.is_err());
        assert!(budget.claim(90).await.is_ok());
    }

    #[tokio::test]
    async fn a_charge_is_capped_at_its_claim() {
        let budget = FreeBudget::new(100);
        budget.claim(30).await.unwrap().settle(500);
        assert_eq!(budget.spent_today(), 30);
    }

    #[tokio::test]
    async fn zero_turns_the_free_tier_off() {
        assert_eq!(FreeBudget::new(0).claim(1).await.err(), Some(Refusal::Off));
    }
}
