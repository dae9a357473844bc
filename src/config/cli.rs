//! The flags every Warren binary shares (config file, broker, queue, logging), so they read
//! and behave the same in both. Each flag names its environment twin, which is also the
//! figment key's environment form, so both paths agree.

use std::path::PathBuf;

use crate::config::{ConfigError, ConfigLoader};

/// Flags common to `warren-consumer` and `warren-producer`; `#[command(flatten)]` them. Each is
/// global, so it may follow a subcommand too (`warren-consumer dlq inspect --queue orders`).
#[derive(Clone, Debug, clap::Args)]
pub struct CommonArgs {
    /// TOML config file; flags and environment variables override it.
    #[arg(long, env = "WARREN_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Broker URI.
    #[arg(long, env = "WARREN_AMQP__URI", value_name = "URI", global = true)]
    pub uri: Option<String>,
    /// The queue (its dead letters go to the queue of the same name ending in .dlq).
    #[arg(long, env = "WARREN_AMQP__QUEUE", global = true)]
    pub queue: Option<String>,
    /// Partition queues, each with its own consumer (default 1: the one queue). Producers and
    /// consumers of one queue must agree; a mismatch with the broker's queues is refused.
    #[arg(long, env = "WARREN_AMQP__PARTITIONS", value_name = "N", global = true)]
    pub partitions: Option<u16>,
    /// Queue type used when declaring the queue: classic or quorum (default classic).
    #[arg(
        long,
        env = "WARREN_AMQP__QUEUE_TYPE",
        value_name = "TYPE",
        global = true
    )]
    pub queue_type: Option<String>,
    /// all: declare the queue with Warren's arguments (default); passive: attach to a queue
    /// that exists, as it is (dead letters still go to `<queue>.dlq`, which Warren declares).
    #[arg(long, env = "WARREN_AMQP__DECLARE", value_name = "MODE", global = true)]
    pub declare: Option<String>,
    /// AMQP connection name, shown by the broker (default: program name and process id).
    #[arg(
        long,
        env = "WARREN_AMQP__CONNECTION_NAME",
        value_name = "NAME",
        global = true
    )]
    pub connection_name: Option<String>,
    /// For an amqps:// URI: a PEM CA certificate trusted besides the system's roots.
    #[arg(
        long,
        env = "WARREN_AMQP__TLS__CA_FILE",
        value_name = "FILE",
        global = true
    )]
    pub amqp_ca_file: Option<PathBuf>,
    /// For an amqps:// URI: this client's PEM certificate chain (with
    /// ?auth_mechanism=external in the URI, the login).
    #[arg(
        long,
        env = "WARREN_AMQP__TLS__CERT_FILE",
        value_name = "FILE",
        global = true
    )]
    pub amqp_cert_file: Option<PathBuf>,
    /// The PEM private key of --amqp-cert-file.
    #[arg(
        long,
        env = "WARREN_AMQP__TLS__KEY_FILE",
        value_name = "FILE",
        global = true
    )]
    pub amqp_key_file: Option<PathBuf>,
    /// Log JSON lines instead of text (the filter is RUST_LOG).
    #[arg(
        long,
        env = "WARREN_LOG__JSON",
        global = true,
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub log_json: Option<bool>,
}

impl CommonArgs {
    /// Defaults, the config file and the environment for settings type `T` (skipping the
    /// variables of `other_sections`, the other binary's), with these flags on top; add the
    /// binary's own flags, then extract.
    pub fn loader<T: serde::Serialize + Default>(
        &self,
        other_sections: &'static [&'static str],
    ) -> Result<ConfigLoader, ConfigError> {
        Ok(
            ConfigLoader::new::<T>(self.config.as_deref(), other_sections)?
                .flag("amqp.uri", self.uri.clone())
                .flag("amqp.queue", self.queue.clone())
                .flag("amqp.partitions", self.partitions)
                .flag("amqp.queue_type", self.queue_type.clone())
                .flag("amqp.declare", self.declare.clone())
                .flag("amqp.connection_name", self.connection_name.clone())
                .flag("amqp.tls.ca_file", self.amqp_ca_file.clone())
                .flag("amqp.tls.cert_file", self.amqp_cert_file.clone())
                .flag("amqp.tls.key_file", self.amqp_key_file.clone())
                .flag("log.json", self.log_json),
        )
    }
}
