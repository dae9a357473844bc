//! TLS for the broker link (`[amqp.tls]`): which CA to trust beyond the system's roots, and
//! which client certificate to present. Used only with an `amqps://` URI; with
//! `?auth_mechanism=external` in the URI the client certificate is the login (RabbitMQ's
//! `rabbitmq_auth_mechanism_ssl` plugin), so no password travels.

use std::path::{Path, PathBuf};

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri, SASLMechanism};
use serde::{Deserialize, Serialize};

use crate::amqp::AmqpError;
use crate::config::{ConfigError, check};
use crate::tls::{self, TlsFileError};

/// Files for an `amqps://` link; all PEM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpTls {
    /// A CA certificate (or bundle) trusted in addition to the system's roots, for a broker
    /// whose certificate a private CA signed.
    pub ca_file: Option<PathBuf>,
    /// This client's certificate chain, for brokers that verify peers or log in with EXTERNAL.
    pub cert_file: Option<PathBuf>,
    /// The private key of `cert_file` (PKCS#8, SEC1 or PKCS#1 PEM).
    pub key_file: Option<PathBuf>,
}

impl AmqpTls {
    /// Rejects files without the scheme that uses them, half a client identity, EXTERNAL
    /// without a certificate, and files that cannot be read or hold no PEM of their kind —
    /// naming the key under `prefix`
    /// (`amqp`), before anything connects.
    pub fn validate(&self, prefix: &str, uri: &AMQPUri) -> Result<(), ConfigError> {
        let tls = uri.scheme == AMQPScheme::AMQPS;
        let any_file = self.ca_file.is_some() || self.cert_file.is_some();
        check(
            tls || !any_file && self.key_file.is_none(),
            prefix,
            "tls",
            "TLS files are set but amqp.uri is not amqps://; use amqps:// (RabbitMQ's TLS port is usually 5671)",
        )?;
        check(
            self.cert_file.is_some() == self.key_file.is_some(),
            prefix,
            "tls.cert_file",
            "a client certificate needs both amqp.tls.cert_file and amqp.tls.key_file",
        )?;
        check(
            uri.query.auth_mechanism != Some(SASLMechanism::External) || self.cert_file.is_some(),
            prefix,
            "tls.cert_file",
            "auth_mechanism=external logs in with a client certificate: set amqp.tls.cert_file and amqp.tls.key_file",
        )?;
        // Read and parsed now, so a wrong file fails at start, not at the first connection.
        type Parse = fn(&Path) -> Result<(), TlsFileError>;
        let files: [(&str, &Option<PathBuf>, Parse); 3] = [
            ("tls.ca_file", &self.ca_file, |f| {
                tls::certificates(f).map(drop)
            }),
            ("tls.cert_file", &self.cert_file, |f| {
                tls::certificates(f).map(drop)
            }),
            ("tls.key_file", &self.key_file, |f| {
                tls::private_key(f).map(drop)
            }),
        ];
        for (key, file, parse) in files {
            if let Some(Err(error)) = file.as_deref().map(parse) {
                check(false, prefix, key, &error.to_string())?;
            }
        }
        Ok(())
    }

    /// What lapin needs for the handshake: the extra CA and the client identity, read now so
    /// a certificate renewed on disk is picked up at the next reconnection.
    pub(crate) fn lapin_config(&self) -> Result<OwnedTLSConfig, AmqpError> {
        let cert_chain = match &self.ca_file {
            Some(file) => Some(String::from_utf8_lossy(&read(file)?).into_owned()),
            None => None,
        };
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
                pem: read(cert)?,
                key: read(key)?,
            }),
            _ => None,
        };
        Ok(OwnedTLSConfig {
            identity,
            cert_chain,
        })
    }
}

fn read(file: &Path) -> Result<Vec<u8>, AmqpError> {
    std::fs::read(file).map_err(|e| AmqpError::TlsFile {
        file: file.to_path_buf(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn uri(text: &str) -> AMQPUri {
        AMQPUri::from_str(text).unwrap()
    }

    fn refusal(tls: &AmqpTls, text: &str) -> String {
        tls.validate("amqp", &uri(text)).unwrap_err().to_string()
    }

    #[test]
    fn no_files_fit_either_scheme() {
        let none = AmqpTls::default();
        none.validate("amqp", &uri("amqp://127.0.0.1")).unwrap();
        none.validate("amqp", &uri("amqps://127.0.0.1")).unwrap();
    }

    #[test]
    fn misconfigurations_are_refused_naming_the_key() {
        let file = std::env::temp_dir().join(format!("warren-tls-{}.pem", std::process::id()));
        std::fs::write(&file, "no PEM in here").unwrap();
        let ca = AmqpTls {
            ca_file: Some(file.clone()),
            ..AmqpTls::default()
        };
        assert!(refusal(&ca, "amqp://127.0.0.1").contains("`amqp.tls`"));
        assert!(refusal(&ca, "amqps://127.0.0.1").contains("`amqp.tls.ca_file`"));

        let half = AmqpTls {
            cert_file: Some(file.clone()),
            ..AmqpTls::default()
        };
        assert!(refusal(&half, "amqps://127.0.0.1").contains("`amqp.tls.cert_file`"));

        let external = "amqps://127.0.0.1?auth_mechanism=external";
        assert!(refusal(&AmqpTls::default(), external).contains("`amqp.tls.cert_file`"));

        let missing = AmqpTls {
            ca_file: Some(PathBuf::from("/nonexistent/ca.pem")),
            ..AmqpTls::default()
        };
        let err = refusal(&missing, "amqps://127.0.0.1");
        assert!(err.contains("`amqp.tls.ca_file`") && err.contains("/nonexistent/ca.pem"));
        std::fs::remove_file(file).unwrap();
    }
}
