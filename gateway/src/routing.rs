//! Provider selection: capability match → availability → power-of-two-choices on load.
//! Scoring (success rate, latency, uptime, price) comes with the routing issue.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rand::Rng;

use crate::providers::Provider;

pub struct Candidates {
    /// Live providers that serve the model at the quality and honour every feature.
    pub eligible: Vec<Arc<Provider>>,
    /// Some live provider serves the model at all (any quality or feature set).
    pub model_known: bool,
    /// A feature that no live provider serving the model honours.
    pub unsupported_feature: Option<&'static str>,
}

pub fn candidates(
    providers: &HashMap<String, Arc<Provider>>,
    model: &str,
    quality: &str,
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
        if !p.serves(model, quality) {
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

fn utilisation(p: &Provider) -> f64 {
    f64::from(p.load.in_flight.load(Ordering::Relaxed)) / f64::from(p.capabilities.max_concurrent_streams.max(1))
}

fn has_capacity(p: &Provider) -> bool {
    p.load.in_flight.load(Ordering::Relaxed) < p.capabilities.max_concurrent_streams
}

/// Power of two choices: two random providers with free capacity, the less loaded wins.
pub fn pick(eligible: &[Arc<Provider>], exclude: &[String]) -> Option<Arc<Provider>> {
    let open: Vec<&Arc<Provider>> =
        eligible.iter().filter(|p| has_capacity(p) && !exclude.contains(&p.id)).collect();
    match open.len() {
        0 => None,
        1 => Some(open[0].clone()),
        n => {
            let mut rng = rand::thread_rng();
            let a = rng.gen_range(0..n);
            let mut b = rng.gen_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (pa, pb) = (open[a], open[b]);
            Some(if utilisation(pa) <= utilisation(pb) { pa.clone() } else { pb.clone() })
        }
    }
}
