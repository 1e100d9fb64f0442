//! `push-weights --url A --url B ...`: one weight update that lands on every
//! replica or on none. The body is staged on all replicas in parallel
//! (`POST /v1/weights/stage`), committed on all of them only when every
//! stage succeeded and they agree on the version (`POST /v1/weights/commit`),
//! and aborted wherever it staged otherwise (`POST /v1/weights/abort`).
//! A replica that fails between the two phases leaves the fleet split: the
//! report then says which replica serves which version (each one's
//! `GET /get_weight_version`), the command fails, and running it again
//! converges them.

use super::push::{base_url, progress_bar, Upload};
use crate::error_chain::error_chain;
use anyhow::bail;
use indicatif::{MultiProgress, ProgressBar};
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A replica that does not answer a connection within this is down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A commit waits for a step boundary (with `--pause wait`, for running
/// requests), not for a body.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(300);
/// An abort or a version query answers at once from a live replica.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// What one phase did on one replica.
pub(super) enum Outcome<T> {
    Done(T),
    /// The replica answered with a refusal, or could not be reached.
    Failed(String),
    /// Cut short because another replica failed first.
    Stopped,
}

/// A stage held on a replica.
pub(super) struct Staged {
    pub(super) id: String,
    pub(super) version: String,
}

/// One replica's line of the report.
pub(super) struct Row {
    pub(super) url: String,
    pub(super) stage: Outcome<Staged>,
    /// `None`: not attempted (another replica failed first).
    pub(super) stage_seconds: Option<f64>,
    commit: Option<(Outcome<String>, f64)>,
    pub(super) aborted: bool,
    /// What `/get_weight_version` says after the push.
    serving: Option<String>,
}

fn client(timeout: Option<Duration>) -> anyhow::Result<reqwest::blocking::Client> {
    Ok(reqwest::blocking::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(timeout)
        .build()?)
}

/// A reply's JSON, or the refusal (status and body) as an error message.
pub(super) fn answer(
    response: reqwest::Result<reqwest::blocking::Response>,
) -> Result<Value, String> {
    let response = response.map_err(|e| error_chain(&e))?;
    let status = response.status();
    let text = response.text().unwrap_or_default();
    if !status.is_success() {
        return Err(format!("{status}: {}", text.trim()));
    }
    serde_json::from_str(&text).map_err(|e| format!("unreadable answer ({e}): {text}"))
}

fn stage_one(
    upload: &Upload,
    client: &reqwest::blocking::Client,
    url: &str,
    bar: ProgressBar,
    stop: &Arc<AtomicBool>,
) -> Outcome<Staged> {
    let request = match upload.request(
        client,
        url,
        "/v1/weights/stage",
        &[],
        bar,
        Some(stop.clone()),
    ) {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(format!("{e:#}")),
    };
    let sent = request.send();
    let transport_error = sent.is_err();
    match answer(sent) {
        Ok(reply) => match (reply["id"].as_str(), reply["version"].as_str()) {
            (Some(id), Some(version)) => Outcome::Done(Staged {
                id: id.to_string(),
                version: version.to_string(),
            }),
            _ => Outcome::Failed(format!("a stage answer without id or version: {reply}")),
        },
        // Our own upload cut short: another replica's failure, not this one's.
        Err(_) if transport_error && stop.load(Ordering::Relaxed) => Outcome::Stopped,
        Err(e) => {
            stop.store(true, Ordering::Relaxed);
            Outcome::Failed(e)
        }
    }
}

pub(super) fn post_small(
    client: &reqwest::blocking::Client,
    upload: &Upload,
    url: &str,
    path: &str,
    query: &[(&str, &str)],
) -> Result<Value, String> {
    let mut request = client.post(format!("{url}{path}")).query(query);
    if let Some(key) = upload.admin_api_key() {
        request = request.bearer_auth(key);
    }
    answer(request.send())
}

/// `GET {url}{path}` with the admin key (the weight and version endpoints want it).
pub(super) fn get_small(
    client: &reqwest::blocking::Client,
    upload: &Upload,
    url: &str,
    path: &str,
) -> Result<Value, String> {
    let mut request = client.get(format!("{url}{path}"));
    if let Some(key) = upload.admin_api_key() {
        request = request.bearer_auth(key);
    }
    answer(request.send())
}

fn serving_version(client: &reqwest::blocking::Client, upload: &Upload, url: &str) -> String {
    match get_small(client, upload, url, "/get_weight_version") {
        Ok(v) => v["weight_version"]
            .as_str()
            .map_or_else(|| format!("? ({v})"), str::to_string),
        Err(_) => "unreachable".into(),
    }
}

/// Runs `work` for every row at once, each on its own thread.
pub(super) fn each<F>(rows: &mut [Row], work: F)
where
    F: Fn(&mut Row) + Sync,
{
    std::thread::scope(|s| {
        for row in rows.iter_mut() {
            let work = &work;
            s.spawn(move || work(row));
        }
    });
}

/// The HTTP clients of a fleet push, one per kind of request.
struct Clients {
    /// Bodies: no overall timeout (a large update takes what it takes).
    uploads: reqwest::blocking::Client,
    commits: reqwest::blocking::Client,
    /// Version queries and aborts.
    small: reqwest::blocking::Client,
}

/// Drops this push's stage on `row`'s replica (by its id).
fn abort_row(clients: &Clients, upload: &Upload, row: &mut Row) {
    if let Outcome::Done(staged) = &row.stage {
        let query = [("id", staged.id.as_str())];
        row.aborted = post_small(
            &clients.small,
            upload,
            &row.url,
            "/v1/weights/abort",
            &query,
        )
        .is_ok_and(|r| !r["aborted"].is_null());
    }
}

fn commit_row(clients: &Clients, upload: &Upload, row: &mut Row) {
    let Outcome::Done(staged) = &row.stage else {
        return;
    };
    let started = Instant::now();
    let query = [
        ("id", staged.id.as_str()),
        ("pause", upload.query_value("pause")),
    ];
    let path = "/v1/weights/commit";
    let outcome = match post_small(&clients.commits, upload, &row.url, path, &query) {
        Ok(reply) => Outcome::Done(reply["weight_version"].as_str().unwrap_or("?").into()),
        Err(e) => Outcome::Failed(e),
    };
    row.commit = Some((outcome, started.elapsed().as_secs_f64()));
}

/// Stage everywhere, then commit everywhere or abort everywhere.
pub(super) fn push_to_fleet(
    upload: &Upload,
    urls: &[String],
    adapter: bool,
    chain: bool,
) -> anyhow::Result<()> {
    let urls: Vec<String> = urls.iter().map(|u| base_url(u)).collect();
    for (i, url) in urls.iter().enumerate() {
        if urls[..i].contains(url) {
            bail!("--url {url} is given twice");
        }
    }
    if adapter && chain {
        bail!("--chain pushes base weights only: adapters have no staged phase");
    }
    if adapter {
        return push_adapter_to_fleet(upload, &urls);
    }
    let clients = Clients {
        uploads: client(None)?,
        commits: client(Some(COMMIT_TIMEOUT))?,
        small: client(Some(QUERY_TIMEOUT))?,
    };
    let bars = MultiProgress::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut rows: Vec<Row> = urls
        .iter()
        .map(|url| Row {
            url: url.clone(),
            stage: Outcome::Stopped,
            stage_seconds: None,
            commit: None,
            aborted: false,
            serving: None,
        })
        .collect();

    // Every replica must answer before a byte is sent: a dead one fails
    // the push here, with its connection error, and costs no upload.
    each(&mut rows, |row| {
        if let Err(e) = get_small(&clients.small, upload, &row.url, "/get_weight_version") {
            row.stage = Outcome::Failed(format!("not reachable: {e}"));
            stop.store(true, Ordering::Relaxed);
        }
    });
    let first_byte = Instant::now();
    if stop.load(Ordering::Relaxed) {
        // A replica is down: nothing is sent.
    } else if chain {
        // Phase 1: one upload, staged along the chain.
        super::chain::stage_along(upload, &clients.uploads, &clients.small, &mut rows);
    } else {
        // Phase 1: stage on every replica at once.
        each(&mut rows, |row| {
            let bar = bars.add(progress_bar(upload.len));
            bar.set_prefix(row.url.clone());
            let started = Instant::now();
            row.stage = stage_one(upload, &clients.uploads, &row.url, bar.clone(), &stop);
            row.stage_seconds = Some(started.elapsed().as_secs_f64());
            bar.finish_and_clear();
        });
    }
    let versions: Vec<&str> = rows
        .iter()
        .filter_map(|r| match &r.stage {
            Outcome::Done(s) => Some(s.version.as_str()),
            _ => None,
        })
        .collect();
    let all_staged = versions.len() == rows.len();
    let agreed = versions.windows(2).all(|w| w[0] == w[1]);
    let version = versions.first().map(|v| v.to_string());
    if all_staged && agreed {
        // Phase 2: every replica holds it; commit on all.
        each(&mut rows, |row| commit_row(&clients, upload, row));
    } else {
        // Some replica refused (or the versions differ): drop it everywhere.
        each(&mut rows, |row| abort_row(&clients, upload, row));
    }
    let committed = rows
        .iter()
        .filter(|r| matches!(r.commit, Some((Outcome::Done(_), _))))
        .count();
    if committed < rows.len() {
        // Where a commit failed, the stage may still be held: drop it, then
        // ask every replica what it serves.
        each(&mut rows, |row| {
            if matches!(row.commit, Some((Outcome::Failed(_), _))) {
                abort_row(&clients, upload, row);
            }
            row.serving = Some(serving_version(&clients.small, upload, &row.url));
        });
    }
    print_table(&rows);
    if committed == rows.len() {
        println!(
            "all {} replicas serve version {} ({:.3} s from the first byte sent to the last commit)",
            rows.len(),
            version.as_deref().unwrap_or("?"),
            first_byte.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    Err(failure(&rows, committed, all_staged && !agreed))
}

/// Why the push did not land everywhere: which replica failed in which
/// phase, and, when the fleet is split, what each replica serves.
fn failure(rows: &[Row], committed: usize, disagreed: bool) -> anyhow::Error {
    let mut problems: Vec<String> = Vec::new();
    for row in rows {
        if let Outcome::Failed(e) = &row.stage {
            problems.push(format!("{}: stage failed: {e}", row.url));
        }
        if let Some((Outcome::Failed(e), _)) = &row.commit {
            problems.push(format!("{}: commit failed: {e}", row.url));
        }
    }
    if disagreed {
        let each_version: Vec<String> = rows
            .iter()
            .filter_map(|r| match &r.stage {
                Outcome::Done(s) => Some(format!("{} -> {}", r.url, s.version)),
                _ => None,
            })
            .collect();
        problems.push(format!(
            "the replicas would serve different versions ({}); pass --version",
            each_version.join(", ")
        ));
    }
    if committed > 0 {
        let serving: Vec<String> = rows
            .iter()
            .map(|r| format!("{} serves {}", r.url, r.serving.as_deref().unwrap_or("?")))
            .collect();
        return anyhow::anyhow!(
            "the update was committed on {committed} of {} replicas: {}; run the same push again to converge them\n{}",
            rows.len(),
            serving.join(", "),
            problems.join("\n")
        );
    }
    anyhow::anyhow!(
        "no replica changed weights (nothing was committed)\n{}",
        problems.join("\n")
    )
}

fn print_table(rows: &[Row]) {
    let width = rows.iter().map(|r| r.url.len()).max().unwrap_or(7).max(7);
    println!(
        "{:<width$}  {:>9}  {:>9}  {:<12}  version",
        "replica", "stage", "commit", "result"
    );
    for row in rows {
        let stage = row
            .stage_seconds
            .map_or_else(|| "-".to_string(), |s| format!("{s:.3} s"));
        let (commit, result) = match (&row.stage, &row.commit) {
            (_, Some((Outcome::Done(_), s))) => (format!("{s:.3} s"), "committed"),
            (_, Some((_, s))) => (format!("{s:.3} s"), "commit failed"),
            (_, None) if row.aborted => ("-".into(), "aborted"),
            (Outcome::Done(_), None) => ("-".into(), "staged"),
            (Outcome::Failed(_), None) => ("-".into(), "stage failed"),
            (Outcome::Stopped, None) => ("-".into(), "not staged"),
        };
        let version = match (&row.serving, &row.commit) {
            (Some(v), _) => v.clone(),
            (None, Some((Outcome::Done(v), _))) => v.clone(),
            _ => "-".into(),
        };
        println!(
            "{:<width$}  {stage:>9}  {commit:>9}  {result:<12}  {version}",
            row.url
        );
    }
}

/// An adapter to several replicas: adapters have no staged phase, so each
/// replica gets its own `POST /v1/weights?adapter=NAME` (all or nothing on
/// that replica, not across them), and the report says which took it.
fn push_adapter_to_fleet(upload: &Upload, urls: &[String]) -> anyhow::Result<()> {
    let uploads = client(None)?;
    let bars = MultiProgress::new();
    let results: Vec<(Result<Value, String>, f64)> = std::thread::scope(|s| {
        let handles: Vec<_> = urls
            .iter()
            .map(|url| {
                let (bars, uploads) = (&bars, &uploads);
                s.spawn(move || {
                    let bar = bars.add(progress_bar(upload.len));
                    bar.set_prefix(url.clone());
                    let started = Instant::now();
                    let sent = upload
                        .request(uploads, url, "/v1/weights", &[], bar.clone(), None)
                        .map_err(|e| format!("{e:#}"))
                        .and_then(|r| answer(r.send()));
                    bar.finish_and_clear();
                    (sent, started.elapsed().as_secs_f64())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| (Err("the push thread panicked".into()), 0.0))
            })
            .collect()
    });
    let width = urls.iter().map(String::len).max().unwrap_or(7).max(7);
    println!(
        "{:<width$}  {:>9}  {:<8}  version",
        "replica", "push", "result"
    );
    let mut problems = Vec::new();
    for (url, (result, seconds)) in urls.iter().zip(&results) {
        let (word, version) = match result {
            Ok(reply) => (
                "pushed",
                reply["weight_version"].as_str().unwrap_or("?").to_string(),
            ),
            Err(e) => {
                problems.push(format!("{url}: {e}"));
                ("failed", "-".to_string())
            }
        };
        println!(
            "{url:<width$}  {:>9}  {word:<8}  {version}",
            format!("{seconds:.3} s")
        );
    }
    if problems.is_empty() {
        return Ok(());
    }
    bail!(
        "the adapter reached {} of {} replicas (adapter pushes are not two-phase: those marked pushed serve it); push again to converge them\n{}",
        urls.len() - problems.len(),
        urls.len(),
        problems.join("\n")
    );
}
