//! Benchmarks of the event backbone, each beside a raw JetStream baseline
//! run in the same process against the same private servers:
//!
//! - append throughput on one aggregate and over 1,000 aggregates;
//! - append → visible-in-projection latency at a steady 1,000 events/s;
//! - projection rebuild rate from a 100,000-event stream.
//!
//! Run with `cargo run --release -p k8shell-bench` (add `-- --write` to
//! update docs/benchmarks.md). PostgreSQL runs with fsync on, as in production.

// A benchmark reports to its operator; a failed step ends the run.
#![allow(clippy::unwrap_used)]

// As in the services that evaluate policies: the in-process numbers must
// come from the allocator production uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod authz;
mod coldstart;
mod k8shelld;
mod latency;
mod rebuild;
mod report;
mod setup;
mod sshproxy;
mod throughput;

use std::path::PathBuf;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let write = std::env::args().any(|a| a == "--write");
    let quick = std::env::args().any(|a| a == "--quick");
    let env = setup::BenchEnv::start().await?;
    let scale = if quick { 10 } else { 1 };
    // `--only latency` (or throughput, rebuild) runs a subset, for investigation.
    let only: Option<String> = std::env::args().skip_while(|a| a != "--only").nth(1);
    let runs = |phase: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|p| p == phase))
    };

    let mut report = report::Report::new();
    if runs("throughput") {
        eprintln!("== append throughput, one aggregate");
        report.push(throughput::one_aggregate(&env, 5_000 / scale).await?);
        eprintln!("== append throughput, 1,000 aggregates");
        report.push(throughput::many_aggregates(&env, 20_000 / scale, 1_000, 64).await?);
    }
    if runs("latency") {
        eprintln!("== append -> visible latency at 1,000 events/s");
        report.push(latency::steady_rate(&env, 1_000, 10_000 / scale).await?);
    }
    if runs("rebuild") {
        eprintln!("== projection rebuild");
        report.push(rebuild::rebuild(&env, 100_000 / scale as u64).await?);
    }

    let machine = env.machine();
    let mut k8shelld_report = report::Report::new();
    if runs("k8shelld") {
        let daemon = k8shelld::start().await?;
        eprintln!("== k8shelld: shell output throughput");
        k8shelld_report.push(k8shelld::throughput(&daemon, (1u64 << 30) / scale as u64).await?);
        eprintln!("== k8shelld: exec round trip");
        k8shelld_report.push(k8shelld::exec_round_trip(&daemon, 500 / scale).await?);
        eprintln!("== k8shelld: keystroke echo");
        k8shelld_report.push(k8shelld::keystroke_echo(&daemon, 1000 / scale).await?);
        daemon.stop();
    }
    let mut coldstart_report = report::Report::new();
    if runs("coldstart") {
        eprintln!("== workspace cold start (podman)");
        coldstart_report.push(coldstart::cold_start(if quick { 3 } else { 20 }).await?);
    }
    let mut authz_report = report::Report::new();
    if runs("authz") {
        eprintln!("== authz decisions");
        authz_report.push(authz::decisions(if quick { 1_000 } else { 20_000 }).await?);
        authz_report.push(authz::wasm_decisions(if quick { 1_000 } else { 20_000 }).await?);
    }
    let mut ssh_report = report::Report::new();
    if runs("sshproxy") {
        eprintln!("== SSH proxy against OpenSSH's sshd");
        for section in Box::pin(sshproxy::all(quick)).await? {
            ssh_report.push(section);
        }
    }
    let markdown = report.markdown(&machine);
    println!("{markdown}");
    println!("{}", k8shelld_report.markdown(&machine));
    println!("{}", coldstart_report.markdown(&machine));
    println!("{}", authz_report.markdown(&machine));
    println!("{}", ssh_report.markdown(&machine));
    if write && !quick {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/benchmarks.md");
        // A section is only rewritten by a run that measured all of it.
        if ["throughput", "latency", "rebuild"].iter().all(|p| runs(p)) {
            report::write_section(&path, "backbone", &markdown)?;
        }
        if runs("k8shelld") {
            report::write_section(&path, "k8shelld", &k8shelld_report.markdown(&machine))?;
        }
        if runs("authz") {
            report::write_section(&path, "authz", &authz_report.markdown(&machine))?;
        }
        if runs("coldstart") {
            report::write_section(&path, "coldstart", &coldstart_report.markdown(&machine))?;
        }
        if runs("sshproxy") {
            report::write_section(&path, "sshproxy", &ssh_report.markdown(&machine))?;
        }
        eprintln!("updated {}", path.display());
    }
    env.stop().await;
    Ok(())
}
