use std::process::ExitCode;

pub async fn run(data_dir: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    let Some(state) = k8shell_platform::PlatformState::read(data_dir)? else {
        if json {
            println!("{}", serde_json::json!({"running": false}));
        } else {
            println!(
                "k8shell is not running (data directory {})",
                data_dir.display()
            );
        }
        return Ok(ExitCode::from(3));
    };
    let health = k8shell_platform::probe_services(&state).await;
    let all_ready = health.iter().all(|h| h.live && h.ready);
    let host_keys = k8shell_platform::ssh_host_keys(data_dir)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "running": true,
                "pid": state.pid,
                "started_at": state.started_at,
                "nats_url": state.nats_url,
                "database_url": state.database_url,
                "services": health,
                "ssh_host_keys": host_keys,
            }))?
        );
    } else {
        println!(
            "k8shell running (pid {}, since {})",
            state.pid, state.started_at
        );
        println!(
            "{:<12} {:<22} {:<6} {:<6}",
            "SERVICE", "ADMIN", "LIVE", "READY"
        );
        for h in &health {
            let admin = h.admin.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
            let yes_no = |b: bool| if b { "yes" } else { "no" };
            println!(
                "{:<12} {:<22} {:<6} {:<6}",
                h.name,
                admin,
                yes_no(h.live),
                yes_no(h.ready)
            );
            if !h.ready {
                println!("    {}", h.detail);
            }
        }
        if !host_keys.is_empty() {
            println!("SSH host keys (compare with ssh's first-connection prompt):");
            for key in &host_keys {
                println!("  {:<20} {}", key.algorithm, key.sha256);
            }
        }
    }
    Ok(if all_ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
