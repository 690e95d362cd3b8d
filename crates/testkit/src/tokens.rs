//! ES256 tokens as identity issues them, for testing their verifiers.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use k8shell_service::daemon_channel::DaemonEndpoint;
use p256::elliptic_curve::Generate;
use p256::pkcs8::EncodePrivateKey;

/// A fresh ES256 key pair with its public JWKS.
pub struct TokenIssuer {
    kid: String,
    signing: EncodingKey,
    jwks: String,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl TokenIssuer {
    /// Generates a key pair identified by `kid`.
    pub fn new(kid: &str) -> anyhow::Result<Self> {
        let secret = p256::SecretKey::generate();
        let pem = secret
            .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
            .map_err(|e| anyhow::anyhow!("cannot encode key: {e}"))?;
        let signing = EncodingKey::from_ec_pem(pem.as_bytes())?;
        let mut jwk = Jwk::from_encoding_key(&signing, Algorithm::ES256)?;
        jwk.common.key_id = Some(kid.to_owned());
        let jwks = serde_json::to_string(&JwkSet { keys: vec![jwk] })?;
        Ok(Self {
            kid: kid.to_owned(),
            signing,
            jwks,
        })
    }

    /// The public keys, as a JWKS document.
    pub fn jwks(&self) -> &str {
        &self.jwks
    }

    /// A token for `subject` and `audience`, expiring in `expires_in`
    /// seconds (negative for an expired one).
    pub fn token(&self, subject: &str, audience: &str, expires_in: i64) -> String {
        self.token_with_kid(&self.kid, subject, audience, expires_in)
    }

    /// Like [`TokenIssuer::token`], claiming another key id.
    pub fn token_with_kid(
        &self,
        kid: &str,
        subject: &str,
        audience: &str,
        expires_in: i64,
    ) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        let claims = serde_json::json!({
            "sub": subject,
            "aud": audience,
            "iat": now(),
            "exp": now() + expires_in,
        });
        jsonwebtoken::encode(&header, &claims, &self.signing).unwrap_or_default()
    }
}

/// A gRPC channel to the k8shelld listening on `socket`.
pub async fn unix_channel(socket: &std::path::Path) -> anyhow::Result<tonic::transport::Channel> {
    Ok(DaemonEndpoint::unix(socket.to_path_buf()).connect().await?)
}
