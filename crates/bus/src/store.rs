use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use k8shell_events::{AggregateId, CloudEvent, Context, subject};

use crate::{BusMetrics, stream_name, trace};

/// An event as read back from a stream.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    /// Stream sequence; also the aggregate's version after this event.
    pub sequence: u64,
    /// NATS subject it was stored under.
    pub subject: String,
    /// The envelope.
    pub envelope: CloudEvent,
}

/// What an append expects the aggregate's last event to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// No check (facts that cannot conflict, e.g. audit records).
    Any,
    /// The aggregate has no events yet.
    NoStream,
    /// The aggregate's last event has this stream sequence.
    Exact(u64),
}

/// An aggregate's events and version (stream sequence of its last event; 0
/// when it has none).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadedAggregate {
    /// Events in order.
    pub events: Vec<StoredEvent>,
    /// Version to pass as [`ExpectedVersion::Exact`] on the next append.
    pub version: u64,
}

/// An append failed.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Another writer appended first: reload and decide again.
    #[error("aggregate {subject} changed concurrently (expected version {expected:?})")]
    Conflict {
        /// Aggregate subject.
        subject: String,
        /// What this writer expected.
        expected: ExpectedVersion,
    },
    /// The bus did not acknowledge the append within the retry budget.
    #[error("append to {subject} failed")]
    Unavailable {
        /// Aggregate subject.
        subject: String,
        /// Last cause.
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },
}

/// Loading an aggregate failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot load aggregate {subject}")]
pub struct LoadError {
    /// Aggregate subject.
    pub subject: String,
    /// Cause.
    #[source]
    pub source: async_nats::Error,
}

/// Appends events to aggregates and loads them back.
#[derive(Clone)]
pub struct EventStore {
    jetstream: jetstream::Context,
    metrics: BusMetrics,
    retry_budget: Duration,
}

impl EventStore {
    pub(crate) fn new(jetstream: jetstream::Context, metrics: BusMetrics) -> Self {
        Self {
            jetstream,
            metrics,
            retry_budget: Duration::from_secs(30),
        }
    }

    /// Appends `events` to an aggregate, in order, if its version is still
    /// `expected`. Returns the new version.
    ///
    /// Each event carries `Nats-Msg-Id` = its id, so retrying after a lost
    /// acknowledgement (a NATS restart, a timeout) cannot store it twice: the
    /// server answers "duplicate" with the original sequence. Events after the
    /// first are chained on the previous one's sequence, so a concurrent
    /// writer cannot interleave; JetStream has no multi-message transaction,
    /// so a crash between two events of one call can leave a prefix.
    pub async fn append(
        &self,
        context: Context,
        aggregate: &AggregateId,
        expected: ExpectedVersion,
        events: &[CloudEvent],
    ) -> Result<u64, AppendError> {
        let subject = subject(context, aggregate);
        let mut expected = expected;
        let mut version = match expected {
            ExpectedVersion::Exact(v) => v,
            _ => 0,
        };
        for event in events {
            let sequence = self.append_one(&subject, expected, event).await?;
            version = sequence;
            expected = ExpectedVersion::Exact(sequence);
        }
        Ok(version)
    }

    async fn append_one(
        &self,
        subject: &str,
        expected: ExpectedVersion,
        event: &CloudEvent,
    ) -> Result<u64, AppendError> {
        let mut headers = async_nats::HeaderMap::new();
        let traceparent = trace::inject_current(&mut headers);
        let mut envelope = event.clone();
        if envelope.traceparent.is_none() {
            envelope.traceparent = traceparent;
        }
        let payload = bytes::Bytes::from(envelope.to_json());
        let deadline = tokio::time::Instant::now() + self.retry_budget;
        let mut backoff = Duration::from_millis(50);
        loop {
            let mut message = PublishMessage::build()
                .payload(payload.clone())
                .headers(headers.clone())
                .message_id(&envelope.id);
            match expected {
                ExpectedVersion::Any => {}
                ExpectedVersion::NoStream => message = message.expected_last_subject_sequence(0),
                ExpectedVersion::Exact(v) => message = message.expected_last_subject_sequence(v),
            }
            let result = match self
                .jetstream
                .send_publish(subject.to_owned(), message)
                .await
            {
                Ok(ack) => ack.await,
                Err(error) => Err(error),
            };
            match result {
                Ok(ack) => {
                    if ack.duplicate {
                        tracing::debug!(subject, event_id = %envelope.id, "append was a duplicate");
                    } else {
                        self.metrics.appended.inc();
                    }
                    return Ok(ack.sequence);
                }
                Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
                    self.metrics.append_conflicts.inc();
                    return Err(AppendError::Conflict {
                        subject: subject.to_owned(),
                        expected,
                    });
                }
                Err(error) => {
                    let transient = matches!(
                        error.kind(),
                        PublishErrorKind::TimedOut
                            | PublishErrorKind::BrokenPipe
                            | PublishErrorKind::StreamNotFound
                            | PublishErrorKind::Other
                    );
                    if !transient || tokio::time::Instant::now() + backoff > deadline {
                        return Err(AppendError::Unavailable {
                            subject: subject.to_owned(),
                            source: error,
                        });
                    }
                    tracing::warn!(subject, %error, "append not acknowledged, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Follows one aggregate's events after `after_sequence`, live, until
    /// the stream is dropped. An ordered consumer: gap-free and in order,
    /// recreated by the client on its own after a disconnect.
    pub async fn watch(
        &self,
        context: Context,
        aggregate: &AggregateId,
        after_sequence: u64,
    ) -> Result<impl futures::Stream<Item = Result<StoredEvent, LoadError>> + Send + use<>, LoadError>
    {
        let subject = subject(context, aggregate);
        let wrap = {
            let subject = subject.clone();
            move |source: async_nats::Error| LoadError {
                subject: subject.clone(),
                source,
            }
        };
        let stream = self
            .jetstream
            .get_stream_no_info(stream_name(context))
            .await
            .map_err(|e| wrap(e.into()))?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subject.clone(),
                deliver_policy: if after_sequence == 0 {
                    consumer::DeliverPolicy::All
                } else {
                    consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: after_sequence + 1,
                    }
                },
                ..Default::default()
            })
            .await
            .map_err(|e| wrap(e.into()))?;
        let messages = consumer.messages().await.map_err(|e| wrap(e.into()))?;
        Ok(futures::StreamExt::filter_map(messages, move |message| {
            let wrap = wrap.clone();
            let subject = subject.clone();
            async move {
                let message = match message {
                    Ok(message) => message,
                    Err(error) => return Some(Err(wrap(error.into()))),
                };
                let sequence = match message.info() {
                    Ok(info) => info.stream_sequence,
                    Err(error) => return Some(Err(wrap(error))),
                };
                match CloudEvent::from_json(&message.payload) {
                    Ok(envelope) => Some(Ok(StoredEvent {
                        sequence,
                        subject,
                        envelope,
                    })),
                    Err(error) => {
                        tracing::warn!(subject, sequence, %error, "skipping malformed event while watching");
                        None
                    }
                }
            }
        }))
    }

    /// Loads an aggregate by replaying its subject.
    ///
    /// Envelopes that do not parse are logged and left out; they still count
    /// towards the version, which is the stream's view.
    pub async fn load(
        &self,
        context: Context,
        aggregate: &AggregateId,
    ) -> Result<LoadedAggregate, LoadError> {
        let subject = subject(context, aggregate);
        let wrap = |source: async_nats::Error| LoadError {
            subject: subject.clone(),
            source,
        };
        let stream = self
            .jetstream
            .get_stream_no_info(stream_name(context))
            .await
            .map_err(|e| wrap(e.into()))?;
        let last = match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => message.sequence,
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => {
                return Ok(LoadedAggregate::default());
            }
            Err(error) => return Err(wrap(error.into())),
        };
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subject.clone(),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| wrap(e.into()))?;
        let mut messages = consumer.messages().await.map_err(|e| wrap(e.into()))?;
        let mut loaded = LoadedAggregate::default();
        while loaded.version < last {
            let message = match messages.next().await {
                Some(Ok(message)) => message,
                Some(Err(error)) => return Err(wrap(error.into())),
                None => break,
            };
            let sequence = message.info().map_err(&wrap)?.stream_sequence;
            loaded.version = sequence;
            match CloudEvent::from_json(&message.payload) {
                Ok(envelope) => loaded.events.push(StoredEvent {
                    sequence,
                    subject: subject.clone(),
                    envelope,
                }),
                Err(error) => {
                    tracing::warn!(subject, sequence, %error, "skipping malformed event while loading")
                }
            }
        }
        Ok(loaded)
    }
}
