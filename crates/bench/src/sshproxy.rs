//! The SSH proxy against OpenSSH's sshd on loopback, both started here and
//! both driven by Debian's `ssh` client:
//!
//! - bulk throughput out of the workspace (`head -c 1G /dev/zero`);
//! - connect → first output of a command, p50/p99, on a warm workspace;
//! - keystroke echo on a PTY, p50/p99;
//! - memory per idle session with many sessions open.
//!
//! sshd runs as root on this machine with its own config and host key;
//! the proxy runs in the whole platform (`TestPlatform`, real podman
//! workspace), so every proxy figure includes k8shelld in a container.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8shell_proto::identity::v1 as identity;
use k8shell_proto::identity::v1::identity_service_client::IdentityServiceClient;
use k8shell_testkit::TestPlatform;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};

use crate::report::{Section, percentile_rows};

/// Both servers and a client config for each.
pub struct Rig {
    platform: TestPlatform,
    sshd: Child,
    dir: tempfile::TempDir,
}

fn keygen(path: &Path, kind: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", kind, "-N", "", "-f"])
        .arg(path)
        .status()?;
    anyhow::ensure!(status.success(), "ssh-keygen failed");
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_for_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("nothing listens on port {port}")
}

impl Rig {
    /// Starts the platform (with a warm workspace) and sshd.
    pub async fn start() -> anyhow::Result<Self> {
        anyhow::ensure!(
            Path::new("/usr/sbin/sshd").exists(),
            "OpenSSH's sshd is missing; run ./scripts/bench (it installs openssh-server)"
        );
        let dir = tempfile::tempdir()?;
        let key = dir.path().join("id_ed25519");
        keygen(&key, "ed25519")?;
        let public = std::fs::read_to_string(key.with_extension("pub"))?;

        // OpenSSH's sshd, as root, with only this key.
        let host_key = dir.path().join("ssh_host_ed25519_key");
        keygen(&host_key, "ed25519")?;
        std::fs::write(dir.path().join("authorized_keys"), &public)?;
        let sshd_port = free_port()?;
        let sshd_config = dir.path().join("sshd_config");
        std::fs::write(
            &sshd_config,
            format!(
                "Port {sshd_port}\nListenAddress 127.0.0.1\nHostKey {host}\nPidFile none\nUsePAM no\n\
                 PermitRootLogin prohibit-password\nAuthorizedKeysFile {keys}\nStrictModes no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nMaxStartups 200\n\
                 MaxSessions 100\nLogLevel ERROR\n",
                host = host_key.display(),
                keys = dir.path().join("authorized_keys").display(),
            ),
        )?;
        std::fs::create_dir_all("/run/sshd")?;
        let sshd = Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&sshd_config)
            .kill_on_drop(true)
            .spawn()?;
        wait_for_port(sshd_port).await?;

        let platform = TestPlatform::start_with_workspaces().await?;
        let mut client = IdentityServiceClient::connect(platform.url("identity", "grpc")).await?;
        client
            .create_user(identity::CreateUserRequest {
                username: "bench".into(),
                ..Default::default()
            })
            .await?;
        client
            .add_ssh_key(identity::AddSshKeyRequest {
                username: "bench".into(),
                public_key: public.trim().into(),
            })
            .await?;
        let proxy = platform
            .platform()
            .listener("sshproxy", "ssh")
            .ok_or_else(|| anyhow::anyhow!("no ssh listener"))?;
        std::fs::write(
            dir.path().join("ssh_config"),
            format!(
                "Host proxy\n  HostName 127.0.0.1\n  Port {proxy_port}\n  User bench~dev\n\
                 Host sshd\n  HostName 127.0.0.1\n  Port {sshd_port}\n  User root\n\
                 Host *\n  IdentityFile {key}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n\
                 UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n",
                proxy_port = proxy.port(),
                key = key.display(),
            ),
        )?;
        let rig = Self {
            platform,
            sshd,
            dir,
        };
        // Warm: the workspace runs before anything is measured.
        let output = rig.ssh("proxy").arg("true").output().await?;
        anyhow::ensure!(
            output.status.success(),
            "the first login failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(rig)
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("ssh_config")
    }

    fn ssh(&self, host: &str) -> Command {
        let mut command = Command::new("ssh");
        command.arg("-F").arg(self.config()).arg(host);
        command
    }

    /// Stops both.
    pub async fn stop(mut self) {
        let _ = self.sshd.kill().await;
        // The workspace's pod and volumes go too.
        let pods = std::process::Command::new("podman")
            .args(["pod", "ls", "-q", "--filter", "name=^bench-"])
            .env("CONTAINERS_CONF", k8shell_testkit::containers_conf())
            .output();
        if let Ok(pods) = pods {
            for pod in String::from_utf8_lossy(&pods.stdout).lines() {
                let _ = std::process::Command::new("podman")
                    .args(["pod", "rm", "-f", pod])
                    .env("CONTAINERS_CONF", k8shell_testkit::containers_conf())
                    .output();
            }
        }
        let volumes = std::process::Command::new("podman")
            .args(["volume", "ls", "-q", "--filter", "name=^bench-"])
            .env("CONTAINERS_CONF", k8shell_testkit::containers_conf())
            .output();
        if let Ok(volumes) = volumes {
            for volume in String::from_utf8_lossy(&volumes.stdout).lines() {
                let _ = std::process::Command::new("podman")
                    .args(["volume", "rm", "-f", volume])
                    .env("CONTAINERS_CONF", k8shell_testkit::containers_conf())
                    .output();
            }
        }
        let _ = self.platform.stop().await;
    }
}

/// Bytes per second of `head -c <bytes> /dev/zero` through `host`.
async fn bulk(rig: &Rig, host: &str, bytes: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut child = rig
        .ssh(host)
        .arg(format!("head -c {bytes} /dev/zero"))
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut buffer = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = stdout.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    child.wait().await?;
    anyhow::ensure!(total == bytes, "{host}: got {total} of {bytes} bytes");
    Ok(bytes as f64 / started.elapsed().as_secs_f64())
}

/// Throughput out of the workspace.
///
/// One transfer each varies by a third from run to run on a 2-core
/// machine (sshd alone measured 280 to 420 MiB/s), so both run `rounds`
/// times, alternating, and the medians are compared.
pub async fn throughput(rig: &Rig, bytes: u64, rounds: usize) -> anyhow::Result<Section> {
    let (mut baselines, mut ours) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        baselines.push(bulk(rig, "sshd", bytes).await?);
        ours.push(bulk(rig, "proxy", bytes).await?);
    }
    let median = |rates: &mut Vec<f64>| {
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    let (baseline_range, ours_range) = (range(&baselines), range(&ours));
    let baseline = median(&mut baselines);
    let ours = median(&mut ours);
    let mib = |rate: f64| format!("{:.0} MiB/s", rate / (1024.0 * 1024.0));
    Ok(Section {
        title: format!(
            "SSH bulk output, `head -c {} MiB /dev/zero`, median of {rounds} alternating runs",
            bytes >> 20
        ),
        rows: vec![[
            "throughput".into(),
            mib(ours),
            mib(baseline),
            format!("{:.2}×", ours / baseline),
            "≥ 0.8× OpenSSH".into(),
        ]],
        note: format!(
            "Both through Debian's `ssh` client (default cipher, chacha20-poly1305 or AES-GCM as negotiated) to `/dev/null`-like reading. Proxy: SSH to the proxy, gRPC over the workspace's unix socket to k8shelld, which runs the command in the podman container. Baseline: OpenSSH's sshd on loopback running the same command on the host. Runs ranged over {ours_range} (proxy) and {baseline_range} (sshd)."
        ),
    })
}

/// `low–high MiB/s` of `rates`.
fn range(rates: &[f64]) -> String {
    let mib = |rate: f64| rate / (1024.0 * 1024.0);
    let low = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let high = rates.iter().copied().fold(0.0, f64::max);
    format!("{:.0}–{:.0} MiB/s", mib(low), mib(high))
}

/// Time from starting `ssh host 'echo ready'` to its exit.
async fn connect_samples(rig: &Rig, host: &str, runs: usize) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let output = rig.ssh(host).arg("echo ready").output().await?;
        anyhow::ensure!(
            output.status.success() && output.stdout == b"ready\n",
            "{host}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        samples.push(started.elapsed());
    }
    samples.sort();
    Ok(samples)
}

/// Connect → first output on a warm workspace.
pub async fn connect(rig: &Rig, runs: usize) -> anyhow::Result<Section> {
    let baseline = connect_samples(rig, "sshd", runs).await?;
    let ours = connect_samples(rig, "proxy", runs).await?;
    Ok(Section {
        title: format!("SSH connect → command output, warm workspace ({runs} logins)"),
        rows: percentile_rows(&ours, &baseline, ["≤ 100 ms", ""]),
        note: "One `ssh host 'echo ready'` per sample, to its exit: TCP connect, key exchange, public-key login (identity), `session:start` and `ssh:exec` decisions (authz), the workspace token (identity), then k8shelld runs the command. Baseline: the same against sshd (which forks a process per connection and runs the command under the root account).".into(),
    })
}

async fn echo_samples(rig: &Rig, host: &str, keys: usize) -> anyhow::Result<Vec<Duration>> {
    // The remote terminal's line discipline echoes; `cat` keeps it open.
    let mut child = rig
        .ssh(host)
        .args(["-tt", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    // Let the shell settle: the first key is echoed once `cat` runs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut buffer = [0u8; 4096];
    let mut samples = Vec::with_capacity(keys);
    for i in 0..keys + 10 {
        let key = b'a' + (i % 26) as u8;
        let started = Instant::now();
        stdin.write_all(&[key]).await?;
        stdin.flush().await?;
        loop {
            let n = tokio::time::timeout(Duration::from_secs(10), stdout.read(&mut buffer))
                .await
                .map_err(|_| anyhow::anyhow!("{host}: no echo"))??;
            anyhow::ensure!(n > 0, "{host}: the session ended");
            if buffer[..n].contains(&key) {
                break;
            }
        }
        // The first keys warm the path up.
        if i >= 10 {
            samples.push(started.elapsed());
        }
    }
    let _ = child.kill().await;
    samples.sort();
    Ok(samples)
}

/// Keystroke echo through a PTY.
pub async fn echo(rig: &Rig, keys: usize) -> anyhow::Result<Section> {
    let baseline = echo_samples(rig, "sshd", keys).await?;
    let ours = echo_samples(rig, "proxy", keys).await?;
    Ok(Section {
        title: format!("SSH keystroke echo on a PTY ({keys} keys)"),
        rows: percentile_rows(&ours, &baseline, ["", "≤ 5 ms"]),
        note: "`ssh -tt host cat`: a byte written to the client, timed until the terminal's echo of it comes back. Proxy path: client → proxy → k8shelld Shell stream → PTY and back.".into(),
    })
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next().map(str::to_owned))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))
}

/// Sum of the RSS of sshd's processes (the listener and every session).
fn sshd_rss_kib() -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        if comm.trim() == "sshd" {
            total += rss_kib(pid).unwrap_or(0);
        }
    }
    Ok(total)
}

/// Opens `count` sessions (`ssh host 'echo up; exec sleep 600'`), waits
/// until each is up, returns the clients (kill them to close).
async fn open_sessions(rig: &Rig, host: &str, count: usize) -> anyhow::Result<Vec<Child>> {
    let mut clients = Vec::with_capacity(count);
    // In batches, so logins do not time out waiting for the CPU.
    for batch in (0..count).collect::<Vec<_>>().chunks(50) {
        let mut pending = Vec::new();
        for _ in batch {
            let mut child = rig
                .ssh(host)
                .arg("echo up; exec sleep 600")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
            pending.push(stdout);
            clients.push(child);
        }
        for mut stdout in pending {
            let mut line = [0u8; 3];
            tokio::time::timeout(Duration::from_secs(60), stdout.read_exact(&mut line))
                .await
                .map_err(|_| anyhow::anyhow!("{host}: a session did not come up"))??;
        }
    }
    Ok(clients)
}

/// Memory per idle session: the platform process's RSS growth (sshproxy
/// runs in it) against sshd's processes' RSS growth.
pub async fn idle_sessions(
    rig: &Rig,
    count: usize,
    baseline_count: usize,
) -> anyhow::Result<Section> {
    let before = sshd_rss_kib()?;
    let clients = open_sessions(rig, "sshd", baseline_count).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sshd_per = (sshd_rss_kib()?.saturating_sub(before)) as f64 / baseline_count as f64;
    drop(clients);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let me = std::process::id();
    let before = rss_kib(me)?;
    let clients = open_sessions(rig, "proxy", count).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(me)?;
    let ours = (after.saturating_sub(before)) as f64 / count as f64;
    drop(clients);
    Ok(Section {
        title: format!(
            "Memory per idle SSH session ({count} sessions through the proxy, {baseline_count} through sshd)"
        ),
        rows: vec![[
            "RSS per idle session".into(),
            format!("{ours:.0} KiB"),
            format!("{sshd_per:.0} KiB"),
            format!("{:.2}×", ours / sshd_per),
            "≤ 256 KiB".into(),
        ]],
        note: format!(
            "Each session: `ssh host 'echo up; exec sleep 600'`, counted once its output arrived, all open at once. Proxy: growth of the process running the whole embedded platform (sshproxy with its connection, channel and k8shelld stream; identity and authz after the logins) from {before} KiB to {after} KiB, divided by the sessions; the programs in the workspace are not counted. Baseline: growth of the RSS summed over all sshd processes (a privileged monitor and an unprivileged child per connection)."
        ),
    })
}

/// Runs every SSH benchmark.
pub async fn all(quick: bool) -> anyhow::Result<Vec<Section>> {
    let rig = Box::pin(Rig::start()).await?;
    let bytes: u64 = if quick { 64 << 20 } else { 1 << 30 };
    let result = async {
        Ok::<_, anyhow::Error>(vec![
            throughput(&rig, bytes, if quick { 1 } else { 5 }).await?,
            connect(&rig, if quick { 10 } else { 50 }).await?,
            echo(&rig, if quick { 50 } else { 500 }).await?,
            idle_sessions(
                &rig,
                if quick { 50 } else { 1000 },
                if quick { 20 } else { 100 },
            )
            .await?,
        ])
    }
    .await;
    rig.stop().await;
    result
}
