//! Token sampling (greedy, temperature, top-k, top-p, seed, penalties, logit bias)
//! and stop-sequence matching on streamed text.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub logit_bias: HashMap<u32, f32>,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Keep generating past the end-of-sequence token (benchmarks).
    pub ignore_eos: bool,
    /// Report each sampled token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: HashMap::new(),
            max_tokens: 256,
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

/// Per-sequence sampler state. Its random stream depends only on the seed, so the
/// same seeded request samples the same tokens alone or inside any batch.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let seed = params.seed.unwrap_or_else(|| rand::thread_rng().gen());
        Sampler { rng: ChaCha8Rng::seed_from_u64(seed), params, counts: HashMap::new() }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        for (&t, &b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
        let t = if p.temperature <= 0.0 { argmax(logits) } else { self.sample_random(logits) };
        *self.counts.entry(t).or_insert(0) += 1;
        t
    }

    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        if p.top_k > 0 {
            idx.truncate(p.top_k);
        }
        let max = logits[idx[0] as usize];
        let mut probs: Vec<f32> = idx.iter().map(|&i| ((logits[i as usize] - max) / p.temperature).exp()).collect();
        let sum: f32 = probs.iter().sum();
        for q in probs.iter_mut() {
            *q /= sum;
        }
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                cum += q;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.gen::<f32>() * total;
        for (i, q) in probs.iter().enumerate() {
            if r < *q {
                return idx[i];
            }
            r -= q;
        }
        idx[probs.len() - 1]
    }
}

/// Log-probability of `token` and the `top` most likely tokens, from the logits the
/// sampler saw (after logit bias and penalties, before temperature).
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if best.len() < top || l > best[best.len() - 1].1 {
                let at = best.partition_point(|&(_, b)| b >= l);
                best.insert(at, (i as u32, l));
                best.truncate(top);
            }
        }
    }
    let chosen = logits.get(token as usize).map_or(f32::NEG_INFINITY, |l| l - lse);
    (chosen, best.into_iter().map(|(i, l)| (i, l - lse)).collect())
}

pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Holds back text that could be the start of a stop sequence, so stop text is never
/// emitted even when it spans several tokens.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

pub enum StopOutcome {
    /// Text safe to emit now.
    Continue(String),
    /// A stop sequence matched: emit this text, then finish.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new() }
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        self.held.push_str(text);
        if let Some(pos) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let out = self.held[..pos].to_string();
            self.held.clear();
            return StopOutcome::Stopped(out);
        }
        // Keep the longest suffix that is a proper prefix of some stop sequence.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if i > keep && self.held.ends_with(&s[..i]) {
                    keep = i;
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        StopOutcome::Continue(out)
    }

    /// Releases held-back text at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopOutcome::Continue(t) => out.push_str(&t),
                StopOutcome::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_sequences_match_across_token_boundaries() {
        let cases: &[(&[&str], &[&str], &str, bool)] = &[
            (&["\n\n"], &["Hello", "\n", "\nWorld"], "Hello", true),
            (&["END"], &["abc E", "N", "D more"], "abc ", true),
            (&["END"], &["abc E", "N", "x"], "abc ENx", false),
            (&["a", "bc"], &["xb", "c"], "x", true),
            (&[], &["plain"], "plain", false),
        ];
        for (stops, pieces, want, stopped) in cases {
            assert_eq!(run(stops, pieces), (want.to_string(), *stopped), "{stops:?} {pieces:?}");
        }
    }

    #[test]
    fn same_seed_same_tokens() {
        let params = SamplingParams { temperature: 1.0, seed: Some(7), ..Default::default() };
        let logits: Vec<f32> = (0..100).map(|i| (i % 10) as f32 / 3.0).collect();
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..20).map(|_| s.sample(&mut logits.clone())).collect::<Vec<_>>()
        };
        assert_eq!(draw(&params), draw(&params));
    }

    #[test]
    fn logit_bias_and_penalties_steer_greedy() {
        let mut s = Sampler::new(SamplingParams {
            logit_bias: [(3, 100.0)].into_iter().collect(),
            frequency_penalty: 200.0,
            ..Default::default()
        });
        let logits = vec![0.0, 1.0, 2.0, 0.5];
        assert_eq!(s.sample(&mut logits.clone()), 3);
        // Token 3 has been seen once: the frequency penalty now outweighs its bias.
        assert_eq!(s.sample(&mut logits.clone()), 2);
    }
}
