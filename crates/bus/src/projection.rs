use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use k8shell_events::{CloudEvent, Context, DomainEvent};
use sqlx::{PgConnection, PgPool, Row};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::ProjectionLabels;
use crate::{Bus, StoredEvent, stream_name, trace};

/// A projection refused one event; it is logged and skipped.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The database failed; the batch is retried.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// The event cannot be applied (inconsistent with the projection); it is
    /// skipped and logged.
    #[error("event rejected: {0}")]
    Rejected(String),
}

/// A read model kept in Postgres from one context's events.
///
/// `apply` runs inside the runner's transaction, which also records the
/// stream sequence; it must only touch the projection's own tables.
pub trait Projection: Send + Sync + 'static {
    /// Unique name, `[a-z0-9-]`; names the durable consumer and the offset row.
    fn name(&self) -> &'static str;
    /// Context whose stream feeds the projection.
    fn context(&self) -> Context;
    /// Applies one decoded event. Unknown types never reach this method.
    fn apply<'a>(
        &'a self,
        db: &'a mut PgConnection,
        stored: &'a StoredEvent,
        event: &'a DomainEvent,
    ) -> BoxFuture<'a, Result<(), ApplyError>>;
    /// Empties the projection's tables before a rebuild.
    fn reset<'a>(&'a self, db: &'a mut PgConnection) -> BoxFuture<'a, Result<(), sqlx::Error>>;

    /// Applies a batch of events in stream order and returns the ones it
    /// rejected. The default applies them one by one; a projection may
    /// override it with set-based statements (one round trip for many
    /// events, which is what makes rebuilds fast) as long as the result is
    /// the same as applying them in order.
    fn apply_batch<'a>(
        &'a self,
        db: &'a mut PgConnection,
        events: &'a [(StoredEvent, DomainEvent)],
    ) -> BoxFuture<'a, Result<Vec<Rejection>, sqlx::Error>> {
        Box::pin(async move {
            let mut rejected = Vec::new();
            for (stored, event) in events {
                match self.apply(&mut *db, stored, event).await {
                    Ok(()) => {}
                    Err(ApplyError::Rejected(reason)) => rejected.push(Rejection {
                        sequence: stored.sequence,
                        reason,
                    }),
                    Err(ApplyError::Database(error)) => return Err(error),
                }
            }
            Ok(rejected)
        })
    }
}

/// An event a projection refused; logged and skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Stream sequence of the event.
    pub sequence: u64,
    /// Why.
    pub reason: String,
}

/// A projection could not be run, rebuilt or inspected.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// Postgres failed.
    #[error("projection {projection}: database error")]
    Database {
        /// Projection name.
        projection: String,
        /// Cause.
        #[source]
        source: sqlx::Error,
    },
    /// NATS failed.
    #[error("projection {projection}: bus error")]
    Bus {
        /// Projection name.
        projection: String,
        /// Cause.
        #[source]
        source: async_nats::Error,
    },
    /// The projection's name is not usable as a consumer name.
    #[error("invalid projection name {0:?}")]
    Name(String),
}

/// Where a projection stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjectionStatus {
    /// Last applied stream sequence.
    pub last_sequence: u64,
    /// Incremented by every rebuild.
    pub generation: u64,
}

const OFFSETS_DDL: &str = "CREATE TABLE IF NOT EXISTS projection_offsets (
    projection text PRIMARY KEY,
    last_sequence bigint NOT NULL DEFAULT 0,
    generation bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
)";

/// The durable consumer of one runner session: `projection-<name>_<id>`.
/// Each session makes a fresh one (`_` cannot occur in projection names,
/// so a name's consumers never match another's): re-creating one name right
/// after deleting it raced nats-server 2.9 into a half-deleted consumer
/// that never delivered ("unlinkat …: directory not empty").
fn session_consumer_name(projection: &str) -> String {
    // The random tail of a v7 id (its head is the time).
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("projection-{projection}_{}", &id[id.len() - 12..])
}

/// Whether `consumer` belongs to `projection` (either naming scheme).
fn is_projection_consumer(consumer: &str, projection: &str) -> bool {
    let base = format!("projection-{projection}");
    consumer == base
        || consumer
            .strip_prefix(&base)
            .is_some_and(|rest| rest.starts_with('_'))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

async fn ensure_offset_row(pool: &PgPool, projection: &str) -> Result<(), sqlx::Error> {
    // Concurrent `CREATE TABLE IF NOT EXISTS` can race on the type catalogue;
    // serialise it with an advisory lock scoped to this transaction.
    let mut tx = pool.begin().await?;
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.projection_offsets'))",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query(OFFSETS_DDL).execute(&mut *tx).await?;
    sqlx::query("INSERT INTO projection_offsets (projection) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(projection)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Reads a projection's offset (from the pool's schema).
pub async fn projection_status(
    pool: &PgPool,
    projection: &str,
) -> Result<ProjectionStatus, ProjectionError> {
    let wrap = |source| ProjectionError::Database {
        projection: projection.to_owned(),
        source,
    };
    ensure_offset_row(pool, projection).await.map_err(wrap)?;
    let row = sqlx::query(
        "SELECT last_sequence, generation FROM projection_offsets WHERE projection = $1",
    )
    .bind(projection)
    .fetch_one(pool)
    .await
    .map_err(wrap)?;
    Ok(ProjectionStatus {
        last_sequence: row.get::<i64, _>(0) as u64,
        generation: row.get::<i64, _>(1) as u64,
    })
}

/// Drops a projection's rows and makes it replay its stream from the start.
///
/// Works whether or not a runner is active: the durable consumer is deleted
/// and the generation bumped, so a running runner abandons its position and
/// replays; a stopped one replays on its next start.
pub async fn rebuild_projection(
    bus: &Bus,
    pool: &PgPool,
    projection: &dyn Projection,
) -> Result<(), ProjectionError> {
    let name = projection.name();
    let db_error = |source| ProjectionError::Database {
        projection: name.to_owned(),
        source,
    };
    ensure_offset_row(pool, name).await.map_err(db_error)?;
    let mut tx = pool.begin().await.map_err(db_error)?;
    sqlx::query("SELECT 1 FROM projection_offsets WHERE projection = $1 FOR UPDATE")
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    projection.reset(&mut tx).await.map_err(db_error)?;
    sqlx::query(
        "UPDATE projection_offsets SET last_sequence = 0, generation = generation + 1, updated_at = now()
         WHERE projection = $1",
    )
    .bind(name)
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    // Only after the new generation is committed: a runner whose consumer
    // disappears re-reads its offset, and must find the reset one. (Deleting
    // first let a runner re-anchor at the old offset and wait there forever.)
    delete_consumer(bus.jetstream(), projection.context(), name)
        .await
        .map_err(|source| ProjectionError::Bus {
            projection: name.to_owned(),
            source,
        })?;
    tracing::info!(
        projection = name,
        "projection reset; replaying from the start"
    );
    Ok(())
}

/// Deletes every consumer of `projection` (sessions of killed runners
/// included); a consumer already gone is fine.
async fn delete_consumer(
    js: &jetstream::Context,
    context: Context,
    projection: &str,
) -> Result<(), async_nats::Error> {
    let stream = js.get_stream_no_info(stream_name(context)).await?;
    let mut names = Vec::new();
    let mut listing = stream.consumer_names();
    while let Some(name) = listing.next().await {
        let name = name?;
        if is_projection_consumer(&name, projection) {
            names.push(name);
        }
    }
    for name in names {
        match stream.delete_consumer(&name).await {
            Ok(_) => {}
            Err(error)
                if matches!(
                    error.kind(),
                    async_nats::jetstream::stream::ConsumerErrorKind::JetStream(ref e)
                        if e.error_code() == async_nats::jetstream::ErrorCode::CONSUMER_NOT_FOUND
                ) => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// Callback told whether the runner is keeping up (`Ok`) or stuck (`Err` with why).
pub type HealthReporter = Arc<dyn Fn(Result<(), String>) + Send + Sync>;

/// Feeds one projection from its durable consumer.
pub struct ProjectionRunner {
    bus: Bus,
    pool: PgPool,
    projection: Arc<dyn Projection>,
    batch_size: usize,
    health: HealthReporter,
}

enum BatchOutcome {
    /// Every message was applied or skipped as already applied.
    Applied,
    /// A rebuild bumped the generation.
    GenerationChanged,
    /// A message arrived after a hole in the sequence; the prefix before
    /// it was committed and the session must restart from the offset.
    Gap { expected: u64, got: u64 },
}

impl ProjectionRunner {
    /// Creates a runner; nothing happens until [`ProjectionRunner::run`].
    pub fn new(bus: Bus, pool: PgPool, projection: Arc<dyn Projection>) -> Self {
        Self {
            bus,
            pool,
            projection,
            batch_size: 500,
            health: Arc::new(|_| {}),
        }
    }

    /// Sets how many ready events are applied in one transaction.
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Reports progress and stalls to the service's health.
    pub fn health_reporter(mut self, reporter: HealthReporter) -> Self {
        self.health = reporter;
        self
    }

    /// Applies events until `shutdown` is cancelled. Errors of NATS or
    /// Postgres are waited out, never returned: a projection outlives outages.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ProjectionError> {
        let name = self.projection.name();
        if !valid_name(name) {
            return Err(ProjectionError::Name(name.to_owned()));
        }
        let mut backoff = Backoff::default();
        while !shutdown.is_cancelled() {
            match self.run_consumer(&shutdown).await {
                Ok(()) => backoff.reset(),
                Err(error) => {
                    (self.health)(Err(format!("{error:#}")));
                    tracing::warn!(projection = name, error = %error, "projection interrupted; restarting");
                    backoff.wait(&shutdown).await;
                }
            }
        }
        Ok(())
    }

    /// One consumer session: returns Ok to restart cleanly (rebuild seen),
    /// Err on a failure to wait out.
    async fn run_consumer(&self, shutdown: &CancellationToken) -> Result<(), anyhow_like::Error> {
        let name = self.projection.name();
        ensure_offset_row(&self.pool, name).await?;
        let status = projection_status(&self.pool, name).await?;
        let consumer = self.consumer(status.last_sequence).await?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(self.batch_size)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await?;
        // A rebuild that committed between our offset read and the consumer's
        // creation deleted the consumer before we made ours; nothing would
        // tell us, so look again now that the consumer exists.
        if projection_status(&self.pool, name).await?.generation != status.generation {
            return Ok(());
        }
        (self.health)(Ok(()));
        let labels = ProjectionLabels {
            projection: name.to_owned(),
        };
        self.bus
            .metrics()
            .projection_sequence
            .get_or_create(&labels)
            .set(status.last_sequence as i64);
        // The first message of a session may follow a hole (messages deleted
        // by retention); after that the stream's sequence is contiguous.
        let mut first_message = true;
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                next = messages.next() => next,
            };
            let first = match first {
                Some(Ok(message)) => message,
                Some(Err(error)) => return Err(error.into()),
                None => return Err(anyhow_like::Error::msg("consumer stream ended")),
            };
            let mut batch = vec![first];
            let mut pending_error = None;
            while batch.len() < self.batch_size {
                match messages.next().now_or_never() {
                    Some(Some(Ok(message))) => batch.push(message),
                    Some(Some(Err(error))) => {
                        pending_error = Some(error);
                        break;
                    }
                    _ => break,
                }
            }
            let mut backoff = Backoff::default();
            loop {
                match self
                    .apply_batch(&batch, status.generation, first_message)
                    .await
                {
                    Ok(BatchOutcome::Applied) => break,
                    Ok(BatchOutcome::Gap { expected, got }) => {
                        tracing::info!(
                            projection = name,
                            expected,
                            got,
                            "sequence gap; re-anchoring the consumer"
                        );
                        return Ok(());
                    }
                    Ok(BatchOutcome::GenerationChanged) => {
                        // Rebuilt under us: drop our position and start over.
                        delete_consumer(self.bus.jetstream(), self.projection.context(), name)
                            .await
                            .map_err(anyhow_like::Error::boxed)?;
                        return Ok(());
                    }
                    Err(error) => {
                        (self.health)(Err(format!("postgres: {error}")));
                        tracing::warn!(projection = name, %error, "cannot apply batch; retrying");
                        if !backoff.wait(shutdown).await {
                            return Ok(());
                        }
                    }
                }
            }
            first_message = false;
            (self.health)(Ok(()));
            if let Some(last) = batch.last() {
                // AckPolicy::All: acknowledging the last acknowledges the batch.
                // A lost ack only causes redelivery, which the offset absorbs.
                if let Err(error) = last.ack().await {
                    tracing::debug!(projection = name, %error, "ack failed; events will be redelivered and skipped");
                }
            }
            if let Some(error) = pending_error {
                return Err(error.into());
            }
        }
    }

    /// Creates the durable consumer anchored right after the last applied
    /// sequence. Postgres, not the consumer's ack floor, is the source of
    /// truth: messages that were in flight to a previous session (killed
    /// task, lost connection) would otherwise come back only after the ack
    /// wait, behind newer ones, and a high-water-mark offset cannot see such
    /// a hole. One runner per projection is assumed (see docs/architecture.md).
    async fn consumer(
        &self,
        last_sequence: u64,
    ) -> Result<consumer::PullConsumer, anyhow_like::Error> {
        let name = self.projection.name();
        let context = self.projection.context();
        let stream = self
            .bus
            .jetstream()
            .get_stream_no_info(stream_name(context))
            .await?;
        let durable = session_consumer_name(name);
        // The previous sessions' consumers go; one that cannot be deleted
        // now (a server error) no longer blocks this session, and the
        // server drops it once inactive.
        if let Err(error) = delete_consumer(self.bus.jetstream(), context, name).await {
            tracing::warn!(projection = name, %error, "cannot delete an old consumer; going on");
        }
        let config = consumer::pull::Config {
            durable_name: Some(durable),
            description: Some(format!("k8shell projection {name}")),
            deliver_policy: if last_sequence == 0 {
                consumer::DeliverPolicy::All
            } else {
                consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: last_sequence + 1,
                }
            },
            ack_policy: consumer::AckPolicy::All,
            ack_wait: Duration::from_secs(60),
            max_ack_pending: 20_000,
            // Abandoned sessions' consumers (a killed process, a failed
            // delete) are removed by the server.
            inactive_threshold: Duration::from_secs(600),
            filter_subject: context.wildcard_subject(),
            ..Default::default()
        };
        Ok(stream.create_consumer(config).await?)
    }

    async fn apply_batch(
        &self,
        batch: &[jetstream::Message],
        generation: u64,
        may_start_after_gap: bool,
    ) -> Result<BatchOutcome, sqlx::Error> {
        let name = self.projection.name();
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT last_sequence, generation FROM projection_offsets WHERE projection = $1 FOR UPDATE",
        )
        .bind(name)
        .fetch_one(&mut *tx)
        .await?;
        if row.get::<i64, _>(1) as u64 != generation {
            return Ok(BatchOutcome::GenerationChanged);
        }
        let mut last = row.get::<i64, _>(0) as u64;
        let labels = ProjectionLabels {
            projection: name.to_owned(),
        };
        let metrics = self.bus.metrics();
        let (mut applied, mut skipped) = (0u64, 0u64);
        let mut outcome = BatchOutcome::Applied;
        let mut gap_allowed = may_start_after_gap;
        let mut decoded_batch = Vec::with_capacity(batch.len());
        for message in batch {
            let Ok(info) = message.info() else {
                skipped += 1;
                continue;
            };
            let sequence = info.stream_sequence;
            if sequence <= last {
                continue; // redelivery of something already applied
            }
            if sequence != last + 1 && !gap_allowed {
                outcome = BatchOutcome::Gap {
                    expected: last + 1,
                    got: sequence,
                };
                break;
            }
            gap_allowed = false;
            last = sequence;
            // Link this event's trace (producer → bus → here).
            let span = tracing::debug_span!("projection.event", projection = name, sequence, subject = %message.subject);
            trace::set_parent_from(&span, message.headers.as_ref());
            let _entered = span.enter();
            let envelope = match CloudEvent::from_json(&message.payload) {
                Ok(envelope) => envelope,
                Err(error) => {
                    tracing::warn!(projection = name, sequence, subject = %message.subject, error = %error, "skipping malformed event");
                    skipped += 1;
                    continue;
                }
            };
            let decoded = match DomainEvent::decode(&envelope) {
                Ok(DomainEvent::Unknown { event_type }) => {
                    tracing::info!(
                        projection = name,
                        sequence,
                        event_type,
                        "skipping event of unknown type"
                    );
                    skipped += 1;
                    continue;
                }
                Ok(decoded) => decoded,
                Err(error) => {
                    tracing::warn!(projection = name, sequence, error = %error, "skipping event with invalid data");
                    skipped += 1;
                    continue;
                }
            };
            let stored = StoredEvent {
                sequence,
                subject: message.subject.to_string(),
                envelope,
            };
            decoded_batch.push((stored, decoded));
        }
        if !decoded_batch.is_empty() {
            let span = tracing::debug_span!(
                "projection.apply",
                projection = name,
                events = decoded_batch.len()
            );
            let rejected = self
                .projection
                .apply_batch(&mut tx, &decoded_batch)
                .instrument(span)
                .await?;
            for rejection in &rejected {
                tracing::warn!(projection = name, sequence = rejection.sequence, reason = %rejection.reason, "event rejected by projection");
            }
            skipped += rejected.len() as u64;
            applied += (decoded_batch.len() - rejected.len()) as u64;
        }
        sqlx::query("UPDATE projection_offsets SET last_sequence = $2, updated_at = now() WHERE projection = $1")
            .bind(name)
            .bind(last as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        metrics
            .projection_applied
            .get_or_create(&labels)
            .inc_by(applied);
        metrics
            .projection_skipped
            .get_or_create(&labels)
            .inc_by(skipped);
        metrics
            .projection_sequence
            .get_or_create(&labels)
            .set(last as i64);
        Ok(outcome)
    }
}

/// Capped exponential backoff that gives way to shutdown.
#[derive(Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Sleeps; returns false when shutdown interrupted the wait.
    async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let delay =
            Duration::from_millis(50 * 2u64.pow(self.attempt.min(5))).min(Duration::from_secs(2));
        self.attempt += 1;
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// A boxed error for the runner's internal restart loop; everything it
/// carries is logged and waited out, never returned to callers.
mod anyhow_like {
    /// Any error.
    #[derive(Debug)]
    pub struct Error(Box<dyn std::error::Error + Send + Sync>);

    impl Error {
        pub fn msg(message: &'static str) -> Self {
            Self(message.into())
        }

        pub fn boxed(error: Box<dyn std::error::Error + Send + Sync>) -> Self {
            Self(error)
        }
    }

    impl std::fmt::Display for Error {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}", self.0)
        }
    }

    impl<E: std::error::Error + Send + Sync + 'static> From<E> for Error {
        fn from(error: E) -> Self {
            Self(Box::new(error))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumers_belong_to_their_projection_only() {
        let session = session_consumer_name("workspaces");
        assert!(is_projection_consumer(&session, "workspaces"));
        assert!(is_projection_consumer(
            "projection-workspaces",
            "workspaces"
        ));
        // A projection whose name extends another's is not its consumer.
        assert!(!is_projection_consumer(
            "projection-workspaces-2_abc",
            "workspaces"
        ));
        assert!(!is_projection_consumer(
            "projection-workspaces-2",
            "workspaces"
        ));
        assert_ne!(session, session_consumer_name("workspaces"));
    }
}
