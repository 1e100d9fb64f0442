//! gym-serve: an inference engine and server for reinforcement-learning rollouts.

pub mod config;
pub mod model;
pub mod weights;
pub mod engine;
