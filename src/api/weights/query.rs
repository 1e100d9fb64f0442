//! The weight endpoints' queries, as typed structs: serde derives parse
//! them, and a refusal names the parameter (`mode`, `pause`) in the error's
//! message and `param`.

use crate::api::error::ApiError;
use crate::engine::refit::{Landing, UpdatePlan, UpdateTarget};
use crate::engine::PauseMode;
use crate::weights::{clip, UpdateMode};
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// `?version=V&mode=full|partial&pause=wait|abort|keep` of a push or stage.
#[derive(Debug, Deserialize)]
pub struct PushQuery {
    version: Option<String>,
    #[serde(default)]
    mode: UpdateMode,
    #[serde(default = "wait")]
    pause: PauseMode,
}

impl PushQuery {
    pub fn plan(self, landing: Landing) -> UpdatePlan {
        UpdatePlan {
            mode: self.mode,
            version: self.version,
            pause: self.pause,
            target: UpdateTarget::Base,
            landing,
        }
    }
}

/// `?id=ID&pause=MODE` of a commit; `?id=ID` of an abort (two-phase updates).
#[allow(dead_code)] // the staged endpoints are being built on it
#[derive(Debug, Deserialize)]
pub struct StagedQuery {
    pub id: Option<String>,
    pub pause: Option<PauseMode>,
}

fn wait() -> PauseMode {
    PauseMode::Wait
}

/// Parses the raw query into `T`; an error names the parameter.
pub fn parse<T: DeserializeOwned>(raw: Option<&str>) -> Result<T, ApiError> {
    let pairs = form_urlencoded::parse(raw.unwrap_or("").as_bytes());
    serde_path_to_error::deserialize(serde_urlencoded::Deserializer::new(pairs)).map_err(|e| {
        let param = e.path().to_string();
        let message = format!("invalid query parameter `{}`: {}", clip(&param), e.inner());
        ApiError::bad_request(message, (param != ".").then_some(param.as_str()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_names_and_refusals() {
        let q: PushQuery = parse(None).unwrap();
        assert_eq!(
            (q.mode, q.pause, q.version),
            (UpdateMode::Full, PauseMode::Wait, None)
        );
        let q: PushQuery = parse(Some("mode=partial&pause=keep&version=7&other=1")).unwrap();
        assert_eq!(q.mode, UpdateMode::Partial);
        assert_eq!(q.pause, PauseMode::Keep);
        assert_eq!(q.version.as_deref(), Some("7"));
        for (query, param, words) in [
            ("mode=sideways", "mode", "expected `full` or `partial`"),
            (
                "pause=never",
                "pause",
                "expected one of `abort`, `wait`, `keep`",
            ),
        ] {
            let e = parse::<PushQuery>(Some(query)).unwrap_err();
            let body = serde_json::to_value(e.body()).unwrap();
            assert_eq!(body["error"]["param"], param, "{body}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(
                message.contains(param) && message.contains(words),
                "{message}"
            );
        }
        let q: StagedQuery = parse(Some("id=stage-3")).unwrap();
        assert_eq!((q.id.as_deref(), q.pause), (Some("stage-3"), None));
    }
}
