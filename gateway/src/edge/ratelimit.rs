//! Rate limits, checked and charged here only: GCRA (the generic cell rate algorithm, as
//! in the `governor` crate) per key for requests/min (`admit`, from the edge's key check)
//! and tokens/min (`RateCtx::charge_tokens`, from the relay once the estimate is known;
//! `TokenCharge::settle` refunds the difference), and per client IP on unauthenticated
//! endpoints (`limit_by_ip`).
//! State lives in this process, or in Redis (`redis_url`) so several replicas enforce
//! one limit; the Redis variant runs the same algorithm atomically in a Lua script on
//! Redis's clock. While Redis cannot be reached (an error, or no answer within 500 ms)
//! each replica enforces `limit ÷ live replicas` in process, logs it once, and goes
//! back to Redis on its next answer.
//!
//! We implement GCRA here rather than use `governor` because token limits must be
//! corrected after the fact (estimated up front from the prompt size and `max_tokens`,
//! refunded when fewer tokens were used), every key has its own quota, and the state
//! must be shareable through Redis; governor supports none of the three.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;

use crate::edge::error::ApiError;
use crate::edge::keys::{AuthedKey, Tier};
use crate::ops::config::Config;

const PERIOD_US: i64 = 60_000_000;

/// What a limit said about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    /// Until the limit is fully replenished.
    pub reset: Duration,
    /// When denied: the wait until this request would be allowed.
    pub retry_after: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("rate limit store: {0}")]
    Redis(#[from] redis::RedisError),
}

enum Backend {
    Memory,
    Redis(redis::aio::ConnectionManager, redis::Script),
}

pub struct Limiter {
    backend: Backend,
    prefix: String,
    /// The in-process state (the Redis variant's fallback).
    memory: Mutex<HashMap<String, i64>>,
    /// Live replicas (`ops::replicas`): while Redis is away each enforces its share.
    replicas: std::sync::atomic::AtomicU32,
    redis_down: std::sync::atomic::AtomicBool,
}


/// The GCRA step on a theoretical arrival time `tat` (µs): consume `n` of `limit` per
/// minute at `now`. Returns the decision and the new TAT when allowed. `n` may be
/// negative to refund.
fn gcra(tat: i64, now: i64, n: i64, limit: u64) -> (Decision, Option<i64>) {
    let limit_i = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
    let t = PERIOD_US / limit_i;
    let tat = tat.max(now);
    let new_tat = (tat + n * t).max(now);
    let usage_after = new_tat - now;
    let decision = |allowed: bool, used: i64, retry: i64| Decision {
        allowed,
        limit,
        remaining: u64::try_from((PERIOD_US - used).max(0) / t.max(1)).unwrap_or(0).min(limit),
        reset: Duration::from_micros(u64::try_from(used.max(0)).unwrap_or(0)),
        retry_after: Duration::from_micros(u64::try_from(retry.max(0)).unwrap_or(0)),
    };
    if usage_after > PERIOD_US {
        return (decision(false, tat - now, usage_after - PERIOD_US), None);
    }
    (decision(true, usage_after, 0), Some(new_tat))
}

const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local n = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local period = 60000000
local step = math.floor(period / limit)
if tat < now then tat = now end
local new = tat + n * step
if new < now then new = now end
if new - now > period then
  return {0, tat - now, new - now - period}
end
if n ~= 0 then
  redis.call('SET', KEYS[1], new, 'PX', math.ceil((new - now) / 1000) + 1000)
end
return {1, new - now, 0}
";

impl Limiter {
    pub fn memory() -> Self {
        Self {
            backend: Backend::Memory,
            prefix: String::new(),
            memory: Mutex::new(HashMap::new()),
            replicas: std::sync::atomic::AtomicU32::new(1),
            redis_down: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Limits shared through Redis, under `{prefix}rl:`.
    pub fn redis(manager: redis::aio::ConnectionManager, prefix: &str) -> Self {
        Self { backend: Backend::Redis(manager, redis::Script::new(SCRIPT)), prefix: format!("{prefix}rl:"), ..Self::memory() }
    }

    /// The live replicas, whose share of a limit each enforces while Redis is away.
    pub fn set_replicas(&self, n: u32) {
        self.replicas.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// GCRA on this process's state.
    fn in_memory(&self, key: &str, n: i64, limit: u64) -> Decision {
        let now = now_us();
        let mut map = self.memory.lock();
        let tat = map.get(key).copied().unwrap_or(0);
        let (decision, new_tat) = gcra(tat, now, n, limit);
        if let Some(t) = new_tat.filter(|_| n != 0) {
            map.insert(key.to_owned(), t);
        }
        if map.len() > 200_000 {
            map.retain(|_, tat| *tat > now);
        }
        decision
    }

    /// Consumes `n` units of `limit`/min for `key` (or refunds with a negative `n`;
    /// `n = 0` only reads).
    pub async fn apply(&self, key: &str, n: i64, limit: u64) -> Result<Decision, LimitError> {
        let limit = limit.max(1);
        match &self.backend {
            Backend::Memory => Ok(self.in_memory(key, n, limit)),
            Backend::Redis(manager, script) => {
                use std::sync::atomic::Ordering::Relaxed;
                let mut conn = manager.clone();
                let mut call = script.key(format!("{}{key}", self.prefix));
                call.arg(n).arg(limit);
                let (allowed, used, retry) = match crate::store::redis_answer(call.invoke_async::<(i64, i64, i64)>(&mut conn)).await {
                    Ok(answer) => {
                        if self.redis_down.swap(false, Relaxed) {
                            tracing::warn!("Redis answers again: rate limits are shared again");
                        }
                        answer
                    }
                    Err(error) => {
                        if !self.redis_down.swap(true, Relaxed) {
                            tracing::error!(%error, "Redis unreachable: each replica enforces limit ÷ replicas in process");
                        }
                        let share = (limit / u64::from(self.replicas.load(Relaxed).max(1))).max(1);
                        return Ok(self.in_memory(key, n, share));
                    }
                };
                let t = PERIOD_US / i64::try_from(limit).unwrap_or(i64::MAX).max(1);
                Ok(Decision {
                    allowed: allowed == 1,
                    limit,
                    remaining: u64::try_from((PERIOD_US - used).max(0) / t.max(1)).unwrap_or(0).min(limit),
                    reset: Duration::from_micros(u64::try_from(used.max(0)).unwrap_or(0)),
                    retry_after: Duration::from_micros(u64::try_from(retry.max(0)).unwrap_or(0)),
                })
            }
        }
    }
}

fn now_us() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_micros()).unwrap_or(i64::MAX)
}

/// OpenAI's duration format for reset headers: `1s`, `6m0s`, `250ms`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        let s = format!("{secs:.3}");
        return format!("{}s", s.trim_end_matches('0').trim_end_matches('.'));
    }
    let whole = d.as_secs();
    format!("{}m{}s", whole / 60, whole % 60)
}

/// A key's requests and tokens per minute: its own, else its tier's.
pub fn key_limits(config: &Config, key: &AuthedKey) -> (u64, u64) {
    let (rpm, tpm) = match key.tier {
        Tier::Free => (config.free_requests_per_minute, config.free_tokens_per_minute),
        Tier::Premium => (config.premium_requests_per_minute, config.premium_tokens_per_minute),
    };
    (u64::from(key.requests_per_minute.unwrap_or(rpm)), u64::from(key.tokens_per_minute.unwrap_or(tpm)))
}

/// Checks and charges one request against its key's requests per minute. Allowed or
/// not, the answer carries the request's `RateCtx` (for the response's headers); its
/// tokens are charged later, once the relay knows the estimate (`RateCtx::charge_tokens`).
pub async fn admit(limiter: &Arc<Limiter>, config: &Config, key: &AuthedKey) -> Result<Arc<RateCtx>, ApiError> {
    let (rpm, tpm) = key_limits(config, key);
    let requests = limiter.apply(&format!("k:{}:r", key.key_id), 1, rpm).await.map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Arc::new(RateCtx {
        requests,
        tokens: Mutex::new(None),
        tokens_key: format!("k:{}:t", key.key_id),
        tokens_limit: tpm,
        limiter: limiter.clone(),
    }))
}

/// The rate-limit state of one authenticated request, shared by the middleware (which
/// writes the headers) and the relay (which charges the token estimate).
pub struct RateCtx {
    pub requests: Decision,
    tokens: Mutex<Option<Decision>>,
    tokens_key: String,
    tokens_limit: u64,
    limiter: Arc<Limiter>,
}

impl RateCtx {
    /// The refusal when the request limit said no.
    pub fn refused(&self) -> Option<ApiError> {
        (!self.requests.allowed).then_some(ApiError::RateLimited { what: "requests", retry_after: self.requests.retry_after })
    }

    /// Charges a request's token estimate (prompt bytes / 4 + every completion token it
    /// may produce) before a provider is called; `TokenCharge::settle` corrects it.
    pub async fn charge_tokens(&self, estimate: u32) -> Result<TokenCharge, ApiError> {
        let d = self
            .limiter
            .apply(&self.tokens_key, i64::from(estimate), self.tokens_limit)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        *self.tokens.lock() = Some(d);
        if !d.allowed {
            return Err(ApiError::RateLimited { what: "tokens", retry_after: d.retry_after });
        }
        Ok(TokenCharge { limiter: self.limiter.clone(), key: self.tokens_key.clone(), limit: self.tokens_limit, estimate })
    }

    /// Writes OpenAI's `x-ratelimit-*` headers for both limits onto a response (the
    /// token limit read without charging when this request charged none).
    pub async fn write_headers(&self, response: &mut http::HeaderMap) {
        let tokens = self.tokens.lock().take();
        let tokens = match tokens {
            Some(d) => Some(d),
            None => self.limiter.apply(&self.tokens_key, 0, self.tokens_limit).await.ok(),
        };
        headers(response, "requests", &self.requests);
        if let Some(t) = tokens {
            headers(response, "tokens", &t);
        }
    }
}

/// A request's token estimate, charged up front.
pub struct TokenCharge {
    limiter: Arc<Limiter>,
    key: String,
    limit: u64,
    estimate: u32,
}

impl TokenCharge {
    /// Gives back what the estimate over-charged: all of it when `used` is 0.
    pub fn settle(self, used: u32) {
        let refund = i64::from(self.estimate.saturating_sub(used));
        if refund > 0 {
            tokio::spawn(async move {
                let _ = self.limiter.apply(&self.key, -refund, self.limit).await;
            });
        }
    }
}

/// Per client address on the unauthenticated doors (registration, top-ups, payout
/// webhooks), so they cannot be flooded; the state is the limiter and the per-minute limit.
pub async fn limit_by_ip(State((limiter, limit)): State<(Arc<Limiter>, u64)>, request: Request, next: Next) -> Response {
    // Provider-key routes (streams, heartbeats, payouts) are authenticated; only the
    // open doors are limited per IP.
    if !matches!(request.uri().path(), "/api/gpu/register" | "/api/payment/topup" | "/api/payment/payout-webhook") {
        return next.run(request).await;
    }
    let ip = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |c| c.0.ip().to_string());
    match limiter.apply(&format!("ip:{ip}"), 1, limit).await {
        Ok(d) if d.allowed => {
            let mut response = next.run(request).await;
            headers(response.headers_mut(), "requests", &d);
            response
        }
        Ok(d) => {
            let mut response = ApiError::RateLimited { what: "requests", retry_after: d.retry_after }.into_response();
            headers(response.headers_mut(), "requests", &d);
            response
        }
        Err(e) => ApiError::Internal(e.to_string()).into_response(),
    }
}

/// OpenAI's rate-limit headers for one limit (`requests` or `tokens`).
pub fn headers(headers: &mut http::HeaderMap, what: &str, d: &Decision) {
    let mut put = |name: String, value: String| {
        if let (Ok(n), Ok(v)) = (http::HeaderName::try_from(name), http::HeaderValue::try_from(value)) {
            headers.insert(n, v);
        }
    };
    put(format!("x-ratelimit-limit-{what}"), d.limit.to_string());
    put(format!("x-ratelimit-remaining-{what}"), d.remaining.to_string());
    put(format!("x-ratelimit-reset-{what}"), format_reset(d.reset));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_admits_the_limit_then_waits() {
        let now = 1_000_000_000;
        let mut tat = 0;
        for i in 0..10 {
            let (d, t) = gcra(tat, now, 1, 10);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 9 - i);
            tat = t.unwrap();
        }
        let (d, t) = gcra(tat, now, 1, 10);
        assert!(!d.allowed && t.is_none());
        assert_eq!(d.retry_after, Duration::from_secs(6), "one slot frees every 6 s");
        // Six seconds later exactly one more fits.
        let (d, _) = gcra(tat, now + 6_000_000, 1, 10);
        assert!(d.allowed);
        // A refund gives capacity back.
        let (d, t) = gcra(tat, now, -5, 10);
        assert!(d.allowed);
        assert_eq!(d.remaining, 5);
        assert!(t.unwrap() < tat);
        // More than the whole limit never fits.
        assert!(!gcra(0, now, 11, 10).0.allowed);
    }

    #[test]
    fn reset_format() {
        assert_eq!(format_reset(Duration::from_millis(250)), "250ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
    }
}
