//! Traces of a message's journey, exported with OpenTelemetry over OTLP/HTTP (protobuf) when an
//! endpoint is configured (`tracing.otlp_endpoint`, or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, which the exporter
//! reads itself, as it does `OTEL_EXPORTER_OTLP_HEADERS` and `_TIMEOUT`); off otherwise.
//!
//! The journey's spans all have the target [`JOURNEY`]: only the exporting layer listens to
//! it, and the log layer never does, so with tracing off no such span is ever built (its
//! callsite is disabled once) and a message costs nothing more than before. The trace context
//! travels as a W3C `traceparent`: in an AMQP header from the producer, and inside the message
//! across the cluster link ([`crate::entity::EntityMessage::trace_context`]).

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::{ConfigError, check};

/// The target of every span of a message's journey.
pub const JOURNEY: &str = "warren_journey";

/// The header (AMQP) and the field name of a W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// Where traces go and how many are kept: `[tracing]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingSettings {
    /// OTLP/HTTP base URL of a collector, e.g. `http://127.0.0.1:4318` (spans go to
    /// `/v1/traces` under it). Unset: the `OTEL_EXPORTER_OTLP_*ENDPOINT` variables; neither
    /// set: no traces.
    pub otlp_endpoint: Option<String>,
    /// Share of new traces kept, 0 to 1. Parent-based: a message whose producer's trace was
    /// kept is always kept, one whose trace was dropped never is.
    pub sample_ratio: f64,
}

impl Default for TracingSettings {
    fn default() -> Self {
        TracingSettings {
            otlp_endpoint: None,
            sample_ratio: 1.0,
        }
    }
}

impl TracingSettings {
    /// Rejects values that cannot work, naming the key under `prefix`.
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        check(
            (0.0..=1.0).contains(&self.sample_ratio),
            prefix,
            "sample_ratio",
            "must be between 0 and 1",
        )?;
        check(
            self.otlp_endpoint
                .as_deref()
                .is_none_or(|url| url.starts_with("http://") || url.starts_with("https://")),
            prefix,
            "otlp_endpoint",
            "must be an http:// or https:// URL",
        )
    }

    /// Whether traces are exported: an endpoint is configured here or in the environment.
    pub fn enabled(&self) -> bool {
        let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
        self.otlp_endpoint.is_some()
            || set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    }
}

/// Builds the exporting tracer provider for `service` (its instance named `instance`), or
/// `None` when tracing is off.
pub(crate) fn provider(
    settings: &TracingSettings,
    service: &'static str,
    instance: &str,
) -> Result<Option<SdkTracerProvider>, opentelemetry_otlp::ExporterBuildError> {
    if !settings.enabled() {
        return Ok(None);
    }
    let mut exporter = SpanExporter::builder().with_http();
    if let Some(base) = &settings.otlp_endpoint {
        exporter = exporter.with_endpoint(format!("{}/v1/traces", base.trim_end_matches('/')));
    }
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(settings.sample_ratio)));
    let resource = Resource::builder()
        .with_service_name(service)
        .with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            instance.to_owned(),
        ))
        .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter.build()?)
            .with_sampler(sampler)
            .with_resource(resource)
            .build(),
    ))
}

/// The W3C `traceparent` of `span`: `None` unless traces are exported and `span` is recorded.
pub fn traceparent(span: &Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Makes `span` continue the trace `traceparent` names (from a message's header or field).
/// Call it before the span is entered or has children; an unusable value starts a new trace.
pub fn continue_trace(span: &Span, traceparent: Option<&str>) {
    let Some(value) = traceparent else {
        return;
    };
    if span.is_disabled() {
        return;
    }
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), value.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    // Refused only for a span already started: it then stays in its own trace.
    let _ = span.set_parent(parent);
}
