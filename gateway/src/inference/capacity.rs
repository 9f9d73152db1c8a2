//! Provider slots across replicas: how many streams a provider has open, fleet-wide,
//! against its `maxConcurrentStreams`.
//!
//! With Redis (`redis_url`), every open stream holds a lease in the provider's sorted
//! set `{redis_prefix}cap:{provider}`: the member names the replica and the stream, the
//! score is when the lease expires by Redis's clock. Taking a slot is one script that
//! drops expired leases, counts the rest and adds one only below the cap, so replicas
//! never give a provider more than its cap between them. Each replica renews its own
//! leases every `RENEW` (re-adding any Redis lost: the periodic reconcile) and drops a
//! lease when its stream ends; a replica that dies (kill -9) stops renewing, and its
//! slots come back `LEASE` later. Routing reads a fleet count refreshed every
//! `REFRESH` and corrected by every take and release.
//!
//! When Redis cannot be reached, each replica falls back to `cap ÷ live replicas` of
//! its own (never unlimited), logs it once, shows it in `/health` and `/metrics`
//! (`gs_capacity_fallback`), and goes back to shared leases when Redis answers again.
//! Without Redis (one replica), slots are this process's count, taken atomically.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::inference::providers::{Load, Provider};
use crate::store::redis_answer;

/// How long a lease lives without renewal: a dead replica's slots return at most this
/// long after it died (the issue's bound is 30 s; 5 s are left for the replicas' view,
/// refreshed every `REFRESH`, and a loaded machine).
pub const LEASE: Duration = Duration::from_secs(25);
/// How often a replica renews its leases (a third of `LEASE`: two renewals may fail).
pub const RENEW: Duration = Duration::from_secs(8);
/// How often routing's view of the fleet's counts is refreshed.
pub const REFRESH: Duration = Duration::from_secs(1);

/// Drops expired leases, then adds `ARGV[2]` if fewer than `ARGV[1]` remain. Returns
/// the count after (taken), or `-1 - count` (full).
const TAKE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[1]) then return -1 - n end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
return n + 1
";

/// Renews (or re-adds) the members `ARGV[2..]` of `KEYS[1]` for `ARGV[1]` ms.
const RENEW_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return #ARGV - 1
";

/// The live lease count of every key in `KEYS`.
const COUNT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, k in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
  out[i] = redis.call('ZCARD', k)
end
return out
";

struct Shared {
    conn: redis::aio::ConnectionManager,
    prefix: String,
    take: redis::Script,
    renew: redis::Script,
    count: redis::Script,
}

/// How this replica counts provider slots.
pub struct Capacity {
    replica: String,
    shared: Option<Shared>,
    /// Redis is configured but did not answer: caps are divided by the live replicas.
    fallback: AtomicBool,
    /// Live replicas, this one included (`replicas` table).
    replicas: AtomicU32,
    next: AtomicU64,
    /// This replica's leases per provider, for renewal.
    leases: Mutex<HashMap<String, HashSet<String>>>,
    /// The providers' loads, which `spread` gives the current divisor.
    loads: Mutex<Vec<Arc<Load>>>,
    /// Woken when a slot frees up here (requests queued for capacity wait on it).
    pub freed: Arc<tokio::sync::Notify>,
}

impl Capacity {
    pub fn local(replica: String) -> Capacity {
        Capacity {
            replica,
            shared: None,
            fallback: AtomicBool::new(false),
            replicas: AtomicU32::new(1),
            next: AtomicU64::new(0),
            leases: Mutex::new(HashMap::new()),
            loads: Mutex::new(Vec::new()),
            freed: Arc::new(tokio::sync::Notify::new()),
        }
    }

    pub fn shared(replica: String, conn: redis::aio::ConnectionManager, prefix: &str) -> Capacity {
        let shared = Shared {
            conn,
            prefix: format!("{prefix}cap:"),
            take: redis::Script::new(TAKE),
            renew: redis::Script::new(RENEW_SCRIPT),
            count: redis::Script::new(COUNT),
        };
        Capacity { shared: Some(shared), ..Capacity::local(replica) }
    }

    /// What `/health` says of capacity: `shared`, `fallback` or `local`.
    pub fn mode(&self) -> &'static str {
        match (&self.shared, self.fallback.load(Ordering::Relaxed)) {
            (None, _) => "local",
            (Some(_), false) => "shared",
            (Some(_), true) => "fallback",
        }
    }

    pub fn in_fallback(&self) -> bool {
        self.fallback.load(Ordering::Relaxed)
    }

    pub fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed)
    }

    pub fn set_replicas(&self, n: u32) {
        self.replicas.store(n.max(1), Ordering::Relaxed);
        self.spread();
    }

    /// What a provider's cap is divided by here: 1, or the live replicas while Redis is
    /// unreachable (`Load::limit` divides).
    fn divisor(&self) -> u32 {
        if self.in_fallback() { self.replicas().max(1) } else { 1 }
    }

    fn enter_fallback(&self, error: &str) {
        let entered = !self.fallback.swap(true, Ordering::Relaxed);
        self.spread();
        if entered {
            tracing::error!(error, replicas = self.replicas(), "Redis unreachable: each replica now uses cap ÷ replicas of every provider");
        }
    }

    /// A slot of `provider`, or `None` when it has none free (fleet-wide with Redis).
    pub async fn take(self: &Arc<Self>, provider: &Arc<Provider>) -> Option<Slot> {
        let cap = provider.capabilities.max_concurrent_streams.max(1);
        let load = &provider.load;
        // This replica's own count first: never more than the cap (or its share).
        load.divisor.store(self.divisor(), Ordering::Relaxed);
        let limit = load.limit(cap);
        load.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1)).ok()?;
        let mut slot = Slot { capacity: self.clone(), provider: provider.clone(), lease: None };
        let Some(shared) = self.shared.as_ref().filter(|_| !self.in_fallback()) else { return Some(slot) };
        let member = format!("{}:{}", self.replica, self.next.fetch_add(1, Ordering::Relaxed));
        let key = format!("{}{}", shared.prefix, provider.id);
        let mut conn = shared.conn.clone();
        let mut call = shared.take.key(&key);
        call.arg(cap).arg(&member).arg(LEASE.as_millis() as u64);
        match redis_answer(call.invoke_async::<i64>(&mut conn)).await {
            Ok(n) if n >= 0 => {
                load.fleet_in_flight.store(u32::try_from(n).unwrap_or(u32::MAX), Ordering::Relaxed);
                self.leases.lock().entry(provider.id.clone()).or_default().insert(member.clone());
                slot.lease = Some(member);
                Some(slot)
            }
            Ok(full) => {
                load.fleet_in_flight.store(u32::try_from(-1 - full).unwrap_or(cap), Ordering::Relaxed);
                None // the slot's drop gives the local count back
            }
            // Redis went away meanwhile: the slot is kept if within this replica's share.
            Err(error) => {
                self.enter_fallback(&error);
                (load.in_flight.load(Ordering::Relaxed) <= load.limit(cap)).then_some(slot)
            }
        }
    }

    /// Renews this replica's leases (re-adding any Redis lost) and refreshes the fleet
    /// counts routing reads; leaves fallback when Redis answers again. Runs every
    /// `REFRESH`; renews every `RENEW`.
    pub async fn tick(&self, providers: &[Arc<Provider>], renew: bool) {
        let Some(shared) = &self.shared else { return };
        let mut conn = shared.conn.clone();
        if renew || self.in_fallback() {
            let leases: Vec<(String, Vec<String>)> =
                self.leases.lock().iter().filter(|(_, m)| !m.is_empty()).map(|(p, m)| (p.clone(), m.iter().cloned().collect())).collect();
            for (provider, members) in leases {
                let mut call = shared.renew.key(format!("{}{provider}", shared.prefix));
                call.arg(LEASE.as_millis() as u64);
                for m in &members {
                    call.arg(m);
                }
                if let Err(error) = redis_answer(call.invoke_async::<i64>(&mut conn)).await {
                    return self.enter_fallback(&error);
                }
            }
        }
        if providers.is_empty() {
            return self.leave_fallback();
        }
        let mut call = shared.count.prepare_invoke();
        for p in providers {
            call.key(format!("{}{}", shared.prefix, p.id));
        }
        match redis_answer(call.invoke_async::<Vec<i64>>(&mut conn)).await {
            Ok(counts) => {
                for (p, n) in providers.iter().zip(counts) {
                    p.load.fleet_in_flight.store(u32::try_from(n).unwrap_or(0), Ordering::Relaxed);
                }
                self.leave_fallback();
                // Slots other replicas freed: requests queued here may take them.
                self.freed.notify_waiters();
            }
            Err(error) => self.enter_fallback(&error),
        }
    }

    fn leave_fallback(&self) {
        let left = self.fallback.swap(false, Ordering::Relaxed);
        self.spread();
        if left {
            tracing::warn!("Redis answers again: provider slots are shared leases again");
        }
    }

    /// Makes routing see the current share of every known provider's cap (the fleet
    /// count, stale while Redis is away, is dropped then).
    fn spread(&self) {
        let divisor = self.divisor();
        for load in self.loads.lock().iter() {
            load.divisor.store(divisor, Ordering::Relaxed);
            if divisor > 1 {
                load.fleet_in_flight.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Remembers the providers' loads so that `spread` reaches them all.
    pub fn track(&self, providers: &[Arc<Provider>]) {
        *self.loads.lock() = providers.iter().map(|p| p.load.clone()).collect();
        self.spread();
    }
}

impl Slot {
    pub fn provider(&self) -> &Arc<Provider> {
        &self.provider
    }
}

/// A provider slot held for the life of a relay; dropping it gives the slot back (and
/// wakes requests queued for capacity).
pub struct Slot {
    capacity: Arc<Capacity>,
    provider: Arc<Provider>,
    /// The Redis lease, when the slot is shared.
    lease: Option<String>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let load = &self.provider.load;
        load.in_flight.fetch_sub(1, Ordering::AcqRel);
        if let (Some(member), Some(shared)) = (self.lease.take(), &self.capacity.shared) {
            let _ = load.fleet_in_flight.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(1)));
            if let Some(set) = self.capacity.leases.lock().get_mut(&self.provider.id) {
                set.remove(&member);
            }
            let key = format!("{}{}", shared.prefix, self.provider.id);
            let mut conn = shared.conn.clone();
            // A lease Redis does not hear about expires after `LEASE`.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let removed: Result<i64, _> = redis::cmd("ZREM").arg(key).arg(member).query_async(&mut conn).await;
                    if let Err(e) = removed {
                        tracing::debug!(error = %e, "lease release did not reach Redis; it expires on its own");
                    }
                });
            }
        }
        self.capacity.freed.notify_waiters();
    }
}
