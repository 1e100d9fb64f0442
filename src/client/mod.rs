//! The client commands: programs that talk HTTP to a running server (ours or
//! any server claiming the contract). They share no state with the engine.

pub mod bench;
mod chain;
mod fleet;
pub mod push;
pub mod validate;
