use k8shell_events::{AggregateId, CloudEvent, Context};

use crate::{AppendError, EventStore, ExpectedVersion, LoadError, StoredEvent};

/// State rebuilt by folding an aggregate's events.
pub trait Aggregate: Default {
    /// Context (stream) the aggregate lives in.
    const CONTEXT: Context;
    /// Applies one stored event. Unknown or malformed events must be ignored,
    /// not panicked on.
    fn apply(&mut self, event: &StoredEvent);
}

/// What a successful [`execute`] did.
#[derive(Debug)]
pub struct Executed<A, T> {
    /// State after the decision's events.
    pub state: A,
    /// Version after the append (unchanged when nothing was appended).
    pub version: u64,
    /// What the decision returned besides its events.
    pub outcome: T,
    /// How many decisions were made (1 without conflicts).
    pub attempts: u32,
}

/// A command could not be executed.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError<E: std::error::Error + 'static> {
    /// The decision rejected the command.
    #[error(transparent)]
    Rejected(E),
    /// Loading failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Appending failed for a reason other than a conflict.
    #[error(transparent)]
    Append(AppendError),
    /// Conflicts persisted beyond the retry limit.
    #[error("aggregate {0} kept changing; gave up after {1} attempts")]
    Contended(AggregateId, u32),
}

const MAX_ATTEMPTS: u32 = 16;

/// Loads an aggregate, lets `decide` choose the events, and appends them
/// with optimistic concurrency. On a conflict it reloads and decides again,
/// so the retried decision sees the winner's events.
pub async fn execute<A, T, E, F>(
    store: &EventStore,
    aggregate_id: &AggregateId,
    mut decide: F,
) -> Result<Executed<A, T>, ExecuteError<E>>
where
    A: Aggregate,
    E: std::error::Error + 'static,
    F: FnMut(&A) -> Result<(Vec<CloudEvent>, T), E>,
{
    for attempt in 1..=MAX_ATTEMPTS {
        let loaded = store.load(A::CONTEXT, aggregate_id).await?;
        let mut state = A::default();
        for event in &loaded.events {
            state.apply(event);
        }
        let (events, outcome) = decide(&state).map_err(ExecuteError::Rejected)?;
        if events.is_empty() {
            return Ok(Executed {
                state,
                version: loaded.version,
                outcome,
                attempts: attempt,
            });
        }
        let expected = if loaded.version == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(loaded.version)
        };
        match store
            .append(A::CONTEXT, aggregate_id, expected, &events)
            .await
        {
            Ok(version) => {
                // Fold the new events locally; their sequences are contiguous
                // only in this aggregate's view, which is all `apply` sees.
                for envelope in events {
                    state.apply(&StoredEvent {
                        sequence: version,
                        subject: k8shell_events::subject(A::CONTEXT, aggregate_id),
                        envelope,
                    });
                }
                return Ok(Executed {
                    state,
                    version,
                    outcome,
                    attempts: attempt,
                });
            }
            Err(AppendError::Conflict { .. }) => {
                tracing::debug!(aggregate = %aggregate_id, attempt, "append conflict, deciding again");
            }
            Err(error) => return Err(ExecuteError::Append(error)),
        }
    }
    Err(ExecuteError::Contended(aggregate_id.clone(), MAX_ATTEMPTS))
}
