//! gym-serve: an inference engine and server for reinforcement-learning rollouts.

pub mod api;
pub mod chat;
pub mod cli;
pub mod client;
pub mod config;
pub mod connections;
pub mod engine;
mod error_chain;
pub mod huge_pages;
pub mod loader;
pub mod lora;
pub mod make_model;
pub mod math;
pub mod memory;
pub mod model;
pub mod server;
pub mod weights;
