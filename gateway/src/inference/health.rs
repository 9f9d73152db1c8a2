//! Provider health as routing sees it: exponentially weighted success rate, TTFT,
//! uptime (active `/health` checks) and usage honesty, a score built from them, and a
//! circuit breaker (closed → open after consecutive failures → half-open probe after a
//! cool-down → closed on success).
//!
//! Replicas share this state through Redis and keep it in the database:
//! `inference::fleet_health`.

use parking_lot::Mutex;
use serde::Serialize;

use crate::store::now_ms;

/// Weight of the newest observation in every average.
pub(crate) const ALPHA: f64 = 0.2;
/// Samples kept for the next sync at most (a sync that keeps failing drops the oldest).
const MAX_PENDING: usize = 1_024;

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
    /// Observations the fleet has not heard of yet (`None`: health is not shared).
    pending: Option<Vec<Sample>>,
}

/// One observation of a provider, as the fleet's script reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Sample {
    /// A request's first token after `ttft_ms`.
    Success { ttft_ms: f64 },
    /// A failed request or check; `probe` when it was the half-open probe.
    Failure { probe: bool, breaking: Breaking },
    /// An active `/health` check.
    Check(bool),
    /// A usage report, plausible or not.
    Honesty(bool),
}

impl Sample {
    /// The script's (kind, value) pair.
    pub(crate) fn wire(self) -> (&'static str, f64) {
        match self {
            Self::Success { ttft_ms } => ("s", ttft_ms),
            Self::Failure { probe: false, .. } => ("f", 0.0),
            Self::Failure { probe: true, .. } => ("p", 0.0),
            Self::Check(ok) => ("c", f64::from(u8::from(ok))),
            Self::Honesty(ok) => ("h", f64::from(u8::from(ok))),
        }
    }
}

/// The breaker's settings, which a failure needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Breaking {
    pub threshold: u32,
    pub cooldown_ms: i64,
}

impl State {
    /// Takes the score's inputs from the database or the fleet.
    fn set_inputs(&mut self, i: Inputs) {
        (self.success, self.ttft_ms, self.uptime, self.honesty, self.requests, self.failures) =
            (i.success, i.ttft_ms, i.uptime, i.honesty, i.requests, i.failures);
    }

    /// The one place a sample changes the state (the fleet's script does the same).
    fn apply(&mut self, sample: Sample, now_ms: i64) {
        match sample {
            Sample::Success { ttft_ms } => {
                self.requests += 1;
                self.success = ewma(self.success, 1.0);
                self.ttft_ms = Some(self.ttft_ms.map_or(ttft_ms, |t| ewma(t, ttft_ms)));
                self.consecutive_failures = 0;
                self.breaker = Breaker::Closed;
                self.probe_in_flight = false;
            }
            Sample::Failure { probe, breaking } => {
                self.requests += 1;
                self.failures += 1;
                self.success = ewma(self.success, 0.0);
                self.consecutive_failures += 1;
                if probe || self.consecutive_failures >= breaking.threshold {
                    self.breaker = Breaker::Open;
                    self.open_until_ms = now_ms + breaking.cooldown_ms;
                    self.probe_in_flight = false;
                }
            }
            Sample::Check(ok) => self.uptime = ewma(self.uptime, if ok { 1.0 } else { 0.0 }),
            Sample::Honesty(ok) => self.honesty = ewma(self.honesty, if ok { 1.0 } else { 0.0 }),
        }
    }
}

/// The inputs of the score, as persisted and as a new fleet entry is seeded with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Inputs {
    pub success: f64,
    pub ttft_ms: Option<f64>,
    pub uptime: f64,
    pub honesty: f64,
    pub requests: u64,
    pub failures: u64,
}

/// The fleet's state of one provider, as the script answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Shared {
    pub(crate) inputs: Inputs,
    pub(crate) consecutive_failures: u32,
    /// `None` while the breaker is closed; else how long it stays open (0: cooled down).
    pub(crate) open_for_ms: Option<i64>,
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
                pending: None,
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
        self.record(Sample::Success { ttft_ms }, now_ms());
    }

    /// A failure from traffic or a check; opens the breaker after `threshold` in a row
    /// (or at once when a half-open probe fails).
    pub fn record_failure(&self, now_ms: i64, breaking: Breaking) {
        let probe = self.state.lock().breaker == Breaker::HalfOpen;
        self.record(Sample::Failure { probe, breaking }, now_ms);
    }

    /// An active `/health` check.
    pub fn record_check(&self, ok: bool) {
        self.record(Sample::Check(ok), now_ms());
    }

    /// A usage report that was plausible (`true`) or over-reported (`false`).
    pub fn record_honesty(&self, honest: bool) {
        self.record(Sample::Honesty(honest), now_ms());
    }

    fn record(&self, sample: Sample, now_ms: i64) {
        let mut s = self.state.lock();
        s.apply(sample, now_ms);
        if let Some(pending) = &mut s.pending {
            if pending.len() >= MAX_PENDING {
                pending.remove(0);
            }
            pending.push(sample);
        }
    }

    /// The score's inputs now.
    pub fn inputs(&self) -> Inputs {
        let s = self.state.lock();
        Inputs { success: s.success, ttft_ms: s.ttft_ms, uptime: s.uptime, honesty: s.honesty, requests: s.requests, failures: s.failures }
    }

    /// Starts from persisted inputs (at start-up, before any traffic).
    pub(crate) fn restore(&self, i: Inputs) {
        let mut s = self.state.lock();
        s.set_inputs(i);
    }

    /// Keeps samples for the fleet from now on; returns those kept since the last call.
    pub(crate) fn take_pending(&self) -> Vec<Sample> {
        let mut s = self.state.lock();
        std::mem::take(s.pending.get_or_insert_with(Vec::new))
    }

    /// Puts samples back that did not reach the fleet (Redis did not answer).
    pub(crate) fn put_back(&self, mut samples: Vec<Sample>) {
        let mut s = self.state.lock();
        let pending = s.pending.get_or_insert_with(Vec::new);
        samples.append(pending);
        let over = samples.len().saturating_sub(MAX_PENDING);
        samples.drain(..over);
        *pending = samples;
    }

    /// Takes the fleet's state, then replays the samples this replica made since it
    /// sent its own.
    pub(crate) fn adopt(&self, fleet: &Shared) {
        let now = now_ms();
        let mut s = self.state.lock();
        s.set_inputs(fleet.inputs);
        s.consecutive_failures = fleet.consecutive_failures;
        match (fleet.open_for_ms, s.breaker) {
            // A probe of this replica is out: its answer decides here.
            (_, Breaker::HalfOpen) if s.probe_in_flight => {}
            (None, _) => {
                s.breaker = Breaker::Closed;
                s.probe_in_flight = false;
            }
            (Some(open_for), _) => {
                s.breaker = Breaker::Open;
                s.open_until_ms = now + open_for;
                s.probe_in_flight = false;
            }
        }
        let replay = s.pending.clone().unwrap_or_default();
        for sample in replay {
            s.apply(sample, now);
        }
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

    const BREAKING: Breaking = Breaking { threshold: 3, cooldown_ms: 1_000 };

    #[test]
    fn breaker_opens_probes_and_closes() {
        let h = Health::default();
        for _ in 0..3 {
            assert!(h.acquire(0));
            h.record_failure(0, BREAKING);
        }
        assert_eq!(h.snapshot().breaker, Breaker::Open);
        assert!(!h.available(500) && !h.acquire(500));
        assert!(h.acquire(1_000), "a probe after the cool-down");
        assert!(!h.acquire(1_001), "only one probe at a time");
        h.record_failure(1_002, BREAKING);
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
