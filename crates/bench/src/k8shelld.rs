//! k8shelld over its unix socket against doing the same thing locally:
//! PTY output throughput, Exec round trip, keystroke echo.

use std::time::{Duration, Instant};

use k8shell_proto::k8shelld::v1::k8shelld_client::K8shelldClient;
use k8shell_proto::k8shelld::v1::{
    ExecRequest, ExecStart, ShellRequest, ShellStart, TerminalSize, exec_request, exec_response,
    shell_request, shell_response,
};
use k8shell_service::Shutdown;
use k8shell_testkit::{TokenIssuer, bearer, unix_channel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::report::{Section, percentile_rows};

const WORKSPACE: &str = "bench-0000000";

pub struct Daemon {
    client: K8shelldClient<Channel>,
    token: String,
    shutdown: Shutdown,
    _dir: tempfile::TempDir,
}

pub async fn start() -> anyhow::Result<Daemon> {
    let dir = tempfile::tempdir()?;
    let issuer = TokenIssuer::new("bench")?;
    let socket = dir.path().join("k8shelld.sock");
    let shutdown = Shutdown::new();
    let config = k8shell_k8shelld::Config {
        admin_addr: "127.0.0.1:0".parse()?,
        socket_path: socket.clone(),
        workspace_id: WORKSPACE.into(),
        jwks: Some(issuer.jwks().to_owned()),
        state_dir: dir.path().join("state"),
        local_api_path: dir.path().join("local.sock"),

        ..Default::default()
    };
    k8shell_k8shelld::start(config, shutdown.clone()).await?;
    let client = K8shelldClient::new(unix_channel(&socket).await?);
    Ok(Daemon {
        client,
        token: issuer.token("bench", WORKSPACE, 3600),
        shutdown,
        _dir: dir,
    })
}

fn mib_per_sec(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1024.0 / 1024.0 / elapsed.as_secs_f64()
}

/// Output of `head -c <bytes> /dev/zero` on a PTY: through k8shelld, and
/// read from a local PTY directly.
pub async fn throughput(daemon: &Daemon, bytes: u64) -> anyhow::Result<Section> {
    let argv = [
        "head".to_owned(),
        "-c".to_owned(),
        bytes.to_string(),
        "/dev/zero".to_owned(),
    ];

    let (pty, pts) = pty_process::open()?;
    pty.resize(pty_process::Size::new(24, 80))?;
    let mut child = pty_process::Command::new(&argv[0])
        .args(&argv[1..])
        .spawn(pts)?;
    let (mut reader, _writer) = pty.into_split();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut direct_bytes = 0u64;
    let started = Instant::now();
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => direct_bytes += n as u64,
        }
    }
    let direct = mib_per_sec(direct_bytes, started.elapsed());
    child.wait().await?;

    let (tx, rx) = mpsc::channel(4);
    tx.send(ShellRequest {
        msg: Some(shell_request::Msg::Start(ShellStart {
            argv: argv.to_vec(),
            size: Some(TerminalSize { rows: 24, cols: 80 }),
            ..Default::default()
        })),
    })
    .await?;
    let started = Instant::now();
    let mut stream = daemon
        .client
        .clone()
        .shell(bearer(ReceiverStream::new(rx), &daemon.token))
        .await?
        .into_inner();
    let mut received = 0u64;
    while let Some(message) = stream.message().await? {
        match message.msg {
            Some(shell_response::Msg::Output(data)) => received += data.len() as u64,
            Some(shell_response::Msg::Exit(_)) => break,
            _ => {}
        }
    }
    let ours = mib_per_sec(received, started.elapsed());
    drop(tx);
    Ok(Section {
        title: format!("Shell output throughput, `head -c {bytes} /dev/zero`"),
        rows: vec![[
            "PTY output, MiB/s".into(),
            format!("{ours:.0}"),
            format!("{direct:.0}"),
            format!("{:.0}%", ours / direct * 100.0),
            "≥ 50% of the direct PTY".into(),
        ]],
        note: format!(
            "k8shell: Shell over gRPC on a unix socket, including the server-side terminal emulator that keeps \
             the screen for reattach ({received} bytes received). Baseline: the same command on a local PTY, \
             read directly ({direct_bytes} bytes)."
        ),
    })
}

/// Round trip of `true`: through k8shelld's Exec, and spawned locally.
pub async fn exec_round_trip(daemon: &Daemon, runs: usize) -> anyhow::Result<Section> {
    let mut direct = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        tokio::process::Command::new("true").status().await?;
        direct.push(started.elapsed());
    }
    let mut ours = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let (tx, rx) = mpsc::channel(1);
        tx.send(ExecRequest {
            msg: Some(exec_request::Msg::Start(ExecStart {
                argv: vec!["true".into()],
                ..Default::default()
            })),
        })
        .await?;
        drop(tx);
        let mut stream = daemon
            .client
            .clone()
            .exec(bearer(ReceiverStream::new(rx), &daemon.token))
            .await?
            .into_inner();
        while let Some(message) = stream.message().await? {
            if let Some(exec_response::Msg::Exit(_)) = message.msg {
                break;
            }
        }
        ours.push(started.elapsed());
    }
    direct.sort();
    ours.sort();
    Ok(Section {
        title: "Exec round trip of `true`".into(),
        rows: percentile_rows(&ours, &direct, ["≤ 5 ms", ""]),
        note: format!(
            "{runs} runs each. k8shell: an Exec stream (token check, spawn, stdout/stderr pumps, exit status) \
             over the unix socket. Baseline: `tokio::process::Command::new(\"true\").status()` in the benchmark."
        ),
    })
}

/// One keystroke to its echo: through k8shelld's Shell, and on a local PTY.
pub async fn keystroke_echo(daemon: &Daemon, keys: usize) -> anyhow::Result<Section> {
    // The line discipline echoes; `cat` only keeps the terminal open.
    let (pty, pts) = pty_process::open()?;
    let mut child = pty_process::Command::new("cat").spawn(pts)?;
    let (mut reader, mut writer) = pty.into_split();
    let mut direct = Vec::with_capacity(keys);
    let mut buffer = [0u8; 256];
    for i in 0..keys {
        let key = b'a' + (i % 26) as u8;
        let started = Instant::now();
        writer.write_all(&[key]).await?;
        loop {
            let n = reader.read(&mut buffer).await?;
            if buffer[..n].contains(&key) {
                break;
            }
        }
        direct.push(started.elapsed());
    }
    child.kill().await?;

    let (tx, rx) = mpsc::channel(8);
    tx.send(ShellRequest {
        msg: Some(shell_request::Msg::Start(ShellStart {
            argv: vec!["cat".into()],
            ..Default::default()
        })),
    })
    .await?;
    let mut stream = daemon
        .client
        .clone()
        .shell(bearer(ReceiverStream::new(rx), &daemon.token))
        .await?
        .into_inner();
    let mut ours = Vec::with_capacity(keys);
    for i in 0..keys {
        let key = b'a' + (i % 26) as u8;
        let started = Instant::now();
        tx.send(ShellRequest {
            msg: Some(shell_request::Msg::Input(vec![key])),
        })
        .await?;
        loop {
            match stream.message().await?.and_then(|m| m.msg) {
                Some(shell_response::Msg::Output(data)) if data.contains(&key) => break,
                Some(_) => {}
                None => anyhow::bail!("shell ended during the echo benchmark"),
            }
        }
        ours.push(started.elapsed());
    }
    tx.send(ShellRequest {
        msg: Some(shell_request::Msg::Signal("KILL".into())),
    })
    .await?;
    direct.sort();
    ours.sort();
    Ok(Section {
        title: "Keystroke echo through Shell".into(),
        rows: percentile_rows(&ours, &direct, ["", "≤ 2 ms"]),
        note: format!(
            "{keys} keystrokes, one at a time, each waiting for its echo. k8shell: Shell input → PTY → emulator → \
             Shell output over the unix socket. Baseline: the same on a local PTY."
        ),
    })
}

impl Daemon {
    pub fn stop(self) {
        self.shutdown.trigger();
    }
}
