//! The burn engine against the native exact path, on burn-ndarray (every build) and,
//! in `wgpu.rs`, on burn-wgpu over Mesa's lavapipe: the same checks run on both.

use std::sync::Arc;

use worker::backend::{open_burn, BurnDevice};
use worker::burn_model::{cache_layout, check_fits, kv_bytes_per_token, CacheConfig, Dtype, LoadError};
use worker::engine::{generate_blocking, Engine, EngineConfig, GenRequest};
use worker::forward::{BatchItem, Forward, KvCache};
use worker::model::{LoadedModel, Model};
use worker::native;
use worker::quant::Precision;
use worker::sampling::{argmax, SamplingParams};

use crate::model;

/// Largest allowed |burn - native exact| (and |batched - alone|) for any logit; logits
/// span about ±30.
pub const TOLERANCE: f32 = 1e-3;

/// The golden set: the three prompts of the numpy parity test, the chat question of
/// the golden answer, and two more shapes of text (code, a long chat turn).
pub fn golden_prompts(m: &LoadedModel) -> Vec<Vec<u32>> {
    let chat = |user: &str| {
        format!(
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        )
    };
    [
        chat("What is the capital of France?"),
        "The quick brown fox jumps over the lazy dog.".to_string(),
        "In 1969, Apollo 11 — café ☕ 東京".to_string(),
        chat("Write a haiku about the sea, then explain it in one sentence."),
        "fn main() {\n    let xs = vec![1, 2, 3];\n    println!(\"{}\", xs.len());\n}".to_string(),
        "Once upon a time".to_string(),
    ]
    .iter()
    .map(|t| m.tokenizer.encode(t))
    .collect()
}

/// Logits at every position of each prompt, each prompt prefilled in one chunk: all
/// prompts in the same step (`batched`, ragged lengths) or each in its own step. The
/// caches are returned for decoding on.
pub fn logits_per_position(f: &dyn Forward, m: &Model, prompts: &[Vec<u32>], batched: bool) -> (Vec<Vec<Vec<f32>>>, Vec<KvCache>) {
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| f.new_cache(m).expect("a free cache slot")).collect();
    let mut rows = Vec::new();
    if batched {
        let mut items: Vec<BatchItem<'_>> = caches
            .iter_mut()
            .zip(prompts)
            .map(|(cache, p)| BatchItem { cache, tokens: p, want_logits: false, all_logits: true })
            .collect();
        rows = f.forward(m, &mut items, Precision::Exact).unwrap();
    } else {
        for (cache, p) in caches.iter_mut().zip(prompts) {
            let mut items = [BatchItem { cache, tokens: p, want_logits: false, all_logits: true }];
            rows.extend(f.forward(m, &mut items, Precision::Exact).unwrap());
        }
    }
    assert_eq!(rows.len(), prompts.iter().map(Vec::len).sum::<usize>());
    let mut rows = rows.into_iter();
    let out = prompts.iter().map(|p| rows.by_ref().take(p.len()).collect()).collect();
    (out, caches)
}

/// One decode step of every sequence together (ragged lengths), each fed `next[i]`.
fn decode_step(f: &dyn Forward, m: &Model, caches: &mut [KvCache], next: &[u32]) -> Vec<Vec<f32>> {
    let mut items: Vec<BatchItem<'_>> = caches
        .iter_mut()
        .zip(next)
        .map(|(cache, t)| BatchItem { cache, tokens: std::slice::from_ref(t), want_logits: true, all_logits: false })
        .collect();
    f.forward(m, &mut items, Precision::Exact).unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

/// Every position of the golden set on `burn`, the six prompts prefilled together in
/// one step (ragged lengths), against the native exact path (bound and argmax); each
/// prompt prefilled alone against the batched step (bound); then three decode steps of
/// all six together (ragged caches, greedy tokens) against the native path; and a
/// step mixing a prefill chunk with decoding rows. Returns the worst differences
/// (native, batched) for the log.
pub fn check_against_native(burn: &dyn Forward, m: &LoadedModel) -> (f32, f32) {
    let prompts = golden_prompts(m);
    let (want, mut native_caches) = logits_per_position(&native::Native, &m.model, &prompts, false);
    let (batched, mut burn_caches) = logits_per_position(burn, &m.model, &prompts, true);
    let (single, _) = logits_per_position(burn, &m.model, &prompts, false);
    let (mut worst_native, mut worst_batched) = (0f32, 0f32);
    for (p, prompt) in prompts.iter().enumerate() {
        assert_eq!(batched[p].len(), prompt.len());
        for pos in 0..prompt.len() {
            let d = max_abs_diff(&want[p][pos], &batched[p][pos]);
            worst_native = worst_native.max(d);
            assert!(d <= TOLERANCE, "prompt {p} position {pos}: max |native - burn| = {d}");
            assert_eq!(argmax(&want[p][pos]), argmax(&batched[p][pos]), "prompt {p} position {pos}: argmax differs");
            let d = max_abs_diff(&single[p][pos], &batched[p][pos]);
            worst_batched = worst_batched.max(d);
            assert!(d <= TOLERANCE, "prompt {p} position {pos}: max |alone - batched| = {d}");
        }
    }
    let mut next: Vec<u32> = want.iter().map(|l| argmax(l.last().unwrap())).collect();
    for step in 0..3 {
        let w = decode_step(&native::Native, &m.model, &mut native_caches, &next);
        let g = decode_step(burn, &m.model, &mut burn_caches, &next);
        for (p, (w, g)) in w.iter().zip(&g).enumerate() {
            let d = max_abs_diff(w, g);
            worst_native = worst_native.max(d);
            assert!(d <= TOLERANCE, "prompt {p} decode step {step}: max |native - burn| = {d}");
            assert_eq!(argmax(w), argmax(g), "prompt {p} decode step {step}: argmax differs");
        }
        next = w.iter().map(|l| argmax(l)).collect();
    }
    drop(burn_caches);
    // A step that mixes a prefill chunk (prompt 0, all but its last token) with
    // single-token rows of two other sequences, then decodes all three together.
    let (a, b, c) = (&prompts[0], &prompts[1], &prompts[5]);
    let mut caches: Vec<KvCache> = (0..3).map(|_| burn.new_cache(&m.model).unwrap()).collect();
    let [ca, cb, cc] = &mut caches[..] else { unreachable!() };
    let mut items = [
        BatchItem { cache: &mut *cb, tokens: &b[..1], want_logits: true, all_logits: false },
        BatchItem { cache: &mut *ca, tokens: &a[..a.len() - 1], want_logits: true, all_logits: false },
        BatchItem { cache: &mut *cc, tokens: &c[..1], want_logits: false, all_logits: false },
    ];
    let mixed = burn.forward(&m.model, &mut items, Precision::Exact).unwrap();
    assert_eq!(mixed.len(), 2, "logits only for the items that want them");
    let d = max_abs_diff(&mixed[0], &want[1][0]);
    assert!(d <= TOLERANCE, "mixed step, decoding row: {d}");
    let d = max_abs_diff(&mixed[1], &want[0][a.len() - 2]);
    assert!(d <= TOLERANCE, "mixed step, last row of the prefill chunk: {d}");
    let mut items = [
        BatchItem { cache: ca, tokens: &a[a.len() - 1..], want_logits: true, all_logits: false },
        BatchItem { cache: cb, tokens: &b[1..3], want_logits: true, all_logits: false },
        BatchItem { cache: cc, tokens: &c[1..2], want_logits: true, all_logits: false },
    ];
    let next = burn.forward(&m.model, &mut items, Precision::Exact).unwrap();
    for (got, want) in next.iter().zip([&want[0][a.len() - 1], &want[1][2], &want[5][1]]) {
        let d = max_abs_diff(got, want);
        assert!(d <= TOLERANCE, "step after the mixed one: {d}");
    }
    (worst_native, worst_batched)
}

/// A greedy generation through the engine on `forward`: the golden answer.
pub fn golden_answer_through_the_engine(forward: Arc<dyn Forward>, cfg: EngineConfig) {
    let m = model();
    let prompt = golden_prompts(&m).remove(0);
    let engine = Engine::start_with(m, forward, cfg);
    let req = GenRequest { prompt, params: SamplingParams { max_tokens: 40, ..Default::default() }, priority: 0, precision: Precision::Exact };
    assert_eq!(generate_blocking(&engine, req, |_| {}).0, "The capital of France is Paris.");
}

/// A small f32 device cache: 16 slots of up to 256 tokens.
pub fn small_cache(m: &Model) -> CacheConfig {
    small_cache_in(m, Dtype::F32)
}

/// 16 slots of up to 256 tokens in `dtype`.
pub fn small_cache_in(m: &Model, dtype: Dtype) -> CacheConfig {
    CacheConfig { slots: 16, kv_budget_bytes: 16 * 256 * kv_bytes_per_token(&m.config, dtype), dtype, max_tensor_bytes: None }
}

#[test]
fn burn_on_ndarray_matches_native_exact_on_the_golden_set() {
    let m = model();
    let opened = open_burn(&m.model, BurnDevice::Ndarray, small_cache(&m.model)).unwrap();
    assert_eq!(opened.device.engine, "burn-ndarray");
    assert_eq!(opened.device.kind, "cpu");
    let (native, batched) = check_against_native(opened.forward.as_ref(), &m);
    eprintln!("burn-ndarray: worst |native - burn| {native}, worst |alone - batched| {batched}");
}

#[test]
fn burn_on_ndarray_gives_the_golden_answer_with_continuous_batching() {
    let m = model();
    let cache = small_cache(&m.model);
    let opened = open_burn(&m.model, BurnDevice::Ndarray, cache).unwrap();
    // The context the engine offers is the cache slot, not the model's 8192.
    let engine = Engine::start_with(m.clone(), opened.forward.clone(), EngineConfig { max_seqs: cache.slots, ..Default::default() });
    assert_eq!(engine.context_length(), 256);
    drop(engine);
    golden_answer_through_the_engine(opened.forward.clone(), EngineConfig { max_seqs: cache.slots, ..Default::default() });
    // Eight concurrent greedy requests, more than the slots' worth of prefill budget
    // per step (chunked prefill), against each one alone on the native path.
    let engine = Engine::start_with(m.clone(), opened.forward, EngineConfig { max_seqs: cache.slots, prefill_chunk: 16, ..Default::default() });
    let native = Engine::start(m.clone(), EngineConfig::default());
    let prompts = golden_prompts(&m);
    let req = |prompt: &Vec<u32>| GenRequest {
        prompt: prompt.clone(),
        params: SamplingParams { max_tokens: 12, ignore_eos: true, ..Default::default() },
        priority: 0,
        precision: Precision::Exact,
    };
    let rxs: Vec<_> = prompts.iter().map(|p| engine.submit(req(p))).collect();
    for (p, mut rx) in prompts.iter().zip(rxs) {
        let mut text = String::new();
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                worker::engine::Event::Text(t) => text.push_str(&t),
                worker::engine::Event::Done { .. } => break,
                worker::engine::Event::Error { message } => panic!("{message}"),
                worker::engine::Event::Logprob(_) => {}
            }
        }
        assert_eq!(text, generate_blocking(&native, req(p), |_| {}).0);
    }
}

#[test]
fn a_model_that_does_not_fit_is_refused_with_the_sizes() {
    let m = model();
    let cache = small_cache(&m.model);
    let err = check_fits(&m.model, cache, "test device", Some(100)).unwrap_err();
    let text = err.to_string();
    let LoadError::DoesNotFit { needed_mb, weights_mb, kv_mb, free_mb, .. } = err else { panic!("{text}") };
    // f32 weights of SmolLM2-135M (134.5 M parameters) and 16 × 256 tokens of cache.
    // (The tied output head is a second, transposed copy of the embedding.)
    assert!((600..640).contains(&weights_mb), "{text}");
    assert_eq!(kv_mb, 180, "{text}");
    assert_eq!((needed_mb, free_mb), (weights_mb + kv_mb, 100));
    assert!(text.contains(&format!("needs {needed_mb} MiB")) && text.contains("but 100 MiB is free"), "{text}");
    assert!(check_fits(&m.model, cache, "test device", Some(needed_mb)).is_ok());
    // In bf16 the same weights and cache take half the bytes.
    let LoadError::DoesNotFit { weights_mb: half_weights, kv_mb: half_kv, dtype, .. } =
        check_fits(&m.model, small_cache_in(&m.model, Dtype::Bf16), "test device", Some(100)).unwrap_err()
    else {
        panic!("bf16 fits in 100 MiB?")
    };
    assert_eq!((half_weights, half_kv, dtype), (weights_mb.div_ceil(2), kv_mb / 2, "bf16"));
    // Through the real load: a cache far larger than this machine's memory.
    let huge = CacheConfig { slots: 100_000, kv_budget_bytes: usize::MAX / 4, dtype: Dtype::F32, max_tensor_bytes: None };
    let err = open_burn(&m.model, BurnDevice::Ndarray, huge).err().expect("refused");
    assert!(err.to_string().contains("does not fit") && err.to_string().contains("MiB is free"), "{err}");
}

#[test]
fn a_device_binding_limit_shortens_the_cache_slots_and_refuses_a_weight_beyond_it() {
    let m = model();
    let cfg = &m.model.config;
    // Unlimited: 16 slots of 256 tokens. Limited to 1 MiB per cache tensor: each layer's
    // [16 × slot_len, kv_dim] f32 keys fit in it (85 tokens a slot).
    let cache = small_cache(&m.model);
    assert_eq!(cache_layout(cfg, cache).unwrap().0, 256);
    let limited = CacheConfig { max_tensor_bytes: Some(1 << 20), ..cache };
    let (slot_len, _) = cache_layout(cfg, limited).unwrap();
    assert_eq!(slot_len, (1 << 20) / (16 * cfg.kv_dim() * 4));
    assert!(slot_len * 16 * cfg.kv_dim() * 4 <= 1 << 20 && slot_len < 256);
    // The f32 embedding (49152 × 576) is over 100 MiB: refused by name, with both sizes.
    let tight = CacheConfig { slots: 1, max_tensor_bytes: Some(64 << 20), ..cache };
    let err = check_fits(&m.model, tight, "test adapter", None).unwrap_err().to_string();
    assert!(err.contains("the token embedding (108 MiB in f32) exceeds the largest buffer test adapter can bind (64 MiB)"), "{err}");
    let half = CacheConfig { dtype: Dtype::F16, ..tight };
    assert!(check_fits(&m.model, half, "test adapter", None).is_ok());
}

#[test]
fn burn_ndarray_refuses_half_types_by_name() {
    let m = model();
    for dtype in [Dtype::Bf16, Dtype::F16] {
        let err = open_burn(&m.model, BurnDevice::Ndarray, small_cache_in(&m.model, dtype)).err().expect("refused");
        let text = err.to_string();
        assert!(text.contains(&format!("--dtype {} is not supported by", dtype.name())) && text.contains("use --dtype f32"), "{text}");
    }
}

/// Three choices of one greedy request (`n = 3`): the further choices start from a
/// copy of the first one's prompt cache, so all three are the request's answer alone.
pub fn choices_start_from_the_copied_prompt_cache(forward: Arc<dyn Forward>, cfg: EngineConfig) {
    let m = model();
    let prompt = golden_prompts(&m).pop().unwrap();
    let engine = Engine::start_with(m, forward, cfg);
    let req = || GenRequest {
        prompt: prompt.clone(),
        params: SamplingParams { max_tokens: 10, ignore_eos: true, ..Default::default() },
        priority: 0,
        precision: Precision::Exact,
    };
    let alone = generate_blocking(&engine, req(), |_| {}).0;
    for mut rx in engine.submit_choices(req(), vec![None, None, None]) {
        let mut text = String::new();
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                worker::engine::Event::Text(t) => text.push_str(&t),
                worker::engine::Event::Done { completion_tokens, .. } => {
                    assert_eq!(completion_tokens, 10);
                    break;
                }
                worker::engine::Event::Error { message } => panic!("{message}"),
                worker::engine::Event::Logprob(_) => {}
            }
        }
        assert_eq!(text, alone);
    }
}

#[test]
fn burn_on_ndarray_n_choices_share_the_prompt_cache() {
    let m = model();
    let cache = small_cache(&m.model);
    let opened = open_burn(&m.model, BurnDevice::Ndarray, cache).unwrap();
    // A prompt longer than a prefill chunk: the copy happens after the last chunk.
    choices_start_from_the_copied_prompt_cache(opened.forward, EngineConfig { max_seqs: cache.slots, prefill_chunk: 16, ..Default::default() });
    choices_start_from_the_copied_prompt_cache(Arc::new(native::Native), EngineConfig { prefill_chunk: 16, ..Default::default() });
}
