//! What the proxy tells the event streams: failed logins (`ssh.auth_failed`,
//! which authz's shield counts), sessions (`session.started` / `ended`) and
//! recordings. Appends go through one queue, in order, so a recording's
//! chunks land in sequence; a full queue slows its producers down rather
//! than dropping events.

use k8shell_bus::{EventStore, ExpectedVersion};
use k8shell_events::{AggregateId, CloudEvent, Context, EventData};
use tokio::sync::mpsc;

/// Where sshproxy's events come from.
const SOURCE: &str = "k8shell/sshproxy";
const QUEUE: usize = 1024;

struct Pending {
    context: Context,
    aggregate: AggregateId,
    event: CloudEvent,
}

/// A handle to the event queue.
#[derive(Clone)]
pub struct Audit {
    queue: mpsc::Sender<Pending>,
}

impl Audit {
    /// Starts the task that appends queued events to `store`.
    pub fn new(store: EventStore) -> Self {
        let (queue, mut pending) = mpsc::channel::<Pending>(QUEUE);
        tokio::spawn(async move {
            while let Some(item) = pending.recv().await {
                if let Err(error) = store
                    .append(
                        item.context,
                        &item.aggregate,
                        ExpectedVersion::Any,
                        &[item.event],
                    )
                    .await
                {
                    tracing::error!(%error, aggregate = item.aggregate.as_str(), "cannot append an sshproxy event");
                }
            }
        });
        Self { queue }
    }

    /// Queues `data` on aggregate `aggregate`.
    pub async fn publish<E: EventData>(&self, aggregate: &str, data: &E) {
        let aggregate = match AggregateId::new(aggregate) {
            Ok(id) => id,
            Err(error) => {
                tracing::error!(%error, event = E::TYPE, "event not published");
                return;
            }
        };
        let event = match CloudEvent::new(SOURCE, &aggregate, data) {
            Ok(event) => event,
            Err(error) => {
                tracing::error!(%error, event = E::TYPE, "event not published");
                return;
            }
        };
        let pending = Pending {
            context: E::CONTEXT,
            aggregate,
            event,
        };
        if self.queue.send(pending).await.is_err() {
            tracing::error!(event = E::TYPE, "the event queue is closed");
        }
    }
}
