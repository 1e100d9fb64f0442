//! The scheduler on its own: real queues, block pool and KV pool tensors;
//! the samples a model would produce are made up (any token will do).

use super::*;
use crate::engine::events::EventReceiver;
use crate::engine::params::SamplingParams;
use crate::engine::sampler::SampledToken;
use crate::engine::stats::EngineStats;
use crate::model::KvPool;
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use tokio::sync::mpsc;

const BS: usize = 4;
/// RNG position of a sibling's made-up first draw.
const DRAWN: u128 = 1000;

fn scheduler(num_blocks: usize, max_num_batched_tokens: usize) -> Scheduler {
    let config = SchedulerConfig {
        block_size: BS,
        num_blocks,
        max_num_batched_tokens,
        max_num_seqs: 16,
        kv_dtype: None,
    };
    Scheduler::new(config, vec![], 7)
}

/// A one-layer pool with one head of width 2, to copy forked blocks in.
fn kv_pool(num_blocks: usize) -> KvPool {
    KvPool::new(1, num_blocks, BS, 1, 2, DType::F32, &Device::Cpu).unwrap()
}

/// Queues request `id`: `n` choices of a `prompt_len`-token prompt.
fn add(s: &mut Scheduler, id: u64, prompt_len: usize, n: usize) -> EventReceiver {
    let (events, rx) = mpsc::unbounded_channel();
    let params = SamplingParams {
        n,
        max_tokens: 1000,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    s.add(GenerationJob {
        adapter: None,
        request_id: id,
        prompt: (0..prompt_len as u32)
            .map(|t| t + 100 * id as u32)
            .collect(),
        params: Arc::new(params),
        seed: id,
        budget: 1000,
        events,
    });
    rx
}

fn token(t: u32) -> SampledToken {
    SampledToken {
        token: t,
        logprob: -1.0,
        top_logprobs: Vec::new(),
    }
}

/// Applies `plan` as if the model sampled token 1 for every sequence that
/// samples (and for each of its parked siblings).
fn apply(s: &mut Scheduler, plan: &StepPlan, pool: &KvPool) -> usize {
    let groups: Vec<SampledGroup> = s
        .sampling_sequences(plan)
        .iter()
        .map(|seq| SampledGroup {
            leader: token(1),
            siblings: (0..seq.siblings.len())
                .map(|i| {
                    // Where the sibling's RNG would be after drawing.
                    let mut rng = ChaCha8Rng::seed_from_u64(i as u64);
                    rng.set_word_pos(DRAWN);
                    TentativeSample {
                        token: token(1),
                        rng,
                    }
                })
                .collect(),
        })
        .collect();
    s.update_from_output(plan, groups, pool, &Arc::from("0"), &EngineStats::default())
}

fn request_ids(plan: &StepPlan, s: &Scheduler) -> Vec<u64> {
    plan.chunks
        .iter()
        .map(|c| s.running[c.index].request_id)
        .collect()
}

#[test]
fn admission_into_a_full_pool_schedules_nothing_for_it_and_changes_nothing() {
    let pool = kv_pool(4);
    let mut s = scheduler(4, 64);
    let _a = add(&mut s, 1, 12, 1);
    let plan = s.schedule(true);
    apply(&mut s, &plan, &pool);
    // A (13 tokens) takes the fourth block; B's two do not fit.
    let _b = add(&mut s, 2, 8, 1);
    let plan = s.schedule(true);
    assert_eq!(request_ids(&plan, &s), vec![1]);
    assert_eq!(plan.preempted, 0);
    assert_eq!((s.kv.num_used(), s.kv.num_free()), (4, 0));
    let b = &s.waiting[0];
    assert_eq!(
        (b.request_id, b.num_computed, b.blocks.ids().len()),
        (2, 0, 0)
    );
    assert_eq!(s.kv.prefix_counters(), (0, 12), "B's prompt is not counted");
    // With A finished the same B is admitted whole.
    s.cancel(1, None);
    let plan = s.schedule(true);
    assert_eq!(request_ids(&plan, &s), vec![2]);
    assert_eq!(plan.chunks[0].tokens.len(), 8);
}

#[test]
fn the_youngest_running_sequence_is_preempted_first_and_requeued_in_arrival_order() {
    let pool = kv_pool(6);
    let mut s = scheduler(6, 64);
    let _rx: Vec<_> = (1..=3).map(|id| add(&mut s, id, 8, 1)).collect();
    let plan = s.schedule(true);
    assert_eq!(request_ids(&plan, &s), vec![1, 2, 3]);
    apply(&mut s, &plan, &pool);
    let _d = add(&mut s, 4, 4, 1);
    // Each of the three now needs a third block, and the pool is full: the
    // oldest takes the youngest's blocks, the next one gets the other.
    let plan = s.schedule(true);
    assert_eq!(request_ids(&plan, &s), vec![1, 2]);
    assert_eq!(plan.preempted, 1);
    let waiting: Vec<u64> = s.waiting.iter().map(|w| w.request_id).collect();
    assert_eq!(waiting, vec![3, 4], "preempted C keeps its place before D");
    assert_eq!(
        (s.waiting[0].num_computed, s.waiting[0].blocks.ids().len()),
        (0, 0)
    );
    assert_eq!(s.waiting[0].tokens.len(), 9, "its sampled token is kept");
    assert_eq!(s.kv.num_free(), 0);
}

#[test]
fn the_oldest_running_sequence_waits_when_nothing_younger_can_make_room() {
    let pool = kv_pool(2);
    let mut s = scheduler(2, 64);
    let _a = add(&mut s, 1, 8, 1);
    let plan = s.schedule(true);
    apply(&mut s, &plan, &pool);
    let plan = s.schedule(true);
    assert!(plan.is_empty());
    assert_eq!(plan.preempted, 1);
    assert_eq!((s.num_running(), s.num_waiting()), (0, 1));
    assert_eq!(s.kv.num_used(), 0);
}

#[test]
fn forked_choices_share_the_prompts_full_blocks_and_copy_the_last() {
    let pool = kv_pool(8);
    let mut s = scheduler(8, 64);
    let mut rx = add(&mut s, 1, 10, 3);
    let plan = s.schedule(true);
    assert_eq!(plan.chunks.len(), 1, "the prompt is computed once");
    let leader_blocks = plan.chunks[0].block_table.clone();
    assert_eq!(leader_blocks.len(), 3);
    // What the forward pass would have written at positions 8 and 9.
    let rows = Tensor::new(&[[[1f32, 2.]], [[3., 4.]]], &Device::Cpu).unwrap();
    let slots = [
        leader_blocks[2] * BS as u32,
        leader_blocks[2] * BS as u32 + 1,
    ];
    pool.write(0, &slots, &rows, &rows).unwrap();
    assert_eq!(apply(&mut s, &plan, &pool), 3);
    assert_eq!(s.num_running(), 3);
    for sib in s.running.iter().filter(|seq| seq.choice > 0) {
        assert_eq!(sib.rng.get_word_pos(), DRAWN, "its draw counted");
        let ids = sib.blocks.ids();
        assert_eq!(ids[..2], leader_blocks[..2], "full blocks are shared");
        assert!(
            !leader_blocks.contains(&ids[2]),
            "the partial block is a copy"
        );
        assert_eq!((sib.num_computed, sib.tokens.len()), (10, 11));
        let copied = pool
            .keys(0)
            .narrow(1, ids[2] as usize * BS, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(copied, vec![1., 2., 3., 4.]);
    }
    assert_eq!(s.kv.num_used(), 5, "three leader blocks and two copies");
    let mut choices: Vec<usize> = std::iter::from_fn(|| rx.try_recv().ok())
        .map(|e| match e {
            EngineEvent::Token(t) => t.choice,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    choices.sort();
    assert_eq!(choices, vec![0, 1, 2]);
}

#[test]
fn a_choice_that_cannot_fork_waits_with_its_rng_untouched() {
    // The leader's three blocks leave none for the copy.
    let pool = kv_pool(3);
    let mut s = scheduler(3, 64);
    let _rx = add(&mut s, 1, 10, 2);
    let before = s.waiting[0].siblings[0].rng.get_word_pos();
    let plan = s.schedule(true);
    assert_eq!(apply(&mut s, &plan, &pool), 1);
    assert_eq!(s.num_running(), 1);
    let sib = &s.waiting[0];
    assert_eq!(
        (sib.choice, sib.blocks.ids().len(), sib.tokens.len()),
        (1, 0, 10)
    );
    assert_eq!(sib.rng.get_word_pos(), before);
    assert_ne!(before, DRAWN);
}

#[test]
fn prefill_chunks_fill_what_decoding_leaves_of_the_budget() {
    let pool = kv_pool(16);
    let mut s = scheduler(16, 8);
    let _a = add(&mut s, 1, 5, 1);
    let plan = s.schedule(true);
    apply(&mut s, &plan, &pool);
    let _b = add(&mut s, 2, 20, 1);
    let mut b_chunks = Vec::new();
    for _ in 0..3 {
        let plan = s.schedule(true);
        assert!(plan.num_tokens() <= 8);
        let lens: Vec<usize> = plan.chunks.iter().map(|c| c.tokens.len()).collect();
        assert_eq!(lens[0], 1, "A decodes every step");
        let b = &plan.chunks[1];
        b_chunks.push((b.offset, b.tokens.len(), b.samples));
        apply(&mut s, &plan, &pool);
    }
    assert_eq!(b_chunks, vec![(0, 7, false), (7, 7, false), (14, 6, true)]);
    assert_eq!(
        s.running[1].tokens.len(),
        21,
        "B sampled after its last chunk"
    );
}

#[test]
fn a_second_prompt_reuses_cached_blocks_but_computes_its_last_token() {
    let pool = kv_pool(8);
    let mut s = scheduler(8, 64);
    let _a = add(&mut s, 1, 8, 1);
    let plan = s.schedule(true);
    apply(&mut s, &plan, &pool);
    s.cancel(1, None);
    // Same 8 tokens: both blocks are cached, but the last token runs again.
    let (events, _rx) = mpsc::unbounded_channel();
    s.add(GenerationJob {
        adapter: None,
        request_id: 2,
        prompt: (100..108).collect(),
        params: Arc::new(SamplingParams::default()),
        seed: 0,
        budget: 4,
        events,
    });
    let plan = s.schedule(true);
    let c = &plan.chunks[0];
    assert_eq!((c.offset, c.tokens.len(), c.samples), (4, 4, true));
    assert_eq!(s.kv.prefix_counters(), (4, 12));
}
