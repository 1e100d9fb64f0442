//! Turning one row of fp32 logits into a sampled token and its log-probs.
//!
//! The `processed` distribution is built in this order (vLLM's): divide by the
//! temperature, drop tokens below `min_p` times the best probability, keep the
//! `top_k` best, keep the smallest prefix reaching `top_p`, renormalize. The
//! same code scores given tokens, so teacher-forced log-probs match the ones
//! reported while sampling.

use super::params::{DistributionParams, LogprobsMode};
use crate::math;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::cmp::Ordering;

/// A sampled token with what the caller asked to know about it.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub token: u32,
    /// Natural-log probability under the requested mode.
    pub logprob: f32,
    /// Best alternatives under the same mode, best first.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// A given token's log-prob and the best alternatives, best first.
pub type Scored = (f32, Vec<(u32, f32)>);

/// `log(sum(exp(x)))` over `values`, stable.
fn log_sum_exp(values: &[f32]) -> f32 {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    max + math::sum_exp(values, max).ln() as f32
}

/// `log(sum(exp(values[i])))` over the given indices, stable.
fn log_sum_exp_of(values: &[f32], indices: &[u32]) -> f32 {
    if indices.len() == values.len() {
        // Nothing filtered out: the contiguous (vectorized) pass.
        return log_sum_exp(values);
    }
    let max = indices
        .iter()
        .map(|&i| values[i as usize])
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    let sum: f64 = indices
        .iter()
        .map(|&i| math::exp(values[i as usize] - max) as f64)
        .sum();
    max + sum.ln() as f32
}

/// Descending by value, then ascending by index: a total order, so ties and
/// partial sorts give the same answer every run.
fn by_value_desc(values: &[f32]) -> impl Fn(&u32, &u32) -> Ordering + '_ {
    move |a, b| {
        values[*b as usize]
            .total_cmp(&values[*a as usize])
            .then(a.cmp(b))
    }
}

/// The indices of the `n` largest values, best first.
fn top_indices(values: &[f32], candidates: &[u32], n: usize) -> Vec<u32> {
    let mut idx = candidates.to_vec();
    let n = n.min(idx.len());
    if n == 0 {
        return Vec::new();
    }
    let cmp = by_value_desc(values);
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, &cmp);
        idx.truncate(n);
    }
    idx.sort_unstable_by(&cmp);
    idx
}

/// The processed distribution over one row: which tokens survive the filters,
/// their scaled logits, and the normalizer.
struct Processed {
    /// Logits divided by the temperature (banned tokens at -inf).
    scaled: Vec<f32>,
    kept: Kept,
    log_z: f32,
}

/// Which tokens survive the filters. Without top-k or top-p the survivors
/// are a predicate on the scaled logit, so nothing is listed: a
/// 150k-token row is then walked, normalized and looked up without
/// building (and scanning) an index list.
enum Kept {
    /// Every token whose scaled logit is finite and at least `floor`
    /// (min-p's cut, or -inf), in index order.
    AtLeast { floor: f32 },
    /// Exactly these tokens, best first (top-k / top-p).
    Sorted(Vec<u32>),
}

/// How many top tokens to sort before falling back to a full sort for top-p;
/// the nucleus almost always lies within them.
const TOP_P_PREFIX: usize = 1024;

/// Whether a scaled logit survives min-p (`floor`, or -inf) and any ban.
pub(super) fn survives(v: f32, floor: f32) -> bool {
    v > f32::NEG_INFINITY && v >= floor
}

/// Tokens per vectorized block of [`Processed::sample`]'s cumulative walk.
const WALK_BLOCK: usize = 1024;

impl Processed {
    fn new(logits: &[f32], p: &DistributionParams, banned: &[u32]) -> Self {
        let t = p.temperature;
        let mut scaled: Vec<f32> = if t == 1.0 {
            logits.to_vec()
        } else {
            logits.iter().map(|&l| l / t).collect()
        };
        for &b in banned {
            if let Some(v) = scaled.get_mut(b as usize) {
                *v = f32::NEG_INFINITY;
            }
        }
        let max = scaled.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let floor = if p.min_p > 0.0 {
            max + p.min_p.ln()
        } else {
            f32::NEG_INFINITY
        };
        let unlisted = |scaled: Vec<f32>| {
            let log_z = log_sum_exp_where(&scaled, max, floor);
            Self {
                scaled,
                kept: Kept::AtLeast { floor },
                log_z,
            }
        };
        if p.top_k.is_none() && p.top_p >= 1.0 {
            return unlisted(scaled);
        }
        let mut kept: Vec<u32> = (0..scaled.len() as u32)
            .filter(|&i| survives(scaled[i as usize], floor))
            .collect();
        let mut sorted = false;
        if let Some(k) = p.top_k {
            if k < kept.len() {
                kept = top_indices(&scaled, &kept, k);
                sorted = true;
            }
        }
        if p.top_p < 1.0 {
            let log_z = log_sum_exp_of(&scaled, &kept);
            let mut prefix = top_indices(&scaled, &kept, TOP_P_PREFIX.min(kept.len()));
            if nucleus_len(&scaled, &prefix, log_z, p.top_p).is_none() {
                prefix = top_indices(&scaled, &kept, kept.len());
            }
            let len = nucleus_len(&scaled, &prefix, log_z, p.top_p).unwrap_or(prefix.len());
            prefix.truncate(len);
            kept = prefix;
            sorted = true;
        }
        if !sorted {
            // top-k kept every survivor: the predicate describes them.
            return unlisted(scaled);
        }
        let log_z = log_sum_exp_of(&scaled, &kept);
        Self {
            scaled,
            kept: Kept::Sorted(kept),
            log_z,
        }
    }

    fn logprob(&self, token: u32) -> f32 {
        let Some(&v) = self.scaled.get(token as usize) else {
            return f32::NEG_INFINITY;
        };
        let kept = match &self.kept {
            Kept::AtLeast { floor } => survives(v, *floor),
            Kept::Sorted(list) => list.contains(&token),
        };
        if kept {
            v - self.log_z
        } else {
            f32::NEG_INFINITY
        }
    }

    fn sample(&self, rng: &mut ChaCha8Rng) -> u32 {
        let u: f64 = rng.random::<f64>();
        let mut acc = 0.0f64;
        let mut last = None;
        match &self.kept {
            Kept::Sorted(list) => {
                for &i in list {
                    acc += math::exp(self.scaled[i as usize] - self.log_z) as f64;
                    if u < acc {
                        return i;
                    }
                }
                last = list.last().copied();
            }
            Kept::AtLeast { floor } => {
                // Whole blocks at vector speed; the block where the running
                // mass passes `u` token by token. Filtered tokens add nothing
                // (they are -inf, or below the floor and skipped).
                let floor = *floor;
                for (b, block) in self.scaled.chunks(WALK_BLOCK).enumerate() {
                    let mass = if floor == f32::NEG_INFINITY {
                        math::sum_exp(block, self.log_z)
                    } else {
                        sum_exp_at_least(block, self.log_z, floor)
                    };
                    if acc + mass <= u {
                        acc += mass;
                        if mass > 0.0 {
                            last = block
                                .iter()
                                .rposition(|&v| survives(v, floor))
                                .map(|j| (b * WALK_BLOCK + j) as u32);
                        }
                        continue;
                    }
                    for (j, &v) in block.iter().enumerate() {
                        if survives(v, floor) {
                            acc += math::exp(v - self.log_z) as f64;
                            last = Some((b * WALK_BLOCK + j) as u32);
                            if u < acc {
                                return (b * WALK_BLOCK + j) as u32;
                            }
                        }
                    }
                }
            }
        }
        // Rounding left the total a hair under 1: the last kept token absorbs it.
        // (Nothing is kept only for all-NaN logits; token 0 then, not a panic.)
        last.unwrap_or(0)
    }

    fn top(&self, n: usize) -> Vec<(u32, f32)> {
        let best: Vec<u32> = match &self.kept {
            Kept::Sorted(list) => list.iter().take(n).copied().collect(),
            Kept::AtLeast { floor } if n > 0 => {
                let kept: Vec<u32> = (0..self.scaled.len() as u32)
                    .filter(|&i| survives(self.scaled[i as usize], *floor))
                    .collect();
                top_indices(&self.scaled, &kept, n)
            }
            Kept::AtLeast { .. } => Vec::new(),
        };
        best.into_iter()
            .map(|i| (i, self.scaled[i as usize] - self.log_z))
            .collect()
    }

    /// The surviving tokens, best first (tests).
    #[cfg(test)]
    fn kept_tokens(&self) -> Vec<u32> {
        match &self.kept {
            Kept::Sorted(list) => list.clone(),
            Kept::AtLeast { .. } => self.top(self.scaled.len()).iter().map(|t| t.0).collect(),
        }
    }
}

/// `log(sum(exp(v)))` over the values `>= floor` (all finite ones when the
/// floor is -inf), given their maximum.
fn log_sum_exp_where(values: &[f32], max: f32, floor: f32) -> f32 {
    if max == f32::NEG_INFINITY || max.is_nan() {
        return max;
    }
    let sum = if floor == f32::NEG_INFINITY {
        math::sum_exp(values, max)
    } else {
        sum_exp_at_least(values, max, floor)
    };
    max + sum.ln() as f32
}

/// `sum(exp(v - shift))` over the values `>= floor`.
fn sum_exp_at_least(values: &[f32], shift: f32, floor: f32) -> f64 {
    values
        .iter()
        .filter(|&&v| v >= floor)
        .map(|&v| math::exp(v - shift) as f64)
        .sum()
}

/// Length of the shortest prefix of `sorted` whose probability mass reaches
/// `top_p`, or `None` if the whole prefix does not reach it.
fn nucleus_len(scaled: &[f32], sorted: &[u32], log_z: f32, top_p: f32) -> Option<usize> {
    let mut acc = 0.0f64;
    for (n, &i) in sorted.iter().enumerate() {
        acc += math::exp(scaled[i as usize] - log_z) as f64;
        if acc >= top_p as f64 {
            return Some(n + 1);
        }
    }
    None
}

/// `log_softmax` of the raw logits, for `raw` mode and greedy decoding.
struct Raw<'a> {
    logits: &'a [f32],
    log_z: f32,
}

impl<'a> Raw<'a> {
    fn new(logits: &'a [f32]) -> Self {
        Self {
            logits,
            log_z: log_sum_exp(logits),
        }
    }
    fn logprob(&self, token: u32) -> f32 {
        self.logits[token as usize] - self.log_z
    }
    fn top(&self, n: usize) -> Vec<(u32, f32)> {
        let all: Vec<u32> = (0..self.logits.len() as u32).collect();
        top_indices(self.logits, &all, n)
            .into_iter()
            .map(|i| (i, self.logprob(i)))
            .collect()
    }
}

/// Samples one token from `logits` (fp32, one row). `banned` tokens (EOS before
/// `min_tokens`) cannot be drawn. Greedy picks the best allowed raw logit and
/// reports raw log-probs in both modes.
pub fn sample(
    logits: &[f32],
    params: &DistributionParams,
    mode: LogprobsMode,
    banned: &[u32],
    top_logprobs: usize,
    rng: &mut ChaCha8Rng,
) -> SampledToken {
    if params.is_greedy() {
        let raw = Raw::new(logits);
        let allowed: Vec<u32> = (0..logits.len() as u32)
            .filter(|i| !banned.contains(i))
            .collect();
        let token = top_indices(logits, &allowed, 1)
            .first()
            .copied()
            .unwrap_or(0);
        return SampledToken {
            token,
            logprob: raw.logprob(token),
            top_logprobs: raw.top(top_logprobs),
        };
    }
    let processed = Processed::new(logits, params, banned);
    let token = processed.sample(rng);
    match mode {
        LogprobsMode::Processed => SampledToken {
            token,
            logprob: processed.logprob(token),
            top_logprobs: processed.top(top_logprobs),
        },
        LogprobsMode::Raw => {
            let raw = Raw::new(logits);
            SampledToken {
                token,
                logprob: raw.logprob(token),
                top_logprobs: raw.top(top_logprobs),
            }
        }
    }
}

/// Log-prob of a given `token` under the mode's distribution for this row, as
/// [`sample`] would have reported it (-inf if filtered out), and the `top`
/// best alternatives under the same distribution.
pub fn score(
    logits: &[f32],
    params: &DistributionParams,
    mode: LogprobsMode,
    token: u32,
    top: usize,
) -> Scored {
    if params.is_greedy() || mode == LogprobsMode::Raw {
        let raw = Raw::new(logits);
        return (raw.logprob(token), raw.top(top));
    }
    let processed = Processed::new(logits, params, &[]);
    (processed.logprob(token), processed.top(top))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn params(t: f32, top_p: f32, top_k: Option<usize>, min_p: f32) -> DistributionParams {
        DistributionParams {
            temperature: t,
            top_p,
            top_k,
            min_p,
        }
    }

    #[test]
    fn processed_is_normalized_over_kept_tokens() {
        let logits = [2.0, 1.0, 0.5, -1.0, 0.0];
        let p = params(0.7, 0.8, None, 0.0);
        let d = Processed::new(&logits, &p, &[]);
        let kept = d.kept_tokens();
        let total: f32 = kept.iter().map(|&i| d.logprob(i).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(kept.len() < logits.len());
    }

    #[test]
    fn top_k_and_min_p_filter() {
        let logits = [3.0, 2.0, 1.0, 0.0];
        let d = Processed::new(&logits, &params(1.0, 1.0, Some(2), 0.0), &[]);
        assert_eq!(d.kept_tokens(), vec![0, 1]);
        // min_p 0.3: exp(-1)=0.37 survives, exp(-2)=0.14 does not.
        let d = Processed::new(&logits, &params(1.0, 1.0, None, 0.3), &[]);
        assert_eq!(d.kept_tokens(), vec![0, 1]);
    }

    #[test]
    fn banned_tokens_are_never_sampled() {
        let logits = [10.0, 0.0, 0.0];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..50 {
            let s = sample(
                &logits,
                &params(1.0, 1.0, None, 0.0),
                LogprobsMode::Processed,
                &[0],
                0,
                &mut rng,
            );
            assert_ne!(s.token, 0);
            assert!(s.logprob.is_finite());
        }
        let g = sample(
            &logits,
            &params(0.0, 1.0, None, 0.0),
            LogprobsMode::Processed,
            &[0],
            0,
            &mut rng,
        );
        assert_eq!(g.token, 1);
    }

    #[test]
    fn score_matches_sample() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = params(0.9, 0.9, Some(20), 0.05);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for mode in [LogprobsMode::Processed, LogprobsMode::Raw] {
            let s = sample(&logits, &p, mode, &[], 3, &mut rng);
            assert_eq!(s.logprob, score(&logits, &p, mode, s.token, 0).0);
            assert_eq!(s.top_logprobs.len(), 3);
        }
    }

    #[test]
    fn block_walk_draws_what_a_token_by_token_walk_draws() {
        // Several walk blocks, a banned token, and min-p cutting some tokens.
        let logits: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919) % 613) as f32 * 0.01)
            .collect();
        for (p, banned) in [
            (params(1.0, 1.0, None, 0.0), vec![]),
            (params(0.7, 1.0, None, 0.0), vec![17u32]),
            (params(1.3, 1.0, None, 0.5), vec![]),
        ] {
            let d = Processed::new(&logits, &p, &banned);
            let kept = {
                let mut k = d.kept_tokens();
                k.sort_unstable();
                k
            };
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            let mut reference_rng = ChaCha8Rng::seed_from_u64(3);
            for _ in 0..200 {
                let token = d.sample(&mut rng);
                let u: f64 = reference_rng.random::<f64>();
                let mut acc = 0.0f64;
                let expected = kept
                    .iter()
                    .copied()
                    .find(|&i| {
                        acc += math::exp(d.scaled[i as usize] - d.log_z) as f64;
                        u < acc
                    })
                    .unwrap_or(*kept.last().unwrap());
                assert_eq!(token, expected);
                assert!(!banned.contains(&token));
            }
        }
    }
}
