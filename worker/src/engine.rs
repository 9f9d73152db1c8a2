//! The scheduler: continuous batching over one model.
//!
//! Requests wait in a priority queue (higher `priority` first, then arrival order) and
//! join the running batch at step boundaries while the sequence limit and the KV-cache
//! budget allow. Each step runs one forward pass over every running sequence: one
//! token for those decoding, a chunk of prompt for those prefilling, so a long prompt
//! never stalls the others for more than a chunk. A request whose receiver is gone
//! (client disconnected) is dropped at the next step.
//!
//! A request for `n > 1` choices is prefilled once: when its prompt is in the KV
//! cache, the cache is copied into each further choice's (`Forward::copy_cache`) and
//! every choice samples its first token from the same logits, with its own seed (the
//! request's seed plus the choice's index) and its own grammar and channel.
//!
//! Precision is per request: a step runs `Exact` when any sequence in it needs full
//! precision, else `Fast`. Rows are independent of each other at one precision, so a
//! full-precision request gets the same results alone or batched with reduced ones
//! (which then run exact too, for those steps).
//!
//! The scheduler does not know which forward pass runs (`forward::Forward`: the native
//! CPU kernels or burn on a device). A step that fails (a backend error, or a panic
//! such as a device out of memory) fails the requests in it with `Event::Error`; the
//! others and the engine go on.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::forward::{BatchItem, Forward, KvCache};
use crate::model::LoadedModel;
use crate::native::Native;
use crate::quant::Precision;
use llguidance::Matcher;

use crate::sampling::{Sampler, SamplingParams, StopMatcher, StopOutcome};
use crate::tokenizer::Utf8Stream;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded together at most.
    pub max_seqs: usize,
    /// Bytes of KV cache that admitted sequences may reserve together.
    pub kv_budget_bytes: usize,
    /// Tokens per step spent on prompt processing (chunked prefill).
    pub prefill_chunk: usize,
    /// Precision of requests that do not name one (the server's `precision` field).
    pub default_precision: Precision,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { max_seqs: 32, kv_budget_bytes: 8 << 30, prefill_chunk: 256, default_precision: Precision::Exact }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// A sampled token's log-probability, with the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<(String, Vec<u8>, f32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Newly generated text (never a partial UTF-8 character, never stop text).
    Text(String),
    /// Sent before the text of each sampled token when the request asked for logprobs.
    Logprob(TokenLogprob),
    Done { reason: FinishReason, prompt_tokens: usize, completion_tokens: usize },
    /// The request failed in the engine (its step did not complete); nothing follows.
    Error { message: String },
}

pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub priority: i32,
    /// `Exact` (full precision) makes every step this request is in run exact.
    pub precision: Precision,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub active: AtomicUsize,
    pub queued: AtomicUsize,
    pub kv_reserved_bytes: AtomicUsize,
    pub requests_total: AtomicU64,
    pub prompt_tokens_total: AtomicU64,
    pub completion_tokens_total: AtomicU64,
    pub cancelled_total: AtomicU64,
    pub steps_total: AtomicU64,
    /// Steps that failed, and the requests they took with them.
    pub failed_steps_total: AtomicU64,
    pub failed_requests_total: AtomicU64,
    /// Requests accepted per queue priority (0..=10; the gateway maps quality tiers to it).
    pub requests_by_priority: [AtomicU64; 11],
    /// Requests accepted that need full precision (the gateway's high and ultra tiers).
    pub requests_full_precision: AtomicU64,
    /// Requests accepted that allow reduced precision.
    pub requests_reduced_precision: AtomicU64,
}

impl Stats {
    /// The counter of requests accepted at `precision`.
    pub fn requests_at(&self, precision: Precision) -> &AtomicU64 {
        match precision {
            Precision::Exact => &self.requests_full_precision,
            Precision::Fast => &self.requests_reduced_precision,
        }
    }
}

struct Queued {
    priority: i32,
    id: u64,
    req: GenRequest,
    /// One per choice (`n`), the first one's prefill shared by all.
    choices: Vec<Choice>,
}

/// What one choice of a request has of its own.
struct Choice {
    constraint: Option<Matcher>,
    events: UnboundedSender<Event>,
}

/// A further choice of an `n > 1` request, waiting for the first one's prefill.
struct Fork {
    cache: KvCache,
    sampler: Sampler,
    choice: Choice,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> Ordering {
        self.priority.cmp(&o.priority).then(o.id.cmp(&self.id))
    }
}

#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Queued>,
    next_id: u64,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    shutdown: AtomicBool,
    stats: Stats,
}

#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    pub model: Arc<LoadedModel>,
    /// The forward pass steps run (native CPU kernels, or burn on a device).
    pub forward: Arc<dyn Forward>,
    pub config: EngineConfig,
}

struct Seq {
    prompt: Vec<u32>,
    prefilled: usize,
    next: [u32; 1],
    generated: usize,
    max_tokens: usize,
    cache: KvCache,
    sampler: Sampler,
    utf8: Utf8Stream,
    stop: StopMatcher,
    /// The grammar its tokens must follow (`grammar`), when it asked for structure.
    constraint: Option<Matcher>,
    events: UnboundedSender<Event>,
    /// The request's other choices, which start when this one's prompt is cached.
    forks: Vec<Fork>,
    reserved: usize,
    finished: bool,
    precision: Precision,
}

impl Seq {
    /// A sequence for `choice` of a request, its prompt not yet computed.
    fn new(prompt: Vec<u32>, cache: KvCache, sampler: Sampler, choice: Choice, reserved: usize, precision: Precision) -> Seq {
        Seq {
            max_tokens: sampler.params().max_tokens,
            stop: StopMatcher::new(sampler.params().stop.clone()),
            sampler,
            prompt,
            prefilled: 0,
            next: [0],
            generated: 0,
            cache,
            utf8: Utf8Stream::default(),
            constraint: choice.constraint,
            events: choice.events,
            forks: Vec::new(),
            reserved,
            finished: false,
            precision,
        }
    }

    /// Every caller of the request (its choices waiting here included) is gone.
    fn abandoned(&self) -> bool {
        self.events.is_closed() && self.forks.iter().all(|f| f.choice.events.is_closed())
    }

    /// KV bytes reserved for it and the forks it still carries.
    fn reserved_with_forks(&self) -> usize {
        self.reserved * (1 + self.forks.len())
    }
}

/// What a caller hears when the engine failed its request.
fn engine_failed(detail: &str) -> Event {
    Event::Error { message: format!("The engine failed while generating this response: {detail}") }
}

/// Runs `f`, turning its error or panic (a device out of memory, say) into a message.
fn guarded<T>(f: impl FnOnce() -> Result<T, crate::forward::StepError>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(crate::backend::panic_message(panic.as_ref())),
    }
}

/// A sequence whose grammar failed (an llguidance error, not a refusal) ends with an
/// error; the others go on.
fn grammar_failed(s: &mut Seq, error: &str) {
    let _ = s.events.send(Event::Error { message: format!("The output grammar failed: {error}") });
    s.finished = true;
}

impl Engine {
    /// Starts an engine on the native CPU forward pass.
    pub fn start(model: Arc<LoadedModel>, config: EngineConfig) -> Engine {
        Engine::start_with(model, Arc::new(Native), config)
    }

    /// Starts an engine whose steps run on `forward`.
    pub fn start_with(model: Arc<LoadedModel>, forward: Arc<dyn Forward>, config: EngineConfig) -> Engine {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            stats: Stats::default(),
        });
        let engine = Engine { shared, model, forward, config };
        let runner = engine.clone();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || runner.run())
            .map(drop)
            .unwrap_or_else(|e| tracing::error!("cannot start engine thread: {e}"));
        engine
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Tokens a request may use in total (prompt plus completion): the model's
    /// context, or a device cache slot when that is shorter.
    pub fn context_length(&self) -> usize {
        self.model.model.config.context_length.min(self.forward.max_seq_len(&self.model.model))
    }

    /// Queues a request; events arrive on the returned receiver. Dropping the receiver
    /// cancels the request.
    pub fn submit(&self, req: GenRequest) -> UnboundedReceiver<Event> {
        self.submit_constrained(req, None)
    }

    /// Queues a request whose tokens must follow `constraint` (structured outputs):
    /// each step samples only among the tokens it allows.
    pub fn submit_constrained(&self, req: GenRequest, constraint: Option<Matcher>) -> UnboundedReceiver<Event> {
        let mut rxs = self.submit_choices(req, vec![constraint]);
        rxs.pop().unwrap_or_else(|| unbounded_channel().1)
    }

    /// Queues a request for `constraints.len()` choices (`n`), each with its grammar;
    /// each choice's events arrive on its own receiver. The prompt is computed once.
    /// Dropping the receivers cancels the request.
    pub fn submit_choices(&self, req: GenRequest, constraints: Vec<Option<Matcher>>) -> Vec<UnboundedReceiver<Event>> {
        let (choices, rxs): (Vec<Choice>, Vec<_>) = constraints
            .into_iter()
            .map(|constraint| {
                let (events, rx) = unbounded_channel();
                (Choice { constraint, events }, rx)
            })
            .unzip();
        if choices.is_empty() {
            return rxs;
        }
        let Ok(mut q) = self.shared.queue.lock() else { return rxs };
        let id = q.next_id;
        q.next_id += 1;
        let (req_priority, req_precision) = (req.priority, req.precision);
        tracing::info!(
            id,
            priority = req.priority,
            precision = req.precision.api_name(),
            max_tokens = req.params.max_tokens,
            temperature = req.params.temperature,
            n = choices.len(),
            "request queued"
        );
        q.heap.push(Queued { priority: req.priority, id, req, choices });
        self.shared.stats.queued.store(q.heap.len(), Relaxed);
        self.shared.stats.requests_total.fetch_add(1, Relaxed);
        let slot = usize::try_from(req_priority.clamp(0, 10)).unwrap_or(0);
        self.shared.stats.requests_by_priority[slot].fetch_add(1, Relaxed);
        self.shared.stats.requests_at(req_precision).fetch_add(1, Relaxed);
        drop(q);
        self.shared.wake.notify_one();
        rxs
    }

    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Relaxed);
        self.shared.wake.notify_all();
    }

    /// KV-cache bytes one choice of `req` may take.
    fn reserve_bytes(&self, req: &GenRequest) -> usize {
        let ctx = self.context_length();
        (req.prompt.len() + req.params.max_tokens).min(ctx) * self.forward.kv_bytes_per_token(&self.model.model)
    }

    /// A cache for each of `n` choices, or `None` when the device has fewer free slots.
    fn new_caches(&self, n: usize) -> Option<Vec<KvCache>> {
        (0..n).map(|_| self.forward.new_cache(&self.model.model)).collect()
    }

    fn run(&self) {
        let stats = &self.shared.stats;
        let mut active: Vec<Seq> = Vec::new();
        let mut reserved = 0usize;
        loop {
            {
                let Ok(mut q) = self.shared.queue.lock() else { return };
                while active.is_empty() && q.heap.is_empty() {
                    if self.shared.shutdown.load(Relaxed) {
                        return;
                    }
                    q = match self.shared.wake.wait(q) {
                        Ok(q) => q,
                        Err(_) => return,
                    };
                }
                while let Some(top) = q.heap.peek() {
                    let n = top.choices.len();
                    let running: usize = active.iter().map(|s| 1 + s.forks.len()).sum();
                    // Every choice is a sequence; a request for more than the limit still
                    // runs when nothing else does.
                    if running + n > self.config.max_seqs && running > 0 {
                        break;
                    }
                    let need = self.reserve_bytes(&top.req);
                    // An oversized request still runs when nothing else does.
                    if reserved + need * n > self.config.kv_budget_bytes && !active.is_empty() {
                        break;
                    }
                    // A device cache with too few free slots: the request waits.
                    let Some(mut caches) = self.new_caches(n) else { break };
                    let Some(item) = q.heap.pop() else { break };
                    if item.choices.iter().all(|c| c.events.is_closed()) {
                        stats.cancelled_total.fetch_add(1, Relaxed);
                        continue;
                    }
                    reserved += need * n;
                    stats.prompt_tokens_total.fetch_add(item.req.prompt.len() as u64, Relaxed);
                    let mut choices = item.choices.into_iter();
                    let (Some(first), Some(cache)) = (choices.next(), caches.pop()) else { continue };
                    let forks = choices
                        .zip(caches)
                        .enumerate()
                        .map(|(i, (choice, cache))| {
                            let mut params = item.req.params.clone();
                            params.seed = params.seed.map(|s| s.wrapping_add(i as u64 + 1));
                            Fork { cache, sampler: Sampler::new(params), choice }
                        })
                        .collect();
                    let mut seq = Seq::new(item.req.prompt, cache, Sampler::new(item.req.params), first, need, item.req.precision);
                    seq.forks = forks;
                    active.push(seq);
                }
                stats.queued.store(q.heap.len(), Relaxed);
            }
            active.retain(|s| {
                let gone = s.abandoned();
                if gone {
                    stats.cancelled_total.fetch_add(1, Relaxed);
                    reserved -= s.reserved_with_forks();
                }
                !gone
            });
            stats.active.store(active.len(), Relaxed);
            stats.kv_reserved_bytes.store(reserved, Relaxed);
            if active.is_empty() {
                continue;
            }
            self.step(&mut active);
            stats.steps_total.fetch_add(1, Relaxed);
            active.retain(|s| {
                let gone = s.finished || s.abandoned();
                if gone {
                    // Forks still waiting here failed or were cancelled with their parent.
                    reserved -= s.reserved_with_forks();
                    if !s.finished {
                        stats.cancelled_total.fetch_add(1, Relaxed);
                    }
                }
                !gone
            });
            stats.active.store(active.len(), Relaxed);
            stats.kv_reserved_bytes.store(reserved, Relaxed);
        }
    }

    /// One forward pass over all running sequences, then sampling. Finished
    /// sequences close their channel (so the caller's `retain` drops them). The pass
    /// is exact when any sequence in it needs full precision.
    fn step(&self, active: &mut Vec<Seq>) {
        let decoding = active.iter().filter(|s| s.prefilled >= s.prompt.len()).count();
        let mut budget = self.config.prefill_chunk.saturating_sub(decoding).max(if decoding == 0 { 1 } else { 0 });
        let mut items = Vec::with_capacity(active.len());
        let mut owners = Vec::with_capacity(active.len());
        let mut stepped = Vec::with_capacity(active.len());
        let mut precision = Precision::Fast;
        for (i, s) in active.iter_mut().enumerate() {
            let prefilling = s.prefilled < s.prompt.len();
            // A sequence waiting for prefill budget is not in this pass.
            if prefilling && budget == 0 {
                continue;
            }
            if s.precision == Precision::Exact {
                precision = Precision::Exact;
            }
            stepped.push(i);
            if prefilling {
                let end = (s.prefilled + budget).min(s.prompt.len());
                budget -= end - s.prefilled;
                let done = end == s.prompt.len();
                items.push(BatchItem { cache: &mut s.cache, tokens: &s.prompt[s.prefilled..end], want_logits: done, all_logits: false });
                s.prefilled = end;
                if done {
                    owners.push(i);
                }
            } else {
                items.push(BatchItem { cache: &mut s.cache, tokens: &s.next, want_logits: true, all_logits: false });
                owners.push(i);
            }
        }
        let model = &self.model.model;
        let result = guarded(|| self.forward.forward(model, &mut items, precision));
        drop(items);
        let logits = match result {
            Ok(logits) => logits,
            Err(detail) => return self.fail_step(active, &stepped, detail),
        };
        let mut born = Vec::new();
        for (i, l) in owners.into_iter().zip(logits) {
            let s = &mut active[i];
            for fork in std::mem::take(&mut s.forks) {
                if let Some(mut f) = self.fork(s, fork) {
                    self.take_logits(&mut f, l.clone());
                    born.push(f);
                }
            }
            self.take_logits(s, l);
        }
        active.extend(born);
    }

    /// A further choice of `parent` (whose prompt is cached), as a sequence of its own;
    /// `None` (and an error to its caller) when its cache could not be copied.
    fn fork(&self, parent: &Seq, fork: Fork) -> Option<Seq> {
        let Fork { mut cache, sampler, choice } = fork;
        if let Err(detail) = guarded(|| self.forward.copy_cache(&self.model.model, &parent.cache, &mut cache)) {
            self.shared.stats.failed_requests_total.fetch_add(1, Relaxed);
            let _ = choice.events.send(engine_failed(&detail));
            return None;
        }
        let mut seq = Seq::new(parent.prompt.clone(), cache, sampler, choice, parent.reserved, parent.precision);
        seq.prefilled = seq.prompt.len();
        Some(seq)
    }

    /// Samples `s`'s next token from its logits and sends what it adds to the answer.
    fn take_logits(&self, s: &mut Seq, mut l: Vec<f32>) {
        let ctx = self.context_length();
        let tok = &self.model.tokenizer;
        if let Some(Err(e)) = s.constraint.as_mut().map(|m| crate::grammar::mask(m, &mut l)) {
            grammar_failed(s, &e);
            return;
        }
        let t = s.sampler.sample(&mut l);
        s.generated += 1;
        self.shared.stats.completion_tokens_total.fetch_add(1, Relaxed);
        if tok.is_eos(t) && (!s.sampler.params().ignore_eos || s.constraint.is_some()) {
            self.finish(s, FinishReason::Stop, String::new());
            return;
        }
        if let Some(Err(e)) = s.constraint.as_mut().map(|m| m.consume_token(t)) {
            grammar_failed(s, &e.to_string());
            return;
        }
        // The end-of-sequence token is not part of the answer, so it has no logprob entry.
        if let Some(top) = s.sampler.params().logprobs {
            let (lp, alts) = crate::sampling::logprobs(&l, t, top);
            let info = |id: u32| {
                let bytes = tok.token_output_bytes(id).to_vec();
                (String::from_utf8_lossy(&bytes).into_owned(), bytes)
            };
            let (token, bytes) = info(t);
            let top = alts.into_iter().map(|(id, p)| { let (s, b) = info(id); (s, b, p) }).collect();
            let _ = s.events.send(Event::Logprob(TokenLogprob { token, bytes, logprob: lp, top }));
        }
        let text = s.utf8.push(tok.token_output_bytes(t));
        match s.stop.push(&text) {
            StopOutcome::Stopped(out) => {
                if !out.is_empty() {
                    let _ = s.events.send(Event::Text(out));
                }
                self.finish(s, FinishReason::Stop, String::new());
                return;
            }
            StopOutcome::Continue(out) => {
                if !out.is_empty() {
                    let _ = s.events.send(Event::Text(out));
                }
            }
        }
        if s.generated >= s.max_tokens || s.cache.len + 1 >= ctx {
            let tail = s.utf8.finish();
            self.finish(s, FinishReason::Length, tail);
            return;
        }
        s.next = [t];
    }

    /// Fails the sequences of a step that did not complete: their KV caches are in an
    /// unknown state, so they end with an error (sequences not in the step go on).
    fn fail_step(&self, active: &mut [Seq], stepped: &[usize], detail: String) {
        let stats = &self.shared.stats;
        stats.failed_steps_total.fetch_add(1, Relaxed);
        tracing::error!(requests = stepped.len(), engine = self.forward.device().engine, "engine step failed: {detail}");
        for &i in stepped {
            let s = &mut active[i];
            for events in std::iter::once(&s.events).chain(s.forks.iter().map(|f| &f.choice.events)) {
                stats.failed_requests_total.fetch_add(1, Relaxed);
                let _ = events.send(engine_failed(&detail));
            }
            s.finished = true;
        }
    }

    fn finish(&self, s: &mut Seq, reason: FinishReason, tail: String) {
        let mut reason = reason;
        let mut text = String::new();
        match s.stop.push(&tail) {
            StopOutcome::Stopped(out) => {
                text.push_str(&out);
                reason = FinishReason::Stop;
            }
            StopOutcome::Continue(out) => {
                text.push_str(&out);
                text.push_str(&s.stop.finish());
            }
        }
        if !text.is_empty() {
            let _ = s.events.send(Event::Text(text));
        }
        let _ = s.events.send(Event::Done {
            reason,
            prompt_tokens: s.prompt.len(),
            completion_tokens: s.generated,
        });
        s.finished = true;
    }
}

/// Runs a request to completion, blocking (for the CLI and tests).
pub fn generate_blocking(engine: &Engine, req: GenRequest, mut on_text: impl FnMut(&str)) -> (String, Event) {
    let mut rx = engine.submit(req);
    let mut text = String::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Text(t) => {
                on_text(&t);
                text.push_str(&t);
            }
            Event::Logprob(_) => {}
            end @ (Event::Done { .. } | Event::Error { .. }) => return (text, end),
        }
    }
    (text, Event::Done { reason: FinishReason::Stop, prompt_tokens: 0, completion_tokens: 0 })
}
