//! An error with its causes, on one line: HTTP clients' errors say what
//! failed ("error sending request") and keep why (refused, reset) in their
//! sources.

/// `e: cause: cause ...`.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(&format!(": {s}"));
        source = s.source();
    }
    message
}
