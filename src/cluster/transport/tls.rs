//! TLS on cluster links (`[cluster.tls]`), mutual: each node presents a certificate the
//! cluster CA signed and accepts only peers that do the same, so the CA is the membership
//! credential and payloads are encrypted. Which host a certificate names is not checked (as
//! Akka's `hostname-verification = off`): nodes come and go with new addresses, and a private
//! cluster CA that signs only nodes is what proves membership. The shared-secret handshake
//! still runs inside the TLS session when a secret is set, as a second factor.
//!
//! Gossip (UDP) does not run over these links: its records are signed with the secret, so
//! they cannot be forged, but they are readable (node ids, addresses, roles, status).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{ConfigError, check};
use crate::tls::{self, ChainOnly, TlsFileError};

/// The cluster CA and this node's certificate, all PEM; all three or none.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterTlsSettings {
    /// The CA that signs every node's certificate, and only those.
    pub ca_file: Option<PathBuf>,
    /// This node's certificate chain; it serves as both server and client certificate.
    pub cert_file: Option<PathBuf>,
    /// The private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl ClusterTlsSettings {
    /// Whether links use TLS.
    pub fn enabled(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }

    /// Refuses a partial set and files that do not hold what they should, naming the key
    /// under `prefix` (`cluster`).
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        for (key, file) in [
            ("tls.ca_file", &self.ca_file),
            ("tls.cert_file", &self.cert_file),
            ("tls.key_file", &self.key_file),
        ] {
            check(
                file.is_some(),
                prefix,
                key,
                "TLS on cluster links needs ca_file, cert_file and key_file together",
            )?;
        }
        match self.link_tls() {
            Ok(_) => Ok(()),
            Err(LinkTlsError { key, source }) => check(false, prefix, key, &source.to_string()),
        }
    }

    /// The acceptor and connector for every link, or `None` without TLS.
    pub fn build(&self) -> Result<Option<Arc<LinkTls>>, LinkTlsError> {
        if !self.enabled() {
            return Ok(None);
        }
        self.link_tls().map(|tls| Some(Arc::new(tls)))
    }

    fn link_tls(&self) -> Result<LinkTls, LinkTlsError> {
        let file = |key: &'static str, file: &Option<PathBuf>| {
            file.clone().ok_or(LinkTlsError {
                key,
                source: TlsFileError::Unusable {
                    file: PathBuf::new(),
                    reason: "not set".into(),
                },
            })
        };
        let (ca, cert, key) = (
            file("tls.ca_file", &self.ca_file)?,
            file("tls.cert_file", &self.cert_file)?,
            file("tls.key_file", &self.key_file)?,
        );
        let at = |key: &'static str| move |source| LinkTlsError { key, source };
        let roots = tls::roots_from(&ca).map_err(at("tls.ca_file"))?;
        let ca_fingerprint = fingerprint(&tls::certificates(&ca).map_err(at("tls.ca_file"))?);
        let chain = tls::certificates(&cert).map_err(at("tls.cert_file"))?;
        let private = tls::private_key(&key).map_err(at("tls.key_file"))?;
        let mismatch = |reason: rustls::Error| LinkTlsError {
            key: "tls.key_file",
            source: TlsFileError::Unusable {
                file: key.clone(),
                reason: format!("does not fit {}: {reason}", cert.display()),
            },
        };
        let provider = tls::provider();
        let versions = |e: rustls::Error| mismatch(e);
        let clients =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots.clone()), provider.clone())
                .build()
                .map_err(|e| LinkTlsError {
                    key: "tls.ca_file",
                    source: TlsFileError::Unusable {
                        file: ca.clone(),
                        reason: e.to_string(),
                    },
                })?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(versions)?
            .with_client_cert_verifier(clients)
            .with_single_cert(chain.clone(), private.clone_key())
            .map_err(mismatch)?;
        let servers = ChainOnly::new(roots, &ca).map_err(at("tls.ca_file"))?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(versions)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(servers))
            .with_client_auth_cert(chain, private)
            .map_err(mismatch)?;
        Ok(LinkTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
            ca_fingerprint,
        })
    }
}

/// The first 8 bytes of the SHA-256 of the CA certificates, in hex.
fn fingerprint(certs: &[rustls::pki_types::CertificateDer<'_>]) -> String {
    use sha2::Digest;
    let mut digest = sha2::Sha256::new();
    for cert in certs {
        digest.update(cert.as_ref());
    }
    digest.finalize()[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// A `[cluster.tls]` file that cannot be used, with the key that named it.
#[derive(Debug, thiserror::Error)]
#[error("cluster.{key}: {source}")]
pub struct LinkTlsError {
    /// The key under `cluster`, e.g. `tls.cert_file`.
    pub key: &'static str,
    /// What is wrong with the file.
    pub source: TlsFileError,
}

/// What a link runs over: a TCP stream, maybe inside TLS.
pub trait LinkIo: AsyncRead + AsyncWrite + Send + Unpin {}

impl<S: AsyncRead + AsyncWrite + Send + Unpin> LinkIo for S {}

/// A link's byte stream.
pub type LinkStream = Box<dyn LinkIo>;

/// The TLS ends of this node's links.
pub struct LinkTls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    ca_fingerprint: String,
}

impl LinkTls {
    /// A short digest of the cluster CA. Gossip carries it in the cluster id, so a node under
    /// another CA (or none) never mixes its gossip with this cluster's: without it, a node
    /// holding the secret but no valid certificate would be seen joining, and then be
    /// unreachable on every link.
    pub fn ca_fingerprint(&self) -> &str {
        &self.ca_fingerprint
    }

    /// Runs the server side of the TLS handshake on an accepted connection.
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<LinkStream> {
        Ok(Box::new(self.acceptor.accept(stream).await?))
    }

    /// Runs the client side of the TLS handshake on a connection dialled to `addr`.
    pub async fn dial(&self, stream: TcpStream, addr: SocketAddr) -> std::io::Result<LinkStream> {
        let name = ServerName::IpAddress(addr.ip().into());
        Ok(Box::new(self.connector.connect(name, stream).await?))
    }
}

/// `stream` in TLS when `tls` is set, as the accepting end.
pub async fn accepted(tls: Option<&LinkTls>, stream: TcpStream) -> Result<LinkStream, String> {
    match tls {
        Some(tls) => tls
            .accept(stream)
            .await
            .map_err(|e| format!("TLS handshake on the cluster link: {e}")),
        None => Ok(Box::new(stream)),
    }
}

/// Why the TLS handshake on a link dialled to `addr` failed.
#[derive(Debug)]
pub struct DialFailure {
    /// A certificate was refused, by either end (rather than the connection failing).
    pub refused: bool,
    /// What happened, naming the link.
    pub reason: String,
}

/// `stream` in TLS when `tls` is set, as the dialling end.
pub async fn dialled(
    tls: Option<&LinkTls>,
    stream: TcpStream,
    addr: SocketAddr,
) -> Result<LinkStream, DialFailure> {
    match tls {
        Some(tls) => tls.dial(stream, addr).await.map_err(|e| DialFailure {
            // rustls reports certificates it refuses, and alerts the peer sent, as bad data.
            refused: e.kind() == std::io::ErrorKind::InvalidData,
            reason: format!("TLS handshake on the cluster link to {addr}: {e}"),
        }),
        None => Ok(Box::new(stream)),
    }
}
