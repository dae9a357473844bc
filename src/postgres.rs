//! Reaching PostgreSQL as libpq would, over rustls: the connection URL's `sslmode` and
//! `sslrootcert` decide whether the link is encrypted and what is verified, for the entity
//! store and the cluster lease alike.
//!
//! | `sslmode` | TLS | verifies |
//! |---|---|---|
//! | `disable` | never | — |
//! | `allow`, `prefer` (the default) | if the server offers it | nothing, unless `sslrootcert` is set (then as `verify-ca`) |
//! | `require` | always | nothing, unless `sslrootcert` is set (then as `verify-ca`) |
//! | `verify-ca` | always | the chain, against `sslrootcert` (required, as in libpq) |
//! | `verify-full` | always | the chain, against `sslrootcert` or (`sslrootcert=system`, or none) the system's roots, and that the certificate names the host |
//!
//! `allow` (libpq: plain first, TLS if refused) is taken as `prefer`, which is no weaker.
//! `verify-ca` with the system's roots would accept any publicly issued certificate for any
//! host, so it needs a root file of the database's own CA. libpq's environment variables
//! (`PGSSLMODE`, …) and `~/.postgresql/root.crt` are not read: everything is in the URL.
//!
//! tokio-postgres knows only `disable`, `prefer` and `require`, and no `sslrootcert`, so those
//! are taken out of the URL here and the rest is left to it.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::tls::{self, ChainOnly, TlsFileError, Unverified};

/// A connection URL that cannot be used; the text names the parameter.
#[derive(Debug, thiserror::Error)]
pub enum PostgresUrlError {
    /// tokio-postgres refused the URL.
    #[error("not a usable PostgreSQL URL: {0}")]
    Invalid(String),
    /// `sslmode` is none of libpq's.
    #[error("sslmode `{0}` is not one of disable, allow, prefer, require, verify-ca, verify-full")]
    SslMode(String),
    /// `verify-ca` needs the database's CA: against the system's roots it would accept any
    /// public certificate of any host.
    #[error(
        "sslmode=verify-ca needs sslrootcert=<the database CA's file> (or use verify-full, which also checks the host name)"
    )]
    VerifyCaWithoutRoot,
    /// `sslrootcert` names a file that holds no certificate.
    #[error("sslrootcert {0}")]
    RootCert(TlsFileError),
}

/// How far the server's certificate is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verify {
    Nothing,
    Chain,
    ChainAndHost,
}

/// A parsed URL and the TLS connector its `sslmode` asks for.
#[derive(Clone)]
pub struct PostgresTarget {
    /// The connection settings, `sslmode` mapped onto what tokio-postgres knows.
    pub config: tokio_postgres::Config,
    /// The connector; tokio-postgres uses it only when the mode asks for TLS.
    pub tls: MakeRustlsConnect,
    /// `postgres://host:port/database (sslmode=…)`, without credentials: what an error about
    /// this link names.
    pub link: String,
}

impl PostgresTarget {
    /// Parses `url` (URL or `key=value` form) and reads its `sslrootcert`.
    pub fn parse(url: &str) -> Result<Self, PostgresUrlError> {
        let (rest, ssl) = take_tls_params(url);
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e: tokio_postgres::Error| PostgresUrlError::Invalid(e.to_string()))?;
        // libpq's `system` names the operating system's roots, for verify-full only.
        let system = ssl.root_cert.as_deref() == Some("system");
        let root_cert = ssl.root_cert.filter(|_| !system).map(PathBuf::from);
        let (mode, verify) = match ssl.mode.as_deref() {
            None | Some("prefer" | "allow") => (SslMode::Prefer, Verify::Nothing),
            Some("disable") => (SslMode::Disable, Verify::Nothing),
            Some("require") => (SslMode::Require, Verify::Nothing),
            Some("verify-ca") => (SslMode::Require, Verify::Chain),
            Some("verify-full") => (SslMode::Require, Verify::ChainAndHost),
            Some(other) => return Err(PostgresUrlError::SslMode(other.to_owned())),
        };
        // libpq: with a root certificate at hand, `prefer` and `require` verify the chain.
        let verify = match (verify, &root_cert) {
            (Verify::Nothing, Some(_)) => Verify::Chain,
            (Verify::Chain, None) => return Err(PostgresUrlError::VerifyCaWithoutRoot),
            (verify, _) => verify,
        };
        if system && verify != Verify::ChainAndHost {
            return Err(PostgresUrlError::VerifyCaWithoutRoot);
        }
        config.ssl_mode(mode);
        let tls = MakeRustlsConnect::new(client_config(verify, root_cert)?);
        let link = link(&config, ssl.mode.as_deref().unwrap_or("prefer"));
        Ok(PostgresTarget { config, tls, link })
    }
}

/// `error` on the link `link` (a [`PostgresTarget::link`]), with its causes: tokio-postgres'
/// own text stops at "error performing TLS handshake", and the reason (unknown issuer,
/// expired, wrong name) is in its source.
pub fn link_failure(link: &str, error: &dyn std::error::Error) -> String {
    let mut text = format!("{link}: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn link(config: &tokio_postgres::Config, sslmode: &str) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(socket)) => socket.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let database = config.get_dbname().unwrap_or("");
    format!("postgres://{host}:{port}/{database} (sslmode={sslmode})")
}

/// libpq's TLS parameters, which tokio-postgres would refuse or misread.
#[derive(Debug, Default, PartialEq)]
struct TlsParams {
    mode: Option<String>,
    root_cert: Option<String>,
}

/// Splits `sslmode` and `sslrootcert` off a URL's query or a `key=value` string.
fn take_tls_params(url: &str) -> (String, TlsParams) {
    let mut params = TlsParams::default();
    let mut take = |key: &str, value: &str| match key {
        "sslmode" => {
            params.mode = Some(value.to_owned());
            true
        }
        "sslrootcert" => {
            params.root_cert = Some(value.to_owned());
            true
        }
        _ => false,
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            Some((base, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|pair| {
                        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                        !take(key, &percent_decoded(value))
                    })
                    .collect();
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
            None => url.to_owned(),
        }
    } else {
        url.split_whitespace()
            .filter(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                !take(key.trim(), value.trim())
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    (rest, params)
}

/// `%XX` escapes decoded (a path in a URL's query is usually escaped).
fn percent_decoded(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn client_config(
    verify: Verify,
    root_cert: Option<PathBuf>,
) -> Result<ClientConfig, PostgresUrlError> {
    let provider = tls::provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| PostgresUrlError::Invalid(e.to_string()))?;
    let config = if verify == Verify::Nothing {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
            .with_no_client_auth()
    } else {
        let roots = match &root_cert {
            Some(file) => tls::roots_from(file).map_err(PostgresUrlError::RootCert)?,
            None => tls::system_roots(),
        };
        let verifier: Arc<dyn ServerCertVerifier> = if verify == Verify::Chain {
            let file = root_cert.clone().unwrap_or_default();
            Arc::new(ChainOnly::new(roots, &file).map_err(PostgresUrlError::RootCert)?)
        } else {
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| PostgresUrlError::Invalid(e.to_string()))?
        };
        builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth()
    };
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_tls_parameters_are_taken_out_of_a_url_and_the_rest_kept() {
        let (rest, params) = take_tls_params(
            "postgres://u:p@db:5432/x?sslmode=verify-full&application_name=a&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(rest, "postgres://u:p@db:5432/x?application_name=a");
        assert_eq!(
            params,
            TlsParams {
                mode: Some("verify-full".into()),
                root_cert: Some("/etc/ca.pem".into())
            }
        );
        let (rest, params) = take_tls_params("postgres://db/x?sslmode=require");
        assert_eq!(
            (rest.as_str(), params.mode.as_deref()),
            ("postgres://db/x", Some("require"))
        );
        let (rest, params) = take_tls_params("host=db sslmode=verify-ca dbname=x");
        assert_eq!(
            (rest.as_str(), params.mode.as_deref()),
            ("host=db dbname=x", Some("verify-ca"))
        );
    }

    #[test]
    fn modes_map_onto_what_tokio_postgres_knows_and_unknown_ones_are_refused() {
        let mode = |url: &str| PostgresTarget::parse(url).map(|t| t.config.get_ssl_mode());
        assert_eq!(mode("postgres://db/x").unwrap(), SslMode::Prefer);
        assert_eq!(
            mode("postgres://db/x?sslmode=disable").unwrap(),
            SslMode::Disable
        );
        assert_eq!(
            mode("postgres://db/x?sslmode=verify-full").unwrap(),
            SslMode::Require
        );
        let target =
            PostgresTarget::parse("postgres://u:secret@db:6432/x?sslmode=require").unwrap();
        assert_eq!(target.link, "postgres://db:6432/x (sslmode=require)");
        assert_eq!(
            mode("postgres://db/x?sslmode=allow").unwrap(),
            SslMode::Prefer
        );
        assert!(matches!(
            mode("postgres://db/x?sslmode=verify-ca"),
            Err(PostgresUrlError::VerifyCaWithoutRoot)
        ));
        assert!(matches!(
            mode("postgres://db/x?sslmode=verify-ca&sslrootcert=system"),
            Err(PostgresUrlError::VerifyCaWithoutRoot)
        ));
        assert_eq!(
            mode("postgres://db/x?sslmode=verify-full&sslrootcert=system").unwrap(),
            SslMode::Require
        );
        let err = mode("postgres://db/x?sslmode=verify-everything").unwrap_err();
        assert!(err.to_string().contains("verify-everything"), "{err}");
        let err =
            mode("postgres://db/x?sslmode=verify-full&sslrootcert=/nonexistent.pem").unwrap_err();
        assert!(err.to_string().contains("/nonexistent.pem"), "{err}");
    }
}
