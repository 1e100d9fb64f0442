//! [`Update`]: an update being received. The caller feeds it the body as it
//! arrives and then finishes or aborts it; dropped unfinished (the client
//! left), it is a refused update and changes nothing.

use super::claim::Claim;
use super::{Landed, RefitError, UpdatePlan};
use crate::weights::stream::StreamingUpdate;

pub struct Update {
    claim: Claim,
    stream: StreamingUpdate,
    bytes: usize,
}

impl Update {
    pub(super) fn new(claim: Claim, stream: StreamingUpdate) -> Self {
        Self {
            claim,
            stream,
            bytes: 0,
        }
    }

    pub fn plan(&self) -> &UpdatePlan {
        self.claim.plan()
    }

    /// Checks and converts the next bytes of the safetensors body. After an
    /// error, abort the update (or drop it).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), RefitError> {
        self.bytes += bytes.len();
        Ok(self.stream.push(bytes)?)
    }

    /// Bytes fed so far.
    pub fn received(&self) -> usize {
        self.bytes
    }

    /// Ends the body: waits for the last conversions, then commits or
    /// stages the update as planned. Runs on a task of its own, so it
    /// completes and is recorded even if the caller goes away.
    pub async fn finish(self) -> Result<Landed, RefitError> {
        let Update {
            claim,
            stream,
            bytes,
        } = self;
        let run = async move {
            match stream.finish().await {
                Ok(updates) => claim.land(updates, bytes, true).await,
                Err(e) => Err(claim.refuse(RefitError::from(e))),
            }
        };
        tokio::spawn(run)
            .await
            .map_err(|e| RefitError::Internal(format!("update task: {e}")))?
    }

    /// Ends the update refused for `reason` (a bad checksum, a body cut
    /// short); the served weights stay as they were.
    pub fn abort(self, reason: &dyn std::fmt::Display) {
        let _ = self.claim.refuse(reason);
    }
}
