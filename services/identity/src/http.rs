//! Public HTTP endpoints: the JWKS every verifier fetches, and an OpenID
//! discovery document pointing at it.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::keyring::KeyRing;

/// The routes.
pub fn router(keys: Arc<KeyRing>) -> Router {
    Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .route("/.well-known/openid-configuration", get(discovery))
        .with_state(keys)
}

async fn jwks(State(keys): State<Arc<KeyRing>>) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            // Verifiers may cache briefly; new keys appear well before use
            // only if rotation pre-publishes, so keep it short.
            (header::CACHE_CONTROL, "public, max-age=60"),
        ],
        keys.jwks(),
    )
}

async fn discovery(State(keys): State<Arc<KeyRing>>) -> impl IntoResponse {
    let issuer = keys.issuer().trim_end_matches('/').to_owned();
    Json(serde_json::json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/.well-known/jwks.json"),
        "id_token_signing_alg_values_supported": ["ES256"],
        "subject_types_supported": ["public"],
        "response_types_supported": ["token"],
        "claims_supported": ["sub", "aud", "exp", "iat", "nbf", "jti", "iss", "roles", "kind", "scopes", "amr"],
    }))
}
