//! Sampling from logits that stay on the device (a GPU): a few hundred
//! values per draw come to the host instead of the whole vocabulary row.
//!
//! A step's f32 logits are 600 KB a row at a 150k vocabulary (154 MB for 256
//! sequences), and the host sampler then walks each row. Here the device
//! reduces each draw's row to its maximum, the probability mass of each
//! block of `B` tokens and its best raw logits; the host draws `u` from the
//! sequence's own RNG exactly as [`sampler::sample`] does, finds the block
//! where the running mass passes `u`, and a second transfer brings that
//! block's raw logits, where the walk ends token by token. With `B` near
//! the square root of the vocabulary both transfers are ~500 values a draw.
//!
//! The distribution, the RNG draws and the walk are the host sampler's; only
//! the sums are the device's (in f32), so log-probs agree with the host path
//! to f32 rounding and a draw whose `u` lies within rounding of a token
//! boundary may take the neighbour. Draws this does not cover (top-k, top-p,
//! banned tokens, over [`MAX_SUMMARY_TOP`] alternatives) get whole rows.

use super::params::{DistributionParams, LogprobsMode, SamplingParams};
use super::sampler::{self, survives, SampledToken, Scored};
use super::scheduler::{SampledGroup, TentativeSample};
use super::sequence::Sequence;
use crate::math;
use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::sync::Arc;

/// How a step's sampled rows reach the sampler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SamplingTransfer {
    /// `summary` on a GPU, `rows` on the CPU.
    #[default]
    Auto,
    /// Whole rows (read in place on the CPU, copied from a GPU).
    Rows,
    /// Per-draw block masses and one block (this module).
    Summary,
}

impl SamplingTransfer {
    /// Whether logits on `device` go through the summary.
    pub fn summarizes(self, device: &Device) -> bool {
        match self {
            Self::Auto => !device.is_cpu(),
            Self::Rows => false,
            Self::Summary => true,
        }
    }
}

/// Values summed in f32 before the block sums go on in f64.
const SUM_RUN: usize = 16;

/// Most alternatives a summarized draw reports; each costs the device one
/// argmax pass over the row, so more take the whole row.
pub const MAX_SUMMARY_TOP: usize = 32;

/// One token to draw from row `row` of a step's logits.
pub struct Draw {
    pub row: usize,
    pub params: Arc<SamplingParams>,
    pub banned: Vec<u32>,
    /// Advanced by the draw.
    pub rng: ChaCha8Rng,
}

impl Draw {
    /// Whether the summary gives this draw exactly what the host sampler
    /// would: no ban, and a distribution the block walk can sample
    /// (greedy, or temperature with min-p only).
    fn summarizable(&self) -> bool {
        let p = &self.params;
        let d = &p.distribution;
        self.banned.is_empty()
            && p.top_logprobs <= MAX_SUMMARY_TOP
            && (d.is_greedy() || (d.top_k.is_none() && d.top_p >= 1.0))
    }
}

/// Samples every sequence's next token and its parked siblings' first ones
/// from `logits` (`[rows, vocab]`, one row per sequence), as
/// `core::sample_group` does from host rows.
pub fn sample_groups(
    logits: &Tensor,
    sequences: Vec<&mut Sequence>,
    eos: &[u32],
) -> Result<Vec<SampledGroup>> {
    // A copy of each RNG: siblings keep theirs tentatively, leaders get
    // theirs back below.
    let draw = |row, seq: &Sequence| Draw {
        row,
        params: seq.params.clone(),
        banned: seq.banned_tokens(eos),
        rng: seq.rng.clone(),
    };
    let mut draws = Vec::new();
    for (row, seq) in sequences.iter().enumerate() {
        draws.extend(seq.siblings.iter().map(|sib| draw(row, sib)));
        draws.push(draw(row, seq));
    }
    let tokens = sample_draws(logits, &mut draws)?;
    let mut drawn = draws.into_iter().zip(tokens);
    let mut groups = Vec::with_capacity(sequences.len());
    for seq in sequences {
        let siblings = (0..seq.siblings.len())
            .filter_map(|_| drawn.next())
            .map(|(draw, token)| TentativeSample {
                token,
                rng: draw.rng,
            })
            .collect();
        let Some((draw, leader)) = drawn.next() else {
            candle_core::bail!("a sequence without its draw");
        };
        seq.rng = draw.rng;
        groups.push(SampledGroup { leader, siblings });
    }
    Ok(groups)
}

/// One token per draw, in order.
pub fn sample_draws(logits: &Tensor, draws: &mut [Draw]) -> Result<Vec<SampledToken>> {
    let (rows, _) = logits.dims2()?;
    if let Some(d) = draws.iter().find(|d| d.row >= rows) {
        candle_core::bail!("draw from row {} of {rows}", d.row);
    }
    let (summarized, whole): (Vec<usize>, Vec<usize>) =
        (0..draws.len()).partition(|&i| draws[i].summarizable());
    let mut out: Vec<Option<SampledToken>> = vec![None; draws.len()];
    if !whole.is_empty() {
        let mut row_ids: Vec<u32> = whole.iter().map(|&i| draws[i].row as u32).collect();
        row_ids.sort_unstable();
        row_ids.dedup();
        let host = select_rows(logits, &row_ids)?.to_vec2::<f32>()?;
        let mut picked: Vec<(usize, &mut Draw)> = draws
            .iter_mut()
            .enumerate()
            .filter(|(_, d)| !d.summarizable())
            .collect();
        // In parallel, as the host path: each draw has its own RNG.
        let sampled: Vec<(usize, SampledToken)> = picked
            .par_iter_mut()
            .filter_map(|(i, d)| {
                let at = row_ids.binary_search(&(d.row as u32)).ok()?;
                let token = sampler::sample(
                    &host[at],
                    &d.params.distribution,
                    d.params.logprobs_mode,
                    &d.banned,
                    d.params.top_logprobs,
                    &mut d.rng,
                );
                Some((*i, token))
            })
            .collect();
        for (i, token) in sampled {
            out[i] = Some(token);
        }
    }
    if !summarized.is_empty() {
        let mut subset: Vec<&mut Draw> = draws.iter_mut().filter(|d| d.summarizable()).collect();
        for (i, token) in summarized
            .iter()
            .zip(sample_summarized(logits, &mut subset)?)
        {
            out[*i] = Some(token);
        }
    }
    out.into_iter()
        .map(|t| t.ok_or_else(|| candle_core::Error::Msg("a draw was not sampled".into())))
        .collect()
}

/// Rows `ids` of `logits`, without a copy when they are all of them in order.
fn select_rows(logits: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let (rows, _) = logits.dims2()?;
    if ids.len() == rows && ids.iter().enumerate().all(|(i, &r)| r as usize == i) {
        return Ok(logits.clone());
    }
    logits.index_select(&Tensor::new(ids, logits.device())?, 0)
}

/// Tokens per block of the summary: the power of two nearest above the
/// square root of `vocab`, so the masses and the block are ~equal in size.
pub fn block_len(vocab: usize) -> usize {
    let mut b = 1;
    while b * b < vocab {
        b *= 2;
    }
    b
}

/// How one row is summarized.
struct RowSpec {
    /// What the logits are divided by (1 for rows read raw only).
    temperature: f32,
    min_p: Option<f32>,
    /// Whether the raw log-normalizer is wanted too.
    raw: bool,
    /// Best raw logits wanted.
    top: usize,
}

impl RowSpec {
    fn of(p: &SamplingParams) -> Self {
        let d = &p.distribution;
        let greedy = d.is_greedy();
        Self {
            // Greedy reads raw values only.
            temperature: if greedy { 1.0 } else { d.temperature },
            min_p: (d.min_p > 0.0 && !greedy).then_some(d.min_p),
            raw: greedy || p.logprobs_mode == LogprobsMode::Raw,
            top: p.top_logprobs.max(usize::from(greedy)),
        }
    }

    /// min-p's cut on scaled logits, given the largest (-inf without it).
    fn floor(&self, max_scaled: f32) -> f32 {
        self.min_p
            .map_or(f32::NEG_INFINITY, |m| max_scaled + m.ln())
    }

    fn scale(&self, raw: f32) -> f32 {
        if self.temperature == 1.0 {
            raw
        } else {
            raw / self.temperature
        }
    }
}

/// What came to the host of one row.
struct Summary {
    /// The largest logit divided by the temperature.
    max_scaled: f32,
    /// `sum(exp(scaled - max_scaled))` over each block's survivors.
    masses: Vec<f64>,
    /// Log-normalizer of the raw logits (NaN unless some row wanted it).
    raw_log_z: f32,
    /// The best raw logits, best first, and their tokens.
    top: Vec<(u32, f32)>,
    /// The raw logit of the row's given token (scoring), else NaN.
    given: f32,
}

impl Summary {
    /// Log-normalizer of the scaled logits that survive min-p.
    fn log_z(&self) -> f32 {
        let total: f64 = self.masses.iter().sum();
        self.max_scaled + total.ln() as f32
    }
}

/// Rows of `x` (`[rows, vocab]`, f32, contiguous) reduced on its device as
/// `specs` ask, brought to the host in one transfer (two with `given`, the
/// token whose raw logit each row also reports).
fn summarize(x: &Tensor, specs: &[RowSpec], given: Option<&[u32]>) -> Result<Vec<Summary>> {
    let device = x.device();
    let (n, vocab) = x.dims2()?;
    let block = block_len(vocab);
    let blocks = vocab.div_ceil(block);
    let temps: Vec<f32> = specs.iter().map(|s| s.temperature).collect();
    let ln_min_p: Vec<f32> = specs
        .iter()
        .map(|s| s.min_p.map_or(f32::NEG_INFINITY, f32::ln))
        .collect();
    // Scoped so each full-size temporary is freed as soon as it is used:
    // the KV budget reserves room for a few copies of the logits only.
    let (max, masses) = {
        let scaled = x.broadcast_div(&Tensor::from_vec(temps, (n, 1), device)?)?;
        let max = scaled.max_keepdim(1)?;
        let mut weights = scaled.broadcast_sub(&max)?.exp()?;
        if specs.iter().any(|s| s.min_p.is_some()) {
            let floor = max.broadcast_add(&Tensor::from_vec(ln_min_p, (n, 1), device)?)?;
            let kept = scaled.broadcast_ge(&floor)?;
            weights = kept.where_cond(&weights, &weights.zeros_like()?)?;
        }
        drop(scaled);
        // Sums of SUM_RUN values in f32, the rest in f64, so a block's
        // mass is as exact as the host walk's f64 running sum: a flat
        // distribution over a large vocabulary puts tokens ~1e-5 of mass
        // apart, and a draw's `u` must land between the same two of them.
        let run = SUM_RUN.min(block);
        let masses = weights
            .pad_with_zeros(1, 0, blocks * block - vocab)?
            .reshape((n, blocks * block / run, run))?
            .sum(2)?
            .to_dtype(DType::F64)?
            .reshape((n, blocks, block / run))?
            .sum(2)?;
        (max, masses)
    };
    // Everything comes back as f64 (exact for the f32 values) in one copy.
    let mut columns = vec![max.to_dtype(DType::F64)?, masses];
    let wants_raw = specs.iter().any(|s| s.raw);
    if wants_raw {
        let raw_max = x.max_keepdim(1)?;
        let raw_sum = x.broadcast_sub(&raw_max)?.exp()?.sum_keepdim(1)?;
        columns.extend([raw_max.to_dtype(DType::F64)?, raw_sum.to_dtype(DType::F64)?]);
    }
    if let Some(given) = given {
        let ids = Tensor::from_slice(given, (n, 1), device)?;
        columns.push(x.gather(&ids, 1)?.to_dtype(DType::F64)?);
    }
    let top_n = specs.iter().map(|s| s.top).max().unwrap_or(0);
    let top_ids = if top_n > 0 {
        let ids = top_indices(x, top_n)?;
        columns.push(x.gather(&ids, 1)?.to_dtype(DType::F64)?);
        ids.to_vec2::<u32>()?
    } else {
        vec![Vec::new(); n]
    };
    let host = Tensor::cat(&columns, 1)?.to_vec2::<f64>()?;
    Ok(host
        .into_iter()
        .zip(top_ids)
        .map(|(values, ids)| {
            let mut rest = &values[1 + blocks..];
            let mut take = || {
                let (first, tail) = rest
                    .split_first()
                    .map_or((f32::NAN, rest), |(f, t)| (*f as f32, t));
                rest = tail;
                first
            };
            let raw_log_z = if wants_raw {
                let (raw_max, raw_sum) = (take(), take());
                raw_max + raw_sum.ln()
            } else {
                f32::NAN
            };
            let given = if given.is_some() { take() } else { f32::NAN };
            Summary {
                max_scaled: values[0] as f32,
                masses: values[1..1 + blocks].to_vec(),
                raw_log_z,
                top: ids
                    .into_iter()
                    .zip(rest.iter().map(|&v| v as f32))
                    .collect(),
                given,
            }
        })
        .collect())
}

fn sample_summarized(logits: &Tensor, draws: &mut [&mut Draw]) -> Result<Vec<SampledToken>> {
    let device = logits.device();
    let (_, vocab) = logits.dims2()?;
    let n = draws.len();
    let block = block_len(vocab);
    let blocks = vocab.div_ceil(block);
    let row_ids: Vec<u32> = draws.iter().map(|d| d.row as u32).collect();
    let x = select_rows(logits, &row_ids)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let specs: Vec<RowSpec> = draws.iter().map(|d| RowSpec::of(&d.params)).collect();
    let summaries = summarize(&x, &specs, None)?;

    // The host's half of the walk: which block each sampling draw lands in.
    let mut walks: Vec<Option<Walk>> = Vec::with_capacity(n);
    for (d, s) in draws.iter_mut().zip(&summaries) {
        walks.push(if d.params.distribution.is_greedy() {
            None
        } else {
            Some(Walk::start(s, d.rng.random::<f64>()))
        });
    }
    let wanted: Vec<u32> = walks
        .iter()
        .enumerate()
        .filter_map(|(i, w)| w.as_ref().map(|w| (i * blocks + w.block) as u32))
        .collect();
    let block_values = if wanted.is_empty() {
        Vec::new()
    } else {
        let pad = blocks * block - vocab;
        // A zero-width tensor would be a zero-sized CUDA launch: an error.
        let padded = if pad == 0 {
            x.clone()
        } else {
            Tensor::cat(
                &[&x, &Tensor::full(f32::NEG_INFINITY, (n, pad), device)?],
                1,
            )?
        };
        padded
            .reshape((n * blocks, block))?
            .index_select(&Tensor::new(wanted.as_slice(), device)?, 0)?
            .to_vec2::<f32>()?
    };

    let mut block_values = block_values.iter();
    let mut out = Vec::with_capacity(n);
    for (((d, s), spec), walk) in draws.iter().zip(&summaries).zip(&specs).zip(walks) {
        let p = &d.params;
        let Some(walk) = walk else {
            // Greedy: the best raw logit (the first, on ties), raw log-probs.
            let (token, value) = s.top.first().copied().unwrap_or((0, f32::NAN));
            out.push(SampledToken {
                token,
                logprob: value - s.raw_log_z,
                top_logprobs: s.raw_top(p.top_logprobs),
            });
            continue;
        };
        let Some(values) = block_values.next() else {
            candle_core::bail!("a sampled block did not come back");
        };
        let floor = spec.floor(s.max_scaled);
        let (token, raw) = walk.finish(values, block, vocab, |raw| {
            let v = spec.scale(raw);
            survives(v, floor).then(|| math::exp(v - walk.log_z) as f64)
        });
        out.push(match p.logprobs_mode {
            LogprobsMode::Processed => SampledToken {
                token,
                logprob: spec.scale(raw) - walk.log_z,
                top_logprobs: s.processed_top(spec, p.top_logprobs, walk.log_z),
            },
            LogprobsMode::Raw => SampledToken {
                token,
                logprob: raw - s.raw_log_z,
                top_logprobs: s.raw_top(p.top_logprobs),
            },
        });
    }
    Ok(out)
}

impl Summary {
    /// The `k` best raw log-probs.
    fn raw_top(&self, k: usize) -> Vec<(u32, f32)> {
        self.top
            .iter()
            .take(k)
            .map(|&(i, v)| (i, v - self.raw_log_z))
            .collect()
    }

    /// The `k` best processed log-probs: the best raw logits that survive
    /// min-p (scaling keeps their order).
    fn processed_top(&self, spec: &RowSpec, k: usize, log_z: f32) -> Vec<(u32, f32)> {
        let floor = spec.floor(self.max_scaled);
        self.top
            .iter()
            .map(|&(i, raw)| (i, spec.scale(raw)))
            .filter(|&(_, v)| survives(v, floor))
            .take(k)
            .map(|(i, v)| (i, v - log_z))
            .collect()
    }
}

/// Whether [`score_rows`] gives what [`sampler::score`] would for these
/// parameters: it cannot apply top-k or top-p.
pub fn scores_on_device(p: &DistributionParams, mode: LogprobsMode, top: usize) -> bool {
    top <= MAX_SUMMARY_TOP
        && (p.is_greedy() || mode == LogprobsMode::Raw || (p.top_k.is_none() && p.top_p >= 1.0))
}

/// Teacher-forced log-probs of `tokens[i]` under row `i` of `logits`, and
/// the `top` best alternatives, as [`sampler::score`] gives them, from a
/// summary of each row (only when [`scores_on_device`]).
pub fn score_rows(
    logits: &Tensor,
    p: &DistributionParams,
    mode: LogprobsMode,
    tokens: &[u32],
    top: usize,
) -> Result<Vec<Scored>> {
    let (rows, vocab) = logits.dims2()?;
    if tokens.len() != rows {
        candle_core::bail!("{} tokens to score against {rows} rows", tokens.len());
    }
    if let Some(t) = tokens.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("token {t} outside the vocabulary of {vocab}");
    }
    let raw = p.is_greedy() || mode == LogprobsMode::Raw;
    let spec = || RowSpec {
        temperature: if raw { 1.0 } else { p.temperature },
        min_p: (!raw && p.min_p > 0.0).then_some(p.min_p),
        raw,
        top,
    };
    let specs: Vec<RowSpec> = (0..rows).map(|_| spec()).collect();
    let x = logits.to_dtype(DType::F32)?.contiguous()?;
    let summaries = summarize(&x, &specs, Some(tokens))?;
    Ok(summaries
        .iter()
        .zip(&specs)
        .map(|(s, spec)| {
            if raw {
                return (s.given - s.raw_log_z, s.raw_top(top));
            }
            let log_z = s.log_z();
            let v = spec.scale(s.given);
            let lp = if survives(v, spec.floor(s.max_scaled)) {
                v - log_z
            } else {
                f32::NEG_INFINITY
            };
            (lp, s.processed_top(spec, top, log_z))
        })
        .collect())
}

/// The `k` largest values of each row of `x` (`[rows, vocab]`), best first,
/// lowest index on ties (as the host sampler orders them): `k` passes, each
/// finding the row's maximum, scoring its occurrences by `vocab - index`
/// and masking the best-scored one. candle's CUDA argmax alone picks any of
/// equal values, and bf16 logits tie often.
fn top_indices(x: &Tensor, k: usize) -> Result<Tensor> {
    let (rows, vocab) = x.dims2()?;
    let device = x.device();
    let work = x.copy()?;
    let masked = Tensor::full(f32::NEG_INFINITY, (rows, 1), device)?;
    // Exact in f32 for any vocabulary under 2^24.
    let earlier = Tensor::arange(0u32, vocab as u32, device)?
        .to_dtype(DType::F32)?
        .affine(-1.0, vocab as f64)?
        .reshape((1, vocab))?
        .broadcast_as((rows, vocab))?;
    let none = Tensor::zeros((rows, vocab), DType::F32, device)?;
    let mut picks = Vec::with_capacity(k);
    for _ in 0..k {
        let best = work.max_keepdim(1)?;
        let ids = work
            .broadcast_eq(&best)?
            .where_cond(&earlier, &none)?
            .argmax_keepdim(1)?;
        work.scatter_set(&ids, &masked, 1)?;
        picks.push(ids);
    }
    Tensor::cat(&picks, 1)?.to_dtype(DType::U32)
}

/// A sampling draw's walk over its row: through whole blocks on the
/// device's masses, then token by token inside the block it lands in.
struct Walk {
    u: f64,
    /// Mass of the blocks before `block`.
    before: f64,
    block: usize,
    log_z: f32,
}

impl Walk {
    fn start(s: &Summary, u: f64) -> Self {
        let log_z = s.log_z();
        // Normalized by the f32 `log_z`, as the host sampler's walk is (its
        // masses sum to 1 only within that rounding), not by the exact total.
        let scale = (f64::from(s.max_scaled) - f64::from(log_z)).exp();
        let mut before = 0.0;
        let mut last_with_mass = 0;
        for (b, &m) in s.masses.iter().enumerate() {
            let mass = m * scale;
            if mass > 0.0 {
                last_with_mass = b;
            }
            if u < before + mass {
                return Self {
                    u,
                    before,
                    block: b,
                    log_z,
                };
            }
            before += mass;
        }
        // Rounding left the total a hair under `u`: the last block with
        // mass absorbs it, as the host sampler's last kept token does.
        Self {
            u: f64::INFINITY,
            before: 0.0,
            block: last_with_mass,
            log_z,
        }
    }

    /// The token and its raw logit: the first in the block where the mass
    /// passes `u`, else (rounding) the block's last survivor. `weight` is a
    /// raw logit's probability if it survives the filters.
    fn finish(
        &self,
        values: &[f32],
        block: usize,
        vocab: usize,
        weight: impl Fn(f32) -> Option<f64>,
    ) -> (u32, f32) {
        let first = self.block * block;
        let mut acc = self.before;
        let mut last = None;
        for (j, &raw) in values.iter().enumerate().take(vocab.saturating_sub(first)) {
            if let Some(w) = weight(raw) {
                acc += w;
                last = Some((j, raw));
                if self.u < acc {
                    break;
                }
            }
        }
        // No survivor at all only for all-NaN logits: the block's first
        // token then, not a panic (the host sampler gives token 0).
        let (j, raw) = last.unwrap_or((0, values.first().copied().unwrap_or(f32::NAN)));
        ((first + j) as u32, raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Rows shaped like a language model's: a few strong tokens, a long
    /// tail, and a -inf entry.
    fn logits(rows: usize, vocab: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..rows)
            .map(|_| {
                let mut row: Vec<f32> = (0..vocab)
                    .map(|_| {
                        let u: f32 = rng.random();
                        -8.0 * u * u + rng.random::<f32>()
                    })
                    .collect();
                for _ in 0..5 {
                    let i = rng.random_range(0..vocab);
                    row[i] = 4.0 + 4.0 * rng.random::<f32>();
                }
                row[rng.random_range(0..vocab)] = f32::NEG_INFINITY;
                row
            })
            .collect()
    }

    fn params(
        temperature: f32,
        min_p: f32,
        mode: LogprobsMode,
        top_logprobs: usize,
    ) -> Arc<SamplingParams> {
        Arc::new(SamplingParams {
            distribution: DistributionParams {
                temperature,
                min_p,
                ..Default::default()
            },
            logprobs_mode: mode,
            top_logprobs,
            ..Default::default()
        })
    }

    /// An unbanned draw from `row`, its RNG seeded with `seed`.
    fn draw(row: usize, params: &Arc<SamplingParams>, seed: u64) -> Draw {
        Draw {
            row,
            params: params.clone(),
            banned: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    fn assert_close(a: f32, b: f32, what: &str) {
        assert!(
            a == b || (a - b).abs() <= 2e-5 * (1.0 + b.abs()),
            "{what}: {a} vs {b}"
        );
    }

    /// Every kind of draw the summary covers gives the host sampler's token,
    /// RNG state, log-prob and alternatives (to f32 rounding of the sums).
    #[test]
    fn summarized_draws_match_the_host_sampler() {
        // Not a multiple of the block length (64), and one (32 x 32).
        for vocab in [3001, 1024] {
            summarized_draws_match_at(vocab);
        }
    }

    fn summarized_draws_match_at(vocab: usize) {
        let rows = logits(6, vocab, 11);
        let device = Device::Cpu;
        let flat: Vec<f32> = rows.concat();
        let tensor = Tensor::from_vec(flat, (rows.len(), vocab), &device).unwrap();
        let kinds = [
            params(1.0, 0.0, LogprobsMode::Processed, 0),
            params(0.7, 0.0, LogprobsMode::Processed, 5),
            params(1.3, 0.05, LogprobsMode::Processed, 3),
            params(0.8, 0.2, LogprobsMode::Raw, 4),
            params(0.0, 0.0, LogprobsMode::Processed, 2),
            params(0.0, 0.0, LogprobsMode::Raw, 0),
        ];
        let mut compared = 0;
        for (k, p) in kinds.iter().enumerate() {
            for seed in 0..40u64 {
                let mut draws: Vec<Draw> = (0..rows.len())
                    .map(|row| draw(row, p, seed * 100 + row as u64))
                    .collect();
                assert!(draws.iter().all(Draw::summarizable));
                let got = sample_draws(&tensor, &mut draws).unwrap();
                for (row, (draw, got)) in draws.iter().zip(&got).enumerate() {
                    let mut rng = ChaCha8Rng::seed_from_u64(seed * 100 + row as u64);
                    let want = sampler::sample(
                        &rows[row],
                        &p.distribution,
                        p.logprobs_mode,
                        &[],
                        p.top_logprobs,
                        &mut rng,
                    );
                    let what = format!("kind {k}, seed {seed}, row {row}");
                    assert_eq!(got.token, want.token, "{what}");
                    assert_eq!(draw.rng, rng, "{what}: the RNG moved as on the host");
                    assert_close(got.logprob, want.logprob, &what);
                    let ids = |t: &[(u32, f32)]| t.iter().map(|x| x.0).collect::<Vec<_>>();
                    assert_eq!(ids(&got.top_logprobs), ids(&want.top_logprobs), "{what}");
                    for (g, w) in got.top_logprobs.iter().zip(&want.top_logprobs) {
                        assert_close(g.1, w.1, &what);
                    }
                    compared += 1;
                }
            }
        }
        assert_eq!(compared, kinds.len() * 40 * rows.len());
    }

    /// A nearly flat row over a large vocabulary (a random model's): tokens
    /// ~2e-5 of mass apart, so the block sums must be as exact as the host
    /// walk's f64 running sum, or draws move to a neighbour.
    #[test]
    fn flat_rows_draw_the_host_samplers_tokens() {
        let vocab = 50_000;
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let rows: Vec<Vec<f32>> = (0..4)
            .map(|_| (0..vocab).map(|_| 0.01 * rng.random::<f32>()).collect())
            .collect();
        let tensor = Tensor::from_vec(rows.concat(), (4, vocab), &Device::Cpu).unwrap();
        let p = params(1.0, 0.0, LogprobsMode::Processed, 0);
        for seed in 0..100u64 {
            let mut draws: Vec<Draw> = (0..4)
                .map(|row| draw(row, &p, seed * 10 + row as u64))
                .collect();
            let got = sample_draws(&tensor, &mut draws).unwrap();
            for (row, got) in got.iter().enumerate() {
                let mut host_rng = ChaCha8Rng::seed_from_u64(seed * 10 + row as u64);
                let want = sampler::sample(
                    &rows[row],
                    &p.distribution,
                    p.logprobs_mode,
                    &[],
                    0,
                    &mut host_rng,
                );
                assert_eq!(got.token, want.token, "seed {seed}, row {row}");
            }
        }
    }

    /// Draws the summary does not cover take whole rows, and a mixed batch
    /// still answers every draw in order, each from its own row.
    #[test]
    fn uncovered_draws_take_whole_rows_in_a_mixed_batch() {
        let vocab = 700;
        let rows = logits(3, vocab, 5);
        let tensor = Tensor::from_vec(rows.concat(), (3, vocab), &Device::Cpu).unwrap();
        let top_k = Arc::new(SamplingParams {
            distribution: DistributionParams {
                top_k: Some(5),
                ..Default::default()
            },
            ..Default::default()
        });
        let top_p = Arc::new(SamplingParams {
            distribution: DistributionParams {
                top_p: 0.9,
                temperature: 0.6,
                ..Default::default()
            },
            ..Default::default()
        });
        let many_top = params(1.0, 0.0, LogprobsMode::Processed, MAX_SUMMARY_TOP + 1);
        let plain = params(1.0, 0.0, LogprobsMode::Processed, 0);
        let banned = rows[1]
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap();
        let cases: Vec<(usize, Arc<SamplingParams>, Vec<u32>)> = vec![
            (2, top_k, vec![]),
            (0, plain.clone(), vec![]),
            (
                1,
                params(0.0, 0.0, LogprobsMode::Processed, 0),
                vec![banned],
            ),
            (0, top_p, vec![]),
            (2, many_top, vec![]),
            (1, plain, vec![]),
        ];
        let mut draws: Vec<Draw> = cases
            .iter()
            .enumerate()
            .map(|(i, (row, p, banned))| Draw {
                row: *row,
                params: p.clone(),
                banned: banned.clone(),
                rng: ChaCha8Rng::seed_from_u64(i as u64),
            })
            .collect();
        let covered: Vec<bool> = draws.iter().map(Draw::summarizable).collect();
        assert_eq!(covered, [false, true, false, false, false, true]);
        let got = sample_draws(&tensor, &mut draws).unwrap();
        for (i, ((row, p, banned), got)) in cases.iter().zip(&got).enumerate() {
            let mut rng = ChaCha8Rng::seed_from_u64(i as u64);
            let want = sampler::sample(
                &rows[*row],
                &p.distribution,
                p.logprobs_mode,
                banned,
                p.top_logprobs,
                &mut rng,
            );
            assert_eq!(got.token, want.token, "draw {i}");
            assert_close(got.logprob, want.logprob, &format!("draw {i}"));
            assert_eq!(got.top_logprobs.len(), want.top_logprobs.len());
        }
        // The banned greedy draw did not take the row's best token.
        assert_ne!(got[2].token, banned);
        // A draw from a row that does not exist is an error, not a panic.
        let mut bad = vec![draw(3, &params(1.0, 0.0, LogprobsMode::Processed, 0), 0)];
        assert!(sample_draws(&tensor, &mut bad).is_err());
    }

    #[test]
    fn degenerate_rows_give_a_token_not_a_panic() {
        let vocab = 10;
        let rows = [
            vec![f32::NEG_INFINITY; vocab],
            vec![f32::NAN; vocab],
            vec![0.0; vocab],
        ];
        let tensor = Tensor::from_vec(rows.concat(), (3, vocab), &Device::Cpu).unwrap();
        for p in [
            params(1.0, 0.0, LogprobsMode::Processed, 2),
            params(0.0, 0.0, LogprobsMode::Raw, 2),
            params(0.5, 0.5, LogprobsMode::Raw, 0),
        ] {
            let mut draws: Vec<Draw> = (0..3).map(|row| draw(row, &p, 1)).collect();
            let got = sample_draws(&tensor, &mut draws).unwrap();
            assert!(got.iter().all(|t| (t.token as usize) < vocab));
        }
        // Tied best logits: the lowest index first, as on the host.
        let mut tied = vec![0.0f32; 1000];
        for i in [700, 5, 300] {
            tied[i] = 5.0;
        }
        tied[999] = 4.0;
        let tensor_tied = Tensor::from_vec(tied, (1, 1000), &Device::Cpu).unwrap();
        let mut draws = vec![draw(0, &params(0.0, 0.0, LogprobsMode::Raw, 4), 1)];
        let got = sample_draws(&tensor_tied, &mut draws).unwrap();
        assert_eq!(got[0].token, 5);
        let ids: Vec<u32> = got[0].top_logprobs.iter().map(|t| t.0).collect();
        assert_eq!(ids, [5, 300, 700, 999]);
        // Equal logits: greedy takes the first, as the host sampler does.
        let mut draws = vec![draw(2, &params(0.0, 0.0, LogprobsMode::Raw, 0), 1)];
        let got = sample_draws(&tensor, &mut draws).unwrap();
        assert_eq!(got[0].token, 0);
        assert_close(got[0].logprob, -(vocab as f32).ln(), "uniform");
    }

    /// Teacher-forced scoring from summaries gives the host's log-probs and
    /// alternatives, including -inf for a token min-p cuts.
    #[test]
    fn scored_rows_match_the_host_scorer() {
        let vocab = 2049;
        let rows = logits(8, vocab, 23);
        let tensor = Tensor::from_vec(rows.concat(), (rows.len(), vocab), &Device::Cpu).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        // Some rows score their best token, others a tail one (cut by min-p).
        let tokens: Vec<u32> = rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                if i % 2 == 0 {
                    let best = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1));
                    best.map(|(j, _)| j as u32).unwrap()
                } else {
                    rng.random_range(0..vocab as u32)
                }
            })
            .collect();
        let mut cut = 0;
        for (d, mode, top) in [
            (DistributionParams::default(), LogprobsMode::Processed, 0),
            (
                DistributionParams {
                    temperature: 0.6,
                    min_p: 0.1,
                    ..Default::default()
                },
                LogprobsMode::Processed,
                4,
            ),
            (
                DistributionParams {
                    temperature: 0.6,
                    min_p: 0.1,
                    top_p: 0.5,
                    ..Default::default()
                },
                LogprobsMode::Raw,
                3,
            ),
            (
                DistributionParams {
                    temperature: 0.0,
                    ..Default::default()
                },
                LogprobsMode::Processed,
                2,
            ),
        ] {
            assert!(scores_on_device(&d, mode, top));
            let got = score_rows(&tensor, &d, mode, &tokens, top).unwrap();
            for (i, (lp, alts)) in got.iter().enumerate() {
                let (want, want_alts) = sampler::score(&rows[i], &d, mode, tokens[i], top);
                let what = format!("{d:?} {mode:?} row {i}");
                if want == f32::NEG_INFINITY {
                    cut += 1;
                }
                assert_close(*lp, want, &what);
                assert_eq!(alts.len(), want_alts.len(), "{what}");
                for (g, w) in alts.iter().zip(&want_alts) {
                    assert_eq!(g.0, w.0, "{what}");
                    assert_close(g.1, w.1, &what);
                }
            }
        }
        assert!(cut > 0, "some scored token was cut by min-p");
        let top_k = DistributionParams {
            top_k: Some(3),
            ..Default::default()
        };
        assert!(!scores_on_device(&top_k, LogprobsMode::Processed, 0));
        assert!(scores_on_device(&top_k, LogprobsMode::Raw, 0));
        assert!(!scores_on_device(
            &DistributionParams::default(),
            LogprobsMode::Raw,
            MAX_SUMMARY_TOP + 1
        ));
        assert!(score_rows(&tensor, &top_k, LogprobsMode::Raw, &tokens[..3], 0).is_err());
        let outside = vec![vocab as u32; rows.len()];
        assert!(score_rows(&tensor, &top_k, LogprobsMode::Raw, &outside, 0).is_err());
    }

    #[test]
    fn block_length_is_near_the_square_root() {
        assert_eq!(block_len(1), 1);
        assert_eq!(block_len(4), 2);
        assert_eq!(block_len(5), 4);
        assert_eq!(block_len(151_936), 512);
        assert_eq!(block_len(49_152), 256);
    }
}
