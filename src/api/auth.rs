//! Who may call what. Inference routes answer to `--api-key`; weight and
//! control routes to `--admin-api-key`, or, without one, to `--api-key`:
//! they are never less protected than inference. With neither key they are
//! open only on a loopback bind, unless `--allow-open-admin` says otherwise.

use super::error::ApiError;
use super::AppState;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::IpAddr;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("refusing to serve weight and control endpoints without a key on {host}, which is not a loopback address: set --admin-api-key (or --api-key), bind 127.0.0.1, or pass --allow-open-admin")]
    OpenAdminOnPublicBind { host: String },
}

/// The key the admin routes require (`None`: open), or a refusal to start.
pub fn admin_key(
    api_key: Option<&str>,
    admin_api_key: Option<&str>,
    host: &str,
    allow_open_admin: bool,
) -> Result<Option<String>, AuthConfigError> {
    if let Some(key) = admin_api_key.or(api_key) {
        return Ok(Some(key.to_string()));
    }
    if is_loopback(host) {
        return Ok(None);
    }
    if !allow_open_admin {
        return Err(AuthConfigError::OpenAdminOnPublicBind {
            host: host.to_string(),
        });
    }
    tracing::warn!(%host, "weight and control endpoints are open to anyone who can reach this address (--allow-open-admin)");
    Ok(None)
}

/// `localhost` or an address in 127.0.0.0/8 or ::1 (IPv4-mapped too).
pub fn is_loopback(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        Ok(IpAddr::V4(ip)) => ip.is_loopback(),
        Ok(IpAddr::V6(ip)) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Err(_) => false,
    }
}

/// Compares in time independent of where the first difference is, so the
/// key cannot be guessed byte by byte from response times.
fn same_key(given: &[u8], key: &[u8]) -> bool {
    given.len() == key.len() && given.iter().zip(key).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}

/// Passes requests carrying `Authorization: Bearer KEY` when a key is set.
fn check_bearer(key: Option<&str>, request: &Request) -> Result<(), ApiError> {
    let Some(key) = key else { return Ok(()) };
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if same_key(g.as_bytes(), key.as_bytes()) => Ok(()),
        _ => Err(ApiError::Unauthorized),
    }
}

pub async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    match check_bearer(state.api_key.as_deref(), &request) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// `state.admin_api_key` is already the effective key (see [`admin_key`]).
pub async fn require_admin_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    match check_bearer(state.admin_api_key.as_deref(), &request) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_takes_the_inference_key_without_its_own() {
        assert_eq!(
            admin_key(Some("k"), None, "0.0.0.0", false).unwrap(),
            Some("k".into())
        );
        assert_eq!(
            admin_key(Some("k"), Some("a"), "0.0.0.0", false).unwrap(),
            Some("a".into())
        );
    }

    #[test]
    fn open_admin_needs_loopback_or_the_flag() {
        assert_eq!(admin_key(None, None, "127.0.0.1", false).unwrap(), None);
        assert_eq!(admin_key(None, None, "::1", false).unwrap(), None);
        assert_eq!(admin_key(None, None, "localhost", false).unwrap(), None);
        assert!(admin_key(None, None, "0.0.0.0", false).is_err());
        assert!(admin_key(None, None, "10.0.0.5", false).is_err());
        assert_eq!(admin_key(None, None, "0.0.0.0", true).unwrap(), None);
    }

    #[test]
    fn keys_compare_whole() {
        assert!(same_key(b"secret", b"secret"));
        assert!(!same_key(b"secre", b"secret"));
        assert!(!same_key(b"secreT", b"secret"));
    }
}
