//! CPU time of the text stage per generated token, at 500 and 4,000 tokens:
//! a chat stream's path (incremental detokenization, stop strings, the
//! reasoning/tool-call parse and its deltas) driven with the tiny model's
//! real tokenizer over random tokens. It must not grow with the length. For
//! scale, the last row re-parses the whole text after every token, as chat
//! streams did before the parse became incremental.
//!
//! `cargo bench --bench text_output` (or `cargo test --bench text_output`
//! for the dev profile's build). Times are this thread's CPU time.

use gym_serve::chat::parsers::{parse_output, ReasoningParser, ToolCallParser};
use gym_serve::chat::stop::StopMatcher;
use gym_serve::chat::text_output::{ChatStreamText, TextOptions, TextOutput};
use gym_serve::chat::TextTokenizer;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

const REASONING: ReasoningParser = ReasoningParser::Qwen3;
const TOOLS: ToolCallParser = ToolCallParser::Hermes;

/// CPU time of this thread: on a shared machine, wall time counts the
/// time other processes ran, which a longer run suffers more of.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Random tokens, opening with `<think>` so the reasoning parser has work.
fn tokens(tokenizer: &TextTokenizer, n: usize, seed: u64) -> Vec<u32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let think = tokenizer.token_to_id("<think>").expect("<think> token");
    let mut ids = vec![think];
    ids.extend((1..n).map(|_| rng.random_range(0..1024)));
    ids
}

/// Seconds per token of the text stage over `ids`, as a chat stream runs it.
fn stream_stage(tokenizer: &TextTokenizer, ids: &[u32]) -> f64 {
    let options = TextOptions {
        stop: StopMatcher::new(vec!["never-written stop".into(), "\n\n\n\n".into()]).map(Arc::new),
        include_stop_str_in_output: false,
        skip_special_tokens: true,
    };
    let start = cpu_seconds();
    let mut output = TextOutput::new(&options);
    let mut stream = ChatStreamText::new(REASONING, TOOLS);
    let mut sent = 0;
    for n in 1..=ids.len() {
        let finished = n == ids.len();
        let stopped = output.update(tokenizer, &ids[..n], finished).unwrap();
        let delta = stream.delta(&output, finished || stopped.is_some());
        sent += delta.content.map_or(0, |c| c.len()) + delta.reasoning.map_or(0, |r| r.len());
        if stopped.is_some() {
            break;
        }
    }
    std::hint::black_box(sent);
    (cpu_seconds() - start) / ids.len() as f64
}

/// Seconds per token of re-parsing the whole text after every token.
fn whole_reparse(tokenizer: &TextTokenizer, ids: &[u32]) -> f64 {
    let text = tokenizer.decode(ids, true).unwrap();
    let ends: Vec<usize> = (1..=ids.len())
        .map(|n| {
            (text.len() * n / ids.len()..=text.len())
                .find(|&e| text.is_char_boundary(e))
                .unwrap()
        })
        .collect();
    let start = cpu_seconds();
    for &end in &ends {
        std::hint::black_box(parse_output(&text[..end], REASONING, TOOLS, true));
    }
    (cpu_seconds() - start) / ids.len() as f64
}

fn main() {
    let dir = std::env::temp_dir().join(format!("gym-serve-text-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    gym_serve::make_model::tokenizer::train_tokenizer(1024)
        .unwrap()
        .save(&path, false)
        .unwrap();
    let tokenizer = TextTokenizer::from_file(&path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{:<44} {:>10} {:>14}",
        "text stage", "tokens", "us per token"
    );
    for n in [500, 4000] {
        // Best of a few runs: the figure is per-token cost, not noise.
        let runs = if n == 500 { 24 } else { 3 };
        let best = (0..runs)
            .map(|seed| stream_stage(&tokenizer, &tokens(&tokenizer, n, seed)))
            .fold(f64::MAX, f64::min);
        println!(
            "{:<44} {n:>10} {:>14.2}",
            "chat stream (incremental)",
            best * 1e6
        );
    }
    for n in [500, 4000] {
        let best = (0..3)
            .map(|seed| whole_reparse(&tokenizer, &tokens(&tokenizer, n, seed)))
            .fold(f64::MAX, f64::min);
        println!(
            "{:<44} {n:>10} {:>14.2}",
            "whole-text re-parse per token (old stream)",
            best * 1e6
        );
    }
}
