//! The event backbone: JetStream streams per context, an event store with
//! optimistic concurrency and de-duplication, aggregate loading by replay,
//! and projection runners that apply events to Postgres exactly once.
//!
//! Depends on `k8shell-events` for the envelope and on nothing service-specific.

mod aggregate;
pub mod components;
mod config;
mod metrics;
mod projection;
mod store;
mod streams;
mod trace;

use async_nats::jetstream;

pub use aggregate::{Aggregate, ExecuteError, Executed, execute};
pub use config::BusConfig;
pub use metrics::BusMetrics;
pub use projection::{
    ApplyError, Projection, ProjectionError, ProjectionRunner, ProjectionStatus, Rejection,
    projection_status, rebuild_projection,
};
pub use store::{
    AppendError, EventStore, ExpectedVersion, LoadError, LoadedAggregate, StoredEvent,
};
pub use streams::{StreamError, ensure_streams, stream_name};

/// Failure to connect to NATS.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to nats at {url}")]
pub struct ConnectError {
    /// Server URL.
    pub url: String,
    /// Cause.
    #[source]
    pub source: async_nats::ConnectError,
}

/// A connection to the event bus.
#[derive(Clone)]
pub struct Bus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    config: BusConfig,
    metrics: BusMetrics,
}

impl Bus {
    /// Connects to NATS. Reconnects forever after the first success; the
    /// first connection is retried too, so a service may start before NATS.
    pub async fn connect(config: BusConfig, metrics: BusMetrics) -> Result<Self, ConnectError> {
        let client = async_nats::ConnectOptions::new()
            .name(&config.client_name)
            .retry_on_initial_connect()
            .connection_timeout(config.connect_timeout)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Disconnected => tracing::warn!("nats disconnected"),
                    async_nats::Event::Connected => tracing::info!("nats connected"),
                    other => tracing::debug!(event = %other, "nats event"),
                }
            })
            .connect(config.url.as_str())
            .await
            .map_err(|source| ConnectError {
                url: config.url.clone(),
                source,
            })?;
        let mut jetstream = jetstream::new(client.clone());
        jetstream.set_timeout(config.request_timeout);
        Ok(Self {
            client,
            jetstream,
            config,
            metrics,
        })
    }

    /// The underlying NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// Configuration in use.
    pub fn config(&self) -> &BusConfig {
        &self.config
    }

    /// Creates or updates every context stream (idempotent).
    pub async fn ensure_streams(&self) -> Result<(), StreamError> {
        ensure_streams(&self.jetstream, &self.config).await
    }

    /// An event store that stamps events with the given CloudEvents `source`.
    pub fn event_store(&self) -> EventStore {
        EventStore::new(self.jetstream.clone(), self.metrics.clone())
    }

    /// `Ok` while connected to NATS, otherwise the connection state.
    pub fn connection_state(&self) -> Result<(), String> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            other => Err(format!("nats {other}")),
        }
    }

    /// Metrics of this connection.
    pub fn metrics(&self) -> &BusMetrics {
        &self.metrics
    }
}
