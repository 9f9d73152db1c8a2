use worker::chat::{ChatMessage, ChatTemplate};
use worker::engine::{generate_blocking, Engine, EngineConfig, Event, FinishReason, GenRequest, TokenLogprob};
use worker::quant::Precision;
use worker::sampling::SamplingParams;

use crate::model;

fn chat_prompt(user: &str) -> Vec<u32> {
    let m = model();
    let tpl = ChatTemplate::new(m.chat_template.as_deref().unwrap_or_default(), "", "");
    let text = match tpl.and_then(|t| t.render(&[ChatMessage::new("user", user)])) {
        Ok(t) => t,
        Err(e) => panic!("chat template: {e}"),
    };
    m.tokenizer.encode(&text)
}

#[test]
fn chat_template_inserts_the_default_system_prompt() {
    let m = model();
    let tpl = ChatTemplate::new(m.chat_template.as_deref().unwrap_or_default(), "", "").unwrap();
    let text = tpl.render(&[ChatMessage::new("user", "Hi")]).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn greedy_golden_answer() {
    let engine = Engine::start(model(), EngineConfig::default());
    let req = GenRequest {
        prompt: chat_prompt("What is the capital of France?"),
        params: SamplingParams { max_tokens: 40, ..Default::default() },
        priority: 0,
        precision: Precision::Exact,
    };
    let (text, done) = generate_blocking(&engine, req, |_| {});
    assert_eq!(text, "The capital of France is Paris.");
    assert!(matches!(done, Event::Done { reason: FinishReason::Stop, .. }), "{done:?}");
}

#[test]
fn max_tokens_gives_length_and_stop_text_is_not_emitted() {
    let engine = Engine::start(model(), EngineConfig::default());
    let prompt = chat_prompt("What is the capital of France?");
    let req = GenRequest { prompt: prompt.clone(), params: SamplingParams { max_tokens: 3, ..Default::default() }, priority: 0, precision: Precision::Exact };
    let (text, done) = generate_blocking(&engine, req, |_| {});
    assert_eq!(text, "The capital of");
    assert!(matches!(done, Event::Done { reason: FinishReason::Length, completion_tokens: 3, .. }), "{done:?}");
    // "ance" spans the token boundary inside " France".
    let params = SamplingParams { stop: vec!["ance".into()], ..Default::default() };
    let (text, done) = generate_blocking(&engine, GenRequest { prompt, params, priority: 0, precision: Precision::Exact }, |_| {});
    assert_eq!(text, "The capital of Fr");
    assert!(matches!(done, Event::Done { reason: FinishReason::Stop, .. }));
}

#[test]
fn seeded_sampling_is_identical_alone_and_in_a_batch() {
    let engine = Engine::start(model(), EngineConfig::default());
    let seeded = |seed| GenRequest {
        prompt: chat_prompt("Write a short poem about the sea."),
        params: SamplingParams { temperature: 0.9, top_p: 0.95, seed: Some(seed), max_tokens: 24, ..Default::default() },
        priority: 0,
        precision: Precision::Exact,
    };
    let (alone, _) = generate_blocking(&engine, seeded(42), |_| {});
    // The same request among 8 concurrent different ones.
    let others: Vec<_> = (0..7)
        .map(|i| {
            engine.submit(GenRequest {
                prompt: chat_prompt(&format!("Tell me fact number {i} about cats.")),
                params: SamplingParams { temperature: 1.0, seed: Some(i), max_tokens: 30, ..Default::default() },
                priority: 0,
                precision: Precision::Exact,
            })
        })
        .collect();
    let (batched, _) = generate_blocking(&engine, seeded(42), |_| {});
    drop(others);
    assert_eq!(alone, batched);
    let (other_seed, _) = generate_blocking(&engine, seeded(43), |_| {});
    assert_ne!(alone, other_seed);
}

#[test]
fn higher_priority_requests_are_served_first() {
    let engine = Engine::start(model(), EngineConfig { max_seqs: 1, ..Default::default() });
    let req = |priority, max_tokens| GenRequest {
        prompt: chat_prompt("Count to twenty."),
        params: SamplingParams { max_tokens, ..Default::default() },
        priority,
        precision: Precision::Exact,
    };
    let _running = engine.submit(req(0, 30));
    let mut low = engine.submit(req(0, 5));
    let mut high = engine.submit(req(10, 5));
    // The low-priority request only starts after the high-priority one has finished.
    while let Some(ev) = low.blocking_recv() {
        if matches!(ev, Event::Done { .. }) {
            break;
        }
    }
    let mut high_done = false;
    while let Ok(ev) = high.try_recv() {
        high_done |= matches!(ev, Event::Done { .. });
    }
    assert!(high_done, "the priority-10 request had not finished when the priority-0 one did");
}

/// The fused kernels differ from exact f32-on-dequantized-weights only in rounding:
/// every logit within 2e-3 (logits here span about ±30), and the same greedy answer.
#[test]
fn fast_kernels_match_exact_logits_within_tolerance() {
    let m = model();
    let prompt = chat_prompt("What is the capital of France?");
    let exact = prefill_and_decode_logits(&m.model, &prompt, Precision::Exact);
    let fast = prefill_and_decode_logits(&m.model, &prompt, Precision::Fast);
    for (e, f) in exact.iter().zip(fast.iter()) {
        let max_diff = max_abs_diff(e, f);
        assert!(max_diff < 2e-3, "max |exact - fast| = {max_diff}");
        assert_eq!(worker::sampling::argmax(e), worker::sampling::argmax(f));
    }
    let engine = Engine::start(m, EngineConfig::default());
    let req = GenRequest { prompt, params: SamplingParams { max_tokens: 40, ..Default::default() }, priority: 0, precision: Precision::Fast };
    assert_eq!(generate_blocking(&engine, req, |_| {}).0, "The capital of France is Paris.");
}

/// Runs a request to its end: its text and the logprobs of every token it sampled.
fn text_and_logprobs(engine: &Engine, req: GenRequest) -> (String, Vec<TokenLogprob>) {
    let mut rx = engine.submit(req);
    let (mut text, mut logprobs) = (String::new(), Vec::new());
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Logprob(lp) => logprobs.push(lp),
            Event::Done { .. } => break,
            Event::Error { message } => panic!("engine error: {message}"),
        }
    }
    (text, logprobs)
}

/// Precision is per request and a step runs exact when any sequence in it needs full
/// precision: a full-precision request batched with reduced-precision ones gets
/// bit-identical logprobs (and so tokens) to the same request alone. Its reduced twin
/// alone gets other logprobs, so a batch that ran the fast kernels would be caught.
#[test]
fn full_precision_request_is_identical_alone_and_batched_with_reduced_ones() {
    let engine = Engine::start(model(), EngineConfig { default_precision: Precision::Fast, ..Default::default() });
    let question = |precision| GenRequest {
        prompt: chat_prompt("What is the capital of France?"),
        params: SamplingParams { max_tokens: 12, logprobs: Some(5), ..Default::default() },
        priority: 0,
        precision,
    };
    let alone = text_and_logprobs(&engine, question(Precision::Exact));
    assert_eq!(alone.0, "The capital of France is Paris.");
    // Three reduced-precision requests that run for far longer than the question.
    let mut reduced: Vec<_> = (0..3)
        .map(|i| {
            engine.submit(GenRequest {
                prompt: chat_prompt(&format!("Tell me fact number {i} about cats.")),
                params: SamplingParams { max_tokens: 400, ignore_eos: true, ..Default::default() },
                priority: 0,
                precision: Precision::Fast,
            })
        })
        .collect();
    // Each has produced text, so all three are in the running batch.
    for rx in &mut reduced {
        loop {
            match rx.blocking_recv() {
                Some(Event::Text(_)) => break,
                Some(_) => {}
                None => panic!("a reduced request ended before its first text"),
            }
        }
    }
    let batched = text_and_logprobs(&engine, question(Precision::Exact));
    // None of them finished while the question ran: every step of it was a mixed batch.
    for rx in &mut reduced {
        while let Ok(ev) = rx.try_recv() {
            assert!(!matches!(ev, Event::Done { .. }), "a reduced request finished before the full one");
        }
    }
    drop(reduced);
    assert_eq!(alone, batched);
    let fast = text_and_logprobs(&engine, question(Precision::Fast));
    assert_eq!(fast.0, alone.0, "the same greedy answer");
    assert_ne!(fast.1, alone.1, "reduced precision runs other kernels");
}

/// Logits after a prefill of `prompt`, then after one decode step: both kernel shapes.
fn prefill_and_decode_logits(m: &worker::model::Model, prompt: &[u32], precision: Precision) -> [Vec<f32>; 2] {
    let mut cache = worker::native::new_cache(m);
    let mut items = [worker::forward::BatchItem { cache: &mut cache, tokens: prompt, want_logits: true, all_logits: false }];
    let a = worker::native::forward(m, &mut items, precision).unwrap().remove(0);
    let mut items = [worker::forward::BatchItem { cache: &mut cache, tokens: &[504], want_logits: true, all_logits: false }];
    let b = worker::native::forward(m, &mut items, precision).unwrap().remove(0);
    [a, b]
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}
