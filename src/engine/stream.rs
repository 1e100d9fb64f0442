//! The events of one request as the engine produces them, and what a
//! finished choice adds up to.

use super::{Command, EngineError, EngineEvent, EventReceiver, FinishReason};
use std::sync::mpsc;

/// Everything one choice produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChoiceOutput {
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    pub finish_reason: Option<FinishReason>,
}

/// The events of one request, as they are produced. Dropping it cancels
/// whatever the request still has running.
pub struct GenerationStream {
    receiver: EventReceiver,
    n: usize,
    request_id: u64,
    commands: mpsc::Sender<Command>,
}

impl Drop for GenerationStream {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Cancel {
            request_id: self.request_id,
            choice: None,
        });
    }
}

impl GenerationStream {
    pub(super) fn new(
        receiver: EventReceiver,
        n: usize,
        request_id: u64,
        commands: mpsc::Sender<Command>,
    ) -> Self {
        Self {
            receiver,
            n,
            request_id,
            commands,
        }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// Stops one choice (e.g. a stop string matched); the others go on.
    pub fn cancel_choice(&self, choice: usize) {
        let _ = self.commands.send(Command::Cancel {
            request_id: self.request_id,
            choice: Some(choice),
        });
    }

    /// The next event; `None` once every choice has finished.
    pub async fn next(&mut self) -> Option<EngineEvent> {
        self.receiver.recv().await
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
                Some(EngineEvent::Aborted { choice }) => {
                    if out[choice].finish_reason.is_none() {
                        out[choice].finish_reason = Some(FinishReason::Abort);
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
}
