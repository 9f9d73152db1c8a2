//! A step that fails fails only the requests in it, with an OpenAI-shaped error, and
//! the worker keeps serving; `/health` says what computes.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::{json, Value};
use worker::engine::{generate_blocking, Engine, EngineConfig, Event, GenRequest};
use worker::forward::{BatchItem, DeviceInfo, Forward, KvCache, StepError};
use worker::model::Model;
use worker::native::{self, Native};
use worker::quant::Precision;
use worker::sampling::SamplingParams;
use worker::server::AppState;

use crate::{call, model};

/// The native forward pass, except that the next step after `fail` is set panics, as
/// a device running out of memory inside burn does.
#[derive(Default)]
struct Flaky {
    fail: AtomicBool,
}

impl Forward for Flaky {
    fn new_cache(&self, m: &Model) -> Option<KvCache> {
        Native.new_cache(m)
    }
    fn max_seq_len(&self, m: &Model) -> usize {
        Native.max_seq_len(m)
    }
    fn forward(&self, m: &Model, items: &mut [BatchItem<'_>], precision: Precision) -> Result<Vec<Vec<f32>>, StepError> {
        if self.fail.swap(false, SeqCst) {
            panic!("injected device failure: out of memory");
        }
        native::forward(m, items, precision)
    }
    fn device(&self) -> DeviceInfo {
        Native.device()
    }
}

fn question(stream: bool) -> Value {
    json!({"model": "smollm2-135m-instruct", "temperature": 0, "stream": stream,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
}

#[tokio::test]
async fn a_failed_step_is_an_openai_error_and_the_worker_keeps_serving() {
    let flaky = Arc::new(Flaky::default());
    let m = model();
    let id = m.default_model_id();
    let st = AppState::new(Engine::start_with(m, flaky.clone(), EngineConfig::default()), id);

    flaky.fail.store(true, SeqCst);
    let (status, text) = call(&st, "POST", "/v1/chat/completions", Some(question(false))).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["type"], "server_error");
    assert_eq!(v["error"]["code"], "engine_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("injected device failure"), "{text}");

    // Streaming: the stream ends with an error event and no `[DONE]`.
    flaky.fail.store(true, SeqCst);
    let (status, text) = call(&st, "POST", "/v1/chat/completions", Some(question(true))).await;
    assert_eq!(status, StatusCode::OK);
    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "engine_error", "{text}");
    assert!(!events.contains(&"[DONE]"));

    // The worker goes on serving.
    let (status, text) = call(&st, "POST", "/v1/chat/completions", Some(question(false))).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "The capital of France is Paris.");
    let (_, metrics) = call(&st, "GET", "/metrics", None).await;
    assert!(metrics.contains("worker_engine_failed_steps_total 2"), "{metrics}");
}

/// A request that is not in the failing step (queued behind a full batch) is served.
#[test]
fn a_failed_step_spares_requests_outside_it() {
    let flaky = Arc::new(Flaky::default());
    let m = model();
    let engine = Engine::start_with(m.clone(), flaky.clone(), EngineConfig { max_seqs: 1, ..Default::default() });
    let mut running = engine.submit(GenRequest {
        prompt: m.tokenizer.encode("Count to a hundred."),
        params: SamplingParams { max_tokens: 500, ignore_eos: true, ..Default::default() },
        priority: 0,
        precision: Precision::Exact,
    });
    // Running: it has produced text.
    while !matches!(running.blocking_recv(), Some(Event::Text(_))) {}
    let question = GenRequest { prompt: crate::burn::golden_prompts(&m).remove(0), params: SamplingParams { max_tokens: 40, ..Default::default() }, priority: 0, precision: Precision::Exact };
    let waiting = std::thread::spawn({
        let engine = engine.clone();
        move || generate_blocking(&engine, question, |_| {})
    });
    // Give the question time to be queued behind the running request, then fail a step.
    while engine.stats().queued.load(SeqCst) == 0 {
        std::thread::yield_now();
    }
    flaky.fail.store(true, SeqCst);
    let end = loop {
        match running.blocking_recv() {
            Some(Event::Text(_)) => {}
            other => break other,
        }
    };
    assert!(matches!(end, Some(Event::Error { .. })), "{end:?}");
    let (text, done) = waiting.join().unwrap();
    assert!(matches!(done, Event::Done { .. }), "{done:?}");
    assert_eq!(text, "The capital of France is Paris.");
    assert_eq!(engine.stats().failed_requests_total.load(SeqCst), 1);
}

#[tokio::test]
async fn health_says_what_computes() {
    let m = model();
    let id = m.default_model_id();
    let st = AppState::new(Engine::start(m, EngineConfig::default()), id);
    let (status, text) = call(&st, "GET", "/health", None).await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["backend"]["engine"], "native-cpu");
    assert_eq!(v["backend"]["kind"], "cpu");
    assert!(v["backend"]["memoryTotalMb"].as_u64().unwrap() > 0, "{text}");
    assert!(v["backend"]["memoryFreeMb"].as_u64().unwrap() > 0, "{text}");
    let info = worker::host::GpuInfo::from_device(&st.engine.forward.device());
    let sent = serde_json::to_value(&info).unwrap();
    assert_eq!(sent["backend"], "cpu", "registration never claims a GPU for the CPU path");
    assert_eq!(sent["engine"], "native-cpu");
    assert_eq!(sent["memoryMb"], v["backend"]["memoryTotalMb"]);
}
