//! Short-lived workspace-audience tokens, so the provisioner can ask
//! k8shelld whether it answers and how idle it is.
//!
//! Until identity issues them (its issue), the provisioner signs them with
//! its own ES256 key, kept in its state directory and created on first
//! start; the JWKS handed to every workspace is this key's. See
//! docs/architecture.md, "Workspace tokens".

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::elliptic_curve::Generate;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey};

/// Subject of the provisioner's own tokens.
pub const SUBJECT: &str = "system:provisioner";

/// The key could not be loaded, created or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Reading or writing the key file failed.
    #[error("signing key {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file is not a P-256 PKCS#8 key.
    #[error("signing key {0} is not a P-256 PKCS#8 PEM key")]
    Format(String),
    /// Signing failed.
    #[error("cannot sign: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// Signs workspace tokens.
#[derive(Clone)]
pub struct WorkspaceTokens {
    kid: String,
    key: EncodingKey,
    jwks: String,
}

impl WorkspaceTokens {
    /// Loads the key at `path`, creating it (mode 0600) when missing.
    pub fn load_or_create(path: &Path) -> Result<Self, TokenError> {
        let io = |source| TokenError::Io {
            path: path.display().to_string(),
            source,
        };
        let pem = match std::fs::read_to_string(path) {
            Ok(pem) => pem,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let secret = p256::SecretKey::generate();
                let pem = secret
                    .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
                    .map_err(|_| TokenError::Format(path.display().to_string()))?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                write_private(path, pem.as_bytes()).map_err(io)?;
                pem.to_string()
            }
            Err(error) => return Err(io(error)),
        };
        p256::SecretKey::from_pkcs8_pem(&pem)
            .map_err(|_| TokenError::Format(path.display().to_string()))?;
        let key = EncodingKey::from_ec_pem(pem.as_bytes())?;
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256)?;
        // The kid names the key by its public half, so a rotated key never
        // reuses an id that verifiers cached.
        let kid = {
            use sha2::{Digest, Sha256};
            let public = serde_json::to_vec(&jwk).map_err(|e| TokenError::Sign(e.into()))?;
            let digest = Sha256::digest(&public);
            let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
            format!("provisioner-{hex}")
        };
        jwk.common.key_id = Some(kid.clone());
        let jwks = serde_json::to_string(&JwkSet { keys: vec![jwk] })
            .map_err(|e| TokenError::Sign(e.into()))?;
        Ok(Self { kid, key, jwks })
    }

    /// The public keys, for workspaces to verify with.
    pub fn jwks(&self) -> &str {
        &self.jwks
    }

    /// A token for `workspace_id`, valid for `ttl`.
    pub fn token(&self, workspace_id: &str, ttl: Duration) -> Result<String, TokenError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let claims = serde_json::json!({
            "sub": SUBJECT,
            "aud": workspace_id,
            "iat": now,
            "exp": now + ttl.as_secs().max(1),
        });
        Ok(jsonwebtoken::encode(&header, &claims, &self.key)?)
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
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/workspace-signing.pem");
        let first = WorkspaceTokens::load_or_create(&path).unwrap();
        let second = WorkspaceTokens::load_or_create(&path).unwrap();
        assert_eq!(first.jwks(), second.jwks());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let token = first
            .token("alice-1234567", Duration::from_secs(60))
            .unwrap();
        let jwks: JwkSet = serde_json::from_str(second.jwks()).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        let jwk = jwks.find(header.kid.as_deref().unwrap()).unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::ES256);
        validation.set_audience(&["alice-1234567"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap(),
            &validation,
        )
        .unwrap();
        assert_eq!(data.claims["sub"], SUBJECT);
        std::fs::write(&path, "not a key").unwrap();
        assert!(matches!(
            WorkspaceTokens::load_or_create(&path),
            Err(TokenError::Format(_))
        ));
    }
}
