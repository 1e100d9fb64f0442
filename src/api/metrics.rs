//! `GET /metrics`: Prometheus text from prometheus-client. HTTP requests,
//! time to first token and inter-token latency are recorded as they happen;
//! the engine's and the refits' counters are read at scrape time.

use super::admission::MemoryBudget;
use super::AppState;
use crate::connections::OpenConnections;
use crate::engine::refit::RefitStats;
use crate::engine::EngineStats;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Arc;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    /// Seconds from a request's arrival to its first generated token.
    pub ttft: Histogram,
    /// Seconds between consecutive tokens of one choice.
    pub itl: Histogram,
}

/// Reads the engine's and the refits' counters when scraped.
#[derive(Debug)]
struct ScrapeTime {
    engine: Arc<EngineStats>,
    refits: Arc<RefitStats>,
    connections: Arc<OpenConnections>,
    memory: Arc<MemoryBudget>,
    replica_id: String,
}

fn gauge<N>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), std::fmt::Error>
where
    ConstGauge<N>: EncodeMetric,
{
    let g = ConstGauge::new(value);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter<N>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), std::fmt::Error>
where
    ConstCounter<N>: EncodeMetric,
{
    let c = ConstCounter::new(value);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for ScrapeTime {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.engine;
        gauge(
            &mut e,
            "gym_serve_num_requests_running",
            "Sequences the engine is running",
            s.running_sequences() as i64,
        )?;
        gauge(
            &mut e,
            "gym_serve_num_requests_waiting",
            "Sequences waiting for admission",
            s.waiting_sequences() as i64,
        )?;
        gauge(
            &mut e,
            "gym_serve_kv_blocks_used",
            "KV pool blocks referenced by sequences",
            s.kv_blocks_used() as i64,
        )?;
        gauge(
            &mut e,
            "gym_serve_kv_blocks_free",
            "KV pool blocks free (possibly holding cached prefixes)",
            s.kv_blocks_free() as i64,
        )?;
        let (hits, computed) = (s.prefix_hit_tokens(), s.prefix_computed_tokens());
        let rate = if hits + computed > 0 {
            hits as f64 / (hits + computed) as f64
        } else {
            0.0
        };
        gauge(
            &mut e,
            "gym_serve_prefix_cache_hit_rate",
            "Share of prompt tokens served from the prefix cache",
            rate,
        )?;
        counter(
            &mut e,
            "gym_serve_prefix_cache_hit_tokens",
            "Prompt tokens served from the prefix cache",
            hits,
        )?;
        counter(
            &mut e,
            "gym_serve_prefix_cache_miss_tokens",
            "Prompt tokens computed",
            computed,
        )?;
        counter(
            &mut e,
            "gym_serve_prompt_tokens",
            "Prompt tokens admitted",
            s.prompt_tokens(),
        )?;
        counter(
            &mut e,
            "gym_serve_generation_tokens",
            "Tokens generated",
            s.generation_tokens(),
        )?;
        counter(
            &mut e,
            "gym_serve_engine_steps",
            "Engine steps run",
            s.steps(),
        )?;
        counter(
            &mut e,
            "gym_serve_preemptions",
            "Sequences preempted for KV blocks",
            s.preemptions(),
        )?;
        gauge(
            &mut e,
            "gym_serve_open_connections",
            "HTTP connections open",
            self.connections.get() as i64,
        )?;
        gauge(
            &mut e,
            "gym_serve_request_memory_reserved_bytes",
            "Host memory reserved by requests in flight (of --max-memory)",
            self.memory.reserved_bytes() as i64,
        )?;
        gauge(
            &mut e,
            "gym_serve_request_memory_budget_bytes",
            "Host memory requests may reserve at once (--max-memory)",
            self.memory.total_bytes() as i64,
        )?;
        let r = &self.refits;
        counter(
            &mut e,
            "gym_serve_weight_updates",
            "Weight updates applied",
            r.count(),
        )?;
        counter(
            &mut e,
            "gym_serve_weight_update_failures",
            "Weight updates refused",
            r.failures(),
        )?;
        counter(
            &mut e,
            "gym_serve_weight_update_seconds",
            "Time spent in weight updates, first byte to serving",
            r.total_seconds(),
        )?;
        gauge(
            &mut e,
            "gym_serve_last_weight_update_seconds",
            "Duration of the latest weight update",
            r.last_seconds(),
        )?;
        counter(
            &mut e,
            "gym_serve_staged_weight_updates",
            "Weight updates staged (POST /v1/weights/stage)",
            r.staged(),
        )?;
        counter(
            &mut e,
            "gym_serve_staged_weight_update_aborts",
            "Staged weight updates aborted",
            r.aborted(),
        )?;
        counter(
            &mut e,
            "gym_serve_staged_weight_update_expiries",
            "Staged weight updates dropped uncommitted after --staged-update-timeout",
            r.expired(),
        )?;
        gauge(
            &mut e,
            "gym_serve_staged_weight_update_bytes",
            "Memory held by the staged weight update (0 without one)",
            r.staged_bytes() as i64,
        )?;
        let info = ConstGauge::new(1);
        let mut family = e.encode_descriptor(
            "gym_serve_replica_info",
            "This replica's name (--replica-id, default host:port) as a label, value 1",
            None,
            info.metric_type(),
        )?;
        info.encode(family.encode_family(&[("replica_id", self.replica_id.as_str())])?)?;
        // The serving version as an info-style gauge: the label carries it.
        let version = s.weight_version().to_string();
        let info = ConstGauge::new(1);
        let mut family = e.encode_descriptor(
            "gym_serve_weight_version",
            "The weight version serving (label), value 1",
            None,
            info.metric_type(),
        )?;
        info.encode(family.encode_family(&[("version", version.as_str())])?)?;
        Ok(())
    }
}

impl Metrics {
    pub fn new(
        engine: Arc<EngineStats>,
        refits: Arc<RefitStats>,
        connections: Arc<OpenConnections>,
        memory: Arc<MemoryBudget>,
        replica_id: String,
    ) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        // 1 ms to about 65 s.
        let ttft = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        let itl = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "gym_serve_http_requests",
            "HTTP requests by endpoint and status",
            requests.clone(),
        );
        registry.register(
            "gym_serve_time_to_first_token_seconds",
            "Time to first token",
            ttft.clone(),
        );
        registry.register(
            "gym_serve_inter_token_latency_seconds",
            "Time between tokens of one choice",
            itl.clone(),
        );
        registry.register_collector(Box::new(ScrapeTime {
            engine,
            refits,
            connections,
            memory,
            replica_id,
        }));
        Self {
            registry,
            requests,
            ttft,
            itl,
        }
    }

    pub fn record_request(&self, endpoint: &str, status: u16) {
        self.requests
            .get_or_create(&vec![
                ("endpoint", endpoint.to_string()),
                ("status", status.to_string()),
            ])
            .inc();
    }
}

/// Counts every routed request by endpoint and status.
pub async fn count_requests(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    state
        .metrics
        .record_request(&endpoint, response.status().as_u16());
    response
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &state.metrics.registry) {
        return super::error::ApiError::Internal(format!("encoding metrics: {e}")).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
