//! Bearer-token check on every RPC: an ES256 JWT whose audience is this
//! workspace, signed by a key of the JWKS given at boot. Only identity holds
//! signing keys; k8shelld only verifies.

use std::collections::HashMap;
use std::sync::Arc;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tonic::{Request, Status};

/// The caller, as established by its token; stored in request extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's `sub`.
    pub subject: String,
}

/// The JWKS could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// Not a JWKS document.
    #[error("invalid jwks")]
    Parse(#[from] serde_json::Error),
    /// A key is not usable for ES256 verification.
    #[error("invalid key {kid:?} in jwks")]
    Key {
        /// Key id.
        kid: String,
        /// Cause.
        #[source]
        source: jsonwebtoken::errors::Error,
    },
    /// No key has a `kid`.
    #[error("jwks has no key with a kid")]
    Empty,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

/// Verifies tokens for one workspace.
#[derive(Clone)]
pub struct TokenVerifier {
    keys: Arc<std::sync::RwLock<HashMap<String, DecodingKey>>>,
    validation: Arc<Validation>,
}

impl TokenVerifier {
    /// Builds a verifier from a JWKS document, for tokens whose audience is
    /// `workspace_id` (and whose issuer is `issuer`, when given).
    pub fn new(
        jwks_json: &str,
        workspace_id: &str,
        issuer: Option<&str>,
    ) -> Result<Self, JwksError> {
        let keys = parse_jwks(jwks_json)?;
        // ES256 only: `alg: none`, HS256 and RS256 tokens fail here.
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_audience(&[workspace_id]);
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        validation.leeway = 30;
        if let Some(issuer) = issuer {
            validation.set_issuer(&[issuer]);
        }
        Ok(Self {
            keys: Arc::new(std::sync::RwLock::new(keys)),
            validation: Arc::new(validation),
        })
    }

    /// Replaces the trusted keys; returns their ids.
    pub fn replace(&self, jwks_json: &str) -> Result<Vec<String>, JwksError> {
        let keys = parse_jwks(jwks_json)?;
        let mut kids: Vec<String> = keys.keys().cloned().collect();
        kids.sort();
        if let Ok(mut current) = self.keys.write() {
            *current = keys;
        }
        Ok(kids)
    }

    fn key(&self, kid: &str) -> Option<DecodingKey> {
        self.keys
            .read()
            .ok()
            .and_then(|keys| keys.get(kid).cloned())
    }
}

fn parse_jwks(jwks_json: &str) -> Result<HashMap<String, DecodingKey>, JwksError> {
    let set: JwkSet = serde_json::from_str(jwks_json)?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|source| JwksError::Key {
            kid: kid.clone(),
            source,
        })?;
        keys.insert(kid, key);
    }
    if keys.is_empty() {
        return Err(JwksError::Empty);
    }
    Ok(keys)
}

impl TokenVerifier {
    /// Checks one token.
    pub fn verify(&self, token: &str) -> Result<Caller, Status> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| unauthenticated("malformed token"))?;
        if header.alg != Algorithm::ES256 {
            return Err(unauthenticated("token must be signed with ES256"));
        }
        let kid = header
            .kid
            .ok_or_else(|| unauthenticated("token has no kid"))?;
        let key = self
            .key(&kid)
            .ok_or_else(|| unauthenticated("token signed by an unknown key"))?;
        let data =
            jsonwebtoken::decode::<Claims>(token, &key, &self.validation).map_err(|error| {
                use jsonwebtoken::errors::ErrorKind;
                match error.kind() {
                    ErrorKind::ExpiredSignature => unauthenticated("token expired"),
                    ErrorKind::InvalidAudience => {
                        unauthenticated("token is not for this workspace")
                    }
                    ErrorKind::InvalidIssuer => unauthenticated("token from an unknown issuer"),
                    ErrorKind::InvalidSignature => unauthenticated("bad token signature"),
                    _ => unauthenticated("invalid token"),
                }
            })?;
        Ok(Caller {
            subject: data.claims.sub,
        })
    }

    /// A tonic interceptor: rejects calls without a valid bearer token and
    /// records the [`Caller`] for handlers.
    pub fn intercept(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.caller(&request).inspect_err(|status| {
            // Every refusal is logged, with why, for whoever audits the workspace.
            tracing::info!(reason = status.message(), "rejected call");
        })?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }

    fn caller(&self, request: &Request<()>) -> Result<Caller, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| unauthenticated("missing bearer token"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| unauthenticated("authorization must be `Bearer <token>`"))?;
        self.verify(token)
    }
}

fn unauthenticated(message: &'static str) -> Status {
    Status::unauthenticated(message)
}
