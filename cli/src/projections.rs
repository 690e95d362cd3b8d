use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use k8shell_bus::{Bus, BusConfig, BusMetrics, projection_status, rebuild_projection, stream_name};

#[derive(Subcommand)]
pub enum ProjectionsCommand {
    /// List projections with their position and lag.
    List,
    /// Drop a projection's rows and replay its stream from the start.
    Rebuild {
        /// Projection name (see `k8shell projections list`).
        name: String,
        /// Return once reset, without waiting for the replay to catch up.
        #[arg(long)]
        no_wait: bool,
    },
}

pub async fn run(
    command: ProjectionsCommand,
    data_dir: &std::path::Path,
    env: &HashMap<String, String>,
) -> anyhow::Result<ExitCode> {
    let (nats_url, database_url) = crate::infra_urls(data_dir, env)?;
    let bus = Bus::connect(
        BusConfig {
            url: nats_url,
            client_name: "k8shell-cli".into(),
            ..BusConfig::default()
        },
        BusMetrics::default(),
    )
    .await?;
    let projections = k8shell_platform::projections();
    match command {
        ProjectionsCommand::List => {
            println!(
                "{:<28} {:<18} {:>10} {:>10} {:>6}",
                "PROJECTION", "STREAM", "APPLIED", "STREAM", "GEN"
            );
            for (schema, projection) in &projections {
                let pool = k8shell_service::connect_schema(&database_url, schema, 1).await?;
                let status = projection_status(&pool, projection.name()).await?;
                let last = stream_last_sequence(&bus, projection.context()).await?;
                println!(
                    "{:<28} {:<18} {:>10} {:>10} {:>6}",
                    projection.name(),
                    stream_name(projection.context()),
                    status.last_sequence,
                    last,
                    status.generation
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ProjectionsCommand::Rebuild { name, no_wait } => {
            let Some((schema, projection)) = projections.iter().find(|(_, p)| p.name() == name)
            else {
                let known: Vec<&str> = projections.iter().map(|(_, p)| p.name()).collect();
                anyhow::bail!("unknown projection {name:?}; known: {}", known.join(", "));
            };
            let pool = k8shell_service::connect_schema(&database_url, schema, 2).await?;
            let target = stream_last_sequence(&bus, projection.context()).await?;
            rebuild_projection(&bus, &pool, projection.as_ref()).await?;
            println!("{name}: reset; replaying {target} events");
            if no_wait || k8shell_platform::PlatformState::read(data_dir)?.is_none() {
                println!("{name}: the replay runs when the platform is running");
                return Ok(ExitCode::SUCCESS);
            }
            let started = std::time::Instant::now();
            loop {
                let status = projection_status(&pool, &name).await?;
                if status.last_sequence >= target {
                    println!(
                        "{name}: caught up at {} in {:.1?}",
                        status.last_sequence,
                        started.elapsed()
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                if started.elapsed() > Duration::from_secs(600) {
                    anyhow::bail!(
                        "{name}: replay still at {} of {target} after 10 minutes",
                        status.last_sequence
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn stream_last_sequence(bus: &Bus, context: k8shell_events::Context) -> anyhow::Result<u64> {
    let mut stream = bus
        .jetstream()
        .get_stream(stream_name(context))
        .await
        .with_context(|| format!("stream {} not found", stream_name(context)))?;
    Ok(stream.info().await?.state.last_sequence)
}
