//! k8shelld over its unix socket, with real processes and PTYs.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use k8shell_k8shelld::Config;
use k8shell_proto::k8shelld::v1::k8shelld_client::K8shelldClient;
use k8shell_proto::k8shelld::v1::{
    self as pb, ExecRequest, ExecStart, ShellAttach, ShellRequest, ShellStart, TerminalSize,
    exec_request, exec_response, shell_request, shell_response,
};
use k8shell_service::Shutdown;
use k8shell_testkit::{TokenIssuer, bearer, unix_channel};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Request, Streaming};

const WORKSPACE: &str = "alice-1a7fd88";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

struct Daemon {
    issuer: TokenIssuer,
    socket: std::path::PathBuf,
    shutdown: Shutdown,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    grpc_addr: Option<std::net::SocketAddr>,
    _dir: tempfile::TempDir,
}

async fn daemon(ttl: Duration) -> Daemon {
    daemon_with(|config| config.detached_ttl = ttl).await
}

async fn daemon_with(customize: impl FnOnce(&mut Config)) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TokenIssuer::new("k1").unwrap();
    let socket = dir.path().join("k8shelld.sock");
    let shutdown = Shutdown::new();
    let mut config = Config {
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        socket_path: socket.clone(),
        workspace_id: WORKSPACE.into(),
        jwks: Some(issuer.jwks().to_owned()),
        state_dir: dir.path().join("state"),
        local_api_path: dir.path().join("local.sock"),
        ..Config::default()
    };
    customize(&mut config);
    let running = k8shell_k8shelld::start(config, shutdown.clone())
        .await
        .unwrap();
    Daemon {
        issuer,
        socket,
        shutdown,
        grpc_addr: running.listener("grpc"),
        task: Some(running.task),
        _dir: dir,
    }
}

fn authorized<T>(message: T, token: &str) -> Request<T> {
    bearer(message, token)
}

impl Daemon {
    fn token(&self) -> String {
        self.issuer.token("alice", WORKSPACE, 300)
    }

    async fn client(&self) -> K8shelldClient<Channel> {
        K8shelldClient::new(unix_channel(&self.socket).await.unwrap())
    }

    async fn exec(
        &self,
        argv: &[&str],
        input: Option<&[u8]>,
    ) -> (Vec<u8>, Vec<u8>, pb::ExitStatus) {
        let (tx, rx) = mpsc::channel(8);
        tx.send(ExecRequest {
            msg: Some(exec_request::Msg::Start(ExecStart {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        if let Some(input) = input {
            tx.send(ExecRequest {
                msg: Some(exec_request::Msg::Stdin(input.to_vec())),
            })
            .await
            .unwrap();
            tx.send(ExecRequest {
                msg: Some(exec_request::Msg::CloseStdin(true)),
            })
            .await
            .unwrap();
        }
        let mut stream = self
            .client()
            .await
            .exec(authorized(ReceiverStream::new(rx), &self.token()))
            .await
            .unwrap()
            .into_inner();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(message) = stream.message().await.unwrap() {
            match message.msg.unwrap() {
                exec_response::Msg::Stdout(b) => out.extend(b),
                exec_response::Msg::Stderr(b) => err.extend(b),
                exec_response::Msg::Exit(exit) => return (out, err, exit),
            }
        }
        panic!("exec stream ended without an exit status");
    }

    /// Opens a Shell stream with `first` as its first request.
    async fn shell(
        &self,
        first: shell_request::Msg,
    ) -> (mpsc::Sender<ShellRequest>, Streaming<pb::ShellResponse>) {
        let (tx, rx) = mpsc::channel(64);
        tx.send(ShellRequest { msg: Some(first) }).await.unwrap();
        let stream = self
            .client()
            .await
            .shell(authorized(ReceiverStream::new(rx), &self.token()))
            .await
            .unwrap()
            .into_inner();
        (tx, stream)
    }
}

fn start(argv: &[&str]) -> shell_request::Msg {
    shell_request::Msg::Start(ShellStart {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        size: Some(TerminalSize { rows: 24, cols: 80 }),
        ..Default::default()
    })
}

fn attach(id: &str, read_only: bool) -> shell_request::Msg {
    shell_request::Msg::Attach(ShellAttach {
        session_id: id.into(),
        read_only,
        size: None,
    })
}

fn input(bytes: &str) -> ShellRequest {
    ShellRequest {
        msg: Some(shell_request::Msg::Input(bytes.as_bytes().to_vec())),
    }
}

/// Reads a new Shell stream up to its session announcement.
async fn started_session(stream: &mut Streaming<pb::ShellResponse>) -> (Screen, String) {
    let mut screen = Screen::new();
    screen
        .read(stream, Duration::from_secs(10), |s| s.session.is_some())
        .await;
    let id = screen
        .session
        .clone()
        .expect("the stream announced its session")
        .id;
    (screen, id)
}

/// A client-side terminal fed everything a stream delivers.
struct Screen {
    parser: vt100::Parser,
    bytes: Vec<u8>,
    exit: Option<pb::ExitStatus>,
    session: Option<pb::SessionInfo>,
    snapshot: Option<Vec<u8>>,
    error: Option<tonic::Status>,
}

impl Screen {
    fn new() -> Self {
        Self {
            parser: vt100::Parser::new(24.try_into().unwrap(), 80.try_into().unwrap(), 0),
            bytes: Vec::new(),
            exit: None,
            session: None,
            snapshot: None,
            error: None,
        }
    }

    /// Reads until `until` holds or `within` passes.
    async fn read(
        &mut self,
        stream: &mut Streaming<pb::ShellResponse>,
        within: Duration,
        until: impl Fn(&Self) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        while !until(self) {
            let Ok(next) = tokio::time::timeout_at(deadline, stream.message()).await else {
                return;
            };
            match next {
                Ok(Some(message)) => match message.msg.unwrap() {
                    shell_response::Msg::Session(info) => self.session = Some(info),
                    shell_response::Msg::Snapshot(bytes) => {
                        self.parser.process(&bytes);
                        self.snapshot = Some(bytes);
                    }
                    shell_response::Msg::Output(bytes) => {
                        self.parser.process(&bytes);
                        self.bytes.extend(bytes);
                    }
                    shell_response::Msg::Exit(exit) => self.exit = Some(exit),
                    shell_response::Msg::Detached(_) => return,
                },
                Ok(None) => return,
                Err(status) => {
                    self.error = Some(status);
                    return;
                }
            }
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    fn same_screen_as(&self, other: &Screen) -> bool {
        let (a, b) = (self.parser.screen(), other.parser.screen());
        a.contents() == b.contents()
            && a.cursor_position() == b.cursor_position()
            && a.alternate_screen() == b.alternate_screen()
    }
}

#[tokio::test]
async fn token_is_checked_on_every_call() {
    let daemon = daemon(Duration::from_secs(60)).await;
    let mut client = daemon.client().await;
    let call = |token: Option<String>| {
        let mut client = client.clone();
        async move {
            let mut request = Request::new(pb::GetActivityRequest {});
            if let Some(token) = token {
                request
                    .metadata_mut()
                    .insert("authorization", token.parse().unwrap());
            }
            client.get_activity(request).await
        }
    };
    assert!(
        call(Some(format!("Bearer {}", daemon.token())))
            .await
            .is_ok()
    );

    let other = TokenIssuer::new("k1").unwrap();
    let b64 = |v: &serde_json::Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let alg_none = format!(
        "{}.{}.",
        b64(&serde_json::json!({"alg": "none", "kid": "k1"})),
        b64(&serde_json::json!({"sub": "alice", "aud": WORKSPACE, "exp": now() + 300}))
    );
    let hs256 = jsonwebtoken::encode(
        &Header {
            kid: Some("k1".into()),
            ..Header::new(Algorithm::HS256)
        },
        &serde_json::json!({"sub": "alice", "aud": WORKSPACE, "exp": now() + 300}),
        &EncodingKey::from_secret(b"guessable"),
    )
    .unwrap();
    let cases = [
        ("missing", None),
        ("not bearer", Some(daemon.token())),
        (
            "expired",
            Some(format!(
                "Bearer {}",
                daemon.issuer.token("alice", WORKSPACE, -120)
            )),
        ),
        (
            "wrong audience",
            Some(format!(
                "Bearer {}",
                daemon.issuer.token("alice", "bob-0000000", 300)
            )),
        ),
        (
            "unknown kid",
            Some(format!(
                "Bearer {}",
                daemon.issuer.token_with_kid("k9", "alice", WORKSPACE, 300)
            )),
        ),
        (
            "bad signature",
            Some(format!("Bearer {}", other.token("alice", WORKSPACE, 300))),
        ),
        ("alg none", Some(format!("Bearer {alg_none}"))),
        ("hs256", Some(format!("Bearer {hs256}"))),
        ("garbage", Some("Bearer x.y.z".into())),
    ];
    for (name, token) in cases {
        let status = call(token).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{name}: {status:?}");
    }
    // Streaming RPCs are guarded too.
    let (tx, rx) = mpsc::channel::<ExecRequest>(1);
    drop(tx);
    let status = client
        .exec(Request::new(ReceiverStream::new(rx)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    daemon.shutdown.trigger();
}

#[tokio::test]
async fn exec_separates_streams_and_reports_exit() {
    let daemon = daemon(Duration::from_secs(60)).await;
    let (out, err, exit) = daemon
        .exec(&["sh", "-c", "echo out; echo err >&2; exit 3"], None)
        .await;
    assert_eq!(
        (out.as_slice(), err.as_slice(), exit.code),
        (&b"out\n"[..], &b"err\n"[..], Some(3))
    );

    let (out, _, exit) = daemon.exec(&["cat"], Some(b"hello\x00binary")).await;
    assert_eq!(
        out, b"hello\x00binary",
        "stdin reaches the process and EOF ends it"
    );
    assert_eq!(exit.code, Some(0));

    // Signals reach the process.
    let (tx, rx) = mpsc::channel(4);
    tx.send(ExecRequest {
        msg: Some(exec_request::Msg::Start(ExecStart {
            argv: vec!["sleep".into(), "30".into()],
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut stream = daemon
        .client()
        .await
        .exec(authorized(ReceiverStream::new(rx), &daemon.token()))
        .await
        .unwrap()
        .into_inner();
    tx.send(ExecRequest {
        msg: Some(exec_request::Msg::Signal("TERM".into())),
    })
    .await
    .unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(exec_response::Msg::Exit(exit)) =
                stream.message().await.unwrap().unwrap().msg
            {
                return exit;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!((exit.code, exit.signal.as_str()), (None, "TERM"));

    // A missing program is a clear error, not a hang.
    let (tx, rx) = mpsc::channel(1);
    tx.send(ExecRequest {
        msg: Some(exec_request::Msg::Start(ExecStart {
            argv: vec!["no-such-program-k8shell".into()],
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let status = daemon
        .client()
        .await
        .exec(authorized(ReceiverStream::new(rx), &daemon.token()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    daemon.shutdown.trigger();
}

#[tokio::test]
async fn shell_round_trip_and_exit_status() {
    let daemon = daemon(Duration::from_secs(60)).await;
    let (tx, mut stream) = daemon
        .shell(start(&["bash", "--norc", "--noprofile"]))
        .await;
    let mut screen = Screen::new();
    tx.send(input(
        "echo $((6 * 7))-marker session=$K8SHELL_SESSION_ID\n",
    ))
    .await
    .unwrap();
    screen
        .read(&mut stream, Duration::from_secs(10), |s| {
            s.text().contains("42-marker")
        })
        .await;
    assert!(screen.text().contains("42-marker"), "{:?}", screen.text());
    assert_eq!(screen.session.as_ref().unwrap().owner, "alice");
    let id = screen.session.as_ref().unwrap().id.clone();
    assert!(
        screen.text().contains(&format!("session={id}")),
        "the session knows its id: {:?}",
        screen.text()
    );
    tx.send(input("exit 7\n")).await.unwrap();
    screen
        .read(&mut stream, Duration::from_secs(10), |s| s.exit.is_some())
        .await;
    assert_eq!(screen.exit.unwrap().code, Some(7));
    daemon.shutdown.trigger();
}

#[tokio::test]
async fn reattach_returns_the_screen_drawn_while_detached() {
    let daemon = daemon(Duration::from_secs(60)).await;
    // top redraws on its own (every 0.2 s), so the screen changes while
    // no writer is attached.
    let (writer, mut writer_stream) = daemon
        .shell(shell_request::Msg::Start(ShellStart {
            argv: vec!["top".into(), "-d".into(), "0.2".into()],
            term: "xterm-256color".into(),
            size: Some(TerminalSize { rows: 24, cols: 80 }),
            ..Default::default()
        }))
        .await;
    let (_first, id) = started_session(&mut writer_stream).await;

    // An observer follows everything from here on.
    let (observer_tx, mut observer_stream) = daemon.shell(attach(&id, true)).await;
    let mut observer = Screen::new();
    observer
        .read(&mut observer_stream, Duration::from_secs(10), |s| {
            s.parser.screen().contents().contains("load average")
        })
        .await;
    assert!(
        observer.parser.screen().contents().contains("load average"),
        "top drew its screen"
    );

    // The writer leaves; top keeps drawing for a while.
    drop(writer);
    drop(writer_stream);
    observer
        .read(&mut observer_stream, Duration::from_millis(1200), |_| false)
        .await;

    // A new writer freezes top so the screen holds still, then leaves.
    let (freezer, mut freezer_stream) = daemon.shell(attach(&id, false)).await;
    freezer
        .send(ShellRequest {
            msg: Some(shell_request::Msg::Signal("STOP".into())),
        })
        .await
        .unwrap();
    let mut scratch = Screen::new();
    scratch
        .read(&mut freezer_stream, Duration::from_millis(300), |_| false)
        .await;
    drop(freezer);
    drop(freezer_stream);
    observer
        .read(&mut observer_stream, Duration::from_millis(700), |_| false)
        .await;

    // Reattach: the snapshot alone must reproduce what the observer's
    // terminal, fed every byte, shows.
    let (again, mut again_stream) = daemon.shell(attach(&id, false)).await;
    let mut reattached = Screen::new();
    reattached
        .read(&mut again_stream, Duration::from_secs(5), |s| {
            s.snapshot.is_some()
        })
        .await;
    assert!(reattached.snapshot.is_some());
    assert!(
        reattached.same_screen_as(&observer),
        "reattached:\n{}\nobserver:\n{}",
        reattached.parser.screen().contents(),
        observer.parser.screen().contents()
    );

    // The observer cannot write.
    observer_tx.send(input("q")).await.unwrap();
    observer
        .read(&mut observer_stream, Duration::from_secs(5), |s| {
            s.error.is_some()
        })
        .await;
    assert_eq!(
        observer.error.map(|e| e.code()),
        Some(Code::PermissionDenied)
    );

    // The writer resumes and quits top.
    again
        .send(ShellRequest {
            msg: Some(shell_request::Msg::Signal("CONT".into())),
        })
        .await
        .unwrap();
    again.send(input("q")).await.unwrap();
    reattached
        .read(&mut again_stream, Duration::from_secs(10), |s| {
            s.exit.is_some()
        })
        .await;
    assert_eq!(reattached.exit.map(|e| e.code), Some(Some(0)));
    daemon.shutdown.trigger();
}

#[tokio::test]
async fn two_observers_see_the_same_output() {
    let daemon = daemon(Duration::from_secs(60)).await;
    let (writer, mut writer_stream) = daemon
        .shell(start(&["bash", "--norc", "--noprofile"]))
        .await;
    let (_screen, id) = started_session(&mut writer_stream).await;
    let (_a_tx, mut a_stream) = daemon.shell(attach(&id, true)).await;
    let (_b_tx, mut b_stream) = daemon.shell(attach(&id, true)).await;
    let (mut a, mut b) = (Screen::new(), Screen::new());
    a.read(&mut a_stream, Duration::from_secs(2), |s| {
        s.snapshot.is_some()
    })
    .await;
    b.read(&mut b_stream, Duration::from_secs(2), |s| {
        s.snapshot.is_some()
    })
    .await;
    writer
        .send(input("echo observed-$((1+1))\n"))
        .await
        .unwrap();
    a.read(&mut a_stream, Duration::from_secs(5), |s| {
        s.text().contains("observed-2")
    })
    .await;
    b.read(&mut b_stream, Duration::from_secs(5), |s| {
        s.text().contains("observed-2")
    })
    .await;
    assert!(a.text().contains("observed-2") && b.text().contains("observed-2"));

    let sessions = daemon
        .client()
        .await
        .list_sessions(authorized(pb::ListSessionsRequest {}, &daemon.token()))
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].attached_clients, 3);
    assert!(sessions[0].has_writer);

    // DetachSession detaches every client; the session lives on.
    let detached = daemon
        .client()
        .await
        .detach_session(authorized(
            pb::DetachSessionRequest {
                session_id: id.clone(),
            },
            &daemon.token(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(detached.detached_clients, 3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let info = daemon
        .client()
        .await
        .list_sessions(authorized(pb::ListSessionsRequest {}, &daemon.token()))
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(info[0].attached_clients, 0);
    assert!(info[0].detached_since.is_some());
    daemon.shutdown.trigger();
}

#[tokio::test]
async fn detached_sessions_expire_after_their_ttl() {
    let daemon = daemon(Duration::from_millis(400)).await;
    let (writer, mut stream) = daemon.shell(start(&["sleep", "60"])).await;
    let mut screen = Screen::new();
    screen
        .read(&mut stream, Duration::from_secs(5), |s| s.session.is_some())
        .await;
    drop(writer);
    drop(stream);
    let mut client = daemon.client().await;
    let mut remaining = usize::MAX;
    for _ in 0..50 {
        remaining = client
            .list_sessions(authorized(pb::ListSessionsRequest {}, &daemon.token()))
            .await
            .unwrap()
            .into_inner()
            .sessions
            .len();
        if remaining == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(remaining, 0, "the detached session was reaped");
    let activity = client
        .get_activity(authorized(pb::GetActivityRequest {}, &daemon.token()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(activity.open_sessions, 0);
    daemon.shutdown.trigger();
}

/// `(state, ppid)` of a process, from /proc.
fn proc_state(pid: i32) -> Option<(String, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.to_owned();
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

#[tokio::test]
async fn orphaned_zombies_are_reaped() {
    let daemon = daemon(Duration::from_secs(60)).await;
    // The shell exits at once and leaves its background child behind.
    let (out, _, exit) = daemon
        .exec(&["sh", "-c", "sleep 0.5 >/dev/null & echo $!"], None)
        .await;
    assert_eq!(exit.code, Some(0));
    let orphan: i32 = String::from_utf8(out).unwrap().trim().parse().unwrap();
    let (_, parent) = proc_state(orphan).expect("the orphan is still sleeping");
    assert_eq!(
        parent,
        std::process::id() as i32,
        "orphans are adopted by k8shelld"
    );
    // Once it exits it must not linger as a zombie.
    let mut state = proc_state(orphan);
    for _ in 0..60 {
        state = proc_state(orphan);
        if state.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state, None, "the orphan was reaped");
    daemon.shutdown.trigger();
}

fn processes_with(marker: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(marker)
                })
                .unwrap_or(false)
        })
        .filter(|pid| proc_state(*pid).is_some_and(|(state, _)| state != "Z"))
        .collect()
}

#[tokio::test]
async fn stop_is_bounded_even_when_children_ignore_sigterm() {
    let mut daemon = daemon(Duration::from_secs(60)).await;
    let marker = format!("61.{}", std::process::id());
    let script = format!("trap '' TERM; echo ready; sleep {marker}");
    let (_tx, mut stream) = daemon.shell(start(&["sh", "-c", &script])).await;
    let mut screen = Screen::new();
    screen
        .read(&mut stream, Duration::from_secs(5), |s| {
            s.text().contains("ready")
        })
        .await;
    assert!(
        !processes_with(&marker).is_empty(),
        "the stubborn children run"
    );

    let started = std::time::Instant::now();
    daemon.shutdown.trigger();
    daemon.task.take().unwrap().await.unwrap().unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "stop took {took:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        processes_with(&marker).is_empty(),
        "the child ignoring SIGTERM was killed"
    );
}

async fn forward(
    daemon: &Daemon,
    host: &str,
    port: u16,
) -> Result<
    (
        mpsc::Sender<pb::PortForwardRequest>,
        Streaming<pb::PortForwardResponse>,
    ),
    tonic::Status,
> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(pb::PortForwardRequest {
        msg: Some(pb::port_forward_request::Msg::Start(pb::PortForwardStart {
            host: host.into(),
            port: port.into(),
        })),
    })
    .await
    .unwrap();
    let stream = daemon
        .client()
        .await
        .port_forward(authorized(ReceiverStream::new(rx), &daemon.token()))
        .await?
        .into_inner();
    Ok((tx, stream))
}

#[tokio::test]
async fn port_forward_reaches_loopback_only() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let daemon = daemon(Duration::from_secs(60)).await;
    // A tiny HTTP server on the workspace's loopback.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = vec![0u8; 1024];
        let n = socket.read(&mut request).await.unwrap();
        assert!(String::from_utf8_lossy(&request[..n]).starts_with("GET /hello"));
        socket
            .write_all(b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\nhello")
            .await
            .unwrap();
    });
    let (tx, mut stream) = forward(&daemon, "127.0.0.1", port).await.unwrap();
    tx.send(pb::PortForwardRequest {
        msg: Some(pb::port_forward_request::Msg::Data(
            b"GET /hello HTTP/1.0\r\n\r\n".to_vec(),
        )),
    })
    .await
    .unwrap();
    let mut response = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        response.extend(message.data);
    }
    let response = String::from_utf8(response).unwrap();
    assert!(
        response.starts_with("HTTP/1.0 200 OK") && response.ends_with("hello"),
        "{response}"
    );

    for denied in ["10.1.2.3", "169.254.169.254", "example.com"] {
        let status = forward(&daemon, denied, 80).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{denied}");
    }
    // Nothing listens on port 1: a clear error, not a hang.
    let status = forward(&daemon, "127.0.0.1", 1).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    daemon.shutdown.trigger();
}

#[tokio::test]
async fn ports_are_listed_and_watched_with_their_process() {
    let daemon = daemon(Duration::from_secs(60)).await;
    let mut client = daemon.client().await;
    let mut watch = client
        .watch_ports(authorized(
            pb::WatchPortsRequest { interval_ms: 100 },
            &daemon.token(),
        ))
        .await
        .unwrap()
        .into_inner();
    let initial = watch.message().await.unwrap().unwrap();
    assert!(initial.closed.is_empty());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = u32::from(listener.local_addr().unwrap().port());
    let listed = client
        .list_ports(authorized(pb::ListPortsRequest {}, &daemon.token()))
        .await
        .unwrap()
        .into_inner()
        .ports;
    let ours = listed
        .iter()
        .find(|p| p.port == port)
        .expect("our listener is listed");
    assert_eq!(ours.address, "127.0.0.1");
    assert_eq!(ours.pid, std::process::id() as i32, "owned by this process");
    assert!(!ours.process.is_empty());

    let opened = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let change = watch.message().await.unwrap().unwrap();
            if change.opened.iter().any(|p| p.port == port) {
                return;
            }
        }
    })
    .await;
    assert!(opened.is_ok(), "the watch reported the new port");
    drop(listener);
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let change = watch.message().await.unwrap().unwrap();
            if change.closed.iter().any(|p| p.port == port) {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the watch reported the closed port");
    daemon.shutdown.trigger();
}

#[tokio::test]
async fn system_info_reports_cpu_memory_mounts_and_uptime() {
    let daemon = daemon(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let info = daemon
        .client()
        .await
        .get_system_info(authorized(pb::GetSystemInfoRequest {}, &daemon.token()))
        .await
        .unwrap()
        .into_inner();
    let cpus = std::thread::available_parallelism().unwrap().get() as f64;
    assert!(
        info.cpu_limit > 0.0 && info.cpu_limit <= cpus,
        "{}",
        info.cpu_limit
    );
    assert!(info.memory_used_bytes > 0);
    let root = info
        .mounts
        .iter()
        .find(|m| m.path == "/")
        .expect("/ is listed");
    assert!(root.total_bytes > 0 && root.available_bytes <= root.total_bytes);
    assert!(
        info.mounts
            .iter()
            .all(|m| m.filesystem != "proc" && m.filesystem != "sysfs")
    );
    assert!(info.system_uptime_seconds > 0);
    assert!(info.daemon_uptime_seconds >= 1);
    assert_eq!(info.load_average.len(), 3);
    assert!(!info.hostname.is_empty());
    daemon.shutdown.trigger();
}

#[tokio::test]
async fn unix_sockets_forward_both_ways() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let daemon = daemon(Duration::from_secs(60)).await;
    let dir = tempfile::tempdir().unwrap();

    // Dial: an echo server on a socket in the workspace.
    let served = dir.path().join("echo.sock");
    let listener = tokio::net::UnixListener::bind(&served).unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buffer = [0u8; 64];
        let n = socket.read(&mut buffer).await.unwrap();
        socket.write_all(&buffer[..n]).await.unwrap();
    });
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::UnixSocketDialRequest {
        msg: Some(pb::unix_socket_dial_request::Msg::Path(
            served.display().to_string(),
        )),
    })
    .await
    .unwrap();
    tx.send(pb::UnixSocketDialRequest {
        msg: Some(pb::unix_socket_dial_request::Msg::Data(b"ping".to_vec())),
    })
    .await
    .unwrap();
    let mut stream = daemon
        .client()
        .await
        .unix_socket_dial(authorized(ReceiverStream::new(rx), &daemon.token()))
        .await
        .unwrap()
        .into_inner();
    let echoed = stream.message().await.unwrap().unwrap();
    assert_eq!(echoed.data, b"ping");
    drop(tx);

    // Listen: a process in the workspace connects to the socket (as an
    // agent client would); the caller claims the connection and answers.
    let agent = dir.path().join("agent/ssh-agent.sock");
    let mut client = daemon.client().await;
    let mut accepted = client
        .unix_socket_listen(authorized(
            pb::UnixSocketListenRequest {
                path: agent.display().to_string(),
                user: String::new(),
            },
            &daemon.token(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        accepted.message().await.unwrap().unwrap().connection_id,
        "",
        "listening"
    );
    let mode = std::fs::metadata(&agent).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let path = agent.clone();
    let inside = tokio::spawn(async move {
        let mut socket = tokio::net::UnixStream::connect(path).await.unwrap();
        socket.write_all(b"request").await.unwrap();
        let mut reply = vec![0u8; 5];
        socket.read_exact(&mut reply).await.unwrap();
        reply
    });
    let id = accepted.message().await.unwrap().unwrap().connection_id;
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::UnixSocketAcceptRequest {
        msg: Some(pb::unix_socket_accept_request::Msg::ConnectionId(
            id.clone(),
        )),
    })
    .await
    .unwrap();
    let mut connection = client
        .unix_socket_accept(authorized(ReceiverStream::new(rx), &daemon.token()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        connection.message().await.unwrap().unwrap().data,
        b"request"
    );
    tx.send(pb::UnixSocketAcceptRequest {
        msg: Some(pb::unix_socket_accept_request::Msg::Data(b"reply".to_vec())),
    })
    .await
    .unwrap();
    assert_eq!(inside.await.unwrap(), b"reply");

    // A connection can be claimed once; relative paths are refused.
    let (tx2, rx2) = mpsc::channel(1);
    tx2.send(pb::UnixSocketAcceptRequest {
        msg: Some(pb::unix_socket_accept_request::Msg::ConnectionId(id)),
    })
    .await
    .unwrap();
    let status = client
        .unix_socket_accept(authorized(ReceiverStream::new(rx2), &daemon.token()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = client
        .unix_socket_listen(authorized(
            pb::UnixSocketListenRequest {
                path: "relative.sock".into(),
                user: String::new(),
            },
            &daemon.token(),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Closing the listen stream removes the socket.
    drop(accepted);
    let mut gone = false;
    for _ in 0..50 {
        if !agent.exists() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "the socket is removed with its listener");
    daemon.shutdown.trigger();
}

fn script(name: &str, body: &str) -> k8shell_k8shelld::InitScript {
    k8shell_k8shelld::InitScript {
        name: name.into(),
        script: body.into(),
        as_root: false,
    }
}

async fn wait_scripts_settled(daemon: &Daemon, count: usize) -> Vec<pb::InitScriptStatus> {
    let mut client = daemon.client().await;
    for _ in 0..100 {
        let scripts = client
            .list_init_scripts(authorized(pb::ListInitScriptsRequest {}, &daemon.token()))
            .await
            .unwrap()
            .into_inner()
            .scripts;
        if scripts.len() == count
            && scripts
                .iter()
                .all(|s| s.state == "succeeded" || s.state == "failed")
        {
            return scripts;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("init scripts did not finish");
}

#[tokio::test]
async fn init_scripts_run_once_in_order_and_failures_are_visible() {
    let state = tempfile::tempdir().unwrap();
    let mark = state.path().join("mark");
    let scripts = vec![
        script("first", &format!("echo one >> {}", mark.display())),
        script("broken", "echo failing-on-purpose >&2; exit 3"),
        script("third", &format!("echo three >> {}", mark.display())),
    ];
    let state_dir = state.path().join("k8shelld");
    let mut first_boot = {
        let (scripts, state_dir) = (scripts.clone(), state_dir.clone());
        daemon_with(move |c| {
            c.init_scripts = scripts;
            c.state_dir = state_dir;
        })
        .await
    };
    let statuses = wait_scripts_settled(&first_boot, 3).await;
    let states: Vec<(&str, &str)> = statuses
        .iter()
        .map(|s| (s.name.as_str(), s.state.as_str()))
        .collect();
    assert_eq!(
        states,
        [
            ("first", "succeeded"),
            ("broken", "failed"),
            ("third", "succeeded")
        ]
    );
    assert_eq!(statuses[1].exit_code, Some(3));
    assert!(
        statuses[1].log_tail.contains("failing-on-purpose"),
        "{:?}",
        statuses[1].log_tail
    );
    assert_eq!(
        std::fs::read_to_string(&mark).unwrap(),
        "one\nthree\n",
        "in order, after a failure too"
    );
    first_boot.shutdown.trigger();
    first_boot.task.take().unwrap().await.unwrap().unwrap();

    // A restart with one more script runs only the new one.
    let mut more = scripts.clone();
    more.push(script(
        "fourth",
        &format!("echo four >> {}", mark.display()),
    ));
    let second_boot = daemon_with(move |c| {
        c.init_scripts = more;
        c.state_dir = state_dir;
    })
    .await;
    let statuses = wait_scripts_settled(&second_boot, 4).await;
    assert_eq!(statuses[3].state, "succeeded");
    assert_eq!(
        std::fs::read_to_string(&mark).unwrap(),
        "one\nthree\nfour\n",
        "nothing ran twice"
    );
    second_boot.shutdown.trigger();
}

fn app(
    name: &str,
    command: &[&str],
    restart: k8shell_k8shelld::RestartPolicy,
) -> k8shell_k8shelld::AppConfig {
    k8shell_k8shelld::AppConfig {
        name: name.into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        binary: None,
        install: None,
        install_as_root: false,
        port: None,
        protocol: "http".into(),
        restart,
        autostart: true,
        version: None,
        env: Default::default(),
    }
}

async fn apps(daemon: &Daemon) -> std::collections::HashMap<String, pb::App> {
    daemon
        .client()
        .await
        .list_apps(authorized(pb::ListAppsRequest {}, &daemon.token()))
        .await
        .unwrap()
        .into_inner()
        .apps
        .into_iter()
        .map(|a| (a.name.clone(), a))
        .collect()
}

async fn wait_app(daemon: &Daemon, name: &str, ok: impl Fn(&pb::App) -> bool) -> pb::App {
    for _ in 0..100 {
        if let Some(found) = apps(daemon).await.remove(name)
            && ok(&found)
        {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "app {name} never reached the expected state: {:?}",
        apps(daemon).await.get(name)
    );
}

#[tokio::test]
async fn apps_follow_their_restart_policies() {
    use k8shell_k8shelld::RestartPolicy::{Always, Never, OnFailure};
    let tools = tempfile::tempdir().unwrap();
    let tool = tools.path().join("mytool");
    let mut installable = app("installable", &[tool.to_str().unwrap(), "serve"], Always);
    installable.install = Some(format!(
        "echo installing; printf '#!/bin/sh\\necho mytool v1.2.3\\n[ \"$1\" = serve ] && exec sleep 60\\n' > {0} && chmod +x {0}",
        tool.display()
    ));
    installable.version = Some(k8shell_k8shelld::VersionProbe {
        command: vec![tool.display().to_string()],
        regex: r"v(\d+\.\d+\.\d+)".into(),
    });
    installable.port = Some(8080);
    let configs = vec![
        app("crasher", &["sh", "-c", "echo crashing; exit 4"], OnFailure),
        app("once", &["sh", "-c", "exit 0"], Never),
        app("server", &["sleep", "60"], Always),
        installable,
    ];
    let daemon = daemon_with(move |c| {
        c.apps = configs;
        c.app_restart_backoff = Duration::from_millis(100);
    })
    .await;

    // on-failure: restarted with growing backoff (100, 200, 400 ms ...).
    let started = std::time::Instant::now();
    // The 4th restart comes after 100 + 200 + 400 ms of backoff (300 ms
    // if the delay did not grow).
    let crasher = wait_app(&daemon, "crasher", |a| a.restarts >= 4).await;
    assert!(
        started.elapsed() >= Duration::from_millis(650),
        "backoff grows: {:?}",
        started.elapsed()
    );
    assert_eq!(crasher.last_exit_code, Some(4));
    let logs = daemon
        .client()
        .await
        .app_logs(authorized(
            pb::AppLogsRequest {
                name: "crasher".into(),
                tail_bytes: 0,
            },
            &daemon.token(),
        ))
        .await
        .unwrap()
        .into_inner()
        .data;
    assert!(String::from_utf8_lossy(&logs).matches("crashing").count() >= 3);

    // never: ran once, stays stopped.
    let once = wait_app(&daemon, "once", |a| {
        a.state == "stopped" && a.last_exit_code == Some(0)
    })
    .await;
    assert_eq!(once.restarts, 0);

    // always: running; stop keeps it stopped, start brings it back.
    wait_app(&daemon, "server", |a| a.state == "running" && a.pid > 0).await;
    let mut client = daemon.client().await;
    client
        .stop_app(authorized(
            pb::AppRequest {
                name: "server".into(),
            },
            &daemon.token(),
        ))
        .await
        .unwrap();
    let stopped = wait_app(&daemon, "server", |a| a.state == "stopped").await;
    assert_eq!(stopped.restarts, 0, "a requested stop is not a crash");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(apps(&daemon).await["server"].state, "stopped");
    client
        .start_app(authorized(
            pb::AppRequest {
                name: "server".into(),
            },
            &daemon.token(),
        ))
        .await
        .unwrap();
    wait_app(&daemon, "server", |a| a.state == "running").await;

    // Installed on first start because its binary was absent; version probed.
    let installed = wait_app(&daemon, "installable", |a| a.state == "running").await;
    assert_eq!(installed.version, "1.2.3");
    assert_eq!(
        (installed.port, installed.protocol.as_str()),
        (8080, "http")
    );

    let status = client
        .start_app(authorized(
            pb::AppRequest {
                name: "nope".into(),
            },
            &daemon.token(),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    daemon.shutdown.trigger();
}

fn kbox(socket: &std::path::Path, args: &[&str], uid: Option<u32>) -> (bool, String, String) {
    use std::os::unix::process::CommandExt;
    let mut binary = std::path::PathBuf::from(env!("CARGO_BIN_EXE_kbox"));
    if uid.is_some() {
        // Another user cannot reach the build directory under /root.
        let copy = socket.with_file_name("kbox");
        if !copy.exists() {
            std::fs::copy(&binary, &copy).unwrap();
        }
        binary = copy;
    }
    let mut command = std::process::Command::new(binary);

    command.args(args).env("KBOX_SOCKET", socket);
    if let Some(uid) = uid {
        command.uid(uid).gid(uid);
    }
    let output = command.output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn kbox_uses_the_local_api_and_strangers_are_refused() {
    use k8shell_k8shelld::RestartPolicy::Always;
    let daemon = daemon_with(|c| {
        c.apps = vec![app("server", &["sleep", "60"], Always)];
    })
    .await;
    let socket = daemon._dir.path().join("local.sock");
    // Let any uid reach the socket file, so the refusal below is k8shelld's.
    std::fs::set_permissions(
        daemon._dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    wait_app(&daemon, "server", |a| a.state == "running").await;

    let socket_for_blocking = socket.clone();
    let results = tokio::task::spawn_blocking(move || {
        let socket = socket_for_blocking;
        vec![
            kbox(&socket, &["apps", "list"], None),
            kbox(&socket, &["--json", "info"], None),
            kbox(&socket, &["apps", "stop", "server"], None),
            kbox(&socket, &["apps", "logs", "nope"], None),
            kbox(&socket, &["explode"], None),
            kbox(&socket, &["detach"], None),
            kbox(&socket, &["apps", "list"], Some(65534)),
        ]
    })
    .await
    .unwrap();
    let (ok, out, _) = &results[0];
    assert!(
        *ok && out.contains("server") && out.contains("running"),
        "{out}"
    );
    let (ok, out, _) = &results[1];
    let info: serde_json::Value = serde_json::from_str(out).unwrap();
    assert!(*ok && info["cpu_limit"].as_f64().unwrap() > 0.0, "{out}");
    assert!(results[2].0);
    wait_app(&daemon, "server", |a| a.state == "stopped").await;
    let (ok, _, err) = &results[3];
    assert!(!*ok && err.contains("no app"), "{err}");
    let (ok, _, err) = &results[4];
    assert!(!*ok && err.contains("usage"), "{err}");
    let (ok, _, err) = &results[5];
    assert!(
        !*ok && err.contains("not inside a k8shell session"),
        "{err}"
    );
    let (ok, _, err) = &results[6];

    assert!(
        !ok && err.contains("only the workspace user and root"),
        "a stranger is refused: {err}"
    );
    daemon.shutdown.trigger();
}

#[tokio::test]
async fn openssh_sftp_client_works_against_the_builtin_server() {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(home.path().join("local.txt"), b"uploaded bytes\n").unwrap();
    let batch = home.path().join("batch");
    std::fs::write(
        &batch,
        "put local.txt remote.txt\n\
         mkdir dir\n\
         rename remote.txt dir/moved.txt\n\
         ls -l dir\n\
         get dir/moved.txt back.txt\n\
         chmod 600 dir/moved.txt\n\
         rm dir/moved.txt\n\
         rmdir dir\n",
    )
    .unwrap();
    let server = format!("{} sftp-server", env!("CARGO_BIN_EXE_k8shelld"));
    let output = std::process::Command::new("sftp")
        .arg("-D")
        .arg(&server)
        .arg("-b")
        .arg(&batch)
        .current_dir(home.path())
        .env("HOME", home.path())
        .output()
        .expect("the OpenSSH sftp client is installed (openssh-client)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("moved.txt"),
        "ls shows the renamed file: {stdout}"
    );
    assert_eq!(
        std::fs::read(home.path().join("back.txt")).unwrap(),
        b"uploaded bytes\n"
    );
    assert!(
        !home.path().join("dir").exists(),
        "rm and rmdir took effect"
    );
}

#[tokio::test]
async fn sftp_over_grpc_with_a_real_client() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let daemon = daemon_with(|c| c.sftp_server = Some(env!("CARGO_BIN_EXE_k8shelld").into())).await;
    let work = tempfile::tempdir().unwrap();
    let base = work.path().display().to_string();

    let sftp = k8shell_testkit::sftp_session(daemon.client().await, &daemon.token(), "")
        .await
        .unwrap();
    sftp.create_dir(format!("{base}/d")).await.unwrap();
    let mut file = sftp.create(format!("{base}/d/a.bin")).await.unwrap();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    file.write_all(&payload).await.unwrap();
    file.shutdown().await.unwrap();
    drop(file);
    assert_eq!(std::fs::read(work.path().join("d/a.bin")).unwrap(), payload);

    let mut back = Vec::new();
    sftp.open(format!("{base}/d/a.bin"))
        .await
        .unwrap()
        .read_to_end(&mut back)
        .await
        .unwrap();
    assert_eq!(back, payload);
    let names: Vec<String> = sftp
        .read_dir(format!("{base}/d"))
        .await
        .unwrap()
        .map(|e| e.file_name())
        .collect();
    assert!(names.contains(&"a.bin".to_owned()), "{names:?}");
    assert_eq!(
        sftp.metadata(format!("{base}/d/a.bin"))
            .await
            .unwrap()
            .len(),
        payload.len() as u64
    );
    sftp.rename(format!("{base}/d/a.bin"), format!("{base}/d/b.bin"))
        .await
        .unwrap();
    assert!(
        sftp.metadata(format!("{base}/d/a.bin")).await.is_err(),
        "a missing file is an error"
    );
    sftp.remove_file(format!("{base}/d/b.bin")).await.unwrap();
    sftp.remove_dir(format!("{base}/d")).await.unwrap();
    assert!(!work.path().join("d").exists());
    daemon.shutdown.trigger();
}

#[tokio::test]
async fn own_logs_are_paged_and_followed() {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    // The single-threaded test runtime runs the daemon on this thread, so a
    // thread-local subscriber sees everything it logs.
    let buffer = k8shell_telemetry::LogBuffer::new(100);
    let subscriber = tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(buffer.clone())
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
    );
    let _guard = tracing::subscriber::set_default(subscriber);
    let daemon = daemon_with(move |c| c.log_buffer = Some(buffer)).await;
    let mut client = daemon.client().await;
    let mut stream = client
        .logs(authorized(
            pb::LogsRequest {
                tail_lines: 50,
                follow: true,
            },
            &daemon.token(),
        ))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("k8shelld serving")) {
        let next = tokio::time::timeout(Duration::from_secs(5), stream.message()).await;
        seen.push(
            next.expect("the tail holds the start-up lines")
                .unwrap()
                .unwrap()
                .line,
        );
    }

    // Something new to log: a refused call.
    let _ = client
        .get_activity(Request::new(pb::GetActivityRequest {}))
        .await;
    let followed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let line = stream.message().await.unwrap().unwrap().line;
            if line.contains("rejected call") {
                return line;
            }
        }
    })
    .await
    .expect("the follow stream delivers new lines");
    assert!(followed.contains("missing bearer token"), "{followed}");

    let socket = daemon._dir.path().join("local.sock");
    let (ok, out, err) = tokio::task::spawn_blocking(move || kbox(&socket, &["logs", "5"], None))
        .await
        .unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("rejected call"), "{out}");
    daemon.shutdown.trigger();
}

#[tokio::test]
async fn tcp_listener_requires_a_client_certificate_and_a_token() {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let pki = k8shell_testkit::test_pki().unwrap();
    let files = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: &str| {
        let path = files.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let tls = k8shell_k8shelld::TlsListener {
        addr: "127.0.0.1:0".parse().unwrap(),
        cert_path: write("server.pem", &pki.server_cert_pem),
        key_path: write("server.key", &pki.server_key_pem),
        client_ca_path: write("ca.pem", &pki.ca_pem),
    };
    let daemon = daemon_with(move |c| c.tls = Some(tls)).await;
    let url = format!("https://{}", daemon.grpc_addr.expect("a tcp listener"));

    let connect = |identity: Option<(String, String)>| {
        let url = url.clone();
        let ca = pki.ca_pem.clone();
        async move {
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost");
            if let Some((cert, key)) = identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            let channel = Endpoint::from_shared(url)
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await?;
            Ok::<_, tonic::transport::Error>(K8shelldClient::new(channel))
        }
    };
    let ours = Some((pki.client_cert_pem.clone(), pki.client_key_pem.clone()));
    let mut client = connect(ours.clone()).await.unwrap();
    client
        .get_activity(authorized(pb::GetActivityRequest {}, &daemon.token()))
        .await
        .expect("certificate and token: allowed");
    // As the provisioner and the SSH proxy reach k8shelld on Kubernetes:
    // the endpoint's host names the server.
    let shared = k8shell_service::daemon_channel::DaemonEndpoint::new(
        &format!("https://localhost:{}", daemon.grpc_addr.unwrap().port()),
        Some(&k8shell_service::daemon_channel::DaemonClientTls {
            ca_pem: pki.ca_pem.clone(),
            cert_pem: pki.client_cert_pem.clone(),
            key_pem: pki.client_key_pem.clone(),
        }),
    )
    .unwrap()
    .connect()
    .await
    .unwrap();
    K8shelldClient::new(shared)
        .get_activity(authorized(pb::GetActivityRequest {}, &daemon.token()))
        .await
        .expect("the shared client speaks mutual TLS");
    let status = client
        .get_activity(Request::new(pb::GetActivityRequest {}))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "the certificate alone is not enough"
    );

    // No client certificate, or one from another CA: the handshake fails.
    let stranger = k8shell_testkit::test_pki().unwrap();
    for identity in [
        None,
        Some((
            stranger.client_cert_pem.clone(),
            stranger.client_key_pem.clone(),
        )),
    ] {
        let refused = match connect(identity).await {
            Err(_) => true,
            Ok(mut client) => client
                .get_activity(authorized(pb::GetActivityRequest {}, &daemon.token()))
                .await
                .is_err(),
        };
        assert!(refused, "a client without a certificate from our CA got in");
    }
    daemon.shutdown.trigger();
}

#[tokio::test]
async fn kbox_attach_drives_a_session_from_a_local_terminal() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let daemon = daemon(Duration::from_secs(60)).await;
    let socket = daemon._dir.path().join("local.sock");
    let (_writer, mut writer_stream) = daemon
        .shell(start(&["bash", "--norc", "--noprofile"]))
        .await;
    let (mut original, id) = started_session(&mut writer_stream).await;

    // kbox attach in a terminal of its own.
    let (pty, pts) = pty_process::open().unwrap();
    pty.resize(pty_process::Size::new(24, 80)).unwrap();
    let mut attached = pty_process::Command::new(env!("CARGO_BIN_EXE_kbox"))
        .args(["attach", &id])
        .env("KBOX_SOCKET", &socket)
        .spawn(pts)
        .unwrap();
    let (mut terminal_out, mut terminal_in) = pty.into_split();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let collector = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut buffer = [0u8; 4096];
            while let Ok(n) = terminal_out.read(&mut buffer).await {
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&buffer[..n]);
            }
        })
    };
    let wait_for = |needle: &'static str| {
        let seen = seen.clone();
        async move {
            for _ in 0..200 {
                if String::from_utf8_lossy(&seen.lock().unwrap()).contains(needle) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            false
        }
    };
    // The original writer is displaced by kbox, which writes now.
    original
        .read(&mut writer_stream, Duration::from_secs(5), |_| false)
        .await;
    terminal_in
        .write_all(b"echo via-kbox-$((2+2))\r")
        .await
        .unwrap();
    assert!(
        wait_for("via-kbox-4").await,
        "{:?}",
        String::from_utf8_lossy(&seen.lock().unwrap())
    );

    // Detaching from elsewhere ends the attach; the session lives on.
    let socket_for_detach = socket.clone();
    let id_for_detach = id.clone();
    let (ok, _, err) = tokio::task::spawn_blocking(move || {
        kbox(&socket_for_detach, &["detach", &id_for_detach], None)
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    let status = tokio::time::timeout(Duration::from_secs(5), attached.wait())
        .await
        .expect("kbox attach exits when detached")
        .unwrap();
    assert!(status.success());
    assert!(wait_for("[detached").await);
    collector.abort();
    let sessions = daemon
        .client()
        .await
        .list_sessions(authorized(pb::ListSessionsRequest {}, &daemon.token()))
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(sessions.len(), 1, "the session outlives its clients");
    daemon.shutdown.trigger();
}

/// Identity rotates its keys; the platform pushes the new set, which only a
/// platform service may do, and which survives a daemon restart.
#[tokio::test]
async fn platform_services_replace_the_trusted_keys() {
    let mut daemon = daemon(Duration::from_secs(60)).await;
    let next = TokenIssuer::new("k2").unwrap();
    let activity = |token: String| {
        let socket = daemon.socket.clone();
        async move {
            let mut client = K8shelldClient::new(unix_channel(&socket).await.unwrap());
            client
                .get_activity(authorized(pb::GetActivityRequest {}, &token))
                .await
        }
    };
    let refused = activity(next.token("alice", WORKSPACE, 300))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);

    // Both keys, as identity publishes during an overlap.
    let both = {
        let mut a: serde_json::Value = serde_json::from_str(daemon.issuer.jwks()).unwrap();
        let b: serde_json::Value = serde_json::from_str(next.jwks()).unwrap();
        let keys = a["keys"].as_array_mut().unwrap();
        keys.extend(b["keys"].as_array().unwrap().iter().cloned());
        a.to_string()
    };
    let update = |token: String, jwks: String| {
        let socket = daemon.socket.clone();
        async move {
            let mut client = K8shelldClient::new(unix_channel(&socket).await.unwrap());
            client
                .update_jwks(authorized(pb::UpdateJwksRequest { jwks }, &token))
                .await
        }
    };
    let by_user = update(daemon.token(), both.clone()).await.unwrap_err();
    assert_eq!(by_user.code(), Code::PermissionDenied);
    let bad = update(
        daemon.issuer.token("system:provisioner", WORKSPACE, 300),
        "{\"keys\": []}".into(),
    )
    .await
    .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let kids = update(
        daemon.issuer.token("system:provisioner", WORKSPACE, 300),
        both,
    )
    .await
    .unwrap()
    .into_inner()
    .kids;
    assert_eq!(kids, vec!["k1".to_owned(), "k2".to_owned()]);
    activity(next.token("alice", WORKSPACE, 300)).await.unwrap();

    // Only the new key from here on; the old one stops verifying.
    update(
        next.token("system:provisioner", WORKSPACE, 300),
        next.jwks().to_owned(),
    )
    .await
    .unwrap();
    let old = activity(daemon.token()).await.unwrap_err();
    assert_eq!(old.code(), Code::Unauthenticated);

    // A restarted daemon keeps the pushed keys over its boot configuration.
    daemon.shutdown.trigger();
    daemon.task.take().unwrap().await.unwrap().unwrap();
    let dir = daemon._dir.path().to_owned();
    let shutdown = Shutdown::new();
    let running = k8shell_k8shelld::start(
        Config {
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            socket_path: daemon.socket.clone(),
            workspace_id: WORKSPACE.into(),
            jwks: Some(daemon.issuer.jwks().to_owned()),
            state_dir: dir.join("state"),
            local_api_path: dir.join("local.sock"),
            ..Config::default()
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    activity(next.token("alice", WORKSPACE, 300)).await.unwrap();
    shutdown.trigger();
    running.task.await.unwrap().unwrap();
}
