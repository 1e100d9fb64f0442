//! `gym-serve push-weights`: the trainer side of `POST /v1/weights`. Streams a
//! safetensors file (or a checkpoint directory merged into one body) with a
//! progress bar and its SHA-256, and prints the server's answer.

use crate::cli::PushWeightsArgs;
use crate::weights::checkpoint::{checkpoint_files, read_checkpoint};
use anyhow::{bail, Context};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::io::Read;

/// A reader that advances a progress bar.
struct Progress<R> {
    inner: R,
    bar: ProgressBar,
}

impl<R: Read> Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
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

/// The body to send: a file on disk, or a directory's shards merged in memory.
enum Payload {
    File(std::path::PathBuf),
    Bytes(Vec<u8>),
}

fn payload(args: &PushWeightsArgs) -> anyhow::Result<Payload> {
    if let Some(file) = &args.file {
        return Ok(Payload::File(file.clone()));
    }
    let Some(dir) = &args.dir else {
        bail!("give --dir or --file")
    };
    if args.adapter.is_some() {
        return Ok(Payload::File(dir.join("adapter_model.safetensors")));
    }
    let files = checkpoint_files(dir)?;
    if let [single] = files.as_slice() {
        return Ok(Payload::File(single.clone()));
    }
    // Shards become one body, so the update stays all or nothing.
    let tensors = read_checkpoint(dir, &candle_core::Device::Cpu)?;
    let mut named: Vec<(String, candle_core::Tensor)> = tensors.into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let views: Vec<(&str, &candle_core::Tensor)> =
        named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Ok(Payload::Bytes(safetensors::serialize(views, None)?))
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

pub fn push_weights(args: PushWeightsArgs) -> anyhow::Result<()> {
    let base = args.url.trim_end_matches('/').trim_end_matches("/v1");
    let mut url = reqwest::Url::parse(&format!("{base}/v1/weights")).context("--url")?;
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("mode", if args.partial { "partial" } else { "full" });
        let pause = args.pause.to_possible_value().context("--pause")?;
        q.append_pair("pause", pause.get_name());
        if let Some(v) = &args.version {
            q.append_pair("version", v);
        }
        if let Some(a) = &args.adapter {
            q.append_pair("adapter", a);
        }
    }
    let adapter_config = adapter_config(&args)?;
    let (digest, len, reader): (String, u64, Box<dyn Read + Send>) = match payload(&args)? {
        Payload::File(path) => {
            let open = || {
                std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))
            };
            let digest = sha256_hex(open()?)?;
            let len = open()?.metadata()?.len();
            (digest, len, Box::new(open()?))
        }
        Payload::Bytes(bytes) => {
            let digest = sha256_hex(bytes.as_slice())?;
            (
                digest,
                bytes.len() as u64,
                Box::new(std::io::Cursor::new(bytes)),
            )
        }
    };
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let body = reqwest::blocking::Body::sized(
        Progress {
            inner: reader,
            bar: bar.clone(),
        },
        len,
    );
    let client = reqwest::blocking::Client::builder().timeout(None).build()?;
    let mut request = client
        .post(url)
        .header("content-type", "application/octet-stream")
        .header("x-weights-sha256", digest)
        .body(body);
    if let Some(key) = &args.admin_api_key {
        request = request.bearer_auth(key);
    }
    if let Some(config) = adapter_config {
        request = request.header(crate::api::lora::CONFIG_HEADER, config);
    }
    let response = request.send().context("sending the weights")?;
    bar.finish_and_clear();
    let status = response.status();
    let text = response.text().unwrap_or_default();
    if !status.is_success() {
        bail!("the server refused the update ({status}): {text}");
    }
    println!("{text}");
    Ok(())
}
