//! Tracing set-up for every k8shell binary: an `EnvFilter` from `RUST_LOG`,
//! human or JSON log lines, and OpenTelemetry export over OTLP/gRPC when an
//! endpoint is configured. W3C `traceparent` propagation itself lives with
//! the transports (bus headers, gRPC metadata), not here.

mod buffer;

pub use buffer::LogBuffer;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Log filter used when `RUST_LOG` is unset.
pub const DEFAULT_FILTER: &str = "info,async_nats=warn,sqlx=warn,tonic=warn,h2=warn";

/// How a binary logs and traces; read from the environment by `main`.
#[derive(Clone, Debug, Default)]
pub struct TelemetryConfig {
    /// `RUST_LOG`-style filter; [`DEFAULT_FILTER`] when absent.
    pub filter: Option<String>,
    /// Emit JSON lines instead of human-readable text.
    pub json: bool,
    /// OTLP/gRPC endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT`); no export when absent.
    pub otlp_endpoint: Option<String>,
    /// Also keep formatted lines here (k8shelld serves them over its API).
    pub buffer: Option<LogBuffer>,
}

impl TelemetryConfig {
    /// Reads `RUST_LOG`, `K8SHELL_LOG_FORMAT=json` and `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn from_env() -> Self {
        Self {
            filter: std::env::var("RUST_LOG").ok(),
            json: std::env::var("K8SHELL_LOG_FORMAT").is_ok_and(|v| v == "json"),
            otlp_endpoint: std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
                .ok()
                .filter(|v| !v.is_empty()),
            buffer: None,
        }
    }
}

/// Telemetry could not be initialised.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter does not parse.
    #[error("invalid log filter")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
    /// The OTLP exporter could not be built.
    #[error("cannot build otlp exporter")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// A global subscriber was already installed.
    #[error("tracing subscriber already installed")]
    AlreadyInstalled(#[from] tracing_subscriber::util::TryInitError),
}

/// Keeps the exporter alive; call [`TelemetryGuard::shutdown`] before exit
/// so buffered spans are flushed.
#[must_use = "dropping the guard without shutdown loses buffered spans"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Flushes and stops span export.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            // The SDK's shutdown blocks on the export; keep it off the runtime threads.
            let result = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(error)) = result {
                eprintln!("failed to flush traces: {error}");
            }
        }
    }
}

/// Installs the process-wide tracing subscriber.
pub fn init(
    service_name: &'static str,
    config: &TelemetryConfig,
) -> Result<TelemetryGuard, TelemetryError> {
    // Library chatter (every reconnect, every statement) stays out of the
    // default view; RUST_LOG brings it back.
    let filter = EnvFilter::try_new(config.filter.as_deref().unwrap_or(DEFAULT_FILTER))?;
    let fmt_layer = if config.json {
        tracing_subscriber::fmt::layer().json().boxed()
    } else {
        // Colours only for a terminal: container logs and files get plain text.
        use std::io::IsTerminal;
        tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stdout().is_terminal())
            .boxed()
    };
    // The buffer gets plain lines (no colours) whatever stderr gets.
    let buffer_layer = config.buffer.clone().map(|buffer| {
        tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(buffer)
    });
    let (otel_layer, provider) = match &config.otlp_endpoint {
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(service_name)
                .build();
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build();
            let tracer = provider.tracer(service_name);
            (
                Some(tracing_opentelemetry::layer().with_tracer(tracer)),
                Some(provider),
            )
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .with(buffer_layer)
        .with(otel_layer)
        .try_init()?;
    Ok(TelemetryGuard { provider })
}
