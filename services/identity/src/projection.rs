//! The `identity-users` projection: users, their SSH keys and their
//! tokens' metadata, from the user stream.

use futures::future::BoxFuture;
use k8shell_bus::{ApplyError, Projection, StoredEvent};
use k8shell_events::user::UserEvent;
use k8shell_events::{Context, DomainEvent};
use sqlx::PgConnection;

/// Keeps `users`, `ssh_keys` and `pats`.
pub struct UserProjection;

/// Projection name.
pub const NAME: &str = "identity-users";

fn rfc3339(value: &str) -> Result<time::OffsetDateTime, ApplyError> {
    time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .map_err(|e| ApplyError::Rejected(format!("bad time {value:?}: {e}")))
}

impl Projection for UserProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn context(&self) -> Context {
        Context::User
    }

    fn apply<'a>(
        &'a self,
        db: &'a mut PgConnection,
        stored: &'a StoredEvent,
        event: &'a DomainEvent,
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        Box::pin(async move {
            let DomainEvent::User(event) = event else {
                return Ok(());
            };
            let username = stored.envelope.subject.as_str();
            let at = stored.envelope.time;
            let version = stored.sequence as i64;
            match event {
                UserEvent::Created(e) => {
                    sqlx::query(
                        "INSERT INTO users (username, email, display_name, roles, origin, created_at, version, organization)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (username) DO NOTHING",
                    )
                    .bind(username)
                    .bind(&e.email)
                    .bind(&e.display_name)
                    .bind(&e.roles)
                    .bind(&e.origin)
                    .bind(at)
                    .bind(version)
                    .bind(if e.organization.is_empty() {
                        crate::orgs::DEFAULT_ORG
                    } else {
                        e.organization.as_str()
                    })
                    .execute(&mut *db)
                    .await?;
                }
                UserEvent::RolesSet(e) => {
                    sqlx::query("UPDATE users SET roles = $2 WHERE username = $1")
                        .bind(username)
                        .bind(&e.roles)
                        .execute(&mut *db)
                        .await?;
                }
                UserEvent::PasswordSet(_) => {
                    sqlx::query(
                        "UPDATE users SET has_password = true, locked_until = NULL WHERE username = $1",
                    )
                    .bind(username)
                    .execute(&mut *db)
                    .await?;
                }
                UserEvent::Locked(e) => {
                    sqlx::query("UPDATE users SET locked_until = $2 WHERE username = $1")
                        .bind(username)
                        .bind(rfc3339(&e.until)?)
                        .execute(&mut *db)
                        .await?;
                }
                UserEvent::SshKeyAdded(e) => {
                    sqlx::query(
                        "INSERT INTO ssh_keys (username, fingerprint, algorithm, comment, public_key, added_at)
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                    )
                    .bind(username)
                    .bind(&e.fingerprint)
                    .bind(&e.algorithm)
                    .bind(&e.comment)
                    .bind(&e.public_key)
                    .bind(at)
                    .execute(&mut *db)
                    .await?;
                }
                UserEvent::SshKeyRemoved(e) => {
                    sqlx::query("DELETE FROM ssh_keys WHERE username = $1 AND fingerprint = $2")
                        .bind(username)
                        .bind(&e.fingerprint)
                        .execute(&mut *db)
                        .await?;
                }
                UserEvent::PatCreated(e) => {
                    sqlx::query(
                        "INSERT INTO pats (id, username, name, scopes, created_at, expires_at)
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                    )
                    .bind(&e.token_id)
                    .bind(username)
                    .bind(&e.name)
                    .bind(&e.scopes)
                    .bind(at)
                    .bind(rfc3339(&e.expires_at)?)
                    .execute(&mut *db)
                    .await?;
                }
                UserEvent::PatRevoked(e) => {
                    sqlx::query("UPDATE pats SET revoked = true WHERE id = $1")
                        .bind(&e.token_id)
                        .execute(&mut *db)
                        .await?;
                }
                UserEvent::IdentityLinked(e) => {
                    sqlx::query(
                        "INSERT INTO identity_links (provider, subject, username, linked_at)
                         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    )
                    .bind(&e.provider)
                    .bind(&e.subject)
                    .bind(username)
                    .bind(at)
                    .execute(&mut *db)
                    .await?;
                }
                UserEvent::Waitlisted(_) | UserEvent::Approved(_) => {
                    sqlx::query("UPDATE users SET waitlisted = $2 WHERE username = $1")
                        .bind(username)
                        .bind(matches!(event, UserEvent::Waitlisted(_)))
                        .execute(&mut *db)
                        .await?;
                }
                UserEvent::OrganizationSet(e) => {
                    sqlx::query("UPDATE users SET organization = $2 WHERE username = $1")
                        .bind(username)
                        .bind(&e.organization)
                        .execute(&mut *db)
                        .await?;
                }
                UserEvent::OrgCreated(e) => {
                    sqlx::query(
                        "INSERT INTO orgs (name, description, created_at) VALUES ($1, $2, $3)
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(&e.name)
                    .bind(&e.description)
                    .bind(at)
                    .execute(&mut *db)
                    .await?;
                    return Ok(());
                }
                UserEvent::LoginFailed(_) | UserEvent::SshCertificateIssued(_) => {}
            }
            sqlx::query("UPDATE users SET version = $2 WHERE username = $1")
                .bind(username)
                .bind(version)
                .execute(&mut *db)
                .await?;
            Ok(())
        })
    }

    fn reset<'a>(&'a self, db: &'a mut PgConnection) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            sqlx::query("TRUNCATE users, ssh_keys, pats, identity_links, orgs")
                .execute(db)
                .await?;
            Ok(())
        })
    }
}
