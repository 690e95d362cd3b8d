//! ES256 tokens as identity issues them, for testing their verifiers.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
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

/// A gRPC channel over a unix socket.
pub async fn unix_channel(socket: &std::path::Path) -> anyhow::Result<tonic::transport::Channel> {
    let socket = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::try_from("http://k8shelld.invalid")?
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(channel)
}

/// Wraps a message with `authorization: Bearer <token>`.
pub fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}
