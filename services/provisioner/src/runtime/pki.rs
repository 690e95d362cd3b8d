//! The CA of workspace daemons on Kubernetes: it issues each k8shelld's
//! server certificate and the provisioner's client certificate, so both
//! ends of the mutual TLS link are checked. Created on first use in the
//! provisioner's state directory (key mode 0600).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The CA could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Files.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Certificate work.
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
}

const CA_NAME: &str = "k8shell workspace daemons";

/// A certificate and its key, PEM.
#[derive(Clone, Debug)]
pub struct Issued {
    /// Certificate.
    pub cert_pem: String,
    /// Private key.
    pub key_pem: String,
}

/// The workspace CA.
pub struct WorkspaceCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM), for verifiers.
    pub ca_pem: String,
}

fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

impl WorkspaceCa {
    /// Loads `ca.crt` / `ca.key` from `dir`, creating them when missing.
    pub fn load_or_create(dir: &Path) -> Result<Self, PkiError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| PkiError::Io { path, source }
        };
        let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
        if cert_path.exists() && key_path.exists() {
            let ca_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
            let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
            let key = KeyPair::from_pem(&key_pem)?;
            // The issuer needs the CA's name and key; the name is fixed.
            let issuer = Issuer::new(ca_params()?, key);
            return Ok(Self { issuer, ca_pem });
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let key = KeyPair::generate()?;
        let certificate = ca_params()?.self_signed(&key)?;
        let ca_pem = certificate.pem();
        write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io(&key_path))?;
        std::fs::write(&cert_path, &ca_pem).map_err(io(&cert_path))?;
        let issuer = Issuer::new(ca_params()?, key);
        Ok(Self { issuer, ca_pem })
    }

    /// A server certificate for `names` (DNS names of the workspace Service).
    pub fn server(&self, names: Vec<String>) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::new(names)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate for the platform (`common_name`).
    pub fn client(&self, common_name: &str) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, params: CertificateParams) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let certificate = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: certificate.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_created_once_and_issues_server_and_client_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let first = WorkspaceCa::load_or_create(dir.path()).unwrap();
        let again = WorkspaceCa::load_or_create(dir.path()).unwrap();
        assert_eq!(first.ca_pem, again.ca_pem, "the CA is kept");
        let server = again
            .server(vec!["alice-1a7fd88.ws.svc".to_owned()])
            .unwrap();
        let client = again.client("k8shell-provisioner").unwrap();
        assert!(server.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(client.key_pem.contains("PRIVATE KEY"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
