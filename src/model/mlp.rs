//! The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.

use super::linear::Linear;
use crate::lora::apply::LayerAdapters;
use crate::weights::names::LayerModule;
use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
pub struct Mlp {
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
}

impl Mlp {
    /// `lora` adds the step's adapters' updates to each projection.
    pub fn forward(&self, x: &Tensor, lora: LayerAdapters<'_>) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&lora.project(LayerModule::GateProj, &self.gate, x)?)?;
        let up = lora.project(LayerModule::UpProj, &self.up, x)?;
        lora.project(LayerModule::DownProj, &self.down, &(gate * up)?)
    }
}
