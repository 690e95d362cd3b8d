//! Every decision becomes an event. Identical decisions (same subject,
//! action, resource, outcome and obligations) within the folding window
//! become one `authz.decided` event with a count, so a busy SSH session
//! does not flood the stream while the audit trail stays complete.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8shell_bus::{EventStore, ExpectedVersion};
use k8shell_events::authz::AuthzDecided;
use k8shell_events::{AggregateId, CloudEvent, Context};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One decision to log.
#[derive(Clone, Debug)]
pub struct Entry {
    pub subject: String,
    pub roles: Vec<String>,
    pub scopes: Vec<String>,
    pub action: String,
    pub resource_type: String,
    pub resource_id: String,
    pub allow: bool,
    pub reasons: Vec<String>,
    pub obligations: BTreeMap<String, String>,
    pub at: time::OffsetDateTime,
}

type Key = (
    String,
    String,
    String,
    String,
    bool,
    Vec<(String, String)>,
    Vec<String>,
);

fn key(entry: &Entry) -> Key {
    (
        entry.subject.clone(),
        entry.action.clone(),
        entry.resource_type.clone(),
        entry.resource_id.clone(),
        entry.allow,
        entry
            .obligations
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        entry.reasons.clone(),
    )
}

struct Folded {
    entry: Entry,
    count: u64,
    last_at: time::OffsetDateTime,
}

/// Hands decisions to the folding task without waiting.
#[derive(Clone)]
pub struct DecisionLog {
    tx: mpsc::Sender<Entry>,
}

impl DecisionLog {
    /// Starts the folding task; it flushes every `window` and at shutdown.
    pub fn start(
        store: EventStore,
        window: Duration,
        engine: &'static str,
        shutdown: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Entry>(10_000);
        let task = tokio::spawn(async move {
            let mut pending: HashMap<Key, Folded> = HashMap::new();
            let mut tick = tokio::time::interval(window);
            tick.tick().await;
            loop {
                tokio::select! {
                    entry = rx.recv() => match entry {
                        Some(entry) => {
                            let at = entry.at;
                            pending
                                .entry(key(&entry))
                                .and_modify(|f| {
                                    f.count += 1;
                                    f.last_at = at;
                                })
                                .or_insert(Folded { entry, count: 1, last_at: at });
                        }
                        None => break,
                    },
                    _ = tick.tick() => flush(&store, &mut pending, engine).await,
                    _ = shutdown.cancelled() => break,
                }
            }
            // What arrived before the stop is not lost.
            while let Ok(entry) = rx.try_recv() {
                let at = entry.at;
                pending
                    .entry(key(&entry))
                    .and_modify(|f| {
                        f.count += 1;
                        f.last_at = at;
                    })
                    .or_insert(Folded {
                        entry,
                        count: 1,
                        last_at: at,
                    });
            }
            flush(&store, &mut pending, engine).await;
        });
        (Self { tx }, task)
    }

    /// Logs one decision; when the log is saturated the decision is still
    /// made and the loss is logged.
    pub fn record(&self, entry: Entry) {
        if let Err(error) = self.tx.try_send(entry) {
            tracing::error!(%error, "decision log saturated; a decision was not logged");
        }
    }
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

async fn flush(store: &EventStore, pending: &mut HashMap<Key, Folded>, engine: &'static str) {
    for (_, folded) in pending.drain() {
        let entry = folded.entry;
        // Subjects are usernames; anything else is logged under "anonymous".
        let id = AggregateId::new(entry.subject.clone())
            .or_else(|_| AggregateId::new("anonymous".to_owned()));
        let Ok(id) = id else { continue };
        let event = AuthzDecided {
            subject: entry.subject,
            roles: entry.roles,
            scopes: entry.scopes,
            action: entry.action,
            resource_type: entry.resource_type,
            resource_id: entry.resource_id,
            allow: entry.allow,
            reasons: entry.reasons,
            obligations: entry.obligations,
            count: folded.count,
            first_at: rfc3339(entry.at),
            last_at: rfc3339(folded.last_at),
            engine: engine.to_owned(),
        };
        let envelope = match CloudEvent::new("k8shell/authz", &id, &event) {
            Ok(envelope) => envelope,
            Err(error) => {
                tracing::error!(%error, "cannot build a decision event");
                continue;
            }
        };
        if let Err(error) = store
            .append(Context::Authz, &id, ExpectedVersion::Any, &[envelope])
            .await
        {
            tracing::error!(%error, "cannot append a decision event");
        }
    }
}
