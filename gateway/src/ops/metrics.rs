//! Prometheus metrics (`GET /metrics`, text format 0.0.4): HTTP requests and latency,
//! completions by outcome, tokens, TTFT, active and queued streams, provider health and
//! score, and ledger charges. Counters are atomics and histograms fixed-bucket arrays, so
//! recording costs a few atomic adds on the hot path.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;

/// Upper bounds in seconds.
const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0];

#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; 12],
    count: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add((seconds.max(0.0) * 1e6) as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// A gauge to render: name, help, and its values by label set (`""` for none).
pub type Gauge<'a> = (&'a str, &'a str, Vec<(String, f64)>);

#[derive(Default)]
pub struct Metrics {
    /// `(path, status code)` → requests.
    http: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub http_duration: Histogram,
    pub ttft: Histogram,
    /// Completed model requests by outcome (`ok`, `client_disconnected`, …).
    completions: Mutex<BTreeMap<&'static str, u64>>,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Micro-USD charged for tokens (users and ad revenue).
    pub charged_micros: AtomicU64,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct HttpTotals {
    pub requests: u64,
    pub client_errors: u64,
    pub server_errors: u64,
}

/// The paths we label by name; everything else is `other` (bounded label cardinality).
const PATHS: [&str; 13] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/models",
    "/api/llm/inference",
    "/api/llm/ws",
    "/api/gpu/register",
    "/api/gpu/heartbeat",
    "/api/gpu/stream/start",
    "/api/gpu/stream/stop",
    "/api/payment/withdraw",
    "/health",
    "/metrics",
];

impl Metrics {
    pub fn record_http(&self, path: &str, status: u16, seconds: f64) {
        let label = PATHS.iter().find(|p| **p == path).copied().unwrap_or_else(|| {
            if path.starts_with("/api/admin/") {
                "/api/admin/*"
            } else if path.starts_with("/v1/responses/") {
                "/v1/responses/*"
            } else {
                "other"
            }
        });
        *self.http.lock().entry((label, status)).or_default() += 1;
        self.http_duration.observe(seconds);
    }

    /// HTTP requests since start-up, and how many ended in 4xx and 5xx (the console's overview).
    pub fn http_totals(&self) -> HttpTotals {
        let mut t = HttpTotals::default();
        for ((_, status), n) in self.http.lock().iter() {
            t.requests += n;
            match status {
                400..=499 => t.client_errors += n,
                500..=599 => t.server_errors += n,
                _ => {}
            }
        }
        t
    }

    pub fn record_completion(&self, status: &'static str, prompt: u32, completion: u32, ttft_us: Option<u64>) {
        *self.completions.lock().entry(status).or_default() += 1;
        self.prompt_tokens.fetch_add(u64::from(prompt), Relaxed);
        self.completion_tokens.fetch_add(u64::from(completion), Relaxed);
        if let Some(us) = ttft_us {
            self.ttft.observe(us as f64 / 1e6);
        }
    }

    /// The whole exposition; `gauges` are rendered as given (name, help, labelled values).
    pub fn render(&self, gauges: &[Gauge<'_>]) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(out, "# HELP gs_http_requests_total HTTP requests by path and status.\n# TYPE gs_http_requests_total counter");
        for ((path, status), n) in self.http.lock().iter() {
            let _ = writeln!(out, "gs_http_requests_total{{path=\"{path}\",status=\"{status}\"}} {n}");
        }
        self.http_duration.render(&mut out, "gs_http_request_duration_seconds", "HTTP request latency (to the response head).");
        self.ttft.render(&mut out, "gs_time_to_first_token_seconds", "Time from request to the first token from the provider.");
        let _ = writeln!(out, "# HELP gs_completions_total Model requests by outcome.\n# TYPE gs_completions_total counter");
        for (status, n) in self.completions.lock().iter() {
            let _ = writeln!(out, "gs_completions_total{{status=\"{status}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP gs_tokens_total Tokens billed, by kind.\n# TYPE gs_tokens_total counter");
        let _ = writeln!(out, "gs_tokens_total{{kind=\"prompt\"}} {}", self.prompt_tokens.load(Relaxed));
        let _ = writeln!(out, "gs_tokens_total{{kind=\"completion\"}} {}", self.completion_tokens.load(Relaxed));
        let _ = writeln!(out, "# HELP gs_ledger_charged_usd_total USD charged for tokens (users and ad revenue).\n# TYPE gs_ledger_charged_usd_total counter");
        let _ = writeln!(out, "gs_ledger_charged_usd_total {}", self.charged_micros.load(Relaxed) as f64 / 1e6);
        for (name, help, values) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (labels, v) in values {
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {v}");
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {v}");
                }
            }
        }
        out
    }
}
