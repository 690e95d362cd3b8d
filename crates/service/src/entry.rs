use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Health, RunningService, Shutdown, load_config, serve_admin};

/// The whole `main` of a service binary: `--config FILE` and `--dump-config`,
/// configuration from defaults, file and `<PREFIX>*` environment variables,
/// telemetry, signals (a second Ctrl-C exits at once), exit code.
pub fn service_main<C, F, Fut>(name: &'static str, env_prefix: &str, run: F) -> ExitCode
where
    C: Serialize + DeserializeOwned + Default,
    F: FnOnce(C, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    main_with(name, env_prefix, None::<LogCapture<C>>, run)
}

/// How many log lines to keep, and how to hand the buffer to the config.
type LogCapture<C> = (usize, fn(&mut C, k8shell_telemetry::LogBuffer));

/// Like [`service_main`], also keeping the last `lines` log lines in memory
/// and handing the buffer to the configuration through `attach`, for a
/// service that serves its own logs.
pub fn service_main_with_logs<C, F, Fut>(
    name: &'static str,
    env_prefix: &str,
    lines: usize,
    attach: fn(&mut C, k8shell_telemetry::LogBuffer),
    run: F,
) -> ExitCode
where
    C: Serialize + DeserializeOwned + Default,
    F: FnOnce(C, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    main_with(name, env_prefix, Some((lines, attach)), run)
}

fn main_with<C, F, Fut>(
    name: &'static str,
    env_prefix: &str,
    logs: Option<LogCapture<C>>,
    run: F,
) -> ExitCode
where
    C: Serialize + DeserializeOwned + Default,
    F: FnOnce(C, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut args = std::env::args().skip(1);
    let mut config_file: Option<PathBuf> = None;
    let mut dump = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => config_file = args.next().map(PathBuf::from),
            "--dump-config" => dump = true,
            "--help" | "-h" => {
                println!(
                    "usage: {name} [--config FILE] [--dump-config]\n\
                     environment: {env_prefix}<FIELD>, nested fields joined with __"
                );
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("{name}: unknown argument {other:?} (try --help)");
                return ExitCode::from(64);
            }
        }
    }
    let env: HashMap<String, String> = std::env::vars().collect();
    let mut config: C = match load_config(env_prefix, config_file.as_deref(), &env) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{name}: {error}");
            return ExitCode::from(64);
        }
    };
    if dump {
        match serde_json::to_string_pretty(&config) {
            Ok(text) => println!("{text}"),
            Err(error) => eprintln!("{name}: {error}"),
        }
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{name}: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let mut telemetry_config = k8shell_telemetry::TelemetryConfig::from_env();
        if let Some((lines, attach)) = logs {
            let buffer = k8shell_telemetry::LogBuffer::new(lines);
            attach(&mut config, buffer.clone());
            telemetry_config.buffer = Some(buffer);
        }
        let telemetry = match k8shell_telemetry::init(name, &telemetry_config) {
            Ok(guard) => guard,
            Err(error) => {
                eprintln!("{name}: {error}");
                return ExitCode::FAILURE;
            }
        };
        let (shutdown, second_signal) = match Shutdown::on_signals() {
            Ok(pair) => pair,
            Err(error) => {
                eprintln!("{name}: cannot install signal handlers: {error}");
                return ExitCode::FAILURE;
            }
        };
        let result = tokio::select! {
            result = run(config, shutdown) => result,
            _ = second_signal => Err(anyhow::anyhow!("second signal; exiting without draining")),
        };
        telemetry.shutdown().await;
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "{name} failed");
                eprintln!("{name}: {error:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Starts a service whose only listener so far is its admin endpoint
/// (`/healthz`, `/readyz`, `/metrics`).
pub async fn start_admin_only(
    name: &'static str,
    admin_addr: SocketAddr,
    shutdown: Shutdown,
) -> anyhow::Result<RunningService> {
    let registry = Arc::new(Registry::default());
    let (addr, task) = serve_admin(admin_addr, name, Health::new(), registry, shutdown)
        .await
        .map_err(|e| anyhow::anyhow!("{name}: failed to bind admin on {admin_addr}: {e}"))?;
    tracing::info!(admin_addr = %addr, "{name} started");
    Ok(RunningService {
        name,
        listeners: vec![("admin", addr)],
        task,
    })
}

/// Declares the `NAME`, `Config`, `start` and `run` of a service that so
/// far only serves its admin endpoint, listening on `127.0.0.1:<port>` by
/// default (configurable as `admin_addr`).
#[macro_export]
macro_rules! admin_only_service {
    ($name:literal, $port:literal) => {
        /// Service name, as reported by health endpoints.
        pub const NAME: &str = $name;

        /// Configuration: the admin (health and metrics) address.
        #[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct Config {
            /// Health and metrics address.
            pub admin_addr: std::net::SocketAddr,
        }

        impl Default for Config {
            fn default() -> Self {
                Self {
                    admin_addr: std::net::SocketAddr::from(([127, 0, 0, 1], $port)),
                }
            }
        }

        /// Starts the service and returns once it listens.
        pub async fn start(
            config: Config,
            shutdown: $crate::Shutdown,
        ) -> anyhow::Result<$crate::RunningService> {
            $crate::start_admin_only(NAME, config.admin_addr, shutdown).await
        }

        /// Runs the service until shutdown.
        pub async fn run(config: Config, shutdown: $crate::Shutdown) -> anyhow::Result<()> {
            start(config, shutdown).await?.task.await?
        }
    };
}
