//! `GET /metrics`: Prometheus text, produced by prometheus-client from the
//! engine's counters at scrape time.

use super::AppState;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::sync::{Arc, Weak};

/// Reads the engine's counters when scraped. Holds the state weakly so the
/// registry (owned by the state) does not keep it alive.
#[derive(Debug)]
struct EngineCollector {
    state: Weak<AppState>,
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(state) = self.state.upgrade() else {
            return Ok(());
        };
        let stats = state.engine.stats();
        let gauge = ConstGauge::new(stats.running_sequences() as i64);
        gauge.encode(encoder.encode_descriptor(
            "gym_serve_num_requests_running",
            "Sequences the engine is running",
            None,
            gauge.metric_type(),
        )?)?;
        for (name, help, value) in [
            (
                "gym_serve_prompt_tokens",
                "Prompt tokens admitted",
                stats.prompt_tokens(),
            ),
            (
                "gym_serve_generation_tokens",
                "Tokens generated",
                stats.generation_tokens(),
            ),
            ("gym_serve_engine_steps", "Engine steps run", stats.steps()),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        let refits = &state.refits;
        for (name, help, value) in [
            (
                "gym_serve_weight_updates",
                "Weight updates applied",
                refits.count(),
            ),
            (
                "gym_serve_weight_update_failures",
                "Weight updates refused",
                refits.failures(),
            ),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        let total = ConstCounter::new(refits.total_seconds());
        total.encode(encoder.encode_descriptor(
            "gym_serve_weight_update_seconds",
            "Time spent in weight updates, from first byte to serving",
            None,
            total.metric_type(),
        )?)?;
        let last = ConstGauge::new(refits.last_seconds());
        last.encode(encoder.encode_descriptor(
            "gym_serve_last_weight_update_seconds",
            "Duration of the latest weight update",
            None,
            last.metric_type(),
        )?)?;
        // The serving version as an info-style gauge: the label carries it.
        let version = state.engine.stats().weight_version().to_string();
        let info = ConstGauge::new(1);
        let mut family = encoder.encode_descriptor(
            "gym_serve_weight_version",
            "The weight version serving (label), value 1",
            None,
            info.metric_type(),
        )?;
        info.encode(family.encode_family(&[("version", version.as_str())])?)?;
        Ok(())
    }
}

pub fn registry(state: &Arc<AppState>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(EngineCollector {
        state: Arc::downgrade(state),
    }));
    registry
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry(&state)) {
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
