//! `k8shell`: runs the embedded platform and talks to a running one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

// `k8shell up` hosts authz in this process; policy evaluation allocates
// many small values (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod login;
mod projections;
mod status;
mod up;
mod workspace;

#[derive(Parser)]
#[command(name = "k8shell", version, about = "Self-hosted developer workspaces")]
struct Cli {
    /// Data directory (default: $K8SHELL_DATA_DIR, /var/lib/k8shell for
    /// root, else ~/.local/share/k8shell).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole platform in this process until Ctrl-C.
    Up(up::UpArgs),
    /// Show the health of every service of the running platform.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Log in with a password: keeps a token and certifies your SSH key.
    Login(login::LoginArgs),
    /// Create, list, start, stop, delete and follow workspaces.
    Workspace {
        #[command(subcommand)]
        command: workspace::WorkspaceCommand,
    },
    /// Inspect or rebuild read-model projections.
    Projections {
        #[command(subcommand)]
        command: projections::ProjectionsCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env: HashMap<String, String> = std::env::vars().collect();
    let data_dir = cli
        .data_dir
        .clone()
        .unwrap_or_else(|| k8shell_platform::default_data_dir(&env));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("k8shell: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => Box::pin(up::run(args, data_dir, &env)).await,
            Command::Status { json } => status::run(&data_dir, json).await,
            Command::Projections { command } => projections::run(command, &data_dir, &env).await,
            Command::Workspace { command } => workspace::run(command, &data_dir, &env).await,
            Command::Login(args) => login::run(args, &data_dir, &env).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("k8shell: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// NATS and PostgreSQL URLs of the running platform, or of the environment.
fn infra_urls(
    data_dir: &std::path::Path,
    env: &HashMap<String, String>,
) -> anyhow::Result<(String, String)> {
    if let (Some(nats), Some(db)) = (env.get("NATS_URL"), env.get("DATABASE_URL")) {
        return Ok((nats.clone(), db.clone()));
    }
    let state = k8shell_platform::PlatformState::read(data_dir)?.with_context(|| {
        format!(
            "no running platform in {}; start it with `k8shell up`, or set NATS_URL and DATABASE_URL",
            data_dir.display()
        )
    })?;
    let database_url = env
        .get("DATABASE_URL")
        .cloned()
        .unwrap_or(state.database_url);
    Ok((state.nats_url, database_url))
}
