//! gym-serve: an inference engine and server for reinforcement-learning rollouts.

pub mod api;
pub mod bench;
pub mod chat;
pub mod cli;
pub mod config;
pub mod connections;
pub mod engine;
pub mod fixtures;
pub mod huge_pages;
pub mod loader;
pub mod math;
pub mod memory;
pub mod model;
pub mod push;
pub mod server;
pub mod validate;
pub mod weights;
