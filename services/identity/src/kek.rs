//! Encryption of secrets at rest: signing keys and the SSH CA key are
//! stored in Postgres sealed with AES-256-GCM under a key-encryption key
//! that lives outside the database (a 0600 file, created on first start),
//! so a database dump alone reveals no private key.

use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, OsRng, rand_core::RngCore};
use aes_gcm::{Aes256Gcm, Nonce};

/// Sealing failed or the key is wrong.
#[derive(Debug, thiserror::Error)]
pub enum KekError {
    /// The key file.
    #[error("key-encryption key {path}: {message}")]
    File {
        /// File.
        path: String,
        /// Why.
        message: String,
    },
    /// A sealed value does not open with this key.
    #[error("a sealed secret does not open with this key-encryption key")]
    Open,
}

/// The key-encryption key.
#[derive(Clone)]
pub struct Kek {
    cipher: Aes256Gcm,
}

impl Kek {
    /// Loads the 32-byte key at `path`, creating it (mode 0600) when missing.
    pub fn load_or_create(path: &Path) -> Result<Self, KekError> {
        let file_error = |message: String| KekError::File {
            path: path.display().to_string(),
            message,
        };
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                OsRng.fill_bytes(&mut key);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| file_error(e.to_string()))?;
                }
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| file_error(e.to_string()))?;
                file.write_all(&key)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| file_error(e.to_string()))?;
                key.to_vec()
            }
            Err(error) => return Err(file_error(error.to_string())),
        };
        let cipher = Aes256Gcm::new_from_slice(&bytes)
            .map_err(|_| file_error(format!("must be 32 bytes, is {}", bytes.len())))?;
        Ok(Self { cipher })
    }

    /// Seals `plain` (a fresh nonce, prepended).
    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        OsRng.fill_bytes(&mut nonce);
        // Encryption with a valid key and nonce cannot fail.
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), plain)
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend(sealed);
        out
    }

    /// Opens what [`Kek::seal`] sealed.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, KekError> {
        if sealed.len() < 12 {
            return Err(KekError::Open);
        }
        let (nonce, body) = sealed.split_at(12);
        self.cipher
            .decrypt(Nonce::from_slice(nonce), body)
            .map_err(|_| KekError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::load_or_create(&dir.path().join("kek")).unwrap();
        let again = Kek::load_or_create(&dir.path().join("kek")).unwrap();
        let sealed = kek.seal(b"private key");
        assert_ne!(&sealed[12..], b"private key");
        assert_eq!(again.open(&sealed).unwrap(), b"private key");
        let other = Kek::load_or_create(&dir.path().join("other")).unwrap();
        assert!(other.open(&sealed).is_err());
        let mut tampered = sealed;
        tampered[20] ^= 1;
        assert!(kek.open(&tampered).is_err());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("kek"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
