//! Host keys: generated once, kept in the host-key directory (OpenSSH
//! format, mode 0600), loaded on every start so clients' `known_hosts`
//! entries stay valid. ed25519 first (what current clients pick), then
//! ECDSA P-256 and RSA 3072 for older ones.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::{Algorithm, EcdsaCurve, LineEnding, PrivateKey};

/// The key files, in the order the server offers them.
const KEYS: [(&str, KeyKind); 3] = [
    ("ssh_host_ed25519_key", KeyKind::Ed25519),
    ("ssh_host_ecdsa_key", KeyKind::EcdsaP256),
    ("ssh_host_rsa_key", KeyKind::Rsa3072),
];

#[derive(Clone, Copy, Debug)]
enum KeyKind {
    Ed25519,
    EcdsaP256,
    Rsa3072,
}

/// A host key could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A file that is not an unencrypted OpenSSH private key.
    #[error("{path}: not an OpenSSH private key: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Generation failed.
    #[error("cannot generate a {kind} host key: {reason}")]
    Generate {
        /// Which.
        kind: &'static str,
        /// Why.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HostKeyError + '_ {
    move |source| HostKeyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Loads the host keys from `dir`, generating the missing ones.
pub fn load_or_generate(dir: &Path) -> Result<Vec<PrivateKey>, HostKeyError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    let mut keys = Vec::with_capacity(KEYS.len());
    for (file, kind) in KEYS {
        let path = dir.join(file);
        let key = match std::fs::read_to_string(&path) {
            Ok(text) => parse(&path, &text)?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let key = generate(kind)?;
                write(&path, &key)?;
                tracing::info!(path = %path.display(), fingerprint = %key.public_key().fingerprint(Default::default()), "generated a host key");
                key
            }
            Err(error) => return Err(io(&path)(error)),
        };
        keys.push(key);
    }
    Ok(keys)
}

/// A host key as clients see it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Fingerprint {
    /// `ssh-ed25519`, `ecdsa-sha2-nistp256`, `ssh-rsa`.
    pub algorithm: String,
    /// `SHA256:…`, as `ssh` and `ssh-keygen -l` print it.
    pub sha256: String,
}

/// The fingerprints of the host keys in `dir` that exist (none are
/// generated), in the order the server offers them — what users compare
/// with the prompt of their first connection.
pub fn fingerprints(dir: &Path) -> Result<Vec<Fingerprint>, HostKeyError> {
    let mut found = Vec::new();
    for (file, _) in KEYS {
        let path = dir.join(file);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(io(&path)(error)),
        };
        let public = parse(&path, &text)?.public_key().clone();
        found.push(Fingerprint {
            algorithm: public.algorithm().to_string(),
            sha256: public.fingerprint(Default::default()).to_string(),
        });
    }
    Ok(found)
}

fn parse(path: &Path, text: &str) -> Result<PrivateKey, HostKeyError> {
    let key = PrivateKey::from_openssh(text).map_err(|e| HostKeyError::Invalid {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    if key.is_encrypted() {
        return Err(HostKeyError::Invalid {
            path: path.to_owned(),
            reason: "it is encrypted; host keys must not have a passphrase".to_owned(),
        });
    }
    Ok(key)
}

fn generate(kind: KeyKind) -> Result<PrivateKey, HostKeyError> {
    let mut rng = rand10::rng();
    let (name, result) = match kind {
        KeyKind::Ed25519 => ("ed25519", PrivateKey::random(&mut rng, Algorithm::Ed25519)),
        KeyKind::EcdsaP256 => (
            "ecdsa",
            PrivateKey::random(
                &mut rng,
                Algorithm::Ecdsa {
                    curve: EcdsaCurve::NistP256,
                },
            ),
        ),
        KeyKind::Rsa3072 => (
            "rsa",
            russh::keys::ssh_key::private::RsaKeypair::random(&mut rng, 3072).map(PrivateKey::from),
        ),
    };
    result.map_err(|e| HostKeyError::Generate {
        kind: name,
        reason: e.to_string(),
    })
}

/// Writes `key` to `path` (0600) through a temporary file, so a crash
/// never leaves half a key behind.
fn write(path: &Path, key: &PrivateKey) -> Result<(), HostKeyError> {
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| HostKeyError::Generate {
            kind: "encoding",
            reason: e.to_string(),
        })?;
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(io(&temporary))?;
    file.write_all(text.as_bytes()).map_err(io(&temporary))?;
    file.sync_all().map_err(io(&temporary))?;
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))
        .map_err(io(&temporary))?;
    std::fs::rename(&temporary, path).map_err(io(path))?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| HostKeyError::Generate {
            kind: "encoding",
            reason: e.to_string(),
        })?;
    let public_path = path.with_extension("pub");
    std::fs::write(&public_path, format!("{public}\n")).map_err(io(&public_path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_those_of_the_keys_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        assert!(fingerprints(dir.path()).unwrap().is_empty());
        let keys = load_or_generate(dir.path()).unwrap();
        let listed = fingerprints(dir.path()).unwrap();
        assert_eq!(listed.len(), 3);
        for (key, listed) in keys.iter().zip(&listed) {
            assert_eq!(listed.algorithm, key.public_key().algorithm().to_string());
            assert_eq!(
                listed.sha256,
                key.public_key().fingerprint(Default::default()).to_string()
            );
            assert!(listed.sha256.starts_with("SHA256:"));
        }
        assert_eq!(listed[0].algorithm, "ssh-ed25519");
    }

    #[test]
    fn keys_are_generated_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_generate(dir.path()).unwrap();
        assert_eq!(first.len(), 3);
        let algorithms: Vec<String> = first.iter().map(|k| k.algorithm().to_string()).collect();
        assert_eq!(
            algorithms,
            ["ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa"]
        );
        let mode = std::fs::metadata(dir.path().join("ssh_host_ed25519_key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = load_or_generate(dir.path()).unwrap();
        for (a, b) in first.iter().zip(&second) {
            assert_eq!(a.public_key(), b.public_key());
        }
    }

    #[test]
    fn a_damaged_key_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ssh_host_ed25519_key"), "garbage").unwrap();
        let error = load_or_generate(dir.path()).unwrap_err().to_string();
        assert!(error.contains("ssh_host_ed25519_key"), "{error}");
    }
}
