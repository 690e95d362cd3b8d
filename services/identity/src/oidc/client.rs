//! The relying party's side of the protocol with one OpenID Provider:
//! discovery (cached), the authorization code flow with PKCE, the device
//! authorization grant, ID token verification and UserInfo.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use openidconnect::core::{
    CoreAuthDisplay, CoreAuthenticationFlow, CoreClaimName, CoreClaimType, CoreClient,
    CoreClientAuthMethod, CoreDeviceAuthorizationResponse, CoreGenderClaim, CoreGrantType,
    CoreJsonWebKey, CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm,
    CoreResponseMode, CoreResponseType, CoreSubjectIdentifierType, CoreTokenResponse,
};
use openidconnect::{
    AdditionalClaims, AdditionalProviderMetadata, AuthorizationCode, ClientId, ClientSecret,
    CsrfToken, DeviceAuthorizationUrl, IssuerUrl, Nonce, NonceVerifier, OAuth2TokenResponse,
    PkceCodeChallenge, PkceCodeVerifier, ProviderMetadata, RedirectUrl, RequestTokenError, Scope,
    TokenResponse, UserInfoClaims,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::OidcProviderConfig;

/// How long discovery (and the provider's signing keys) is trusted before
/// it is fetched again; a provider rotating its keys is picked up within
/// this time.
const METADATA_TTL: Duration = Duration::from_secs(600);

/// The longest a device login waits for the user.
const DEVICE_LOGIN_LIMIT: Duration = Duration::from_secs(15 * 60);

/// Discovery metadata with the device authorization endpoint, which the
/// core metadata type leaves out.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct DeviceEndpoint {
    #[serde(default)]
    device_authorization_endpoint: Option<DeviceAuthorizationUrl>,
}
impl AdditionalProviderMetadata for DeviceEndpoint {}

type Metadata = ProviderMetadata<
    DeviceEndpoint,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// Every claim, whatever its name, for the CEL mapping.
#[derive(Clone, Debug, Deserialize, Serialize)]
struct RawClaims {
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}
impl AdditionalClaims for RawClaims {}

/// What can go wrong talking to a provider.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// The provider cannot be reached or answered nonsense at the HTTP level.
    #[error("the identity provider is unavailable: {0}")]
    Unavailable(String),
    /// The provider refused (denied, expired, bad code).
    #[error("the identity provider refused the login: {0}")]
    Refused(String),
    /// What the provider sent does not verify.
    #[error("the identity provider's answer does not verify: {0}")]
    Invalid(String),
    /// The provider or its configuration does not offer this flow.
    #[error("{0}")]
    NotSupported(String),
}

/// An account the provider vouched for.
#[derive(Clone, Debug)]
pub struct VerifiedAccount {
    /// The `sub` claim.
    pub subject: String,
    /// The ID token's claims, with UserInfo's merged over them.
    pub claims: serde_json::Value,
}

/// A browser login in flight: the URL to send the browser to, and what
/// the relying party must keep until the browser comes back.
pub struct BrowserLogin {
    pub url: String,
    pub state: String,
    pub nonce: String,
    pub pkce_verifier: String,
}

/// What the user must do to finish a device login.
#[derive(Clone, Debug)]
pub struct DevicePrompt {
    pub verification_uri: String,
    pub verification_uri_complete: String,
    pub user_code: String,
    pub expires_in: Duration,
}

/// The HTTP client for providers. Redirects are not followed: the token
/// and UserInfo endpoints never redirect, and following would open the
/// door to request forgery.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// One provider's endpoints and credentials.
pub struct ProviderClient {
    issuer: IssuerUrl,
    client_id: ClientId,
    secret: Option<ClientSecret>,
    redirect: Option<RedirectUrl>,
    scopes: Vec<Scope>,
    http: reqwest::Client,
    metadata: Mutex<Option<(Arc<Metadata>, Instant)>>,
}

fn token_error<RE, T>(error: RequestTokenError<RE, T>) -> OidcError
where
    RE: std::error::Error + 'static,
    T: openidconnect::ErrorResponse + 'static,
{
    match error {
        RequestTokenError::ServerResponse(response) => OidcError::Refused(response.to_string()),
        RequestTokenError::Request(e) => OidcError::Unavailable(chain(&e)),
        RequestTokenError::Parse(e, _) => OidcError::Invalid(e.to_string()),
        RequestTokenError::Other(e) => OidcError::Refused(e),
    }
}

/// An error with its causes, for messages.
fn chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

impl ProviderClient {
    /// Checks the URLs; nothing is fetched yet.
    pub fn new(
        config: &OidcProviderConfig,
        secret: String,
        http: reqwest::Client,
    ) -> Result<Self, String> {
        let issuer = IssuerUrl::new(config.issuer.clone())
            .map_err(|e| format!("bad issuer {:?}: {e}", config.issuer))?;
        let redirect = if config.redirect_uri.is_empty() {
            None
        } else {
            Some(
                RedirectUrl::new(config.redirect_uri.clone())
                    .map_err(|e| format!("bad redirect_uri {:?}: {e}", config.redirect_uri))?,
            )
        };
        if config.client_id.is_empty() {
            return Err("client_id is empty".to_owned());
        }
        let scopes = config
            .scopes
            .iter()
            .filter(|s| s.as_str() != "openid")
            .map(|s| Scope::new(s.clone()))
            .collect();
        Ok(Self {
            issuer,
            client_id: ClientId::new(config.client_id.clone()),
            secret: (!secret.is_empty()).then(|| ClientSecret::new(secret)),
            redirect,
            scopes,
            http,
            metadata: Mutex::new(None),
        })
    }

    pub fn has_redirect(&self) -> bool {
        self.redirect.is_some()
    }

    /// Discovery, cached for [`METADATA_TTL`].
    async fn metadata(&self) -> Result<Arc<Metadata>, OidcError> {
        let mut cached = self.metadata.lock().await;
        if let Some((metadata, at)) = cached.as_ref()
            && at.elapsed() < METADATA_TTL
        {
            return Ok(Arc::clone(metadata));
        }
        let metadata = Metadata::discover_async(self.issuer.clone(), &self.http)
            .await
            .map_err(|e| OidcError::Unavailable(chain(&e)))?;
        let metadata = Arc::new(metadata);
        *cached = Some((Arc::clone(&metadata), Instant::now()));
        Ok(metadata)
    }

    fn core_client(
        &self,
        metadata: &Metadata,
    ) -> openidconnect::core::CoreClient<
        openidconnect::EndpointSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointMaybeSet,
        openidconnect::EndpointMaybeSet,
    > {
        let client = CoreClient::from_provider_metadata(
            metadata.clone(),
            self.client_id.clone(),
            self.secret.clone(),
        );
        match &self.redirect {
            Some(redirect) => client.set_redirect_uri(redirect.clone()),
            None => client,
        }
    }

    /// Starts a browser login: the authorization URL with a fresh state,
    /// nonce and PKCE challenge.
    pub async fn begin_browser(&self) -> Result<BrowserLogin, OidcError> {
        if self.redirect.is_none() {
            return Err(OidcError::NotSupported(
                "this provider has no redirect_uri configured, so browser login is off".to_owned(),
            ));
        }
        let metadata = self.metadata().await?;
        let client = self.core_client(&metadata);
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (url, state, nonce) = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .add_scopes(self.scopes.iter().cloned())
            .set_pkce_challenge(challenge)
            .url();
        Ok(BrowserLogin {
            url: url.to_string(),
            state: state.secret().clone(),
            nonce: nonce.secret().clone(),
            pkce_verifier: verifier.secret().clone(),
        })
    }

    /// Finishes a browser login with the code the browser brought back.
    pub async fn complete_browser(
        &self,
        code: &str,
        nonce: &str,
        pkce_verifier: &str,
    ) -> Result<VerifiedAccount, OidcError> {
        let metadata = self.metadata().await?;
        let client = self.core_client(&metadata);
        let token: CoreTokenResponse = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(|e| OidcError::NotSupported(e.to_string()))?
            .set_pkce_verifier(PkceCodeVerifier::new(pkce_verifier.to_owned()))
            .request_async(&self.http)
            .await
            .map_err(token_error)?;
        let nonce = Nonce::new(nonce.to_owned());
        self.account(&client, &token, &nonce).await
    }

    /// Starts a device login: what the user must open and type.
    pub async fn begin_device(
        &self,
    ) -> Result<(DevicePrompt, CoreDeviceAuthorizationResponse), OidcError> {
        let metadata = self.metadata().await?;
        let endpoint = metadata
            .additional_metadata()
            .device_authorization_endpoint
            .clone()
            .ok_or_else(|| {
                OidcError::NotSupported(
                    "this identity provider does not offer device login".to_owned(),
                )
            })?;
        let client = self
            .core_client(&metadata)
            .set_device_authorization_url(endpoint);
        let details: CoreDeviceAuthorizationResponse = client
            .exchange_device_code()
            .add_scopes(self.scopes.iter().cloned())
            .request_async(&self.http)
            .await
            .map_err(token_error)?;
        let prompt = DevicePrompt {
            verification_uri: details.verification_uri().to_string(),
            verification_uri_complete: details
                .verification_uri_complete()
                .map(|uri| uri.secret().clone())
                .unwrap_or_default(),
            user_code: details.user_code().secret().clone(),
            expires_in: details.expires_in(),
        };
        Ok((prompt, details))
    }

    /// Waits (polling at the provider's interval) until the user approves
    /// or refuses the device login, or it expires.
    pub async fn finish_device(
        &self,
        details: &CoreDeviceAuthorizationResponse,
    ) -> Result<VerifiedAccount, OidcError> {
        let metadata = self.metadata().await?;
        let client = self.core_client(&metadata);
        let limit = details.expires_in().min(DEVICE_LOGIN_LIMIT);
        let token: CoreTokenResponse = client
            .exchange_device_access_token(details)
            .map_err(|e| OidcError::NotSupported(e.to_string()))?
            .request_async(&self.http, tokio::time::sleep, Some(limit))
            .await
            .map_err(token_error)?;
        // The device grant carries no nonce.
        let no_nonce = |_: Option<&Nonce>| Ok(());
        self.account(&client, &token, no_nonce).await
    }

    /// Verifies the ID token and gathers the account's claims.
    async fn account<N: NonceVerifier>(
        &self,
        client: &openidconnect::core::CoreClient<
            openidconnect::EndpointSet,
            openidconnect::EndpointNotSet,
            openidconnect::EndpointNotSet,
            openidconnect::EndpointNotSet,
            openidconnect::EndpointMaybeSet,
            openidconnect::EndpointMaybeSet,
        >,
        token: &CoreTokenResponse,
        nonce: N,
    ) -> Result<VerifiedAccount, OidcError> {
        let id_token = token
            .id_token()
            .ok_or_else(|| OidcError::Invalid("the token response has no ID token".to_owned()))?;
        let verified = id_token
            .claims(&client.id_token_verifier(), nonce)
            .map_err(|e| OidcError::Invalid(chain(&e)))?;
        let subject = verified.subject().to_string();
        // The typed claims know only the standard names; the mapping may use
        // any claim, so the (now verified) payload is read as JSON.
        let mut claims = id_token_payload(&id_token.to_string())?;
        if let Ok(request) = client.user_info(
            token.access_token().clone(),
            Some(verified.subject().clone()),
        ) {
            let info: UserInfoClaims<RawClaims, CoreGenderClaim> = request
                .request_async(&self.http)
                .await
                .map_err(|e| OidcError::Unavailable(format!("UserInfo: {}", chain(&e))))?;
            let info = serde_json::to_value(&info)
                .map_err(|e| OidcError::Invalid(format!("UserInfo: {e}")))?;
            if let (Some(claims), serde_json::Value::Object(info)) = (claims.as_object_mut(), info)
            {
                for (name, value) in info {
                    if !value.is_null() {
                        claims.insert(name, value);
                    }
                }
            }
        }
        Ok(VerifiedAccount { subject, claims })
    }
}

fn id_token_payload(jwt: &str) -> Result<serde_json::Value, OidcError> {
    let payload = jwt
        .split('.')
        .nth(1)
        .ok_or_else(|| OidcError::Invalid("the ID token is not a JWS".to_owned()))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| OidcError::Invalid(format!("ID token payload: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| OidcError::Invalid(format!("ID token payload: {e}")))
}
