use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use k8shell_platform::{Platform, PlatformConfig};
use k8shell_service::Shutdown;

#[derive(Args)]
pub struct UpArgs {
    /// Address every listener binds to.
    #[arg(long, default_value = "127.0.0.1", env = "K8SHELL_BIND")]
    bind: std::net::IpAddr,
    /// HTTP port (API, console, app proxy).
    #[arg(long, default_value_t = 8080, env = "K8SHELL_HTTP_PORT")]
    http_port: u16,
    /// SSH port (reserved for the SSH proxy).
    #[arg(long, default_value_t = 2222, env = "K8SHELL_SSH_PORT")]
    ssh_port: u16,
    /// Bind every listener to a free port instead of the defaults, to run
    /// several platforms on one machine (`k8shell status` finds them).
    #[arg(long)]
    ephemeral_ports: bool,
    /// OpenID Connect providers and SSH onboarding (TOML; see
    /// docs/operations.md, "Signing in").
    #[arg(long, env = "K8SHELL_SIGN_IN")]
    sign_in: Option<PathBuf>,
}

pub async fn run(
    args: UpArgs,
    data_dir: PathBuf,
    env: &HashMap<String, String>,
) -> anyhow::Result<ExitCode> {
    let telemetry =
        k8shell_telemetry::init("k8shell", &k8shell_telemetry::TelemetryConfig::from_env())
            .context("cannot set up logging")?;
    if let Some(running) = k8shell_platform::PlatformState::read(&data_dir)? {
        anyhow::bail!(
            "a platform is already running from {} (pid {}); stop it first",
            data_dir.display(),
            running.pid
        );
    }
    let mut config = PlatformConfig::embedded(data_dir.clone());
    config.workspaces = k8shell_platform::WorkspaceOptions::detect(env);
    config.policies_dir = k8shell_platform::default_policies_dir(env);
    config.nats_url = env.get("NATS_URL").filter(|u| !u.is_empty()).cloned();
    config.database_url = env.get("DATABASE_URL").filter(|u| !u.is_empty()).cloned();
    config.bind = args.bind;
    if let Some(path) = &args.sign_in {
        config.sign_in = k8shell_platform::SignIn::from_file(path)?;
    }
    if args.ephemeral_ports {
        config.ports = k8shell_platform::Ports::ephemeral();
    } else {
        config.ports.http = args.http_port;
        config.ports.ssh = args.ssh_port;
    }

    let (shutdown, second_signal) =
        Shutdown::on_signals().context("cannot install signal handlers")?;
    let mut platform = Platform::start(config, shutdown.clone()).await?;
    print_banner(&platform, &data_dir);
    match bootstrap_admin(&platform, &data_dir, env).await {
        Ok(k8shell_identity::bootstrap::Bootstrap::Exists) => {}
        Ok(k8shell_identity::bootstrap::Bootstrap::WithKey(path)) => {
            println!("created user admin, who logs in with {}", path.display());
        }
        Ok(k8shell_identity::bootstrap::Bootstrap::Generated(path)) => {
            println!(
                "created user admin with a new key pair: {} (no ~/.ssh/*.pub was found)",
                path.display()
            );
        }
        Err(error) => eprintln!("cannot bootstrap the admin user: {error:#}"),
    }

    let exited = tokio::select! {
        _ = shutdown.wait() => None,
        (name, result) = platform.wait_any_exit() => Some((name, result)),
    };
    // A service that finished because Ctrl-C arrived is not a failure.
    let exited = exited.filter(|(_, result)| result.is_err() || !shutdown.is_triggered());
    if let Some((name, result)) = &exited {
        match result {
            Ok(()) => eprintln!("{name} stopped unexpectedly; stopping the platform"),
            Err(error) => eprintln!("{name} failed: {error:#}; stopping the platform"),
        }
    } else {
        eprintln!("stopping…");
    }
    let stopped = tokio::select! {
        result = platform.stop() => result,
        _ = second_signal => Err(anyhow::anyhow!("second interrupt; exiting without a clean stop")),
        _ = tokio::time::sleep(Duration::from_secs(10)) => Err(anyhow::anyhow!("stop took longer than 10s")),
    };
    telemetry.shutdown().await;
    stopped?;
    eprintln!("stopped");
    Ok(if exited.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print_banner(platform: &Platform, data_dir: &std::path::Path) {
    let state = platform.state();
    println!("k8shell is up (data in {})", data_dir.display());
    println!(
        "  nats      {}{}",
        state.nats_url,
        if state.embedded_nats {
            "  (private)"
        } else {
            ""
        }
    );
    println!(
        "  postgres  {}{}",
        state.database_url,
        if state.embedded_postgres {
            "  (private, unix socket)"
        } else {
            ""
        }
    );
    for service in platform.services() {
        let listeners: Vec<String> = service
            .listeners
            .iter()
            .map(|(role, addr)| format!("{role} {addr}"))
            .collect();
        println!("  {:<12}{}", service.name, listeners.join(", "));
    }
    match k8shell_platform::ssh_host_keys(data_dir) {
        Ok(keys) => {
            for key in keys {
                println!("  ssh host key {:<20} {}", key.algorithm, key.sha256);
            }
        }
        Err(error) => eprintln!("cannot read the SSH host keys: {error:#}"),
    }
    println!("`k8shell status` shows health; Ctrl-C stops everything.");
}

/// Creates the `admin` user on a platform that has none.
async fn bootstrap_admin(
    platform: &Platform,
    data_dir: &std::path::Path,
    env: &HashMap<String, String>,
) -> anyhow::Result<k8shell_identity::bootstrap::Bootstrap> {
    let address = platform
        .listener("identity", "grpc")
        .context("identity has no gRPC listener")?;
    let mut client =
        k8shell_proto::identity::v1::identity_service_client::IdentityServiceClient::connect(
            format!("http://{address}"),
        )
        .await
        .context("cannot reach identity")?;
    let home = env.get("HOME").map(std::path::PathBuf::from);
    k8shell_identity::bootstrap::ensure_admin(&mut client, home.as_deref(), data_dir)
        .await
        .map_err(|e| anyhow::anyhow!(e))
}
