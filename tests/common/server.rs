//! Starts the real `gym-serve` binary on an ephemeral port.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub struct Server {
    child: Child,
    pub base: String,
    pub http: reqwest::blocking::Client,
}

impl Server {
    /// `gym-serve --model DIR --port 0 --served-model-name tiny EXTRA...`,
    /// waiting until it listens.
    pub fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gym-serve"))
            .arg("--model")
            .arg(model)
            .args(["--port", "0", "--served-model-name", "tiny"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start gym-serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read address");
        let base = line
            .trim()
            .strip_prefix("gym-serve listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_string();
        Server {
            child,
            base,
            http: reqwest::blocking::Client::builder()
                .timeout(std::time::Duration::from_secs(120))
                .build()
                .unwrap(),
        }
    }

    /// A server with `--admin-api-key key`, its test client sending the key.
    #[allow(dead_code)] // not every test binary uses it
    pub fn start_keyed(model: &Path, key: &str) -> Server {
        let mut server = Server::start(model, &["--admin-api-key", key]);
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {key}").parse().unwrap(),
        );
        server.http = reqwest::blocking::Client::builder()
            .default_headers(headers)
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .unwrap();
        server
    }

    /// Gives each request `secs` instead of two minutes (long generations
    /// on the unoptimized test build).
    pub fn with_timeout(mut self, secs: u64) -> Server {
        self.http = reqwest::blocking::Client::builder()
            .timeout(std::time::Duration::from_secs(secs))
            .build()
            .unwrap();
        self
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("wait")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// POSTs JSON; returns the status and the parsed body.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// POSTs raw bytes (a weight push); returns the status and the parsed
    /// body (null when it is not JSON).
    pub fn post_bytes(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let resp = self
            .http
            .post(self.url(path))
            .body(body)
            .send()
            .expect("request");
        let status = resp.status().as_u16();
        (status, resp.json().unwrap_or(Value::Null))
    }

    /// POSTs JSON and asserts success.
    pub fn ok(&self, path: &str, body: &Value) -> Value {
        let (status, v) = self.post(path, body);
        assert_eq!(status, 200, "{path}: {v}");
        v
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let resp = self.http.get(self.url(path)).send().expect("request");
        (resp.status().as_u16(), resp.text().expect("body"))
    }

    /// Streams a request and returns every `data:` payload but `[DONE]`, parsed.
    pub fn stream(&self, path: &str, body: &Value) -> Vec<Value> {
        let resp = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .expect("request");
        assert_eq!(resp.status().as_u16(), 200);
        let text = resp.text().expect("body");
        assert!(
            text.trim_end().ends_with("data: [DONE]"),
            "stream did not end with [DONE]: {text}"
        );
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).expect("chunk JSON"))
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `v` as a list of token IDs.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_u64().expect("token id") as u32)
        .collect()
}

pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}
