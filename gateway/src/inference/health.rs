//! Provider health as routing sees it: exponentially weighted success rate, TTFT,
//! uptime (active `/health` checks) and usage honesty, a score built from them, and a
//! circuit breaker (closed → open after consecutive failures → half-open probe after a
//! cool-down → closed on success).

use parking_lot::Mutex;
use serde::Serialize;

/// Weight of the newest observation in every average.
const ALPHA: f64 = 0.2;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    pub success: f64,
    pub latency: f64,
    pub uptime: f64,
    pub price: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Breaker {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug)]
struct State {
    success: f64,
    ttft_ms: Option<f64>,
    uptime: f64,
    honesty: f64,
    consecutive_failures: u32,
    breaker: Breaker,
    open_until_ms: i64,
    probe_in_flight: bool,
    requests: u64,
    failures: u64,
}

#[derive(Debug)]
pub struct Health {
    state: Mutex<State>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                success: 1.0,
                ttft_ms: None,
                uptime: 1.0,
                honesty: 1.0,
                consecutive_failures: 0,
                breaker: Breaker::Closed,
                open_until_ms: 0,
                probe_in_flight: false,
                requests: 0,
                failures: 0,
            }),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HealthSnapshot {
    pub success_rate: f64,
    pub ttft_ms: Option<f64>,
    pub uptime: f64,
    pub honesty: f64,
    pub breaker: Breaker,
    pub requests: u64,
    pub failures: u64,
}

fn ewma(old: f64, sample: f64) -> f64 {
    old + ALPHA * (sample - old)
}

impl Health {
    /// Whether the breaker lets a request through now (without taking a probe).
    pub fn available(&self, now_ms: i64) -> bool {
        let s = self.state.lock();
        match s.breaker {
            Breaker::Closed => true,
            Breaker::Open => now_ms >= s.open_until_ms,
            Breaker::HalfOpen => !s.probe_in_flight,
        }
    }

    /// Takes the right to send a request: in half-open state only one probe at a time.
    pub fn acquire(&self, now_ms: i64) -> bool {
        let mut s = self.state.lock();
        match s.breaker {
            Breaker::Closed => true,
            Breaker::Open if now_ms >= s.open_until_ms => {
                s.breaker = Breaker::HalfOpen;
                s.probe_in_flight = true;
                true
            }
            Breaker::Open => false,
            Breaker::HalfOpen if !s.probe_in_flight => {
                s.probe_in_flight = true;
                true
            }
            Breaker::HalfOpen => false,
        }
    }

    /// Gives back a probe taken by `acquire` for a request that was never sent.
    pub fn cancel_probe(&self) {
        self.state.lock().probe_in_flight = false;
    }

    pub fn record_success(&self, ttft_ms: f64) {
        let mut s = self.state.lock();
        s.requests += 1;
        s.success = ewma(s.success, 1.0);
        s.ttft_ms = Some(s.ttft_ms.map_or(ttft_ms, |t| ewma(t, ttft_ms)));
        s.consecutive_failures = 0;
        s.breaker = Breaker::Closed;
        s.probe_in_flight = false;
    }

    /// A failure from traffic; opens the breaker after `threshold` in a row (or at once
    /// when a half-open probe fails).
    pub fn record_failure(&self, now_ms: i64, threshold: u32, cooldown_ms: i64) {
        let mut s = self.state.lock();
        s.requests += 1;
        s.failures += 1;
        s.success = ewma(s.success, 0.0);
        s.consecutive_failures += 1;
        if s.breaker == Breaker::HalfOpen || s.consecutive_failures >= threshold {
            s.breaker = Breaker::Open;
            s.open_until_ms = now_ms + cooldown_ms;
            s.probe_in_flight = false;
        }
    }

    /// An active `/health` check.
    pub fn record_check(&self, ok: bool) {
        let mut s = self.state.lock();
        s.uptime = ewma(s.uptime, if ok { 1.0 } else { 0.0 });
    }

    /// A usage report that was plausible (`true`) or over-reported (`false`).
    pub fn record_honesty(&self, honest: bool) {
        let mut s = self.state.lock();
        s.honesty = ewma(s.honesty, if honest { 1.0 } else { 0.0 });
    }

    /// A score in [0, 1]. `price_score` is 1 for the cheapest eligible provider;
    /// `best_ttft_ms` is the fastest eligible provider's TTFT, so latency is relative
    /// (with 50 ms of slack so jitter between fast providers does not count).
    pub fn score(&self, weights: &Weights, price_score: f64, best_ttft_ms: f64) -> f64 {
        let s = self.state.lock();
        // A provider not measured yet counts as fast, so new providers get tried.
        let latency = s.ttft_ms.map_or(1.0, |t| ((best_ttft_ms + 50.0) / (t + 50.0)).min(1.0));
        let total = weights.success + weights.latency + weights.uptime + weights.price;
        let raw = weights.success * s.success + weights.latency * latency + weights.uptime * s.uptime + weights.price * price_score;
        (raw / total.max(f64::EPSILON)) * s.honesty
    }

    pub fn snapshot(&self) -> HealthSnapshot {
        let s = self.state.lock();
        HealthSnapshot {
            success_rate: s.success,
            ttft_ms: s.ttft_ms,
            uptime: s.uptime,
            honesty: s.honesty,
            breaker: s.breaker,
            requests: s.requests,
            failures: s.failures,
        }
    }

    pub fn ttft_ms(&self) -> Option<f64> {
        self.state.lock().ttft_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_probes_and_closes() {
        let h = Health::default();
        for _ in 0..3 {
            assert!(h.acquire(0));
            h.record_failure(0, 3, 1_000);
        }
        assert_eq!(h.snapshot().breaker, Breaker::Open);
        assert!(!h.available(500) && !h.acquire(500));
        assert!(h.acquire(1_000), "a probe after the cool-down");
        assert!(!h.acquire(1_001), "only one probe at a time");
        h.record_failure(1_002, 3, 1_000);
        assert_eq!(h.snapshot().breaker, Breaker::Open, "a failed probe reopens at once");
        assert!(h.acquire(2_100));
        h.record_success(100.0);
        assert_eq!(h.snapshot().breaker, Breaker::Closed);
    }

    #[test]
    fn score_prefers_fast_reliable_honest_cheap() {
        let w = Weights { success: 0.4, latency: 0.3, uptime: 0.2, price: 0.1 };
        let (good, slow, liar) = (Health::default(), Health::default(), Health::default());
        good.record_success(100.0);
        slow.record_success(5_000.0);
        liar.record_success(100.0);
        liar.record_honesty(false);
        assert!(good.score(&w, 1.0, 100.0) > slow.score(&w, 1.0, 100.0));
        assert!(good.score(&w, 1.0, 100.0) > liar.score(&w, 1.0, 100.0));
        assert!(good.score(&w, 1.0, 100.0) > good.score(&w, 0.2, 100.0));
        assert!((good.score(&w, 1.0, 100.0) - 1.0).abs() < 1e-9);
    }
}
