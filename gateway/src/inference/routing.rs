//! Provider selection: capability match (model, quality streams, precision, features,
//! reservations) → availability → power-of-two-choices on load.
//! Scoring (success rate, latency, uptime, price) comes with the routing issue.

use std::collections::HashMap;
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::Rng;

use crate::inference::health::Weights;
use crate::inference::providers::Provider;
use crate::inference::quality::{self, Precision, QualityLevel};

pub struct Candidates {
    /// Live providers that serve the model at the quality, meet its precision
    /// requirement and honour every feature.
    pub eligible: Vec<Arc<Provider>>,
    /// Some live provider serves the model at all (any quality or feature set).
    pub model_known: bool,
    /// A feature that no live provider serving the model honours.
    pub unsupported_feature: Option<&'static str>,
}

// The arguments are one request's routing inputs.
#[allow(clippy::too_many_arguments)]
pub fn candidates(
    providers: &HashMap<String, Arc<Provider>>,
    model: &str,
    qualities: &[&str],
    precision: Precision,
    features: &[&'static str],
    now_ms: i64,
    stale_after_ms: i64,
    reservation: Option<&str>,
) -> Candidates {
    let mut eligible = Vec::new();
    let mut model_known = false;
    let mut unsupported_feature = None;
    for p in providers.values() {
        if !p.is_live(now_ms, stale_after_ms) || !p.streams.iter().any(|(m, _)| m == model) {
            continue;
        }
        model_known = true;
        // A reserved provider serves only its reservation; a reservation only its provider.
        let reserved_for = p.reservation.as_ref().filter(|r| r.ends_at > now_ms).map(|r| r.id.as_str());
        if reserved_for != reservation {
            continue;
        }
        if !qualities.iter().any(|q| p.serves(model, q)) || !p.meets(precision) {
            continue;
        }
        if let Some(missing) = features.iter().find(|f| !p.supports(f)) {
            unsupported_feature.get_or_insert(*missing);
            continue;
        }
        eligible.push(p.clone());
    }
    if !eligible.is_empty() {
        unsupported_feature = None;
    }
    Candidates { eligible, model_known, unsupported_feature }
}

/// Live providers that serve `model` on `/v1/embeddings`. A provider under a
/// reservation serves only its reservation's chat requests.
pub fn embedding_candidates(providers: &HashMap<String, Arc<Provider>>, model: &str, now_ms: i64, stale_after_ms: i64) -> Candidates {
    let serving: Vec<&Arc<Provider>> = providers.values().filter(|p| p.is_live(now_ms, stale_after_ms) && p.embeds(model)).collect();
    let model_known = !serving.is_empty();
    let eligible = serving.into_iter().filter(|p| p.reservation.as_ref().is_none_or(|r| r.ends_at <= now_ms)).cloned().collect();
    Candidates { eligible, model_known, unsupported_feature: None }
}

fn utilisation(p: &Provider) -> f64 {
    f64::from(p.load.used()) / f64::from(p.load.limit(p.capabilities.max_concurrent_streams))
}

fn has_capacity(p: &Provider) -> bool {
    p.load.used() < p.load.limit(p.capabilities.max_concurrent_streams)
}

/// What a provider is compared against: the cheapest price and the best TTFT among
/// the candidates.
#[derive(Debug, Clone, Copy)]
pub struct Baseline {
    pub cheapest: i64,
    pub best_ttft_ms: f64,
}

impl Baseline {
    pub fn of<'a>(providers: impl Iterator<Item = &'a Arc<Provider>> + Clone) -> Self {
        Self {
            cheapest: providers.clone().map(|p| p.price_per_mtok).filter(|p| *p > 0).min().unwrap_or(1),
            best_ttft_ms: providers.filter_map(|p| p.load.health.ttft_ms()).fold(f64::INFINITY, f64::min).min(1e9),
        }
    }
}

/// A provider's health score against the baseline.
pub fn score(p: &Provider, weights: &Weights, base: &Baseline) -> f64 {
    let price_score = if p.price_per_mtok <= 0 { 1.0 } else { base.cheapest.max(1) as f64 / p.price_per_mtok as f64 };
    let best = if base.best_ttft_ms.is_finite() { base.best_ttft_ms } else { 0.0 };
    p.load.health.score(weights, price_score.min(1.0), best)
}

/// Providers within this fraction of the best weight compete for a request; the rest
/// only get traffic when the better ones are full.
const COMPETITIVE: f64 = 0.85;

/// Candidates scored per request: a random sample this large keeps selection O(1) in
/// the number of providers (1,000 providers cost what 16 do).
const SAMPLE: usize = 16;

/// Score-aware power of two choices: among (a random sample of) the providers with a
/// free slot, an open breaker, a score of at least `min_score`, and a weight (score ×
/// free capacity) close to the best, two random ones are compared and the heavier wins.
pub fn pick(eligible: &[Arc<Provider>], exclude: &[String], weights: &Weights, now_ms: i64, min_score: f64) -> Option<Arc<Provider>> {
    pick_with(&mut rand::thread_rng(), eligible, exclude, weights, now_ms, min_score)
}

/// `pick` with the caller's random source (a seeded one makes routing reproducible:
/// `routing_seed`).
pub fn pick_with(
    rng: &mut dyn rand::RngCore,
    eligible: &[Arc<Provider>],
    exclude: &[String],
    weights: &Weights,
    now_ms: i64,
    min_score: f64,
) -> Option<Arc<Provider>> {
    let mut open: Vec<&Arc<Provider>> = eligible
        .iter()
        .filter(|p| has_capacity(p) && !exclude.contains(&p.id) && p.load.health.available(now_ms))
        .collect();
    if open.len() > SAMPLE {
        let (sample, _) = open.partial_shuffle(rng, SAMPLE);
        open = sample.to_vec();
    }
    let base = Baseline::of(open.iter().copied());
    let mut weighted: Vec<(&Arc<Provider>, f64)> = open
        .iter()
        .map(|p| (*p, score(p, weights, &base)))
        .filter(|(_, s)| *s >= min_score)
        .map(|(p, s)| (p, s * (1.0 - utilisation(p)).max(0.0)))
        .collect();
    while !weighted.is_empty() {
        let best = weighted.iter().map(|(_, w)| *w).fold(0.0, f64::max);
        let contenders: Vec<usize> = (0..weighted.len()).filter(|i| weighted[*i].1 >= best * COMPETITIVE).collect();
        let choice = if contenders.len() == 1 {
            contenders[0]
        } else {
            let a = contenders[rng.gen_range(0..contenders.len())];
            let mut b = contenders[rng.gen_range(0..contenders.len() - 1)];
            if b == a {
                b = contenders[contenders.len() - 1];
            }
            if weighted[a].1 >= weighted[b].1 { a } else { b }
        };
        // A half-open breaker admits one probe; losing that race means try another.
        if weighted[choice].0.load.health.acquire(now_ms) {
            return Some(weighted[choice].0.clone());
        }
        weighted.swap_remove(choice);
    }
    None
}

/// Whether any eligible provider is merely busy (so waiting for a slot can help).
pub fn all_busy(eligible: &[Arc<Provider>], exclude: &[String]) -> bool {
    eligible.iter().any(|p| !exclude.contains(&p.id) && !has_capacity(p))
}

/// The stream qualities that can serve a level: its own, and `standard` for custom levels.
pub fn serve_on(level: &crate::inference::quality::QualityLevel) -> Vec<&str> {
    if level.custom { vec![level.name.as_str(), "standard"] } else { vec![level.name.as_str()] }
}

/// How far a request may step down from the level it asked for (`quality_fallback`,
/// `max_latency_ms`), and whether it named that level.
pub struct Ladder {
    pub fallback: bool,
    pub max_latency_ms: Option<u64>,
    pub explicit: bool,
}

/// The level a request is served at and the providers that may serve it. Computed once
/// per request, here, and handed to the relay in its `Dispatch`.
pub struct Route {
    pub level: QualityLevel,
    pub candidates: Candidates,
}

/// Chooses the level: the one asked for, or with a ladder the highest one that has an
/// eligible provider (meeting the level's minimum score) expected within the latency
/// budget. Its candidates are the capability match; the minimum score applies again
/// when the relay picks.
// The arguments are one request's routing inputs.
#[allow(clippy::too_many_arguments)]
pub fn route(
    providers: &HashMap<String, Arc<Provider>>,
    model: &str,
    asked: QualityLevel,
    ladder: &Ladder,
    features: &[&'static str],
    reservation: Option<&str>,
    now_ms: i64,
    stale_after_ms: i64,
    weights: &Weights,
) -> Route {
    let at = |level: &QualityLevel| {
        candidates(providers, model, &serve_on(level), level.precision, features, now_ms, stale_after_ms, reservation)
    };
    let asked_route = |asked: QualityLevel| Route { candidates: at(&asked), level: asked };
    if !ladder.fallback && ladder.max_latency_ms.is_none() {
        return asked_route(asked);
    }
    let top = if ladder.explicit || asked.custom { asked.clone() } else { quality::builtin("ultra").unwrap_or_else(|| asked.clone()) };
    let mut levels = vec![top.clone()];
    if let Some(i) = quality::BUILTIN.iter().position(|n| *n == top.name) {
        levels.extend(quality::BUILTIN[..i].iter().rev().filter_map(|n| quality::builtin(n)));
    } else {
        levels.extend(quality::BUILTIN.iter().rev().filter_map(|n| quality::builtin(n)).filter(|l| l.multiplier < top.multiplier));
    }
    for level in levels {
        let found = at(&level);
        let base = Baseline::of(found.eligible.iter());
        let viable: Vec<&Arc<Provider>> =
            found.eligible.iter().filter(|p| level.min_score <= 0.0 || score(p, weights, &base) >= level.min_score).collect();
        if viable.is_empty() {
            if ladder.fallback || !ladder.explicit {
                continue;
            }
            return asked_route(asked);
        }
        if let Some(budget) = ladder.max_latency_ms {
            let best = viable.iter().filter_map(|p| p.load.health.ttft_ms()).fold(f64::INFINITY, f64::min);
            let expected = if best.is_finite() { best * level.latency_multiplier } else { 0.0 };
            if expected > budget as f64 {
                continue;
            }
        }
        return Route { level, candidates: found };
    }
    asked_route(asked)
}

/// Each model's requests and how many of them went to providers on probation, so
/// that while a trusted provider serves a model, providers on probation get at most
/// `probation_max_share` of its requests (counted on this replica).
#[derive(Default)]
pub struct Probation {
    models: parking_lot::Mutex<HashMap<String, (u64, u64)>>,
}

impl Probation {
    /// The providers this request's first pick is made from: all of them unless the
    /// eligible ones mix trusted providers and providers on probation; then the
    /// providers on probation while they are under their share, else the trusted ones.
    pub fn first_pool(&self, model: &str, eligible: &[Arc<Provider>], share: f64) -> Option<Vec<Arc<Provider>>> {
        // The common case (no provider on probation, or only such) allocates nothing.
        let on_probation = eligible.iter().filter(|p| p.probation_left > 0).count();
        if on_probation == 0 || on_probation == eligible.len() {
            return None;
        }
        let (trial, trusted): (Vec<_>, Vec<_>) = eligible.iter().cloned().partition(|p| p.probation_left > 0);
        if trial.is_empty() || trusted.is_empty() {
            return None;
        }
        let mut models = self.models.lock();
        let counts = match models.get_mut(model) {
            Some(c) => c,
            None => models.entry(model.to_owned()).or_default(),
        };
        counts.0 += 1;
        #[allow(clippy::cast_precision_loss)]
        let allowed = (counts.1 + 1) as f64 <= share * counts.0 as f64;
        Some(if allowed { trial } else { trusted })
    }

    /// A provider on probation was sent one of `model`'s requests.
    pub fn served(&self, model: &str) {
        if let Some(counts) = self.models.lock().get_mut(model) {
            counts.1 += 1;
        }
    }
}
