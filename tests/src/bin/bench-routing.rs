//! Provider selection cost per request: capability match, score filter and the
//! score-aware power of two choices, over 10 and 1,000 registered providers (a quarter
//! of them serving another model, some busy, varied health).
//! `cargo run --release -p tests --bin bench-routing`

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use gateway::ops::config::Config;
use gateway::inference::providers::{Load, Provider, ProviderStatus};
use gateway::inference::quality;
use gateway::inference::routing;
use openapi::platform::{Capabilities, Precision, Pricing};

fn provider(i: usize, now: i64) -> Arc<Provider> {
    let model = if i % 4 == 3 { "other-model" } else { "bench-model" };
    let load = Arc::new(Load::default());
    load.last_heartbeat_ms.store(now, Ordering::Relaxed);
    load.in_flight.store(u32::try_from(i % 5).unwrap_or(0), Ordering::Relaxed);
    load.health.record_success(20.0 + (i % 7) as f64 * 15.0);
    if i % 11 == 0 {
        load.health.record_failure(now, gateway::inference::health::Breaking { threshold: 3, cooldown_ms: 10_000 });
    }
    let mut streams = HashSet::new();
    for q in ["low", "standard", "high", "ultra"] {
        streams.insert((model.to_owned(), q.to_owned()));
    }
    Arc::new(Provider {
        id: format!("prov_{i}"),
        name: format!("p{i}"),
        base_url: format!("http://10.0.0.{}:8080", i % 250),
        connection: openapi::platform::Connection::Direct,
        link_elsewhere: None,
        status: ProviderStatus::Active,
        capabilities: Capabilities {
            models: vec![model.to_owned()],
            max_concurrent_streams: 8,
            supported_qualities: vec!["standard".into()],
            features: None,
            precisions: vec![Precision::Full, Precision::Reduced],
            http2: false,
            embedding_models: Vec::new(),
        },
        pricing: Pricing::usd(0.000_002, 0.5, 5.0),
        price_per_mtok: 2_000_000 + i64::try_from(i % 13).unwrap_or(0) * 100_000,
        gpu_info: serde_json::Value::Null,
        streams,
        features: None,
        created_at: now,
        load,
        reservation: None,
        key_hash: String::new(),
        probation_left: 0,
        status_reason: None,
    })
}

fn main() {
    let config = Config::default();
    let weights = config.weights();
    let now = gateway::store::now_ms();
    let mut out = String::from("| providers | level | selections | µs per selection (p50 of 5 runs) |\n|---:|---|---:|---:|\n");
    for n in [10usize, 1_000] {
        let providers: HashMap<String, Arc<Provider>> = (0..n).map(|i| (format!("prov_{i}"), provider(i, now))).collect();
        for level_name in ["standard", "ultra"] {
            let level = quality::builtin(level_name).unwrap_or_else(|| unreachable!());
            let iterations = if n == 10 { 200_000 } else { 5_000 };
            let mut runs = Vec::new();
            for _ in 0..5 {
                let start = Instant::now();
                let mut picked = 0usize;
                for _ in 0..iterations {
                    let found = routing::candidates(&providers, "bench-model", &routing::serve_on(&level), level.precision, &[], now, 90_000, None);
                    if routing::pick(&found.eligible, &[], &weights, now, level.min_score).is_some() {
                        picked += 1;
                    }
                }
                assert!(picked > 0);
                runs.push(start.elapsed().as_secs_f64() * 1e6 / iterations as f64);
            }
            runs.sort_by(f64::total_cmp);
            out.push_str(&format!("| {n} | {level_name} | {iterations} | {:.2} |\n", runs[2]));
        }
    }
    #[allow(clippy::print_stdout)]
    {
        println!("{out}");
    }
}
