//! The `authz-decisions` projection: the decision log as a table, queryable
//! by subject, action, outcome and time.

use futures::future::BoxFuture;
use k8shell_bus::{ApplyError, Projection, StoredEvent};
use k8shell_events::{Context, DomainEvent};
use sqlx::PgConnection;

/// Keeps `decisions`.
pub struct DecisionProjection;

fn time(value: &str) -> Result<time::OffsetDateTime, ApplyError> {
    time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .map_err(|e| ApplyError::Rejected(format!("bad time {value:?}: {e}")))
}

impl Projection for DecisionProjection {
    fn name(&self) -> &'static str {
        "authz-decisions"
    }

    fn context(&self) -> Context {
        Context::Authz
    }

    fn apply<'a>(
        &'a self,
        db: &'a mut PgConnection,
        stored: &'a StoredEvent,
        event: &'a DomainEvent,
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        Box::pin(async move {
            let DomainEvent::AuthzDecided(e) = event else {
                return Ok(());
            };
            let obligations = serde_json::to_value(&e.obligations)
                .map_err(|err| ApplyError::Rejected(err.to_string()))?;
            sqlx::query(
                "INSERT INTO decisions (sequence, subject, roles, action, resource_type, resource_id,
                     allow, reasons, obligations, count, first_at, last_at, engine)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                 ON CONFLICT (sequence) DO NOTHING",
            )
            .bind(stored.sequence as i64)
            .bind(&e.subject)
            .bind(&e.roles)
            .bind(&e.action)
            .bind(&e.resource_type)
            .bind(&e.resource_id)
            .bind(e.allow)
            .bind(&e.reasons)
            .bind(obligations)
            .bind(e.count as i64)
            .bind(time(&e.first_at)?)
            .bind(time(&e.last_at)?)
            .bind(&e.engine)
            .execute(db)
            .await?;
            Ok(())
        })
    }

    fn reset<'a>(&'a self, db: &'a mut PgConnection) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            sqlx::query("TRUNCATE decisions").execute(db).await?;
            Ok(())
        })
    }
}
