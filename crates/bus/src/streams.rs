use async_nats::jetstream::{self, stream};
use k8shell_events::Context;

use crate::BusConfig;

/// A stream could not be created or updated.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up stream {stream}")]
pub struct StreamError {
    /// Stream name.
    pub stream: String,
    /// Cause.
    #[source]
    pub source: async_nats::Error,
}

/// Name of the stream of a context: `K8SHELL_<CONTEXT>`.
pub fn stream_name(context: Context) -> String {
    format!("K8SHELL_{}", context.as_str().to_ascii_uppercase())
}

fn stream_config(context: Context, config: &BusConfig) -> stream::Config {
    stream::Config {
        name: stream_name(context),
        description: Some(format!("k8shell {context} events")),
        subjects: vec![context.wildcard_subject()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        duplicate_window: config.duplicate_window,
        max_age: config.max_age,
        max_bytes: config.max_bytes,
        num_replicas: config.replicas,
        // Projections read every event; allow_direct keeps aggregate loads
        // cheap on replicas.
        allow_direct: true,
        ..Default::default()
    }
}

/// Creates every context stream, or updates it to the configured limits.
/// Safe to call on every start and from several services at once.
pub async fn ensure_streams(
    js: &jetstream::Context,
    config: &BusConfig,
) -> Result<(), StreamError> {
    for context in Context::ALL {
        let wanted = stream_config(context, config);
        let name = wanted.name.clone();
        let wrap = |source: async_nats::Error| StreamError {
            stream: name.clone(),
            source,
        };
        match js.get_stream(&name).await {
            Ok(mut existing) => {
                let info = existing.info().await.map_err(|e| wrap(e.into()))?;
                let current = &info.config;
                let differs = current.subjects != wanted.subjects
                    || current.duplicate_window != wanted.duplicate_window
                    || current.max_age != wanted.max_age
                    || current.max_bytes != wanted.max_bytes;
                if differs {
                    tracing::info!(stream = %name, "updating stream limits");
                    js.update_stream(wanted).await.map_err(|e| wrap(e.into()))?;
                }
            }
            Err(error)
                if matches!(
                    error.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(ref e)
                        if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                // A concurrent creator makes this a harmless "already exists".
                match js.create_stream(wanted.clone()).await {
                    Ok(_) => tracing::info!(stream = %name, "created stream"),
                    Err(create_error) => {
                        if js.get_stream(&name).await.is_err() {
                            return Err(wrap(create_error.into()));
                        }
                    }
                }
            }
            Err(error) => return Err(wrap(error.into())),
        }
    }
    Ok(())
}
