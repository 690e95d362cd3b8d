//! The token signer: ES256 keys with `kid`, kept in Postgres (private
//! halves sealed with the key-encryption key), rotated on a schedule with
//! overlap: a retired key stops signing at once but keeps verifying until
//! every token it signed has expired. Several identity replicas share the
//! keys; an advisory lock makes one of them rotate.

use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use p256::elliptic_curve::Generate;
use p256::pkcs8::EncodePrivateKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};

use crate::kek::Kek;

/// What every k8shell token says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer (identity's URL).
    pub iss: String,
    /// The user.
    pub sub: String,
    /// `k8shell` for user tokens, the workspace id for workspace tokens.
    pub aud: String,
    /// Expiry (seconds since the epoch).
    pub exp: u64,
    /// Issued at.
    pub iat: u64,
    /// Not before.
    pub nbf: u64,
    /// Token id.
    pub jti: String,
    /// `user` or `workspace`.
    pub kind: String,
    /// The user's roles when issued.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Action patterns the token is limited to (PAT-derived); empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// How the user authenticated: `pwd`, `publickey`, `pat`, `oidc`.
    #[serde(default)]
    pub amr: Vec<String>,
    /// The user's organisation.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub org: String,
    /// When the user proved who they are (seconds since the epoch);
    /// renewed tokens keep it. 0 in tokens from before it existed.
    #[serde(default)]
    pub auth_time: u64,
}

/// What to put in a token.
#[derive(Clone, Copy, Debug)]
pub struct TokenRequest<'a> {
    /// The user.
    pub sub: &'a str,
    /// Audience.
    pub aud: &'a str,
    /// `user` or `workspace`.
    pub kind: &'a str,
    /// Roles.
    pub roles: &'a [String],
    /// Scope limits.
    pub scopes: &'a [String],
    /// Authentication methods.
    pub amr: &'a [&'a str],
    /// Organisation (empty: none).
    pub org: &'a str,
    /// Lifetime.
    pub ttl: Duration,
    /// When the user authenticated; `None`: now (a fresh login).
    pub auth_time: Option<u64>,
}

/// Audience of user tokens.
pub const USER_AUDIENCE: &str = "k8shell";

/// Signing or verifying failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Postgres.
    #[error("key store: {0}")]
    Database(#[from] sqlx::Error),
    /// A key could not be made or read.
    #[error("key material: {0}")]
    Key(String),
    /// JWT work.
    #[error("token: {0}")]
    Jwt(#[from] jsonwebtoken::errors::Error),
    /// No active key yet.
    #[error("no signing key is active")]
    NoKey,
}

struct Active {
    kid: String,
    key: EncodingKey,
}

struct Ring {
    active: Option<Active>,
    verifying: Vec<(String, DecodingKey)>,
    jwks: String,
}

/// The keys, cached from Postgres and refreshed periodically.
pub struct KeyRing {
    pool: PgPool,
    kek: Kek,
    issuer: String,
    rotation: Duration,
    max_token_ttl: Duration,
    ring: RwLock<Ring>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl KeyRing {
    /// Loads the keys, creating the first one when there is none.
    pub async fn open(
        pool: PgPool,
        kek: Kek,
        issuer: String,
        rotation: Duration,
        max_token_ttl: Duration,
    ) -> Result<Self, KeyError> {
        let ring = Self {
            pool,
            kek,
            issuer,
            rotation,
            max_token_ttl,
            ring: RwLock::new(Ring {
                active: None,
                verifying: Vec::new(),
                jwks: "{\"keys\":[]}".to_owned(),
            }),
        };
        ring.refresh().await?;
        Ok(ring)
    }

    /// The issuer tokens carry.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Rotates when the active key is older than the rotation period, then
    /// reloads. Run periodically; cheap when nothing changes.
    pub async fn refresh(&self) -> Result<(), KeyError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('identity.signing_keys'))")
            .execute(&mut *tx)
            .await?;
        let active: Option<(String, time::OffsetDateTime)> = sqlx::query_as(
            "SELECT kid, activated_at FROM signing_keys
             WHERE retired_at IS NULL AND activated_at IS NOT NULL
             ORDER BY activated_at DESC LIMIT 1",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let due = match &active {
            None => true,
            Some((_, activated)) => {
                let age = time::OffsetDateTime::now_utc() - *activated;
                age >= time::Duration::try_from(self.rotation).unwrap_or(time::Duration::MAX)
            }
        };
        if due {
            self.rotate_in(&mut tx).await?;
        } else {
            // A deployment from before keys were pre-published has no next
            // key yet.
            self.ensure_next(&mut tx).await?;
        }
        tx.commit().await?;
        self.reload().await
    }

    /// Makes a new key the signer now; the old one keeps verifying.
    pub async fn rotate_now(&self) -> Result<(), KeyError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('identity.signing_keys'))")
            .execute(&mut *tx)
            .await?;
        self.rotate_in(&mut tx).await?;
        tx.commit().await?;
        self.reload().await
    }

    /// Retires the signer, promotes the published next key (or a fresh one
    /// when there is none) and publishes a new next key.
    async fn rotate_in(&self, tx: &mut sqlx::PgConnection) -> Result<(), KeyError> {
        let grace = i64::try_from(self.max_token_ttl.as_secs()).unwrap_or(i64::MAX / 2) + 60;
        sqlx::query(
            "UPDATE signing_keys SET retired_at = now(),
                 expires_at = now() + make_interval(secs => $1)
             WHERE retired_at IS NULL AND activated_at IS NOT NULL",
        )
        .bind(grace as f64)
        .execute(&mut *tx)
        .await?;
        let promoted = sqlx::query(
            "UPDATE signing_keys SET activated_at = now()
             WHERE kid = (SELECT kid FROM signing_keys WHERE activated_at IS NULL
                          ORDER BY created_at LIMIT 1)",
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if promoted == 0 {
            self.create_key(tx, true).await?;
        }
        self.create_key(tx, false).await
    }

    async fn ensure_next(&self, tx: &mut sqlx::PgConnection) -> Result<(), KeyError> {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM signing_keys WHERE activated_at IS NULL")
                .fetch_one(&mut *tx)
                .await?;
        if pending == 0 {
            self.create_key(tx, false).await?;
        }
        Ok(())
    }

    /// A new key, signing now (`active`) or published as the next one.
    async fn create_key(&self, tx: &mut sqlx::PgConnection, active: bool) -> Result<(), KeyError> {
        let secret = p256::SecretKey::generate();
        let pem = secret
            .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
            .map_err(|e| KeyError::Key(e.to_string()))?;
        let key = EncodingKey::from_ec_pem(pem.as_bytes())?;
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256)?;
        let digest =
            Sha256::digest(serde_json::to_vec(&jwk).map_err(|e| KeyError::Key(e.to_string()))?);
        let kid: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        jwk.common.key_id = Some(kid.clone());
        sqlx::query(
            "INSERT INTO signing_keys (kid, private_key, public_jwk, activated_at)
             VALUES ($1, $2, $3, CASE WHEN $4 THEN now() END)",
        )
        .bind(&kid)
        .bind(self.kek.seal(pem.as_bytes()))
        .bind(serde_json::to_value(&jwk).map_err(|e| KeyError::Key(e.to_string()))?)
        .bind(active)
        .execute(&mut *tx)
        .await?;
        tracing::info!(kid, active, "new signing key");
        Ok(())
    }

    async fn reload(&self) -> Result<(), KeyError> {
        let rows = sqlx::query(
            "SELECT kid, private_key, public_jwk,
                    retired_at IS NULL AND activated_at IS NOT NULL AS active
             FROM signing_keys
             WHERE expires_at IS NULL OR expires_at > now()
             ORDER BY created_at DESC",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut active = None;
        let mut verifying = Vec::new();
        let mut jwks = Vec::new();
        for row in rows {
            let kid: String = row.get("kid");
            let jwk: Jwk = serde_json::from_value(row.get("public_jwk"))
                .map_err(|e| KeyError::Key(e.to_string()))?;
            verifying.push((kid.clone(), DecodingKey::from_jwk(&jwk)?));
            if row.get::<bool, _>("active") && active.is_none() {
                let sealed: Vec<u8> = row.get("private_key");
                let pem = self
                    .kek
                    .open(&sealed)
                    .map_err(|e| KeyError::Key(e.to_string()))?;
                active = Some(Active {
                    kid: kid.clone(),
                    key: EncodingKey::from_ec_pem(&pem)?,
                });
            }
            jwks.push(jwk);
        }
        let jwks = serde_json::to_string(&JwkSet { keys: jwks })
            .map_err(|e| KeyError::Key(e.to_string()))?;
        if let Ok(mut ring) = self.ring.write() {
            *ring = Ring {
                active,
                verifying,
                jwks,
            };
        }
        Ok(())
    }

    /// The public keys that verify tokens now.
    pub fn jwks(&self) -> String {
        self.ring.read().map(|r| r.jwks.clone()).unwrap_or_default()
    }

    /// Signs a token with the active key.
    pub fn sign(&self, request: &TokenRequest<'_>) -> Result<(String, Claims), KeyError> {
        let TokenRequest {
            sub,
            aud,
            kind,
            roles,
            scopes,
            amr,
            org,
            ttl,
            auth_time,
        } = *request;
        let ring = self.ring.read().map_err(|_| KeyError::NoKey)?;
        let active = ring.active.as_ref().ok_or(KeyError::NoKey)?;
        let now = now_secs();
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: sub.to_owned(),
            aud: aud.to_owned(),
            exp: now + ttl.as_secs().max(1),
            iat: now,
            nbf: now.saturating_sub(5),
            jti: {
                use rand::RngCore;
                let mut id = [0u8; 16];
                rand::rngs::OsRng.fill_bytes(&mut id);
                id.iter().map(|b| format!("{b:02x}")).collect()
            },
            kind: kind.to_owned(),
            roles: roles.to_vec(),
            scopes: scopes.to_vec(),
            amr: amr.iter().map(|s| (*s).to_owned()).collect(),
            org: org.to_owned(),
            auth_time: auth_time.unwrap_or(now),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(active.kid.clone());
        Ok((jsonwebtoken::encode(&header, &claims, &active.key)?, claims))
    }

    /// Verifies a token for `audience`: signature by a current key, ES256
    /// only, issuer, expiry.
    pub fn verify(&self, token: &str, audience: &str) -> Result<Claims, KeyError> {
        let header = jsonwebtoken::decode_header(token)?;
        let kid = header
            .kid
            .ok_or_else(|| KeyError::Key("the token has no kid".to_owned()))?;
        let ring = self.ring.read().map_err(|_| KeyError::NoKey)?;
        let key = ring
            .verifying
            .iter()
            .find(|(k, _)| *k == kid)
            .map(|(_, key)| key)
            .ok_or_else(|| KeyError::Key(format!("unknown or expired key {kid}")))?;
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_audience(&[audience]);
        validation.set_issuer(&[&self.issuer]);
        validation.leeway = 30;
        Ok(jsonwebtoken::decode::<Claims>(token, key, &validation)?.claims)
    }
}
