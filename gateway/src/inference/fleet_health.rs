//! Provider health (`inference::health`) across replicas, and kept in the database.
//!
//! With Redis (`Fleet`) every observation a replica makes is also kept as a `Sample` until the next sync (every `capacity::REFRESH`), which sends the
//! samples to the provider's hash `{redis_prefix}health:{provider}` where one script
//! folds them into the fleet's state (the same transitions as `State::apply`, timed by
//! Redis's clock) and answers with it; the replica then adopts that state and replays
//! the samples it made meanwhile. So the breaker counts consecutive failures
//! fleet-wide, and a breaker opened by one replica is open on every replica within two
//! syncs. Half-open probes stay per replica (each may send one after the cool-down).
//! The averages are persisted (`provider_health`, every `PERSIST` by the replica that
//! holds the writer lease, or by the one replica without Redis) and restored at start,
//! so a restart does not forget who was down; active `/health` checks are taken once
//! per provider per period across the fleet, by whichever replica wins its lease.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;

use crate::inference::health::{Breaking, Inputs, Shared, ALPHA};
use crate::inference::providers::Provider;
use crate::store::{now_ms, redis_answer, Store};

/// How often the fleet's health is written to the database.
pub const PERSIST: Duration = Duration::from_secs(5);

/// Folds samples into a provider's fleet state. `KEYS[1]`: its hash. `ARGV`: alpha,
/// breaker threshold, cool-down ms, the seed for a missing hash (success, ttft or -1,
/// uptime, honesty, requests, failures), then (kind, value) pairs (`Sample::wire`).
/// Answers success, ttft (-1: none), uptime, honesty, requests, failures, consecutive
/// failures, and the breaker: -1 closed, else the ms it stays open (0: cooled down).
const FOLD: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local k = KEYS[1]
if redis.call('EXISTS', k) == 0 then
  redis.call('HSET', k, 'success', ARGV[4], 'ttft', ARGV[5], 'uptime', ARGV[6], 'honesty', ARGV[7],
    'requests', ARGV[8], 'failures', ARGV[9], 'cf', 0, 'open_until', 0)
end
local v = redis.call('HMGET', k, 'success', 'ttft', 'uptime', 'honesty', 'requests', 'failures', 'cf', 'open_until')
local success, ttft, uptime, honesty = tonumber(v[1]), tonumber(v[2]), tonumber(v[3]), tonumber(v[4])
local requests, failures, cf, open_until = tonumber(v[5]), tonumber(v[6]), tonumber(v[7]), tonumber(v[8])
local a, threshold, cooldown = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local function ewma(old, x) return old + a * (x - old) end
for i = 10, #ARGV - 1, 2 do
  local kind, x = ARGV[i], tonumber(ARGV[i + 1])
  if kind == 's' then
    requests = requests + 1
    success = ewma(success, 1)
    if ttft < 0 then ttft = x else ttft = ewma(ttft, x) end
    cf = 0
    open_until = 0
  elseif kind == 'f' or kind == 'p' then
    requests = requests + 1
    failures = failures + 1
    success = ewma(success, 0)
    cf = cf + 1
    if kind == 'p' or cf >= threshold then open_until = now + cooldown end
  elseif kind == 'c' then
    uptime = ewma(uptime, x)
  elseif kind == 'h' then
    honesty = ewma(honesty, x)
  end
end
local f = function(x) return string.format('%.17g', x) end
redis.call('HSET', k, 'success', f(success), 'ttft', f(ttft), 'uptime', f(uptime), 'honesty', f(honesty),
  'requests', requests, 'failures', failures, 'cf', cf, 'open_until', open_until)
redis.call('PEXPIRE', k, 604800000)
local open = -1
if open_until > 0 then open = math.max(open_until - now, 0) end
return {f(success), f(ttft), f(uptime), f(honesty), tostring(requests), tostring(failures), tostring(cf), tostring(open)}
";

/// Takes or keeps leases: for each key, 1 when `ARGV[1]` holds it now (it held it
/// already, or it was free and is taken for `ARGV[2]` ms), else 0.
const LEASES: &str = r"
local out = {}
for i, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then
    redis.call('PEXPIRE', k, ARGV[2])
    out[i] = 1
  elseif redis.call('SET', k, ARGV[1], 'NX', 'PX', ARGV[2]) then
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
";

struct Redis {
    conn: redis::aio::ConnectionManager,
    prefix: String,
    fold: redis::Script,
    leases: redis::Script,
}

/// Provider health shared by the replicas (with Redis) and kept in the database.
pub struct Fleet {
    replica: String,
    redis: Option<Redis>,
    breaking: Breaking,
    /// The last sync failed: each replica judges on its own until Redis answers.
    alone: AtomicBool,
}

impl Fleet {
    pub fn new(replica: String, redis: Option<(redis::aio::ConnectionManager, &str)>, breaking: Breaking) -> Self {
        let redis = redis.map(|(conn, prefix)| Redis {
            conn,
            prefix: prefix.to_owned(),
            fold: redis::Script::new(FOLD),
            leases: redis::Script::new(LEASES),
        });
        Self { replica, redis, breaking, alone: AtomicBool::new(false) }
    }

    /// What `/health` says of provider health: `shared`, `alone` (Redis unreachable) or
    /// `local` (no Redis).
    pub fn mode(&self) -> &'static str {
        match (&self.redis, self.alone.load(Ordering::Relaxed)) {
            (None, _) => "local",
            (Some(_), false) => "shared",
            (Some(_), true) => "alone",
        }
    }

    /// Sends each provider's samples to the fleet and adopts the fleet's state, all
    /// providers at once (the connection pipelines the calls). Runs every
    /// `capacity::REFRESH`.
    pub async fn sync(&self, providers: &[Arc<Provider>]) {
        let Some(redis) = self.redis.as_ref() else { return };
        let calls = providers.iter().map(|p| async move {
            let health = &p.load.health;
            let samples = health.take_pending();
            let seed = health.inputs();
            let mut call = redis.fold.key(format!("{}health:{}", redis.prefix, p.id));
            call.arg(ALPHA).arg(self.breaking.threshold).arg(self.breaking.cooldown_ms);
            call.arg(seed.success).arg(seed.ttft_ms.unwrap_or(-1.0)).arg(seed.uptime).arg(seed.honesty).arg(seed.requests).arg(seed.failures);
            for sample in &samples {
                let (kind, value) = sample.wire();
                call.arg(kind).arg(value);
            }
            let mut conn = redis.conn.clone();
            match redis_answer(call.invoke_async::<Vec<String>>(&mut conn)).await.and_then(|a| parse_shared(&a)) {
                Ok(shared) => {
                    health.adopt(&shared);
                    None
                }
                Err(error) => {
                    health.put_back(samples);
                    Some(error)
                }
            }
        });
        let errors: Vec<String> = futures::future::join_all(calls).await.into_iter().flatten().collect();
        match errors.first() {
            Some(error) if !self.alone.swap(true, Ordering::Relaxed) => {
                tracing::error!(error, "Redis unreachable: each replica judges provider health on its own until it answers");
            }
            None if self.alone.swap(false, Ordering::Relaxed) => tracing::warn!("Redis answers again: provider health is shared again"),
            _ => {}
        }
    }

    /// Of `providers`, those this replica checks this period: all of them without
    /// Redis (or while it is away), else those whose check lease it wins (one replica
    /// per provider per period).
    pub async fn to_check(&self, providers: Vec<Arc<Provider>>, period: Duration) -> Vec<Arc<Provider>> {
        let Some(redis) = self.redis.as_ref() else { return providers };
        if providers.is_empty() {
            return providers;
        }
        // A little shorter than the period, so that the next period's lease is free.
        let ttl = period.saturating_sub(Duration::from_millis(250)).max(Duration::from_millis(100));
        let keys: Vec<String> = providers.iter().map(|p| format!("{}check:{}", redis.prefix, p.id)).collect();
        match self.lease(redis, &keys, ttl).await {
            Some(won) => providers.into_iter().zip(won).filter_map(|(p, won)| won.then_some(p)).collect(),
            None => providers,
        }
    }

    /// Whether this replica writes the fleet's health to the database: the one
    /// replica without Redis, or the holder of the writer lease.
    pub async fn writes(&self) -> bool {
        let Some(redis) = self.redis.as_ref() else { return true };
        let key = format!("{}health:writer", redis.prefix);
        self.lease(redis, &[key], PERSIST * 3).await.is_some_and(|won| won.first() == Some(&true))
    }

    async fn lease(&self, redis: &Redis, keys: &[String], ttl: Duration) -> Option<Vec<bool>> {
        let mut call = redis.leases.prepare_invoke();
        for k in keys {
            call.key(k);
        }
        call.arg(&self.replica).arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let mut conn = redis.conn.clone();
        redis_answer(call.invoke_async::<Vec<i64>>(&mut conn)).await.ok().map(|won| won.into_iter().map(|w| w == 1).collect())
    }
}

fn parse_shared(answer: &[String]) -> Result<Shared, String> {
    let number = |i: usize| -> Result<f64, String> {
        answer.get(i).and_then(|v| v.parse::<f64>().ok()).ok_or_else(|| format!("unexpected health answer {answer:?}"))
    };
    let ttft = number(1)?;
    let open = number(7)?;
    Ok(Shared {
        inputs: Inputs {
            success: number(0)?,
            ttft_ms: (ttft >= 0.0).then_some(ttft),
            uptime: number(2)?,
            honesty: number(3)?,
            requests: number(4)? as u64,
            failures: number(5)? as u64,
        },
        consecutive_failures: number(6)? as u32,
        open_for_ms: (open >= 0.0).then_some(open as i64),
    })
}

/// Writes the score's inputs of `providers` (`provider_health`), one transaction.
pub async fn persist(store: &Store, providers: &[Arc<Provider>]) -> Result<(), sqlx::Error> {
    let now = now_ms();
    let mut tx = store.pool.begin().await?;
    for p in providers {
        let i = p.load.health.inputs();
        sqlx::query(
            "INSERT INTO provider_health (provider_id, success, ttft_ms, uptime, honesty, requests, failures, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (provider_id) DO UPDATE SET success = excluded.success, \
             ttft_ms = excluded.ttft_ms, uptime = excluded.uptime, honesty = excluded.honesty, requests = excluded.requests, \
             failures = excluded.failures, updated_at = excluded.updated_at",
        )
        .bind(&p.id)
        .bind(i.success)
        .bind(i.ttft_ms)
        .bind(i.uptime)
        .bind(i.honesty)
        .bind(i64::try_from(i.requests).unwrap_or(i64::MAX))
        .bind(i64::try_from(i.failures).unwrap_or(i64::MAX))
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// Gives the providers the inputs persisted for them (at start-up).
pub async fn restore(store: &Store, providers: &HashMap<String, Arc<Provider>>) -> Result<usize, sqlx::Error> {
    let rows = sqlx::query("SELECT provider_id, success, ttft_ms, uptime, honesty, requests, failures FROM provider_health")
        .fetch_all(&store.pool)
        .await?;
    let mut restored = 0;
    for r in rows {
        let id: String = r.try_get("provider_id")?;
        let Some(p) = providers.get(&id) else { continue };
        p.load.health.restore(Inputs {
            success: r.try_get("success")?,
            ttft_ms: r.try_get("ttft_ms")?,
            uptime: r.try_get("uptime")?,
            honesty: r.try_get("honesty")?,
            requests: u64::try_from(r.try_get::<i64, _>("requests")?).unwrap_or(0),
            failures: u64::try_from(r.try_get::<i64, _>("failures")?).unwrap_or(0),
        });
        restored += 1;
    }
    Ok(restored)
}
