//! Logging setup for the binaries: `RUST_LOG` filters (default `info`, lapin quieter), plain
//! text for people or JSON lines for log pipelines; and, when configured, the message
//! journey's traces ([`traces`]).
//!
//! Gossip runs on UDP, where anyone can send a datagram: chitchat logs a warning for every one
//! it cannot decode, so a stray scanner (or an attacker) could fill the logs. Those warnings are
//! counted in `warren_gossip_invalid_datagrams_total` and logged at most once per
//! [`NOISY_LOG_INTERVAL`]. They are counted as log events, so only while `RUST_LOG` lets
//! chitchat's warnings through (the default does).

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use prometheus::IntCounter;
use tracing::Metadata;
use tracing::subscriber::Interest;
use tracing_subscriber::filter::{FilterExt, Targets};
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

pub mod traces;

pub use traces::{JOURNEY, TracingSettings, continue_trace, traceparent};

/// At most one undecodable-datagram warning per this interval.
pub const NOISY_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Installs the global subscriber for logs only; call once, first thing in `main`.
pub fn init(json: bool) {
    tracing_subscriber::registry().with(log_layer(json)).init();
}

/// Keeps the trace exporter; dropping it exports what is still buffered (up to a few seconds)
/// and stops it.
#[must_use = "traces stop being exported when this is dropped"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber: logs (filtered by `RUST_LOG`) and, when `tracing` names an
/// endpoint, the message journey's spans exported as `service` (instance `instance`, e.g. the
/// node id). Call once, first thing in `main`, and keep the result until the end.
pub fn init_with_traces(
    json: bool,
    tracing: &TracingSettings,
    service: &'static str,
    instance: &str,
) -> Telemetry {
    let mut layers = vec![log_layer(json)];
    let (provider, failed) = match traces::provider(tracing, service, instance) {
        Ok(provider) => (provider, None),
        Err(error) => (None, Some(error)),
    };
    if let Some(provider) = &provider {
        let journey = Targets::new().with_target(JOURNEY, tracing::Level::TRACE);
        let exporting = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("warren"))
            .with_filter(journey);
        layers.push(Box::new(exporting));
    }
    tracing_subscriber::registry().with(layers).init();
    if let Some(error) = failed {
        tracing::error!(%error, "traces are not exported: the OTLP exporter cannot be built");
    }
    Telemetry { provider }
}

/// Log lines to stderr, filtered by `RUST_LOG` (the journey's spans never: they are for the
/// exporter only, see [`traces`]), plain or JSON.
fn log_layer(json: bool) -> Box<dyn Layer<Registry> + Send + Sync> {
    let mut logs = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,lapin=warn,amq_protocol=warn"));
    if let Ok(directive) = format!("{JOURNEY}=off").parse() {
        logs = logs.add_directive(directive);
    }
    let filter = logs.and(InvalidDatagrams::new());
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(true)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        Box::new(fmt.json().with_filter(filter))
    } else {
        Box::new(fmt.with_filter(filter))
    }
}

/// Undecodable gossip datagrams seen (by the log filter, so only where it is installed).
pub fn invalid_gossip_datagrams() -> IntCounter {
    static COUNTER: OnceLock<IntCounter> = OnceLock::new();
    COUNTER
        .get_or_init(|| {
            IntCounter::new(
                "warren_gossip_invalid_datagrams_total",
                "UDP datagrams on the gossip port that were not valid gossip of this cluster.",
            )
            .unwrap_or_else(|_| unreachable!("the name and help are valid"))
        })
        .clone()
}

/// Counts chitchat's warning about an undecodable datagram and lets one through per
/// [`NOISY_LOG_INTERVAL`]; every other event passes.
struct InvalidDatagrams {
    counter: IntCounter,
    started: Instant,
    /// Milliseconds after `started` when one was last logged, plus one (0: never).
    last_logged: AtomicU64,
}

impl InvalidDatagrams {
    fn new() -> Self {
        InvalidDatagrams {
            counter: invalid_gossip_datagrams(),
            started: Instant::now(),
            last_logged: AtomicU64::new(0),
        }
    }

    /// chitchat's warning for a datagram it could not decode (the one with a `payload_len`).
    fn is_invalid_datagram(meta: &Metadata<'_>) -> bool {
        meta.is_event()
            && meta.target().starts_with("chitchat::transport")
            && meta.fields().field("payload_len").is_some()
    }

    /// Whether one may be logged now, noting it if so.
    fn may_log(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.last_logged.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= NOISY_LOG_INTERVAL.as_millis() as u64;
        due && self
            .last_logged
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

impl<S> Filter<S> for InvalidDatagrams {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        if !Self::is_invalid_datagram(meta) {
            return true;
        }
        self.counter.inc();
        self.may_log()
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if Self::is_invalid_datagram(meta) {
            // Asked at every event, so each one is counted.
            Interest::sometimes()
        } else {
            Interest::always()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Collects what passes the filter.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<String>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(buf).into_owned());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_flood_of_invalid_datagrams_is_counted_and_logged_once() {
        let lines = Lines::default();
        let writer = lines.clone();
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(move || writer.clone())
            .with_filter(InvalidDatagrams::new());
        let subscriber = tracing_subscriber::registry().with(fmt);
        let before = invalid_gossip_datagrams().get();
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..1000 {
                tracing::warn!(
                    target: "chitchat::transport::udp",
                    payload_len = 3,
                    "invalid-chitchat-payload"
                );
            }
            tracing::warn!(target: "chitchat::transport::udp", "transient UDP recv error");
            tracing::info!("something else");
        });
        assert_eq!(invalid_gossip_datagrams().get() - before, 1000);
        let lines = lines.0.lock().unwrap();
        let invalid = lines
            .iter()
            .filter(|l| l.contains("invalid-chitchat-payload"))
            .count();
        assert_eq!(invalid, 1, "{lines:?}");
        assert!(lines.iter().any(|l| l.contains("transient UDP recv error")));
        assert!(lines.iter().any(|l| l.contains("something else")));
    }
}
