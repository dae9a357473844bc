//! Logging setup for the binaries: `RUST_LOG` filters (default `info`, lapin quieter), plain
//! text for people or JSON lines for log pipelines.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber; call once, first thing in `main`.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,lapin=warn,amq_protocol=warn"));
    let registry = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(true)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt).init();
    }
}
