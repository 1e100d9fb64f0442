//! The weight-update transaction, with one owner: [`Refitter`].
//!
//! It holds the served [`ParamStore`] (whose lock serializes updates), the
//! tensors the last update retired (converted into by the next one), the
//! receive buffers and the [`EngineHandle`]. The HTTP layer only parses,
//! frames and answers:
//!
//! 1. [`Refitter::begin`] with an [`UpdatePlan`] (mode, version, pause, and
//!    whether to commit at once or stage) claims the update and gives an
//!    [`Update`];
//! 2. [`Update::feed`] takes the body's bytes as they arrive (checked and
//!    converted beside the served weights while generation goes on);
//! 3. [`Update::finish`] commits (swaps between two engine steps) or stages
//!    the result; [`Update::abort`], or dropping the update, changes nothing.
//!
//! A staged update waits beside the serving weights until
//! [`Refitter::commit_staged`] swaps it in, [`Refitter::abort_staged`] drops
//! it, or it expires. Everything past the last byte runs on a task of its
//! own, so a client that leaves cannot cut an update short between reaching
//! the engine and being recorded.

mod claim;
mod staged;
mod stats;
mod update;

pub use staged::StagedInfo;
pub use stats::RefitStats;
pub use update::Update;

use super::{EngineError, EngineHandle, PauseMode};
use crate::config::ModelConfig;
use crate::weights::disk::{finish_checkpoint, stage_checkpoint, StageTarget};
use crate::weights::stream::{BufferPool, Spawner, StreamingUpdate};
use crate::weights::{ParamStore, UpdateMode, WeightsError};
use candle_core::{Device, Tensor};
use claim::Claim;
use staged::Slot;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum RefitError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Another update holds the staging slot (or a staged update blocks a
    /// direct one, which would change the weights it was staged against).
    #[error("weight update {id} (version {version}) is {state}; commit or abort it first (POST /v1/weights/commit or /v1/weights/abort)")]
    Busy {
        id: String,
        version: String,
        state: &'static str,
    },
    #[error("no staged weight update to {action}: stage one first (POST /v1/weights/stage)")]
    NothingStaged { action: &'static str },
    #[error("the staged weight update is {staged}, not {asked}")]
    NotThatOne { staged: String, asked: String },
    #[error("{0}")]
    Internal(String),
}

/// What an update replaces. Only the base weights today; an adapter push
/// (a named LoRA adapter beside the base) is another target, with its own
/// checks and its own swap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum UpdateTarget {
    #[default]
    Base,
}

/// Where an update goes once its last byte is in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Landing {
    /// Swap it in at once (a plain `POST /v1/weights`).
    #[default]
    Commit,
    /// Hold it, converted, until a commit or an abort (or it expires).
    Stage,
}

/// What a client asks of an update.
#[derive(Debug, Clone)]
pub struct UpdatePlan {
    pub mode: UpdateMode,
    /// The label it serves under; by default the serving one plus one.
    pub version: Option<String>,
    /// How the swap treats running requests (a commit may override a
    /// staged update's).
    pub pause: PauseMode,
    pub target: UpdateTarget,
    pub landing: Landing,
}

/// Where an update ended.
#[derive(Debug, Clone)]
pub enum Landed {
    Committed(Committed),
    Staged(StagedInfo),
}

/// An update that serves.
#[derive(Debug, Clone)]
pub struct Committed {
    pub version: String,
    pub tensors: usize,
    pub bytes: usize,
    /// From the first byte (or, for a staged update, the commit) to serving.
    pub seconds: f64,
    /// The staged update it came from, if any.
    pub stage_id: Option<String>,
}

pub struct RefitterOptions {
    /// How long a staged update waits for its commit before it is dropped.
    pub staged_timeout: Duration,
}

#[derive(Clone)]
pub struct Refitter {
    shared: Arc<Shared>,
}

struct Shared {
    engine: EngineHandle,
    config: ModelConfig,
    device: Device,
    /// The served parameters; the lock serializes updates.
    served: Arc<tokio::sync::Mutex<ParamStore>>,
    /// On the CPU, the tensors the last update replaced, which nothing reads
    /// any more: the next update converts into their memory instead of
    /// allocating (a fresh allocation's page faults cost as much as the
    /// conversion). Touched only while `served` is locked.
    spare: Mutex<HashMap<String, Tensor>>,
    /// Receive buffers, kept for the next update for the same reason.
    buffers: BufferPool,
    stats: Arc<RefitStats>,
    /// The one staged update, or the one being staged.
    slot: Mutex<Slot>,
    staged_timeout: Duration,
    next_id: AtomicU64,
}

impl Refitter {
    pub fn new(
        engine: EngineHandle,
        config: ModelConfig,
        device: Device,
        served: ParamStore,
        options: RefitterOptions,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                engine,
                config,
                device,
                served: Arc::new(tokio::sync::Mutex::new(served)),
                spare: Mutex::default(),
                buffers: BufferPool::default(),
                stats: Arc::default(),
                slot: Mutex::new(Slot::Empty),
                staged_timeout: options.staged_timeout,
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// The served model's config, which adapters are checked against.
    pub fn model_config(&self) -> &ModelConfig {
        &self.shared.config
    }

    /// The counters `/metrics` shows.
    pub fn stats(&self) -> Arc<RefitStats> {
        self.shared.stats.clone()
    }

    /// The version serving now.
    pub fn serving_version(&self) -> Arc<str> {
        self.shared.engine.stats().weight_version()
    }

    /// Counts and logs an update refused before it began (a bad query, a
    /// body declared too large).
    pub fn refused(&self, error: &dyn std::fmt::Display) {
        self.shared.stats.record_failure();
        tracing::warn!(error = %error, "weight update refused; served weights unchanged");
    }

    /// Claims the right to change the weights (waiting for an update in
    /// progress to end) and gives the update to feed. A staged update in
    /// the way is a [`RefitError::Busy`], at once.
    pub async fn begin(&self, plan: UpdatePlan) -> Result<Update, RefitError> {
        let claim = Claim::take(self.shared.clone(), plan).await?;
        let reuse = self
            .shared
            .spare
            .lock()
            .map(|mut spare| std::mem::take(&mut *spare))
            .unwrap_or_default();
        let stream = StreamingUpdate::new(
            &self.shared.config,
            claim.plan().mode,
            claim.run_dtype(),
            &self.shared.device,
            Some(self.shared.spawner()),
            reuse,
            self.shared.buffers.clone(),
        )
        .holding_matrices(claim.matrix_dtype());
        Ok(Update::new(claim, stream))
    }

    /// An update from the checkpoint directory `dir` (read under the bounds
    /// of [`crate::weights::disk`]), to its end; `plan.mode` is decided by
    /// the files (one must hold everything, shards together).
    pub async fn apply_checkpoint(
        &self,
        dir: PathBuf,
        plan: UpdatePlan,
    ) -> Result<Landed, RefitError> {
        let claim = Claim::take(self.shared.clone(), plan).await?;
        let shared = self.shared.clone();
        // On a task of its own: see the module's note.
        let run = async move {
            let target = StageTarget {
                run: claim.run_dtype(),
                matrices: claim.matrix_dtype(),
                device: shared.device.clone(),
                spawner: Some(shared.spawner()),
                buffers: shared.buffers.clone(),
            };
            let config = shared.config.clone();
            let staged =
                tokio::task::spawn_blocking(move || stage_checkpoint(&dir, &config, &target))
                    .await
                    .map_err(|e| RefitError::Internal(format!("staging thread: {e}")));
            let updates = match staged {
                Ok(Ok(stages)) => finish_checkpoint(&shared.config, stages)
                    .await
                    .map_err(RefitError::from),
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(e),
            };
            match updates {
                // What a disk update replaces is dropped: only pushes
                // convert into retired memory.
                Ok(updates) => claim.land(updates, 0, false).await,
                Err(e) => Err(claim.refuse(e)),
            }
        };
        tokio::spawn(run)
            .await
            .map_err(|e| RefitError::Internal(format!("update task: {e}")))?
    }

    /// Swaps the staged update in (with `pause`, else the one it was staged
    /// with). `id`, when given, must name it.
    pub async fn commit_staged(
        &self,
        id: Option<String>,
        pause: Option<PauseMode>,
    ) -> Result<Committed, RefitError> {
        let shared = self.shared.clone();
        tokio::spawn(async move { staged::commit(shared, id, pause).await })
            .await
            .map_err(|e| RefitError::Internal(format!("commit task: {e}")))?
    }

    /// Drops the staged update (`id`, when given, must name it) and returns
    /// its memory; `None` when nothing was staged.
    pub async fn abort_staged(&self, id: Option<String>) -> Result<Option<StagedInfo>, RefitError> {
        staged::abort(&self.shared, id).await
    }

    /// The staged update, if one is held.
    pub fn staged(&self) -> Option<StagedInfo> {
        staged::info(&self.shared)
    }
}

impl Shared {
    /// Conversions run on the engine thread between steps (see
    /// [`EngineHandle::between_steps`]).
    fn spawner(&self) -> Spawner {
        let engine = self.engine.clone();
        Arc::new(move |job| engine.between_steps(job))
    }

    fn new_id(&self) -> String {
        format!("stage-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }
}

/// The label after `current`: the next integer when it is one.
pub(crate) fn next_version(current: &str) -> String {
    match current.parse::<u64>() {
        Ok(n) => (n + 1).to_string(),
        Err(_) => format!("{current}+1"),
    }
}

/// Seconds since `t`.
fn since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}
