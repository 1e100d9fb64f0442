//! `push-weights --chain`: the stage phase sent once, to the first replica,
//! with `forward_to` naming the others; each replica stages the body as it
//! passes it on. The first replica's answer lists every stage (`chain`),
//! and [`super::fleet`] commits or aborts them as it does its own.

use super::fleet::{answer, each, get_small, post_small, Outcome, Row, Staged};
use super::push::{progress_bar, Upload};
use serde_json::Value;
use std::time::Instant;

/// The replica a chain's error blames: the last `forwarding to URL failed`
/// in it (each hop wraps the next one's error), else the first replica.
fn blamed<'a>(rows: &'a [Row], error: &str) -> &'a str {
    let mut blamed = rows[0].url.as_str();
    let mut rest = error;
    while let Some(at) = rest.find("forwarding to ") {
        rest = &rest[at + "forwarding to ".len()..];
        if let Some(row) = rows
            .iter()
            .find(|r| rest.starts_with(&format!("{} ", r.url)))
        {
            blamed = &row.url;
        }
    }
    blamed
}

/// Stages along `rows` (in order), filling each row's stage.
pub(super) fn stage_along(
    upload: &Upload,
    uploads: &reqwest::blocking::Client,
    small: &reqwest::blocking::Client,
    rows: &mut [Row],
) {
    let Some((first, rest)) = rows.split_first() else {
        return;
    };
    let forward_to: Vec<&str> = rest.iter().map(|r| r.url.as_str()).collect();
    let bar = progress_bar(upload.len);
    bar.set_prefix(first.url.clone());
    let started = Instant::now();
    let result = upload
        .request(
            uploads,
            &first.url,
            "/v1/weights/stage",
            &[("forward_to", forward_to.join(","))],
            bar.clone(),
            None,
        )
        .map_err(|e| format!("{e:#}"))
        .and_then(|r| answer(r.send()));
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(reply) => {
            let hops = reply["chain"].as_array().cloned().unwrap_or_default();
            for (i, row) in rows.iter_mut().enumerate() {
                let (hop, took) = if i == 0 {
                    (Some(&reply), seconds)
                } else {
                    let hop = hops.iter().find(|h| h["url"].as_str() == Some(&row.url));
                    (hop, hop.and_then(|h| h["seconds"].as_f64()).unwrap_or(0.0))
                };
                row.stage_seconds = Some(took);
                row.stage = match hop.map(|h| (h["id"].as_str(), h["version"].as_str())) {
                    Some((Some(id), Some(version))) => Outcome::Done(Staged {
                        id: id.to_string(),
                        version: version.to_string(),
                    }),
                    _ => Outcome::Failed(format!("missing from the chain's answer: {reply}")),
                };
            }
        }
        Err(e) => {
            let who = blamed(rows, &e).to_string();
            for row in rows.iter_mut() {
                if row.url == who {
                    row.stage = Outcome::Failed(e.clone());
                    row.stage_seconds = Some(seconds);
                }
            }
            sweep(upload, small, rows, started);
        }
    }
}

/// After a failed chain: each replica drops its part itself, but one that
/// had the whole body may have staged it without the chain hearing back.
/// A stage held now that is this push's (its version, or younger than the
/// push when no version was given) is aborted by its id.
fn sweep(upload: &Upload, small: &reqwest::blocking::Client, rows: &mut [Row], started: Instant) {
    let version = upload.query_value("version").to_string();
    let age = started.elapsed().as_secs_f64();
    each(rows, |row| {
        let Ok(status) = get_small(small, upload, &row.url, "/v1/weights/staged") else {
            return;
        };
        let held: &Value = &status["staged"];
        let ours = if version.is_empty() {
            held["age_seconds"].as_f64().is_some_and(|a| a <= age)
        } else {
            held["version"].as_str() == Some(version.as_str())
        };
        if let (true, Some(id)) = (ours, held["id"].as_str()) {
            row.aborted = post_small(small, upload, &row.url, "/v1/weights/abort", &[("id", id)])
                .is_ok_and(|r| !r["aborted"].is_null());
        }
    });
}
