//! The gRPC face of identity. It is an internal API: the apiserver, the
//! SSH proxy and the CLI call it and put users' requests through authz
//! first; identity checks credentials and signs.

use std::sync::Arc;
use std::time::Duration;

use k8shell_bus::{EventStore, ExecuteError, execute};
use k8shell_events::user::{
    UserCreated, UserLoginFailed, UserPatCreated, UserSshCertificateIssued, UserSshKeyAdded,
};
use k8shell_events::{AggregateId, CloudEvent};
use k8shell_proto::identity::v1 as pb;
use sqlx::{PgPool, Row};
use tonic::{Request, Response, Status};

use crate::credentials::{self, LockoutConfig};
use crate::keyring::{Claims, KeyRing, TokenRequest, USER_AUDIENCE};
use crate::sshca::SshUserCa;
use crate::users::{self, Refusal, User, UserAggregate};

/// Lifetimes and limits.
#[derive(Clone, Debug)]
pub struct TokenPolicy {
    pub user_token_ttl: Duration,
    pub workspace_token_ttl: Duration,
    pub ssh_certificate_ttl: Duration,
    pub ssh_certificate_max_ttl: Duration,
    pub pat_default_days: u32,
    pub pat_max_days: u32,
    pub lockout: LockoutConfig,
    /// How long after a login its tokens can still be renewed.
    pub login_max_age: Duration,
}

/// Implements `k8shell.identity.v1.IdentityService`. Cheap to clone: the
/// device login's background task holds a copy.
#[derive(Clone)]
pub struct IdentityApi {
    pub(crate) store: EventStore,
    pub(crate) pool: PgPool,
    pub(crate) keys: Arc<KeyRing>,
    pub(crate) ca: Arc<SshUserCa>,
    pub(crate) policy: TokenPolicy,
    pub(crate) oidc: Arc<crate::oidc::OidcProviders>,
}

const BAD_LOGIN: &str = "invalid username or credentials";

pub(crate) fn internal(context: &'static str) -> impl FnOnce(&dyn std::fmt::Display) -> Status {
    move |error| {
        tracing::error!(error = %error, "{context}");
        Status::internal(context)
    }
}

fn timestamp_secs(secs: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(secs).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

pub(crate) fn timestamp(t: time::OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: t.nanosecond() as i32,
    }
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn parse_rfc3339(value: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339).ok()
}

/// Usernames as the provisioner accepts them (they become workspace ids).
pub(crate) fn valid_username(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

pub(crate) fn user_id(username: &str) -> Result<AggregateId, Status> {
    if !valid_username(username) {
        return Err(Status::invalid_argument(format!(
            "invalid username {username:?}: use 1-32 lowercase letters, digits or '-', starting with a letter"
        )));
    }
    AggregateId::new(username.to_owned())
        .map_err(|_| Status::invalid_argument(format!("invalid username {username:?}")))
}

fn refusal(error: ExecuteError<Refusal>) -> Status {
    match error {
        ExecuteError::Rejected(Refusal::NotFound(name)) => {
            Status::not_found(format!("user {name} not found"))
        }
        ExecuteError::Rejected(Refusal::Exists(m)) => Status::already_exists(m),
        ExecuteError::Rejected(Refusal::Missing(m)) => Status::not_found(m),
        ExecuteError::Contended(..) => {
            Status::aborted("the user is being changed concurrently; retry")
        }
        ExecuteError::Append(k8shell_bus::AppendError::Unavailable { .. })
        | ExecuteError::Load(_) => Status::unavailable("event bus unavailable; retry"),
        other => internal("cannot record a user event")(&other),
    }
}

pub(crate) fn to_proto(user: &User) -> pb::User {
    pb::User {
        username: user.username.clone(),
        email: user.email.clone(),
        display_name: user.display_name.clone(),
        roles: user.roles.clone(),
        origin: user.origin.clone(),
        has_password: user.has_password,
        locked_until: user
            .locked_until
            .as_deref()
            .and_then(parse_rfc3339)
            .filter(|t| *t > time::OffsetDateTime::now_utc())
            .map(timestamp),
        created_at: Some(timestamp(user.created_at)),
        version: user.version,
        waitlisted: user.waitlisted,
        linked_providers: user.links.keys().cloned().collect(),
        organization: user.organization.clone(),
    }
}

impl IdentityApi {
    pub(crate) async fn change<F>(&self, id: &AggregateId, decide: F) -> Result<User, Status>
    where
        F: FnMut(&UserAggregate) -> Result<(Vec<CloudEvent>, ()), Refusal>,
    {
        let executed = execute::<UserAggregate, _, _, _>(&self.store, id, decide)
            .await
            .map_err(refusal)?;
        executed
            .state
            .0
            .ok_or_else(|| Status::internal("user missing after change"))
    }

    pub(crate) async fn load(&self, username: &str) -> Result<Option<User>, Status> {
        let Ok(id) = AggregateId::new(username.to_owned()) else {
            return Ok(None);
        };
        let loaded = self
            .store
            .load(k8shell_events::Context::User, &id)
            .await
            .map_err(|_| Status::unavailable("event bus unavailable; retry"))?;
        let mut state = UserAggregate::default();
        for event in &loaded.events {
            k8shell_bus::Aggregate::apply(&mut state, event);
        }
        Ok(state.0)
    }

    pub(crate) fn user_token(
        &self,
        user: &User,
        amr: &str,
        scopes: &[String],
    ) -> Result<pb::LoginResponse, Status> {
        self.sign_user_token(user, &[amr], scopes, None)
    }

    /// A user token for `user` with their current roles; `auth_time`:
    /// when they logged in (`None`: now).
    fn sign_user_token(
        &self,
        user: &User,
        amr: &[&str],
        scopes: &[String],
        auth_time: Option<u64>,
    ) -> Result<pb::LoginResponse, Status> {
        let (token, claims) = self
            .keys
            .sign(&TokenRequest {
                sub: &user.username,
                aud: USER_AUDIENCE,
                kind: "user",
                roles: &user.roles,
                scopes,
                amr,
                org: &user.organization,
                ttl: self.policy.user_token_ttl,
                auth_time,
            })
            .map_err(|e| internal("cannot sign a token")(&e))?;
        Ok(pb::LoginResponse {
            token,
            expires_at: Some(timestamp_secs(claims.exp)),
            user: Some(to_proto(user)),
        })
    }

    /// The organisation named, checked to exist; empty is `default`.
    pub(crate) async fn existing_org(&self, name: &str) -> Result<String, Status> {
        if name.is_empty() || name == crate::orgs::DEFAULT_ORG {
            return Ok(crate::orgs::DEFAULT_ORG.to_owned());
        }
        let id = crate::orgs::org_id(name).ok_or_else(|| {
            Status::invalid_argument(format!("invalid organisation name {name:?}"))
        })?;
        let loaded = self
            .store
            .load(k8shell_events::Context::User, &id)
            .await
            .map_err(|_| Status::unavailable("event bus unavailable; retry"))?;
        let mut state = crate::orgs::OrgAggregate::default();
        for event in &loaded.events {
            k8shell_bus::Aggregate::apply(&mut state, event);
        }
        match state.0 {
            Some(org) => Ok(org.name),
            None => Err(Status::failed_precondition(format!(
                "organisation {name} does not exist"
            ))),
        }
    }

    /// Locked after failures, or still waiting for approval: no login by
    /// any credential.
    fn barred(user: &User) -> bool {
        user.waitlisted || Self::locked(user)
    }

    fn locked(user: &User) -> bool {
        user.locked_until
            .as_deref()
            .and_then(parse_rfc3339)
            .is_some_and(|until| until > time::OffsetDateTime::now_utc())
    }

    /// Records a failed login of an existing user, locking it at the limit.
    async fn failed_login(&self, user: &User, method: &str, source: &str) {
        let lockout = &self.policy.lockout;
        let failures =
            match credentials::record_failure(&self.pool, &user.username, source, lockout.window)
                .await
            {
                Ok(count) => count,
                Err(error) => {
                    tracing::error!(%error, "cannot record a login failure");
                    return;
                }
            };
        let lock_until = (failures >= lockout.max_failures).then(|| {
            rfc3339(
                time::OffsetDateTime::now_utc()
                    + time::Duration::try_from(lockout.lock_for).unwrap_or(time::Duration::HOUR),
            )
        });
        if lock_until.is_some() {
            tracing::warn!(user = %user.username, failures, "account locked after repeated failures");
        }
        let Ok(id) = AggregateId::new(user.username.clone()) else {
            return;
        };
        let failed = UserLoginFailed {
            method: method.to_owned(),
            source: source.to_owned(),
            failures,
        };
        if let Err(error) = self
            .change(&id, |state| {
                users::decide_failure(state, &id, failed.clone(), lock_until.clone())
            })
            .await
        {
            tracing::warn!(%error, "cannot record a login failure event");
        }
    }

    /// Verifies a user token.
    fn verify_user(&self, token: &str) -> Result<Claims, Status> {
        let claims = self.keys.verify(token, USER_AUDIENCE).map_err(|e| {
            tracing::info!(error = %e, "token refused");
            Status::unauthenticated("invalid or expired token")
        })?;
        if claims.kind != "user" {
            return Err(Status::unauthenticated("not a user token"));
        }
        Ok(claims)
    }
}

#[tonic::async_trait]
impl pb::identity_service_server::IdentityService for IdentityApi {
    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let req = request.into_inner();
        let id = user_id(&req.username)?;
        let organization = self.existing_org(&req.organization).await?;
        let with_password = !req.password.is_empty();
        if with_password {
            let hash = credentials::hash_password(&req.password)
                .map_err(|e| internal("cannot hash the password")(&e))?;
            // The hash first: a user with a password event always has a hash.
            sqlx::query(
                "INSERT INTO password_hashes (username, hash) VALUES ($1, $2)
                 ON CONFLICT (username) DO NOTHING",
            )
            .bind(&req.username)
            .bind(hash)
            .execute(&self.pool)
            .await
            .map_err(|e| internal("cannot store the password")(&e))?;
        }
        let created = UserCreated {
            username: req.username.clone(),
            email: req.email,
            display_name: req.display_name,
            roles: req.roles,
            origin: "local".to_owned(),
            organization,
        };
        let user = self
            .change(&id, |state| {
                users::decide_create(state, &id, created.clone(), with_password)
            })
            .await?;
        tracing::info!(user = %user.username, "user created");
        Ok(Response::new(to_proto(&user)))
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let req = request.into_inner();
        user_id(&req.username)?;
        match self.load(&req.username).await? {
            Some(user) => Ok(Response::new(to_proto(&user))),
            None => Err(Status::not_found(format!(
                "user {} not found",
                req.username
            ))),
        }
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let role = request.into_inner().role;
        let rows = sqlx::query(
            "SELECT username, email, display_name, roles, origin, has_password, locked_until, created_at, version,
                    waitlisted, organization,
                    ARRAY(SELECT provider FROM identity_links l WHERE l.username = users.username ORDER BY provider) AS linked
             FROM users WHERE ($1 = '' OR $1 = ANY(roles)) ORDER BY username",
        )
        .bind(&role)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| internal("cannot list users")(&e))?;
        let users = rows
            .iter()
            .map(|row| pb::User {
                username: row.get("username"),
                email: row.get("email"),
                display_name: row.get("display_name"),
                roles: row.get("roles"),
                origin: row.get("origin"),
                has_password: row.get("has_password"),
                locked_until: row
                    .get::<Option<time::OffsetDateTime>, _>("locked_until")
                    .filter(|t| *t > time::OffsetDateTime::now_utc())
                    .map(timestamp),
                created_at: Some(timestamp(row.get("created_at"))),
                version: row.get::<i64, _>("version") as u64,
                waitlisted: row.get("waitlisted"),
                linked_providers: row.get("linked"),
                organization: row.get("organization"),
            })
            .collect();
        Ok(Response::new(pb::ListUsersResponse { users }))
    }

    async fn set_roles(
        &self,
        request: Request<pb::SetRolesRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let req = request.into_inner();
        let id = user_id(&req.username)?;
        let user = self
            .change(&id, |state| {
                users::decide_roles(state, &id, req.roles.clone())
            })
            .await?;
        Ok(Response::new(to_proto(&user)))
    }

    async fn set_password(
        &self,
        request: Request<pb::SetPasswordRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let req = request.into_inner();
        let id = user_id(&req.username)?;
        if req.password.chars().count() < 8 {
            return Err(Status::invalid_argument(
                "the password must have at least 8 characters",
            ));
        }
        if self.load(&req.username).await?.is_none() {
            return Err(Status::not_found(format!(
                "user {} not found",
                req.username
            )));
        }
        let hash = credentials::hash_password(&req.password)
            .map_err(|e| internal("cannot hash the password")(&e))?;
        sqlx::query(
            "INSERT INTO password_hashes (username, hash) VALUES ($1, $2)
             ON CONFLICT (username) DO UPDATE SET hash = EXCLUDED.hash, updated_at = now()",
        )
        .bind(&req.username)
        .bind(hash)
        .execute(&self.pool)
        .await
        .map_err(|e| internal("cannot store the password")(&e))?;
        credentials::clear_failures(&self.pool, &req.username)
            .await
            .map_err(|e| internal("cannot clear failures")(&e))?;
        let user = self
            .change(&id, |state| users::decide_password(state, &id))
            .await?;
        Ok(Response::new(to_proto(&user)))
    }

    async fn password_login(
        &self,
        request: Request<pb::PasswordLoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let req = request.into_inner();
        let user = if valid_username(&req.username) {
            self.load(&req.username).await?
        } else {
            None
        };
        let stored: Option<String> = match &user {
            Some(user) => {
                sqlx::query_scalar("SELECT hash FROM password_hashes WHERE username = $1")
                    .bind(&user.username)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| internal("cannot read credentials")(&e))?
            }
            None => None,
        };
        // Always one argon2 verification, so timing does not tell whether
        // the user exists; every refusal is the same message.
        let password = req.password.clone();
        let stored_for_check = stored.clone();
        let matches = tokio::task::spawn_blocking(move || {
            credentials::verify_password(&password, stored_for_check.as_deref())
        })
        .await
        .unwrap_or(false);
        let Some(user) = user else {
            tracing::info!(source = %req.source, "password login for an unknown user");
            return Err(Status::unauthenticated(BAD_LOGIN));
        };
        if Self::barred(&user) {
            tracing::info!(user = %user.username, source = %req.source, "login refused: account locked");
            return Err(Status::unauthenticated(BAD_LOGIN));
        }
        if !matches {
            self.failed_login(&user, "password", &req.source).await;
            return Err(Status::unauthenticated(BAD_LOGIN));
        }
        credentials::clear_failures(&self.pool, &user.username)
            .await
            .map_err(|e| internal("cannot clear failures")(&e))?;
        Ok(Response::new(self.user_token(&user, "pwd", &[])?))
    }

    async fn public_key_login(
        &self,
        request: Request<pb::PublicKeyLoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let req = request.into_inner();
        let user = if valid_username(&req.username) {
            self.load(&req.username).await?
        } else {
            None
        };
        let Some(user) = user else {
            return Err(Status::unauthenticated(BAD_LOGIN));
        };
        if Self::barred(&user) {
            return Err(Status::unauthenticated(BAD_LOGIN));
        }
        let line = req.public_key.trim();
        let accepted = if line.contains("-cert-v01@openssh.com") {
            self.ca.check(&user.username, line).is_ok()
        } else {
            credentials::parse_ssh_key(line)
                .is_ok_and(|key| user.keys.contains_key(&key.fingerprint))
        };
        if !accepted {
            self.failed_login(&user, "public_key", &req.source).await;
            return Err(Status::unauthenticated(BAD_LOGIN));
        }
        Ok(Response::new(self.user_token(&user, "publickey", &[])?))
    }

    async fn renew_login(
        &self,
        request: Request<pb::RenewLoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let req = request.into_inner();
        let claims = self.verify_user(&req.token)?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
        // Strictly unexpired: the verification's clock-skew leeway does not
        // stretch a session.
        if claims.exp <= now {
            return Err(Status::unauthenticated("invalid or expired token"));
        }
        if claims.amr.iter().any(|m| m == "pat") || !claims.scopes.is_empty() {
            return Err(Status::failed_precondition(
                "tokens from personal access tokens are not renewed: exchange the PAT again",
            ));
        }
        let authenticated = if claims.auth_time == 0 {
            claims.iat
        } else {
            claims.auth_time
        };
        let max_age = self.policy.login_max_age.as_secs();
        if now.saturating_sub(authenticated) >= max_age {
            tracing::info!(user = %claims.sub, source = %req.source, "renewal refused: login too old");
            return Err(Status::unauthenticated(format!(
                "the login is older than {}: log in again",
                humantime::format_duration(self.policy.login_max_age)
            )));
        }
        let user = self
            .load(&claims.sub)
            .await?
            .filter(|user| !Self::barred(user))
            .ok_or_else(|| {
                tracing::info!(user = %claims.sub, source = %req.source, "renewal refused: account gone or locked");
                Status::unauthenticated(BAD_LOGIN)
            })?;
        let amr: Vec<&str> = claims.amr.iter().map(String::as_str).collect();
        Ok(Response::new(self.sign_user_token(
            &user,
            &amr,
            &[],
            Some(authenticated),
        )?))
    }

    async fn add_ssh_key(
        &self,
        request: Request<pb::AddSshKeyRequest>,
    ) -> Result<Response<pb::SshKey>, Status> {
        let req = request.into_inner();
        let id = user_id(&req.username)?;
        let key = credentials::parse_ssh_key(&req.public_key).map_err(Status::invalid_argument)?;
        let added = UserSshKeyAdded {
            fingerprint: key.fingerprint.clone(),
            algorithm: key.algorithm.clone(),
            public_key: key.public_key.clone(),
            comment: key.comment.clone(),
        };
        let user = self
            .change(&id, |state| {
                users::decide_add_key(state, &id, added.clone())
            })
            .await?;
        Ok(Response::new(pb::SshKey {
            username: user.username,
            fingerprint: key.fingerprint,
            algorithm: key.algorithm,
            comment: key.comment,
            public_key: key.public_key,
            added_at: Some(timestamp(time::OffsetDateTime::now_utc())),
        }))
    }

    async fn list_ssh_keys(
        &self,
        request: Request<pb::ListSshKeysRequest>,
    ) -> Result<Response<pb::ListSshKeysResponse>, Status> {
        let username = request.into_inner().username;
        user_id(&username)?;
        let rows = sqlx::query(
            "SELECT fingerprint, algorithm, comment, public_key, added_at FROM ssh_keys
             WHERE username = $1 ORDER BY added_at",
        )
        .bind(&username)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| internal("cannot list keys")(&e))?;
        Ok(Response::new(pb::ListSshKeysResponse {
            keys: rows
                .iter()
                .map(|row| pb::SshKey {
                    username: username.clone(),
                    fingerprint: row.get("fingerprint"),
                    algorithm: row.get("algorithm"),
                    comment: row.get("comment"),
                    public_key: row.get("public_key"),
                    added_at: Some(timestamp(row.get("added_at"))),
                })
                .collect(),
        }))
    }

    async fn remove_ssh_key(
        &self,
        request: Request<pb::RemoveSshKeyRequest>,
    ) -> Result<Response<pb::RemoveSshKeyResponse>, Status> {
        let req = request.into_inner();
        let id = user_id(&req.username)?;
        self.change(&id, |state| {
            users::decide_remove_key(state, &id, &req.fingerprint)
        })
        .await?;
        Ok(Response::new(pb::RemoveSshKeyResponse {}))
    }

    async fn issue_ssh_certificate(
        &self,
        request: Request<pb::IssueSshCertificateRequest>,
    ) -> Result<Response<pb::IssueSshCertificateResponse>, Status> {
        let req = request.into_inner();
        let claims = self.verify_user(&req.token)?;
        let id = user_id(&claims.sub)?;
        let ttl = match req.valid_seconds {
            0 => self.policy.ssh_certificate_ttl,
            n => Duration::from_secs(u64::from(n)).min(self.policy.ssh_certificate_max_ttl),
        };
        let issued = self
            .ca
            .issue(&claims.sub, &req.public_key, ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let record = UserSshCertificateIssued {
            serial: issued.serial,
            fingerprint: issued.fingerprint.clone(),
            valid_before: rfc3339(
                time::OffsetDateTime::from_unix_timestamp(issued.valid_before as i64)
                    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
            ),
        };
        self.change(&id, |state| {
            users::decide_certificate(state, &id, record.clone())
        })
        .await?;
        Ok(Response::new(pb::IssueSshCertificateResponse {
            certificate: issued.certificate,
            valid_before: Some(timestamp_secs(issued.valid_before)),
        }))
    }

    async fn get_ssh_user_ca(
        &self,
        _request: Request<pb::GetSshUserCaRequest>,
    ) -> Result<Response<pb::GetSshUserCaResponse>, Status> {
        Ok(Response::new(pb::GetSshUserCaResponse {
            public_key: self.ca.public_key(),
        }))
    }

    async fn create_pat(
        &self,
        request: Request<pb::CreatePatRequest>,
    ) -> Result<Response<pb::CreatePatResponse>, Status> {
        let req = request.into_inner();
        let id = user_id(&req.username)?;
        if req.name.trim().is_empty() || req.name.len() > 100 {
            return Err(Status::invalid_argument(
                "give the token a name (1-100 characters)",
            ));
        }
        for scope in &req.scopes {
            let valid = !scope.is_empty()
                && scope.len() <= 100
                && scope
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b":*-_.".contains(&b));
            if !valid {
                return Err(Status::invalid_argument(format!(
                    "invalid scope {scope:?}: an action or pattern like workspace:* or ssh:shell"
                )));
            }
        }
        let days = match req.valid_days {
            0 => self.policy.pat_default_days,
            n => n.min(self.policy.pat_max_days),
        };
        if self.load(&req.username).await?.is_none() {
            return Err(Status::not_found(format!(
                "user {} not found",
                req.username
            )));
        }
        let (token_id, secret) = credentials::new_pat();
        sqlx::query("INSERT INTO pat_secrets (id, username, hash) VALUES ($1, $2, $3)")
            .bind(&token_id)
            .bind(&req.username)
            .bind(credentials::pat_hash(&secret))
            .execute(&self.pool)
            .await
            .map_err(|e| internal("cannot store the token")(&e))?;
        let expires_at = time::OffsetDateTime::now_utc() + time::Duration::days(i64::from(days));
        let created = UserPatCreated {
            token_id: token_id.clone(),
            name: req.name.clone(),
            scopes: req.scopes.clone(),
            expires_at: rfc3339(expires_at),
        };
        self.change(&id, |state| users::decide_pat(state, &id, created.clone()))
            .await?;
        Ok(Response::new(pb::CreatePatResponse {
            pat: Some(pb::Pat {
                id: token_id,
                username: req.username,
                name: req.name,
                scopes: req.scopes,
                created_at: Some(timestamp(time::OffsetDateTime::now_utc())),
                expires_at: Some(timestamp(expires_at)),
                last_used_at: None,
                revoked: false,
            }),
            secret,
        }))
    }

    async fn list_pats(
        &self,
        request: Request<pb::ListPatsRequest>,
    ) -> Result<Response<pb::ListPatsResponse>, Status> {
        let username = request.into_inner().username;
        user_id(&username)?;
        let rows = sqlx::query(
            "SELECT p.id, p.name, p.scopes, p.created_at, p.expires_at, p.revoked, s.last_used_at
             FROM pats p LEFT JOIN pat_secrets s ON s.id = p.id
             WHERE p.username = $1 ORDER BY p.created_at",
        )
        .bind(&username)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| internal("cannot list tokens")(&e))?;
        Ok(Response::new(pb::ListPatsResponse {
            pats: rows
                .iter()
                .map(|row| pb::Pat {
                    id: row.get("id"),
                    username: username.clone(),
                    name: row.get("name"),
                    scopes: row.get("scopes"),
                    created_at: Some(timestamp(row.get("created_at"))),
                    expires_at: Some(timestamp(row.get("expires_at"))),
                    last_used_at: row
                        .get::<Option<time::OffsetDateTime>, _>("last_used_at")
                        .map(timestamp),
                    revoked: row.get("revoked"),
                })
                .collect(),
        }))
    }

    async fn revoke_pat(
        &self,
        request: Request<pb::RevokePatRequest>,
    ) -> Result<Response<pb::Pat>, Status> {
        let req = request.into_inner();
        let id = user_id(&req.username)?;
        let user = self
            .change(&id, |state| users::decide_revoke_pat(state, &id, &req.id))
            .await?;
        let pat = user.pats.get(&req.id).cloned();
        // The secret goes too: nothing can ever match it again.
        sqlx::query("DELETE FROM pat_secrets WHERE id = $1")
            .bind(&req.id)
            .execute(&self.pool)
            .await
            .map_err(|e| internal("cannot revoke the token")(&e))?;
        Ok(Response::new(pb::Pat {
            id: req.id,
            username: req.username,
            name: pat.as_ref().map(|p| p.name.clone()).unwrap_or_default(),
            scopes: pat.as_ref().map(|p| p.scopes.clone()).unwrap_or_default(),
            created_at: None,
            expires_at: pat
                .as_ref()
                .and_then(|p| parse_rfc3339(&p.expires_at))
                .map(timestamp),
            last_used_at: None,
            revoked: true,
        }))
    }

    async fn exchange_pat(
        &self,
        request: Request<pb::ExchangePatRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let req = request.into_inner();
        let refused = || Status::unauthenticated("invalid, expired or revoked token");
        let token_id = credentials::pat_id(&req.secret).ok_or_else(refused)?;
        let row = sqlx::query("SELECT username, hash FROM pat_secrets WHERE id = $1")
            .bind(token_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| internal("cannot read tokens")(&e))?
            .ok_or_else(refused)?;
        let hash: Vec<u8> = row.get("hash");
        if !credentials::same_hash(&hash, &credentials::pat_hash(&req.secret)) {
            return Err(refused());
        }
        let username: String = row.get("username");
        let user = self.load(&username).await?.ok_or_else(refused)?;
        // The event-sourced state decides revocation and expiry.
        let pat = user.pats.get(token_id).ok_or_else(refused)?;
        let expired =
            parse_rfc3339(&pat.expires_at).is_none_or(|t| t <= time::OffsetDateTime::now_utc());
        if pat.revoked || expired || Self::barred(&user) {
            return Err(refused());
        }
        sqlx::query("UPDATE pat_secrets SET last_used_at = now() WHERE id = $1")
            .bind(token_id)
            .execute(&self.pool)
            .await
            .map_err(|e| internal("cannot update the token")(&e))?;
        let scopes = pat.scopes.clone();
        Ok(Response::new(self.user_token(&user, "pat", &scopes)?))
    }

    async fn issue_workspace_token(
        &self,
        request: Request<pb::IssueWorkspaceTokenRequest>,
    ) -> Result<Response<pb::IssueWorkspaceTokenResponse>, Status> {
        let req = request.into_inner();
        let claims = self.verify_user(&req.token)?;
        if AggregateId::new(req.workspace_id.clone()).is_err() || req.workspace_id.is_empty() {
            return Err(Status::invalid_argument(format!(
                "invalid workspace id {:?}",
                req.workspace_id
            )));
        }
        // Whether this user may reach this workspace is authz's call, made
        // by the caller before asking; the token carries the user's scopes.
        let (token, issued) = self
            .keys
            .sign(&TokenRequest {
                sub: &claims.sub,
                aud: &req.workspace_id,
                kind: "workspace",
                roles: &claims.roles,
                scopes: &claims.scopes,
                amr: &claims.amr.iter().map(String::as_str).collect::<Vec<_>>(),
                org: &claims.org,
                ttl: self.policy.workspace_token_ttl,
                auth_time: Some(claims.auth_time),
            })
            .map_err(|e| internal("cannot sign a token")(&e))?;
        Ok(Response::new(pb::IssueWorkspaceTokenResponse {
            token,
            expires_at: Some(timestamp_secs(issued.exp)),
        }))
    }

    async fn list_oidc_providers(
        &self,
        _request: Request<pb::ListOidcProvidersRequest>,
    ) -> Result<Response<pb::ListOidcProvidersResponse>, Status> {
        Ok(Response::new(self.list_oidc_providers()))
    }

    async fn begin_oidc_login(
        &self,
        request: Request<pb::BeginOidcLoginRequest>,
    ) -> Result<Response<pb::BeginOidcLoginResponse>, Status> {
        Ok(Response::new(
            self.begin_oidc_login(request.into_inner()).await?,
        ))
    }

    async fn complete_oidc_login(
        &self,
        request: Request<pb::CompleteOidcLoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        Ok(Response::new(
            self.complete_oidc_login(request.into_inner()).await?,
        ))
    }

    type OidcDeviceLoginStream = crate::oidc_login::DeviceLoginStream;

    async fn oidc_device_login(
        &self,
        request: Request<pb::OidcDeviceLoginRequest>,
    ) -> Result<Response<Self::OidcDeviceLoginStream>, Status> {
        Ok(Response::new(
            Arc::new(self.clone())
                .oidc_device_login(request.into_inner())
                .await?,
        ))
    }

    async fn approve_user(
        &self,
        request: Request<pb::ApproveUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        Ok(Response::new(
            self.approve_user(request.into_inner()).await?,
        ))
    }

    async fn get_jwks(
        &self,
        _request: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        Ok(Response::new(pb::GetJwksResponse {
            jwks: self.keys.jwks(),
        }))
    }

    async fn issue_service_token(
        &self,
        request: Request<pb::IssueServiceTokenRequest>,
    ) -> Result<Response<pb::IssueWorkspaceTokenResponse>, Status> {
        let req = request.into_inner();
        if req.service.is_empty()
            || !req
                .service
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(Status::invalid_argument(format!(
                "invalid service name {:?}",
                req.service
            )));
        }
        if req.workspace_id.is_empty() || AggregateId::new(req.workspace_id.clone()).is_err() {
            return Err(Status::invalid_argument(format!(
                "invalid workspace id {:?}",
                req.workspace_id
            )));
        }
        let subject = format!("system:{}", req.service);
        let (token, issued) = self
            .keys
            .sign(&TokenRequest {
                sub: &subject,
                aud: &req.workspace_id,
                kind: "workspace",
                roles: &[],
                scopes: &[],
                amr: &["service"],
                org: "",
                ttl: self.policy.workspace_token_ttl,
                auth_time: None,
            })
            .map_err(|e| internal("cannot sign a token")(&e))?;
        Ok(Response::new(pb::IssueWorkspaceTokenResponse {
            token,
            expires_at: Some(timestamp_secs(issued.exp)),
        }))
    }

    async fn create_org(
        &self,
        request: Request<pb::CreateOrgRequest>,
    ) -> Result<Response<pb::Org>, Status> {
        let req = request.into_inner();
        if req.name == crate::orgs::DEFAULT_ORG {
            return Err(Status::already_exists("organisation default always exists"));
        }
        let id = crate::orgs::org_id(&req.name).ok_or_else(|| {
            Status::invalid_argument(format!(
                "invalid organisation name {:?}: lowercase letters, digits and '-', starting with a letter, at most 32",
                req.name
            ))
        })?;
        let created = k8shell_events::user::OrgCreated {
            name: req.name.clone(),
            description: req.description,
        };
        let executed = execute::<crate::orgs::OrgAggregate, _, _, _>(&self.store, &id, |state| {
            crate::orgs::decide_create(state, &id, created.clone())
        })
        .await
        .map_err(refusal)?;
        let org = executed
            .state
            .0
            .ok_or_else(|| Status::internal("organisation missing after creation"))?;
        tracing::info!(org = %org.name, "organisation created");
        Ok(Response::new(pb::Org {
            name: org.name,
            description: org.description,
            created_at: Some(timestamp(org.created_at)),
        }))
    }

    async fn list_orgs(
        &self,
        _request: Request<pb::ListOrgsRequest>,
    ) -> Result<Response<pb::ListOrgsResponse>, Status> {
        let rows: Vec<(String, String, time::OffsetDateTime)> =
            sqlx::query_as("SELECT name, description, created_at FROM orgs ORDER BY name")
                .fetch_all(&self.pool)
                .await
                .map_err(|e| internal("cannot list organisations")(&e))?;
        let mut orgs = vec![pb::Org {
            name: crate::orgs::DEFAULT_ORG.to_owned(),
            description: "every user not placed elsewhere".to_owned(),
            created_at: None,
        }];
        orgs.extend(rows.into_iter().map(|(name, description, at)| pb::Org {
            name,
            description,
            created_at: Some(timestamp(at)),
        }));
        Ok(Response::new(pb::ListOrgsResponse { orgs }))
    }

    async fn set_user_organization(
        &self,
        request: Request<pb::SetUserOrganizationRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let req = request.into_inner();
        let id = user_id(&req.username)?;
        let organization = self.existing_org(&req.organization).await?;
        let user = self
            .change(&id, |state| {
                users::decide_organization(state, &id, &organization)
            })
            .await?;
        Ok(Response::new(to_proto(&user)))
    }
}
