//! The generation engine: one thread owns the model and runs the step loop;
//! [`EngineHandle`] is the cheap, cloneable way in from any other thread or task.
//!
//! Requests are validated on the caller's side of the channel, so a bad request
//! is answered at once and never reaches the engine thread.

pub mod core;
pub mod events;
pub mod params;
pub mod sampler;
pub mod sequence;

use self::core::{EngineCore, GenerationJob, ScoreJob};
use crate::model::Model;
pub use events::{EngineEvent, EventReceiver, FinishReason, TokenEvent};
pub use params::{DistributionParams, LogprobsMode, ParamError, SamplingParams};
use std::sync::mpsc;
use std::sync::Arc;
use tokio::sync::{mpsc as tokio_mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    InvalidParam(#[from] ParamError),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {token} is out of the vocabulary (size {vocab_size})")]
    TokenOutOfVocab { token: u32, vocab_size: usize },
    #[error("This model's maximum context length is {max} tokens. However, your request has {requested} tokens. Please reduce the length of the input.")]
    ContextLength { requested: usize, max: usize },
    #[error("start must be in [1, {len}] (the first token has no prefix to score it against), got {start}")]
    InvalidStart { start: usize, len: usize },
    #[error("the engine has stopped")]
    Stopped,
    #[error("engine failure: {0}")]
    Failed(String),
}

/// Limits every request is validated against.
#[derive(Debug, Clone)]
pub struct EngineLimits {
    pub vocab_size: usize,
    pub max_model_len: usize,
    pub eos_token_ids: Vec<u32>,
}

enum Command {
    Generate(GenerationJob),
    Score(ScoreJob, oneshot::Sender<Result<Vec<f32>, EngineError>>),
}

#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    limits: Arc<EngineLimits>,
}

impl EngineHandle {
    /// Starts the engine thread. `max_model_len` is clamped to what the model's
    /// position tables cover.
    pub fn spawn(
        model: Model,
        eos_token_ids: Vec<u32>,
        max_model_len: Option<usize>,
    ) -> std::io::Result<Self> {
        let max_positions = model.max_positions();
        let limits = Arc::new(EngineLimits {
            vocab_size: model.config().vocab_size,
            max_model_len: max_model_len.map_or(max_positions, |m| m.min(max_positions)),
            eos_token_ids: eos_token_ids.clone(),
        });
        let (tx, rx) = mpsc::channel::<Command>();
        std::thread::Builder::new()
            .name("gym-serve-engine".into())
            .spawn(move || run_loop(EngineCore::new(model, eos_token_ids), rx))?;
        Ok(Self {
            commands: tx,
            limits,
        })
    }

    pub fn limits(&self) -> &EngineLimits {
        &self.limits
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<(), EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if let Some(&token) = tokens
            .iter()
            .find(|&&t| t as usize >= self.limits.vocab_size)
        {
            return Err(EngineError::TokenOutOfVocab {
                token,
                vocab_size: self.limits.vocab_size,
            });
        }
        Ok(())
    }

    /// Queues a generation; events for all `n` choices arrive on the stream.
    pub fn generate(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<GenerationStream, EngineError> {
        params.validate()?;
        self.check_tokens(&prompt)?;
        let max = self.limits.max_model_len;
        if prompt.len() >= max {
            return Err(EngineError::ContextLength {
                requested: prompt.len(),
                max,
            });
        }
        // max_tokens beyond the context is clamped to what fits.
        let budget = params.max_tokens.min(max - prompt.len());
        let seed = params.seed.unwrap_or_else(rand::random);
        let n = params.n;
        let (events, receiver) = tokio_mpsc::unbounded_channel();
        let job = GenerationJob {
            prompt,
            params: Arc::new(params),
            seed,
            budget,
            events,
        };
        self.commands
            .send(Command::Generate(job))
            .map_err(|_| EngineError::Stopped)?;
        Ok(GenerationStream { receiver, n })
    }

    fn score_job(
        &self,
        token_ids: Vec<u32>,
        start: usize,
        distribution: DistributionParams,
        mode: LogprobsMode,
    ) -> Result<oneshot::Receiver<Result<Vec<f32>, EngineError>>, EngineError> {
        distribution.validate()?;
        self.check_tokens(&token_ids)?;
        if start == 0 || start > token_ids.len() {
            return Err(EngineError::InvalidStart {
                start,
                len: token_ids.len(),
            });
        }
        if token_ids.len() > self.limits.max_model_len {
            return Err(EngineError::ContextLength {
                requested: token_ids.len(),
                max: self.limits.max_model_len,
            });
        }
        let (reply, rx) = oneshot::channel();
        let job = ScoreJob {
            token_ids,
            start,
            distribution,
            mode,
        };
        self.commands
            .send(Command::Score(job, reply))
            .map_err(|_| EngineError::Stopped)?;
        Ok(rx)
    }

    /// Teacher-forced log-probs of `token_ids[start..]` (blocking).
    pub fn score_blocking(
        &self,
        token_ids: Vec<u32>,
        start: usize,
        distribution: DistributionParams,
        mode: LogprobsMode,
    ) -> Result<Vec<f32>, EngineError> {
        self.score_job(token_ids, start, distribution, mode)?
            .blocking_recv()
            .map_err(|_| EngineError::Stopped)?
    }

    /// Teacher-forced log-probs of `token_ids[start..]`.
    pub async fn score(
        &self,
        token_ids: Vec<u32>,
        start: usize,
        distribution: DistributionParams,
        mode: LogprobsMode,
    ) -> Result<Vec<f32>, EngineError> {
        self.score_job(token_ids, start, distribution, mode)?
            .await
            .map_err(|_| EngineError::Stopped)?
    }
}

fn run_loop(mut core: EngineCore, commands: mpsc::Receiver<Command>) {
    let apply = |core: &mut EngineCore, cmd: Command| match cmd {
        Command::Generate(job) => core.add(job),
        Command::Score(job, reply) => {
            let result = core
                .score(&job)
                .map_err(|e| EngineError::Failed(e.to_string()));
            let _ = reply.send(result);
        }
    };
    loop {
        if !core.has_work() {
            // Idle: sleep until a command arrives; every handle dropped ends the loop.
            match commands.recv() {
                Ok(cmd) => apply(&mut core, cmd),
                Err(_) => return,
            }
        }
        while let Ok(cmd) = commands.try_recv() {
            apply(&mut core, cmd);
        }
        core.step();
    }
}

/// Everything one choice produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChoiceOutput {
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    pub finish_reason: Option<FinishReason>,
}

/// The events of one request, as they are produced.
pub struct GenerationStream {
    receiver: EventReceiver,
    n: usize,
}

impl GenerationStream {
    pub fn n(&self) -> usize {
        self.n
    }

    /// The next event; `None` once every choice has finished.
    pub async fn next(&mut self) -> Option<EngineEvent> {
        self.receiver.recv().await
    }

    pub fn next_blocking(&mut self) -> Option<EngineEvent> {
        self.receiver.blocking_recv()
    }

    fn fold(
        n: usize,
        mut next: impl FnMut() -> Option<EngineEvent>,
    ) -> Result<Vec<ChoiceOutput>, EngineError> {
        let mut out = vec![ChoiceOutput::default(); n];
        let mut unfinished = n;
        while unfinished > 0 {
            match next() {
                Some(EngineEvent::Token(t)) => {
                    let c = &mut out[t.choice];
                    c.token_ids.push(t.token);
                    c.logprobs.push(t.logprob);
                    c.top_logprobs.push(t.top_logprobs);
                    if t.finish.is_some() {
                        c.finish_reason = t.finish;
                        unfinished -= 1;
                    }
                }
                Some(EngineEvent::Failed(msg)) => return Err(EngineError::Failed(msg)),
                None => return Err(EngineError::Stopped),
            }
        }
        Ok(out)
    }

    /// Waits for every choice to finish (blocking; not for async contexts).
    pub fn collect_blocking(mut self) -> Result<Vec<ChoiceOutput>, EngineError> {
        let n = self.n;
        Self::fold(n, || self.receiver.blocking_recv())
    }

    /// Waits for every choice to finish.
    pub async fn collect(mut self) -> Result<Vec<ChoiceOutput>, EngineError> {
        let mut events = Vec::new();
        let mut finished = 0;
        while finished < self.n {
            let Some(event) = self.receiver.recv().await else {
                break;
            };
            match &event {
                EngineEvent::Token(t) if t.finish.is_some() => finished += 1,
                EngineEvent::Failed(_) => finished = self.n,
                EngineEvent::Token(_) => {}
            }
            events.push(event);
        }
        let mut events = events.into_iter();
        Self::fold(self.n, || events.next())
    }
}
