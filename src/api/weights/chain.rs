//! Chained staging: `POST /v1/weights/stage?forward_to=B,C` stages the body
//! here and, frame by frame as it arrives, sends it on to `B`'s stage with
//! `forward_to=C`, and so on, so a trainer sends the update once however
//! many replicas there are. Every hop checks the checksum itself; a failure
//! anywhere fails the stage of the whole chain (each hop drops what it
//! staged) and the first hop answers with the error, naming the replica.
//! The commit stays the client's, on every replica the answer lists.
//!
//! Forwarding makes this server send requests to addresses a client
//! chose, so it is refused unless the server has an admin key (the client
//! passed it to get here); that key goes on to the next hop, as the whole
//! chain shares it. The frames in flight to the next hop are bounded.

use super::body::CHECKSUM_HEADER;
use crate::api::error::ApiError;
use crate::api::AppState;
use crate::error_chain::error_chain;
use axum::body::Bytes;
use axum::http::{header, HeaderMap};
use serde::{Deserialize, Serialize};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;

/// At most this many replicas after this one.
pub const MAX_HOPS: usize = 32;
/// Frames received but not yet taken by the next hop: the bound on what a
/// chain holds in memory beyond what this replica stages.
const FRAMES_IN_FLIGHT: usize = 8;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a failed hop waits for the rest of the chain to hear of it.
const WIND_DOWN: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize)]
struct ForwardQuery {
    forward_to: Option<String>,
}

/// A stage held on a replica further down the chain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hop {
    /// The base URL it was reached at, as `forward_to` named it.
    pub url: String,
    pub id: String,
    pub version: String,
    pub replica_id: String,
    /// From the stage's arrival on that replica to held.
    pub seconds: f64,
}

/// The replicas after this one: `next`, then `rest`.
pub struct Chain {
    next: String,
    rest: Vec<String>,
}

fn refuse(message: String) -> ApiError {
    ApiError::bad_request(message, Some("forward_to"))
}

/// The chain `forward_to` names, if any; refused without an admin key on
/// this server, over [`MAX_HOPS`], or with an entry that is not an
/// `http(s)://host[:port]` base URL.
pub fn plan(state: &AppState, raw_query: Option<&str>) -> Result<Option<Chain>, ApiError> {
    let q: ForwardQuery = super::query::parse(raw_query)?;
    let Some(list) = q.forward_to else {
        return Ok(None);
    };
    if state.admin_api_key.is_none() {
        return Err(ApiError::ForwardNotAllowed);
    }
    let mut hops = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let base = entry.trim_end_matches('/');
        let url = reqwest::Url::parse(base).map_err(|e| {
            refuse(format!(
                "`{}` is not a URL: {e}",
                crate::weights::clip(entry)
            ))
        })?;
        let plain = matches!(url.scheme(), "http" | "https")
            && url.host().is_some()
            && url.path() == "/"
            && url.query().is_none()
            && url.fragment().is_none()
            && url.username().is_empty()
            && url.password().is_none();
        if !plain {
            return Err(refuse(format!(
                "`{}` is not a replica's base URL (http(s)://host[:port])",
                crate::weights::clip(entry)
            )));
        }
        hops.push(base.to_string());
    }
    if hops.len() > MAX_HOPS {
        return Err(refuse(format!(
            "{} replicas to forward to, over the limit of {MAX_HOPS}",
            hops.len()
        )));
    }
    let mut hops = hops.into_iter();
    Ok(hops.next().map(|next| Chain {
        next,
        rest: hops.collect(),
    }))
}

/// This stage's query for the next hop: the same, the chain one shorter.
fn next_query(raw_query: Option<&str>, rest: &[String]) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form_urlencoded::parse(raw_query.unwrap_or("").as_bytes()) {
        if k != "forward_to" {
            out.append_pair(&k, &v);
        }
    }
    if !rest.is_empty() {
        out.append_pair("forward_to", &rest.join(","));
    }
    out.finish()
}

enum Piece {
    Data(Bytes),
    /// The body is complete; without it, a closed channel is a failure.
    End,
}

/// The next hop's request body: the frames this hop receives, cut with an
/// error if this hop stops before the end.
struct ChannelBody {
    rx: mpsc::Receiver<Piece>,
    ended: bool,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(Piece::Data(bytes))) => {
                Poll::Ready(Some(Ok(http_body::Frame::data(bytes))))
            }
            Poll::Ready(Some(Piece::End)) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(None) => Poll::Ready(Some(Err(std::io::Error::other(
                "the previous replica stopped sending",
            )))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The stage request to the next hop, fed as this one receives.
pub struct Forward {
    tx: Option<mpsc::Sender<Piece>>,
    task: tokio::task::JoinHandle<Result<Vec<Hop>, ApiError>>,
    next: String,
    authorization: Option<header::HeaderValue>,
}

/// The hops a stage answer lists: the replica that answered, then its own chain.
fn hops_of(url: &str, reply: &serde_json::Value) -> Option<Vec<Hop>> {
    let mut hops = vec![Hop {
        url: url.to_string(),
        id: reply["id"].as_str()?.to_string(),
        version: reply["version"].as_str()?.to_string(),
        replica_id: reply["replica_id"].as_str().unwrap_or("").to_string(),
        seconds: reply["seconds"].as_f64().unwrap_or(0.0),
    }];
    if let Some(rest) = reply.get("chain") {
        hops.extend(serde_json::from_value::<Vec<Hop>>(rest.clone()).ok()?);
    }
    Some(hops)
}

impl Forward {
    /// Opens the next hop's stage with this request's headers (type,
    /// length, checksum, admin key); the body follows through [`Self::send`].
    pub fn start(
        chain: Chain,
        raw_query: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<Forward, ApiError> {
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| ApiError::Internal(format!("an HTTP client: {e}")))?;
        let url = format!(
            "{}/v1/weights/stage?{}",
            chain.next,
            next_query(raw_query, &chain.rest)
        );
        let (tx, rx) = mpsc::channel(FRAMES_IN_FLIGHT);
        let mut request = client
            .post(url)
            .body(reqwest::Body::wrap(ChannelBody { rx, ended: false }));
        let authorization = headers.get(header::AUTHORIZATION).cloned();
        for name in [
            header::CONTENT_TYPE,
            header::CONTENT_LENGTH,
            header::AUTHORIZATION,
        ] {
            if let Some(value) = headers.get(&name) {
                request = request.header(name, value.clone());
            }
        }
        if let Some(value) = headers.get(CHECKSUM_HEADER) {
            request = request.header(CHECKSUM_HEADER, value.clone());
        }
        let next = chain.next.clone();
        let task = tokio::spawn(async move {
            let failed = |message: String| ApiError::Forward {
                hop: next.clone(),
                message,
            };
            let response = request.send().await.map_err(|e| failed(error_chain(&e)))?;
            let status = response.status();
            let text = response.text().await.map_err(|e| failed(error_chain(&e)))?;
            let reply: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            if !status.is_success() {
                let said = reply["error"]["message"].as_str().unwrap_or(&text);
                return Err(failed(format!("{status}: {said}")));
            }
            hops_of(&next, &reply).ok_or_else(|| failed(format!("an unreadable answer: {text}")))
        });
        Ok(Forward {
            tx: Some(tx),
            task,
            next: chain.next,
            authorization,
        })
    }

    /// Passes one frame on; an error once the next hop has stopped taking them.
    pub async fn send(&mut self, bytes: Bytes) -> Result<(), ApiError> {
        let sent = match &self.tx {
            Some(tx) => tx.send(Piece::Data(bytes)).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        Err(ApiError::Forward {
            hop: self.next.clone(),
            message: "stopped receiving".into(),
        })
    }

    /// The body is complete here: the stages the rest of the chain holds,
    /// or why it holds none.
    pub async fn finish(mut self) -> Result<Vec<Hop>, ApiError> {
        if let Some(tx) = self.tx.take() {
            // A closed channel: the task has ended, and says why.
            let _ = tx.send(Piece::End).await;
        }
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => Err(ApiError::Internal(format!("forwarding the weights: {e}"))),
        }
    }

    /// This hop failed: cut the next hop's body, and drop whatever the
    /// rest of the chain staged anyway (a hop that had the whole body).
    /// Returns the rest of the chain's own error, if it had one.
    pub async fn fail(mut self) -> Option<ApiError> {
        self.tx = None;
        let outcome = tokio::time::timeout(WIND_DOWN, &mut self.task).await;
        match outcome {
            Ok(Ok(Ok(hops))) => {
                abort_hops(&hops, self.authorization.as_ref()).await;
                None
            }
            Ok(Ok(Err(e))) => Some(e),
            _ => None,
        }
    }
}

/// `POST {url}/v1/weights/abort?id=` on each hop, best effort.
pub async fn abort_hops(hops: &[Hop], authorization: Option<&header::HeaderValue>) {
    let Ok(client) = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(WIND_DOWN)
        .build()
    else {
        return;
    };
    for hop in hops {
        let mut request = client
            .post(format!("{}/v1/weights/abort", hop.url))
            .query(&[("id", hop.id.as_str())]);
        if let Some(value) = authorization {
            request = request.header(header::AUTHORIZATION, value.clone());
        }
        if let Err(e) = request.send().await {
            tracing::warn!(hop = %hop.url, error = %e, "could not abort a chained stage");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_query_drops_this_hop() {
        let rest = vec!["http://b:1".to_string(), "http://c:2".to_string()];
        let q = next_query(
            Some("version=v%201&forward_to=http://a:0,x&mode=full"),
            &rest,
        );
        assert_eq!(
            q,
            "version=v+1&mode=full&forward_to=http%3A%2F%2Fb%3A1%2Chttp%3A%2F%2Fc%3A2"
        );
        assert_eq!(
            next_query(Some("forward_to=x&pause=keep"), &[]),
            "pause=keep"
        );
    }
}
