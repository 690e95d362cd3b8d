//! Logins through identity: passwords, public keys, OpenSSH certificates
//! from identity's user CA, and the OpenID device flow for users who
//! onboard over SSH. Every failure looks the same to the client; the reason
//! goes to the log and to `ssh.auth_failed`.

use std::time::Duration;

use k8shell_proto::identity::v1 as pb;
use tonic::Code;

use crate::backends::Backends;

/// A user logged in.
#[derive(Clone, Debug)]
pub struct Login {
    /// The k8shell user.
    pub username: String,
    /// identity's user token (ES256 JWT).
    pub token: String,
    /// Roles at login.
    pub roles: Vec<String>,
    /// `publickey`, `certificate`, `password`, `keyboard-interactive`,
    /// `oidc-device`.
    pub method: &'static str,
    /// When `token` expires.
    pub expires_at: Option<std::time::SystemTime>,
    /// The key or certificate line the user proved to hold: the proxy logs
    /// in again with it when the token runs out during a long session.
    pub proven_key: Option<String>,
}

impl Login {
    fn from_response(
        response: pb::LoginResponse,
        method: &'static str,
    ) -> Result<Self, LoginFailure> {
        let user = response
            .user
            .ok_or_else(|| LoginFailure::Unavailable("identity returned no user".to_owned()))?;
        Ok(Self {
            username: user.username,
            token: response.token,
            roles: user.roles,
            method,
            expires_at: response
                .expires_at
                .and_then(|t| std::time::SystemTime::try_from(t).ok()),
            proven_key: None,
        })
    }

    /// The subject authz decides about.
    pub fn subject(&self) -> k8shell_proto::authz::v1::Subject {
        let amr = match self.method {
            "password" | "keyboard-interactive" => "pwd",
            "oidc-device" => "oidc",
            _ => "publickey",
        };
        k8shell_proto::authz::v1::Subject {
            sub: self.username.clone(),
            roles: self.roles.clone(),
            scopes: Vec::new(),
            kind: "user".to_owned(),
            amr: vec![amr.to_owned()],
        }
    }
}

/// Why a login failed (never shown to the client).
#[derive(Debug, thiserror::Error)]
pub enum LoginFailure {
    /// identity refused the credentials.
    #[error("{0}")]
    Refused(String),
    /// identity could not be asked.
    #[error("identity unavailable: {0}")]
    Unavailable(String),
}

fn failure(status: tonic::Status) -> LoginFailure {
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied | Code::NotFound | Code::InvalidArgument => {
            LoginFailure::Refused(status.message().to_owned())
        }
        _ => LoginFailure::Unavailable(status.message().to_owned()),
    }
}

/// A fresh token for the holder of `token` (identity's `RenewLogin`) and
/// its expiry.
pub async fn renew(
    backends: &Backends,
    token: &str,
    source: &str,
) -> Result<(String, Option<std::time::SystemTime>), LoginFailure> {
    let response = backends
        .identity
        .clone()
        .renew_login(pb::RenewLoginRequest {
            token: token.to_owned(),
            source: source.to_owned(),
        })
        .await
        .map_err(|status| match status.code() {
            Code::FailedPrecondition => LoginFailure::Refused(status.message().to_owned()),
            _ => failure(status),
        })?
        .into_inner();
    let expires_at = response
        .expires_at
        .and_then(|t| std::time::SystemTime::try_from(t).ok());
    Ok((response.token, expires_at))
}

/// Password login (also what keyboard-interactive's prompt uses).
pub async fn password(
    backends: &Backends,
    username: &str,
    password: &str,
    source: &str,
    method: &'static str,
) -> Result<Login, LoginFailure> {
    let response = backends
        .identity
        .clone()
        .password_login(pb::PasswordLoginRequest {
            username: username.to_owned(),
            password: password.to_owned(),
            source: source.to_owned(),
        })
        .await
        .map_err(failure)?
        .into_inner();
    Login::from_response(response, method)
}

/// Public key or certificate login; `line` is the OpenSSH public key or
/// certificate line (the client proved it holds the private key).
pub async fn public_key(
    backends: &Backends,
    username: &str,
    line: String,
    source: &str,
    method: &'static str,
) -> Result<Login, LoginFailure> {
    let response = backends
        .identity
        .clone()
        .public_key_login(pb::PublicKeyLoginRequest {
            username: username.to_owned(),
            public_key: line.clone(),
            source: source.to_owned(),
        })
        .await
        .map_err(failure)?
        .into_inner();
    let mut login = Login::from_response(response, method)?;
    login.proven_key = Some(line);
    Ok(login)
}

/// Whether identity knows `username` (keyboard-interactive offers the
/// device flow only to users who do not exist yet).
pub async fn user_exists(backends: &Backends, username: &str) -> Result<bool, LoginFailure> {
    match backends
        .identity
        .clone()
        .get_user(pb::GetUserRequest {
            username: username.to_owned(),
            min_version: 0,
        })
        .await
    {
        Ok(_) => Ok(true),
        Err(status) if status.code() == Code::NotFound => Ok(false),
        Err(status) => Err(LoginFailure::Unavailable(status.message().to_owned())),
    }
}

/// A device-flow login in progress: the prompt to show, and the stream
/// that ends with the login once the user has confirmed in a browser.
pub struct DeviceLogin {
    /// What the user must do.
    pub instructions: String,
    updates: tonic::Streaming<pb::OidcDeviceLoginUpdate>,
}

/// Starts a device-flow login at `provider`.
pub async fn begin_device_login(
    backends: &Backends,
    provider: &str,
    source: &str,
) -> Result<DeviceLogin, LoginFailure> {
    let mut updates = backends
        .identity
        .clone()
        .oidc_device_login(pb::OidcDeviceLoginRequest {
            provider: provider.to_owned(),
            source: source.to_owned(),
        })
        .await
        .map_err(failure)?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(20), updates.message())
        .await
        .map_err(|_| LoginFailure::Unavailable("the provider did not answer".to_owned()))?
        .map_err(failure)?;
    let Some(pb::OidcDeviceLoginUpdate {
        update: Some(pb::oidc_device_login_update::Update::Prompt(prompt)),
    }) = first
    else {
        return Err(LoginFailure::Unavailable(
            "identity sent no device prompt".to_owned(),
        ));
    };
    let mut instructions = format!(
        "To log in, visit {}\nand enter the code {}",
        prompt.verification_uri, prompt.user_code
    );
    if !prompt.verification_uri_complete.is_empty() {
        instructions.push_str(&format!("\n(or open {})", prompt.verification_uri_complete));
    }
    instructions.push_str("\nthen press Enter here.");
    Ok(DeviceLogin {
        instructions,
        updates,
    })
}

impl DeviceLogin {
    /// Waits (at most `wait`) for the user to finish in the browser.
    pub async fn finish(mut self, wait: Duration) -> Result<Login, LoginFailure> {
        loop {
            let update = tokio::time::timeout(wait, self.updates.message())
                .await
                .map_err(|_| LoginFailure::Refused("the device login timed out".to_owned()))?
                .map_err(failure)?;
            match update.and_then(|u| u.update) {
                Some(pb::oidc_device_login_update::Update::Completed(response)) => {
                    return Login::from_response(response, "oidc-device");
                }
                Some(pb::oidc_device_login_update::Update::Prompt(_)) => continue,
                None => {
                    return Err(LoginFailure::Refused(
                        "the device login ended without a login".to_owned(),
                    ));
                }
            }
        }
    }
}
