//! Logging users in through OpenID Providers: the gRPC handlers' logic on
//! top of [`crate::oidc`] — pending browser logins, device logins,
//! account linking and onboarding.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use k8shell_events::AggregateId;
use k8shell_events::user::{UserCreated, UserIdentityLinked};
use k8shell_proto::identity::v1 as pb;
use tonic::Status;

use crate::api::{IdentityApi, internal, timestamp, to_proto, user_id, valid_username};
use crate::oidc::{OidcError, OnboardingAction, Provider, VerifiedAccount};
use crate::users::{self, Admission, User};

/// How long a browser has to come back from the provider.
const BROWSER_LOGIN_TTL: Duration = Duration::from_secs(10 * 60);

/// The stream of a device login.
pub type DeviceLoginStream =
    Pin<Box<dyn Stream<Item = Result<pb::OidcDeviceLoginUpdate, Status>> + Send>>;

fn oidc_status(provider: &str, error: OidcError) -> Status {
    tracing::info!(%provider, %error, "OIDC login failed");
    match error {
        OidcError::Unavailable(_) => Status::unavailable(error.to_string()),
        OidcError::Refused(_) | OidcError::Invalid(_) => Status::unauthenticated(error.to_string()),
        OidcError::NotSupported(_) => Status::failed_precondition(error.to_string()),
    }
}

impl IdentityApi {
    fn provider(&self, name: &str) -> Result<Arc<Provider>, Status> {
        self.oidc.get(name).ok_or_else(|| {
            Status::not_found(format!("no OpenID Provider named {name:?} is configured"))
        })
    }

    pub(crate) fn list_oidc_providers(&self) -> pb::ListOidcProvidersResponse {
        pb::ListOidcProvidersResponse {
            providers: self
                .oidc
                .iter()
                .map(|p| pb::OidcProvider {
                    name: p.name.clone(),
                    display_name: p.display_name.clone(),
                    browser_login: p.browser_login(),
                })
                .collect(),
        }
    }

    pub(crate) async fn begin_oidc_login(
        &self,
        req: pb::BeginOidcLoginRequest,
    ) -> Result<pb::BeginOidcLoginResponse, Status> {
        let provider = self.provider(&req.provider)?;
        let login = provider
            .client()
            .begin_browser()
            .await
            .map_err(|e| oidc_status(&provider.name, e))?;
        let expires_at = time::OffsetDateTime::now_utc()
            + time::Duration::try_from(BROWSER_LOGIN_TTL).unwrap_or(time::Duration::MINUTE);
        // Abandoned logins are swept here rather than by a timer: the table
        // only grows with begun logins.
        sqlx::query("DELETE FROM oidc_pending_logins WHERE expires_at < now()")
            .execute(&self.pool)
            .await
            .map_err(|e| internal("cannot store the login")(&e))?;
        sqlx::query(
            "INSERT INTO oidc_pending_logins (state, provider, nonce, pkce_verifier, expires_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&login.state)
        .bind(&provider.name)
        .bind(&login.nonce)
        .bind(&login.pkce_verifier)
        .bind(expires_at)
        .execute(&self.pool)
        .await
        .map_err(|e| internal("cannot store the login")(&e))?;
        Ok(pb::BeginOidcLoginResponse {
            authorization_url: login.url,
            state: login.state,
            expires_at: Some(timestamp(expires_at)),
        })
    }

    pub(crate) async fn complete_oidc_login(
        &self,
        req: pb::CompleteOidcLoginRequest,
    ) -> Result<pb::LoginResponse, Status> {
        if req.state.is_empty() {
            return Err(Status::invalid_argument("state is required"));
        }
        // One use per state, whatever the outcome: a replayed redirect finds
        // nothing.
        let pending: Option<(String, String, String)> = sqlx::query_as(
            "DELETE FROM oidc_pending_logins WHERE state = $1 AND expires_at >= now()
             RETURNING provider, nonce, pkce_verifier",
        )
        .bind(&req.state)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| internal("cannot read the login")(&e))?;
        let Some((provider, nonce, verifier)) = pending else {
            tracing::info!(source = %req.source, "OIDC callback with an unknown or expired state");
            return Err(Status::failed_precondition(
                "this login is unknown, already used or expired; start again",
            ));
        };
        if !req.error.is_empty() {
            tracing::info!(%provider, error = %req.error, description = %req.error_description, source = %req.source, "provider refused the login");
            return Err(Status::permission_denied(format!(
                "the identity provider refused the login: {} {}",
                req.error, req.error_description
            )));
        }
        if req.code.is_empty() {
            return Err(Status::invalid_argument("code is required"));
        }
        let provider = self.provider(&provider)?;
        let account = provider
            .client()
            .complete_browser(&req.code, &nonce, &verifier)
            .await
            .map_err(|e| oidc_status(&provider.name, e))?;
        self.oidc_account_login(&provider, account, &req.source)
            .await
    }

    pub(crate) async fn oidc_device_login(
        self: Arc<Self>,
        req: pb::OidcDeviceLoginRequest,
    ) -> Result<DeviceLoginStream, Status> {
        let provider = self.provider(&req.provider)?;
        let (prompt, details) = provider
            .client()
            .begin_device()
            .await
            .map_err(|e| oidc_status(&provider.name, e))?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let expires_at = time::OffsetDateTime::now_utc()
            + time::Duration::try_from(prompt.expires_in).unwrap_or(time::Duration::MINUTE);
        let first = pb::OidcDeviceLoginUpdate {
            update: Some(pb::oidc_device_login_update::Update::Prompt(
                pb::DevicePrompt {
                    verification_uri: prompt.verification_uri,
                    verification_uri_complete: prompt.verification_uri_complete,
                    user_code: prompt.user_code,
                    expires_at: Some(timestamp(expires_at)),
                },
            )),
        };
        tokio::spawn(async move {
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            let outcome = tokio::select! {
                // The caller gave up: stop polling the provider.
                () = tx.closed() => return,
                outcome = provider.client().finish_device(&details) => outcome,
            };
            let result = match outcome {
                Ok(account) => self
                    .oidc_account_login(&provider, account, &req.source)
                    .await
                    .map(|login| pb::OidcDeviceLoginUpdate {
                        update: Some(pb::oidc_device_login_update::Update::Completed(login)),
                    }),
                Err(error) => Err(oidc_status(&provider.name, error)),
            };
            let _ = tx.send(result).await;
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    pub(crate) async fn approve_user(
        &self,
        req: pb::ApproveUserRequest,
    ) -> Result<pb::User, Status> {
        let id = user_id(&req.username)?;
        let user = self
            .change(&id, |state| {
                users::decide_approve(state, &id, &req.approved_by)
            })
            .await?;
        tracing::info!(user = %user.username, by = %req.approved_by, "waitlisted user approved");
        Ok(to_proto(&user))
    }

    /// Logs in the account a provider vouched for: an existing linked
    /// user, or a new one if the onboarding rules admit it.
    async fn oidc_account_login(
        &self,
        provider: &Provider,
        account: VerifiedAccount,
        source: &str,
    ) -> Result<pb::LoginResponse, Status> {
        let mapped = provider.mapping.apply(&account.claims).map_err(|e| {
            tracing::warn!(provider = %provider.name, error = %e, "claim mapping failed");
            Status::failed_precondition(format!(
                "provider {}: {e}; fix the provider's claim mapping",
                provider.name
            ))
        })?;
        // A linked account keeps its username even if the provider's
        // username claim changes later.
        let linked: Option<String> = sqlx::query_scalar(
            "SELECT username FROM identity_links WHERE provider = $1 AND subject = $2",
        )
        .bind(&provider.name)
        .bind(&account.subject)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| internal("cannot read account links")(&e))?;
        let username = linked.unwrap_or_else(|| mapped.username.clone());
        if !valid_username(&username) {
            return Err(Status::failed_precondition(format!(
                "provider {}: the account maps to the username {username:?}, which is not valid \
                 (lowercase letters, digits and '-', starting with a letter, at most 32)",
                provider.name
            )));
        }
        let user = match self.load(&username).await? {
            Some(user) => self.linked_user(provider, &account, user)?,
            None => self.onboard(provider, &account, &mapped, &username).await?,
        };
        if user.waitlisted {
            tracing::info!(user = %user.username, provider = %provider.name, %source, "waitlisted user tried to log in");
            return Err(Status::permission_denied(format!(
                "the account {} is waiting for an administrator's approval",
                user.username
            )));
        }
        let user = match &mapped.roles {
            Some(roles) if *roles != user.roles => {
                let id = user_id(&user.username)?;
                self.change(&id, |state| users::decide_roles(state, &id, roles.clone()))
                    .await?
            }
            _ => user,
        };
        tracing::info!(user = %user.username, provider = %provider.name, %source, "OIDC login");
        self.user_token(&user, "oidc", &[])
    }

    fn linked_user(
        &self,
        provider: &Provider,
        account: &VerifiedAccount,
        user: User,
    ) -> Result<User, Status> {
        if user.links.get(&provider.name) == Some(&account.subject) {
            return Ok(user);
        }
        // Same name, different person (or a local account): never merge
        // silently, that would hand the account to whoever controls the
        // name at the provider.
        tracing::warn!(user = %user.username, provider = %provider.name, subject = %account.subject, "OIDC login for an existing user not linked to this account");
        Err(Status::permission_denied(format!(
            "a user named {} exists and is not linked to this {} account",
            user.username, provider.name
        )))
    }

    async fn onboard(
        &self,
        provider: &Provider,
        account: &VerifiedAccount,
        mapped: &crate::oidc::MappedUser,
        username: &str,
    ) -> Result<User, Status> {
        let admission = match provider.onboarding.decide(username) {
            OnboardingAction::Allow => Admission::Active,
            OnboardingAction::Waitlist => Admission::Waitlisted,
            OnboardingAction::Reject => {
                tracing::info!(%username, provider = %provider.name, "onboarding rules reject a new user");
                return Err(Status::permission_denied(format!(
                    "{username} may not sign up through {}",
                    provider.name
                )));
            }
        };
        let id = AggregateId::new(username.to_owned())
            .map_err(|_| Status::failed_precondition(format!("invalid username {username:?}")))?;
        let created = UserCreated {
            username: username.to_owned(),
            email: mapped.email.clone(),
            display_name: mapped.display_name.clone(),
            roles: mapped.roles.clone().unwrap_or_default(),
            origin: format!("oidc:{}", provider.name),
            organization: String::new(),
        };
        let link = UserIdentityLinked {
            provider: provider.name.clone(),
            subject: account.subject.clone(),
        };
        match self
            .change(&id, |state| {
                users::decide_create_linked(state, &id, created.clone(), link.clone(), admission)
            })
            .await
        {
            Ok(user) => {
                tracing::info!(user = %username, provider = %provider.name, ?admission, "user onboarded");
                Ok(user)
            }
            // Two first logins at once: the other created it.
            Err(status) if status.code() == tonic::Code::AlreadyExists => {
                match self.load(username).await? {
                    Some(user) => self.linked_user(provider, account, user),
                    None => Err(Status::unavailable("user creation raced; retry")),
                }
            }
            Err(status) => Err(status),
        }
    }
}
