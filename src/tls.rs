//! What every TLS link of Warren's shares: one crypto provider (rustls with ring), PEM files
//! read into certificates, keys and root stores with errors that name the file, and the two
//! server-certificate checks rustls does not ship (chain only, and none).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// A PEM file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    /// Missing, unreadable, or no PEM of the kind needed in it.
    #[error("`{}`: {reason}", file.display())]
    Unusable {
        /// The file.
        file: PathBuf,
        /// Why.
        reason: String,
    },
}

fn unusable(file: &Path, reason: impl ToString) -> TlsFileError {
    TlsFileError::Unusable {
        file: file.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The crypto every link uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates in `file`, in order (a leaf then its intermediates, or a CA bundle).
pub fn certificates(file: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let certs = CertificateDer::pem_file_iter(file)
        .map_err(|e| unusable(file, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unusable(file, e))?;
    if certs.is_empty() {
        return Err(unusable(file, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// The private key in `file` (PKCS#8, SEC1 or PKCS#1 PEM).
pub fn private_key(file: &Path) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    PrivateKeyDer::from_pem_file(file).map_err(|e| unusable(file, e))
}

/// The CA certificates of `file` as the only roots.
pub fn roots_from(file: &Path) -> Result<RootCertStore, TlsFileError> {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certificates(file)?);
    if added == 0 {
        return Err(unusable(file, "holds no usable CA certificate"));
    }
    Ok(roots)
}

/// The operating system's roots.
pub fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    roots
}

/// The chain must lead to a trusted root; which host the certificate names does not matter
/// (PostgreSQL's `verify-ca`; cluster links, where the private cluster CA is the identity).
#[derive(Debug)]
pub struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ChainOnly {
    /// Verifies chains against `roots`, read from `file`.
    pub fn new(roots: RootCertStore, file: &Path) -> Result<Self, TlsFileError> {
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map(ChainOnly)
            .map_err(|e| unusable(file, e))
    }
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Encrypted, not authenticated: PostgreSQL's `prefer` and `require` without a root
/// certificate (libpq's meaning). The handshake's signatures are still checked.
#[derive(Debug)]
pub struct Unverified(pub Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
