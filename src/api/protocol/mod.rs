//! The wire format of the HTTP API, in one place: every request body and
//! every response body is a typed struct here, so each field name is written
//! once. Response structs borrow the request's token state and serialize
//! straight from it (no `serde_json::Value` tree), in the field order
//! clients have always received.
//!
//! Log-probs go out as the f32's exact value widened to f64
//! (`-7.066963195800781`), which is what a Python float reads back as the
//! same number; `-inf` becomes vLLM's `-9999.0`.

pub mod chat;
pub mod common;
pub mod completion;
pub mod request;

pub use common::*;
