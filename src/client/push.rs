//! `gym-serve push-weights`: the trainer side of `POST /v1/weights`. Streams a
//! safetensors file (or a checkpoint directory merged into one body) with a
//! progress bar and its SHA-256, and prints the server's answer. With
//! several `--url`s the update goes to every replica in two phases
//! ([`super::fleet`]).

use crate::cli::PushWeightsArgs;
use crate::weights::checkpoint::{checkpoint_files, read_checkpoint};
use anyhow::{bail, Context};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A reader that advances a progress bar, and fails once `stop` is set
/// (another replica refused: the rest of this upload is not worth sending).
struct Progress<R> {
    inner: R,
    bar: ProgressBar,
    stop: Option<Arc<AtomicBool>>,
}

impl<R: Read> Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed))
        {
            return Err(std::io::Error::other("stopped: another replica failed"));
        }
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

fn sha256_hex(mut reader: impl Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Where the body's bytes come from: a file on disk (opened once per
/// replica), or a directory's shards merged in memory (shared).
enum Source {
    File(PathBuf),
    Bytes(Arc<[u8]>),
}

impl Source {
    fn reader(&self) -> anyhow::Result<Box<dyn Read + Send>> {
        Ok(match self {
            Source::File(path) => Box::new(
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
            ),
            Source::Bytes(bytes) => Box::new(std::io::Cursor::new(bytes.clone())),
        })
    }
}

fn source(args: &PushWeightsArgs) -> anyhow::Result<Source> {
    if let Some(file) = &args.file {
        return Ok(Source::File(file.clone()));
    }
    let Some(dir) = &args.dir else {
        bail!("give --dir or --file")
    };
    if args.adapter.is_some() {
        return Ok(Source::File(dir.join("adapter_model.safetensors")));
    }
    let files = checkpoint_files(dir)?;
    if let [single] = files.as_slice() {
        return Ok(Source::File(single.clone()));
    }
    // Shards become one body, so the update stays all or nothing.
    let tensors = read_checkpoint(dir, &candle_core::Device::Cpu)?;
    let mut named: Vec<(String, candle_core::Tensor)> = tensors.into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let views: Vec<(&str, &candle_core::Tensor)> =
        named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Ok(Source::Bytes(safetensors::serialize(views, None)?.into()))
}

/// An adapter directory's `adapter_config.json`, on one line (a header value).
fn adapter_config(args: &PushWeightsArgs) -> anyhow::Result<Option<String>> {
    let (Some(_), Some(dir)) = (&args.adapter, &args.dir) else {
        return Ok(None);
    };
    let path = dir.join("adapter_config.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(serde_json::to_string(&value)?))
}

/// One update's body and headers, ready to be sent to any number of servers.
pub(super) struct Upload {
    source: Source,
    digest: String,
    pub(super) len: u64,
    adapter_config: Option<String>,
    admin_api_key: Option<String>,
    /// `mode`, `pause`, `version`, `adapter`, as the push and stage take them.
    query: Vec<(&'static str, String)>,
}

impl Upload {
    pub(super) fn new(args: &PushWeightsArgs) -> anyhow::Result<Upload> {
        let source = source(args)?;
        let digest = sha256_hex(source.reader()?)?;
        let len = match &source {
            Source::File(path) => std::fs::metadata(path)
                .with_context(|| format!("reading {}", path.display()))?
                .len(),
            Source::Bytes(bytes) => bytes.len() as u64,
        };
        let mut query = vec![("mode", if args.partial { "partial" } else { "full" }.into())];
        let pause = args.pause.to_possible_value().context("--pause")?;
        query.push(("pause", pause.get_name().to_string()));
        if let Some(v) = &args.version {
            query.push(("version", v.clone()));
        }
        if let Some(a) = &args.adapter {
            query.push(("adapter", a.clone()));
        }
        Ok(Upload {
            source,
            digest,
            len,
            adapter_config: adapter_config(args)?,
            admin_api_key: args.admin_api_key.clone(),
            query,
        })
    }

    /// `POST {base}{path}?{query}` carrying the body (advancing `bar`,
    /// cut short once `stop` is set), its checksum and the admin key.
    pub(super) fn request(
        &self,
        client: &reqwest::blocking::Client,
        base: &str,
        path: &str,
        extra: &[(&str, String)],
        bar: ProgressBar,
        stop: Option<Arc<AtomicBool>>,
    ) -> anyhow::Result<reqwest::blocking::RequestBuilder> {
        let mut url = reqwest::Url::parse(&format!("{base}{path}"))
            .with_context(|| format!("--url {base}"))?;
        url.query_pairs_mut()
            .extend_pairs(self.query.iter().map(|(k, v)| (*k, v.as_str())))
            .extend_pairs(extra.iter().map(|(k, v)| (*k, v.as_str())));
        let body = reqwest::blocking::Body::sized(
            Progress {
                inner: self.source.reader()?,
                bar,
                stop,
            },
            self.len,
        );
        let mut request = client
            .post(url)
            .header("content-type", "application/octet-stream")
            .header("x-weights-sha256", &self.digest)
            .body(body);
        if let Some(key) = &self.admin_api_key {
            request = request.bearer_auth(key);
        }
        if let Some(config) = &self.adapter_config {
            request = request.header(crate::api::lora::CONFIG_HEADER, config);
        }
        Ok(request)
    }

    /// A query parameter every request of this update carries (`pause`).
    pub(super) fn query_value(&self, name: &str) -> &str {
        self.query
            .iter()
            .find(|(k, _)| *k == name)
            .map_or("", |(_, v)| v.as_str())
    }

    pub(super) fn admin_api_key(&self) -> Option<&str> {
        self.admin_api_key.as_deref()
    }
}

/// A server's base URL as given, without a trailing `/` or `/v1`.
pub(super) fn base_url(url: &str) -> String {
    url.trim_end_matches('/')
        .trim_end_matches("/v1")
        .trim_end_matches('/')
        .to_string()
}

pub(super) fn progress_bar(len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

pub fn push_weights(args: PushWeightsArgs) -> anyhow::Result<()> {
    let upload = Upload::new(&args)?;
    match args.url.as_slice() {
        [] => bail!("give --url"),
        [one] => push_one(&upload, &base_url(one)),
        many => super::fleet::push_to_fleet(&upload, many, args.adapter.is_some(), args.chain),
    }
}

/// One server: a plain `POST /v1/weights` (all or nothing on that server),
/// its answer printed as it came.
fn push_one(upload: &Upload, base: &str) -> anyhow::Result<()> {
    let bar = progress_bar(upload.len);
    let client = reqwest::blocking::Client::builder().timeout(None).build()?;
    let request = upload.request(&client, base, "/v1/weights", &[], bar.clone(), None)?;
    let response = request
        .send()
        .with_context(|| format!("sending the weights to {base}"))?;
    bar.finish_and_clear();
    let status = response.status();
    let text = response.text().unwrap_or_default();
    if !status.is_success() {
        bail!("{base} refused the update ({status}): {text}");
    }
    println!("{text}");
    Ok(())
}
