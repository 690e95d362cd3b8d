//! The `provisioner-workspaces` projection: one row per workspace.
//!
//! Events are applied set-based: a batch is cut into segments in which each
//! workspace appears at most once, and each segment costs two statements
//! (inserts of new workspaces, updates of lifecycle states) whatever its
//! size. Events on distinct rows commute, so this equals applying them one
//! by one, in order.

use std::collections::HashSet;

use futures::future::BoxFuture;
use k8shell_bus::{ApplyError, Projection, Rejection, StoredEvent};
use k8shell_events::workspace::WorkspaceEvent;
use k8shell_events::{Context, DomainEvent};
use sqlx::PgConnection;
use time::OffsetDateTime;

use crate::workspace::Change;

/// Keeps `workspaces` from the workspace stream.
pub struct WorkspaceProjection;

/// Name of the projection (consumer `projection-provisioner-workspaces`).
pub const NAME: &str = "provisioner-workspaces";

#[derive(Default)]
struct Inserts {
    ids: Vec<String>,
    usernames: Vec<String>,
    blueprints: Vec<String>,
    sequences: Vec<i64>,
    times: Vec<OffsetDateTime>,
}

#[derive(Default)]
struct Updates {
    ids: Vec<String>,
    /// `None` keeps the stored value (SQL NULL, then COALESCE).
    states: Vec<Option<String>>,
    reasons: Vec<Option<String>>,
    endpoints: Vec<Option<String>>,
    splashes: Vec<Option<String>>,
    stages: Vec<Option<String>>,
    progress: Vec<Option<i16>>,
    sequences: Vec<i64>,
    times: Vec<OffsetDateTime>,
}

#[derive(Default)]
struct Segment {
    inserts: Inserts,
    updates: Updates,
    members: HashSet<String>,
}

impl Segment {
    fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Adds one event; returns the reason when it is rejected.
    fn add(&mut self, stored: &StoredEvent, event: &WorkspaceEvent) -> Option<String> {
        let id = stored.envelope.subject.clone();
        let sequence = stored.sequence as i64;
        let time = stored.envelope.time;
        match event {
            WorkspaceEvent::Requested(requested) => {
                if requested.workspace_id != id {
                    return Some(format!(
                        "workspace_id {} does not match subject {id}",
                        requested.workspace_id
                    ));
                }
                self.inserts.ids.push(id.clone());
                self.inserts.usernames.push(requested.username.clone());
                self.inserts.blueprints.push(requested.blueprint.clone());
                self.inserts.sequences.push(sequence);
                self.inserts.times.push(time);
            }
            other => {
                let change = Change::of(other);
                self.updates.ids.push(id.clone());
                self.updates
                    .states
                    .push(change.state.map(|s| s.as_str().to_owned()));
                self.updates.reasons.push(change.reason);
                self.updates.endpoints.push(change.endpoint);
                self.updates.splashes.push(change.splash);
                self.updates.stages.push(change.stage);
                self.updates.progress.push(change.progress.map(i16::from));
                self.updates.sequences.push(sequence);
                self.updates.times.push(time);
            }
        }
        self.members.insert(id);
        None
    }

    async fn flush(self, db: &mut PgConnection) -> Result<(), sqlx::Error> {
        if !self.inserts.ids.is_empty() {
            // A request for a live workspace changes nothing; one after its
            // deletion starts the row afresh.
            sqlx::query(
                "INSERT INTO workspaces
                   (id, username, blueprint, state, reason, created_seq, version, created_at, updated_at)
                 SELECT id, username, blueprint, 'requested', '', seq, seq, t, t
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::timestamptz[])
                      AS u(id, username, blueprint, seq, t)
                 ON CONFLICT (id) DO UPDATE SET
                   username = EXCLUDED.username, blueprint = EXCLUDED.blueprint,
                   state = EXCLUDED.state, reason = '', endpoint = '', splash = '', stage = '', progress = 0,
                   created_seq = EXCLUDED.created_seq,
                   version = EXCLUDED.version, created_at = EXCLUDED.created_at,
                   updated_at = EXCLUDED.updated_at
                 WHERE workspaces.state = 'deleted'",
            )
            .bind(&self.inserts.ids)
            .bind(&self.inserts.usernames)
            .bind(&self.inserts.blueprints)
            .bind(&self.inserts.sequences)
            .bind(&self.inserts.times)
            .execute(&mut *db)
            .await?;
        }
        if !self.updates.ids.is_empty() {
            sqlx::query(
                "UPDATE workspaces w
                 SET state = COALESCE(u.state, w.state), reason = COALESCE(u.reason, w.reason),
                     endpoint = COALESCE(u.endpoint, w.endpoint), stage = COALESCE(u.stage, w.stage),
                     progress = COALESCE(u.progress, w.progress),
                     splash = COALESCE(u.splash, w.splash),
                     version = u.seq, updated_at = u.t
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $6::smallint[], $7::bigint[], $8::timestamptz[], $9::text[])
                      AS u(id, state, reason, endpoint, stage, progress, seq, t, splash)
                 WHERE w.id = u.id",
            )
            .bind(&self.updates.ids)
            .bind(&self.updates.states)
            .bind(&self.updates.reasons)
            .bind(&self.updates.endpoints)
            .bind(&self.updates.stages)
            .bind(&self.updates.progress)
            .bind(&self.updates.sequences)
            .bind(&self.updates.times)
            .bind(&self.updates.splashes)
            .execute(&mut *db)
            .await?;
        }
        Ok(())
    }
}

impl Projection for WorkspaceProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn context(&self) -> Context {
        Context::Workspace
    }

    fn apply<'a>(
        &'a self,
        db: &'a mut PgConnection,
        stored: &'a StoredEvent,
        event: &'a DomainEvent,
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        Box::pin(async move {
            let DomainEvent::Workspace(event) = event else {
                return Ok(());
            };
            let mut segment = Segment::default();
            if let Some(reason) = segment.add(stored, event) {
                return Err(ApplyError::Rejected(reason));
            }
            segment.flush(db).await?;
            Ok(())
        })
    }

    fn apply_batch<'a>(
        &'a self,
        db: &'a mut PgConnection,
        events: &'a [(StoredEvent, DomainEvent)],
    ) -> BoxFuture<'a, Result<Vec<Rejection>, sqlx::Error>> {
        Box::pin(async move {
            let mut rejected = Vec::new();
            let mut segment = Segment::default();
            for (stored, event) in events {
                let DomainEvent::Workspace(event) = event else {
                    continue;
                };
                if segment.members.contains(&stored.envelope.subject) {
                    std::mem::take(&mut segment).flush(&mut *db).await?;
                }
                if let Some(reason) = segment.add(stored, event) {
                    rejected.push(Rejection {
                        sequence: stored.sequence,
                        reason,
                    });
                }
            }
            if !segment.is_empty() {
                segment.flush(db).await?;
            }
            Ok(rejected)
        })
    }

    fn reset<'a>(&'a self, db: &'a mut PgConnection) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            sqlx::query("TRUNCATE workspaces").execute(db).await?;
            Ok(())
        })
    }
}
