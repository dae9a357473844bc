//! Certificates a test makes for itself: a CA, server certificates for loopback, and client
//! certificates, as PEM files in a temporary folder that servers run as other users can read.
//! Removed when dropped.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use uuid::Uuid;

/// A certificate and its key, as files.
#[derive(Clone, Debug)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate authority that signs what a test needs.
pub struct TestCa {
    pub dir: PathBuf,
    /// The CA's own certificate, the file a client or server trusts.
    pub cert: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    /// A fresh CA named `name`, in a folder of its own.
    pub fn new(name: &str) -> TestCa {
        let dir = std::env::temp_dir().join(format!(
            "warren-certs-{name}-{}",
            &Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&dir).expect("certificate folder");
        set_mode(&dir, 0o755);
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("CA certificate");
        let cert_file = dir.join("ca.pem");
        write(&cert_file, &cert.pem());
        TestCa {
            dir,
            cert: cert_file,
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for the names (DNS names or IP addresses) in `names`.
    pub fn server(&self, file: &str, names: &[&str]) -> Pair {
        self.leaf(
            file,
            names,
            names[0],
            &[ExtendedKeyUsagePurpose::ServerAuth],
            false,
        )
    }

    /// Like [`Self::server`], but its validity ended in 2021.
    pub fn expired_server(&self, file: &str, names: &[&str]) -> Pair {
        self.leaf(
            file,
            names,
            names[0],
            &[ExtendedKeyUsagePurpose::ServerAuth],
            true,
        )
    }

    /// A client certificate whose common name is `name` (RabbitMQ's EXTERNAL login).
    pub fn client(&self, file: &str, name: &str) -> Pair {
        self.leaf(
            file,
            &[],
            name,
            &[ExtendedKeyUsagePurpose::ClientAuth],
            false,
        )
    }

    /// A certificate for both ends of a link: a cluster node is server and client.
    pub fn peer(&self, file: &str, names: &[&str]) -> Pair {
        let usages = [
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.leaf(file, names, names[0], &usages, false)
    }

    fn leaf(
        &self,
        file: &str,
        names: &[&str],
        common_name: &str,
        usages: &[ExtendedKeyUsagePurpose],
        expired: bool,
    ) -> Pair {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = usages.to_vec();
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        let pair = Pair {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}-key.pem")),
        };
        write(&pair.cert, &cert.pem());
        write(&pair.key, &key.serialize_pem());
        pair
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Written readable by all: the servers run as their own users, and these keys guard nothing.
fn write(file: &Path, text: &str) {
    std::fs::write(file, text).expect("certificate file");
    set_mode(file, 0o644);
}

fn set_mode(file: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode)).expect("permissions");
}
