//! The SSH proxy end to end: Debian's OpenSSH clients (ssh, scp, sftp,
//! rsync, ssh-agent) against the whole platform as `k8shell up` starts it,
//! with real podman workspaces, identity, authz and the provisioner.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use futures::StreamExt as _;
use k8shell_proto::identity::v1 as identity;
use k8shell_proto::identity::v1::identity_service_client::IdentityServiceClient;
use k8shell_proto::provisioner::v1 as provisioner;
use k8shell_proto::provisioner::v1::provisioner_service_client::ProvisionerServiceClient;
use k8shell_testkit::TestPlatform;
use tokio::process::Command;

/// A user with a key pair and an ssh_config pointing at the proxy. Its
/// name is unique to the run (workspace and podman pod names derive from
/// it, tests run side by side, and a failed run's pods must not get in the
/// next one's way); its pods and volumes go when it drops.
struct SshUser {
    dir: tempfile::TempDir,
    name: String,
}

impl Drop for SshUser {
    fn drop(&mut self) {
        k8shell_testkit::remove_workspaces_of(&self.name);
    }
}

/// `<base><6 hex digits>`: a user name no other run uses.
fn unique(base: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{base}{:06x}", (nanos ^ std::process::id()) & 0xff_ffff)
}

impl SshUser {
    fn key(&self) -> PathBuf {
        self.dir.path().join("id_ed25519")
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("ssh_config")
    }

    /// `ssh -F <config> <args>`.
    fn ssh(&self) -> Command {
        let mut command = Command::new("ssh");
        command.arg("-F").arg(self.config());
        command
    }

    /// `ssh` logging in with `method` (password or keyboard-interactive),
    /// whose prompts the `askpass` program answers.
    fn with_askpass(&self, askpass: &Path, method: &str) -> Command {
        let mut command = self.ssh();
        command
            .args(["-o", "BatchMode=no", "-o", "PubkeyAuthentication=no", "-o"])
            .arg(format!("PreferredAuthentications={method}"))
            .env("SSH_ASKPASS", askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", ":0")
            .stdin(std::process::Stdio::null());
        command
    }

    fn tool(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.arg("-F").arg(self.config());
        command
    }
}

async fn identity_client(
    platform: &TestPlatform,
) -> IdentityServiceClient<tonic::transport::Channel> {
    IdentityServiceClient::connect(platform.url("identity", "grpc"))
        .await
        .unwrap()
}

/// Creates a user named `base` + a unique suffix (password `correct
/// horse`) with a fresh ed25519 key.
async fn user(platform: &TestPlatform, base: &str) -> SshUser {
    let user = ssh_user(platform, base);
    let name = &user.name;
    let public = std::fs::read_to_string(user.key().with_extension("pub")).unwrap();
    let mut identity = identity_client(platform).await;
    identity
        .create_user(identity::CreateUserRequest {
            username: name.into(),
            password: "correct horse".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    identity
        .add_ssh_key(identity::AddSshKeyRequest {
            username: name.into(),
            public_key: public.trim().into(),
        })
        .await
        .unwrap();
    user
}

/// A key pair and an ssh_config for `base` + a unique suffix, whom
/// identity does not know (yet).
fn ssh_user(platform: &TestPlatform, base: &str) -> SshUser {
    let name = &unique(base);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id_ed25519");
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(status.success());
    let ssh = platform.platform().listener("sshproxy", "ssh").unwrap();
    std::fs::write(
        dir.path().join("ssh_config"),
        format!(
            "Host proxy\n  HostName 127.0.0.1\n  Port {port}\n  User {name}~dev\n  IdentityFile {key}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile {known}\n  BatchMode yes\n  LogLevel ERROR\n  ConnectTimeout 10\n",
            port = ssh.port(),
            key = key.display(),
            known = dir.path().join("known_hosts").display(),
        ),
    )
    .unwrap();
    SshUser {
        dir,
        name: name.clone(),
    }
}

/// An executable `SSH_ASKPASS` program named `name` in `user`'s directory
/// running the shell `script`.
fn askpass(user: &SshUser, name: &str, script: &str) -> PathBuf {
    let path = user.dir.path().join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn check(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({:?}):\nstdout: {}\nstderr: {}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
}

async fn run(command: &mut Command) -> Output {
    tokio::time::timeout(Duration::from_secs(240), command.output())
        .await
        .expect("the command did not finish in 4 minutes")
        .unwrap()
}

async fn run_with_input(command: &mut Command, input: &[u8]) -> Output {
    use tokio::io::AsyncWriteExt as _;
    command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).await.unwrap();
    drop(stdin);
    tokio::time::timeout(Duration::from_secs(240), child.wait_with_output())
        .await
        .expect("the command did not finish in 4 minutes")
        .unwrap()
}

async fn events(platform: &TestPlatform, subject: &str) -> async_nats::Subscriber {
    let state = k8shell_platform::PlatformState::read(platform.dir())
        .unwrap()
        .unwrap();
    let nats = async_nats::connect(state.nats_url).await.unwrap();
    nats.subscribe(subject.to_owned()).await.unwrap()
}

async fn next_event(events: &mut async_nats::Subscriber, event_type: &str) -> serde_json::Value {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let message = events.next().await.unwrap();
            let envelope: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
            if envelope["type"] == event_type {
                return envelope;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {event_type} event"))
}

#[tokio::test]
async fn openssh_clients_work_through_the_proxy() {
    let platform = TestPlatform::start_with_workspaces().await.unwrap();
    let alice = user(&platform, "alice").await;
    let mut sessions = events(&platform, "k8shell.evt.session.>").await;

    // Exec with exit code and stderr; the first connection cold-starts the
    // workspace and shows the progress on stderr.
    let output = run(alice
        .ssh()
        .args(["proxy", "echo out; echo err >&2; exit 3"]))
    .await;
    assert_eq!(output.status.code(), Some(3), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "out\n");
    let stderr = text(&output.stderr);
    assert!(stderr.contains("err"), "{stderr}");
    assert!(
        stderr.contains(&format!("k8shell: workspace {}-", alice.name)),
        "{stderr}"
    );

    let started = next_event(&mut sessions, "k8shell.session.started.v1").await;
    assert_eq!(started["data"]["username"], alice.name.as_str());
    assert_eq!(started["data"]["auth_method"], "publickey");
    assert!(
        started["data"]["client_version"]
            .as_str()
            .unwrap()
            .starts_with("SSH-2.0-OpenSSH"),
        "{started}"
    );
    let ended = next_event(&mut sessions, "k8shell.session.ended.v1").await;
    assert_eq!(ended["data"]["channels"]["exec"], 1);
    assert!(ended["data"]["bytes_out"].as_u64().unwrap() >= 4);

    // UpdateHostKeys: a client that trusts only the proxy's ed25519 key
    // learns its ECDSA and RSA keys (announced with hostkeys-00, each
    // proven with hostkeys-prove-00 before OpenSSH writes it down). With
    // compression on: the announcement travels after authentication, when
    // zlib@openssh.com's delayed compression has begun.
    let host_key = |file: &str| {
        let output = std::process::Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(platform.dir().join("sshproxy").join(file))
            .output()
            .unwrap();
        assert!(output.status.success(), "{file}: {}", text(&output.stderr));
        text(&output.stdout).trim().to_owned()
    };
    let port = platform
        .platform()
        .listener("sshproxy", "ssh")
        .unwrap()
        .port();
    let known = alice.dir.path().join("known_hosts_ed25519");
    std::fs::write(
        &known,
        format!("[127.0.0.1]:{port} {}\n", host_key("ssh_host_ed25519_key")),
    )
    .unwrap();
    let output = run(alice
        .ssh()
        .args([
            "-C",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "UpdateHostKeys=yes",
            "-o",
        ])
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .args(["proxy", "true"]))
    .await;
    check(&output, "ssh with UpdateHostKeys");
    let learned = std::fs::read_to_string(&known).unwrap();
    for file in ["ssh_host_ecdsa_key", "ssh_host_rsa_key"] {
        let key = host_key(file);
        let blob = key.split_whitespace().nth(1).unwrap();
        assert!(learned.contains(blob), "{file} was not learned:\n{learned}");
    }

    // An interactive shell on a PTY, scripted through `ssh -tt`.
    let output = run_with_input(
        alice.ssh().args(["-tt", "proxy"]),
        b"echo \"tty=$(tty)\"; stty size; exit 5\n",
    )
    .await;
    let stdout = text(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(5),
        "{stdout}\n{}",
        text(&output.stderr)
    );
    assert!(stdout.contains("tty=/dev/pts/"), "{stdout}");
    // The blueprint's splash greets the interactive login.
    assert!(
        stdout.contains(&format!("k8shell workspace {}-", alice.name)),
        "{stdout}"
    );

    // scp (SFTP mode) up and down, sftp -b, rsync -e ssh.
    let local = alice.dir.path().join("upload.bin");
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&local, &payload).unwrap();
    let output = run(alice.tool("scp").arg(&local).arg("proxy:upload.bin")).await;
    check(&output, "scp upload");
    let back = alice.dir.path().join("back.bin");
    let output = run(alice.tool("scp").arg("proxy:upload.bin").arg(&back)).await;
    check(&output, "scp download");
    assert_eq!(std::fs::read(&back).unwrap(), payload);

    let batch = alice.dir.path().join("batch");
    std::fs::write(
        &batch,
        "mkdir dir\nput upload.bin dir/copy.bin\nls -l dir\nrm dir/copy.bin\nrmdir dir\n",
    )
    .unwrap();
    let output = run(alice
        .tool("sftp")
        .arg("-b")
        .arg(&batch)
        .arg("proxy")
        .current_dir(alice.dir.path()))
    .await;
    check(&output, "sftp -b");
    assert!(
        text(&output.stdout).contains("copy.bin"),
        "{}",
        text(&output.stdout)
    );

    let tree = alice.dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/a.txt"), "rsync me\n").unwrap();
    let output = run(Command::new("rsync")
        .arg("-a")
        .arg("-e")
        .arg(format!("ssh -F {}", alice.config().display()))
        .arg(format!("{}/", tree.display()))
        .arg("proxy:tree/"))
    .await;
    check(&output, "rsync -e ssh");
    let output = run(alice.ssh().args(["proxy", "cat tree/sub/a.txt"])).await;
    assert_eq!(text(&output.stdout), "rsync me\n");

    // A b64- user string reaches the same workspace.
    let encoded = base64_url(&format!("{}~dev", alice.name));
    let output = run(alice
        .ssh()
        .arg("-l")
        .arg(format!("b64-{encoded}"))
        .args(["proxy", "cat tree/sub/a.txt"]))
    .await;
    check(&output, "b64 user string");
    assert_eq!(text(&output.stdout), "rsync me\n");

    platform.stop().await.unwrap();
}

#[tokio::test]
async fn forwards_agent_and_policy_through_the_proxy() {
    let platform = TestPlatform::start_with_workspaces().await.unwrap();
    // Each test its own user: workspace (and podman pod) names derive from
    // the user and blueprint, and the tests run side by side.
    let alice = user(&platform, "erin").await;

    // An HTTP server in the workspace, reached with -L and with -W.
    let mut server = alice
        .ssh()
        .args([
            "proxy",
            "mkdir -p www && echo hello-from-workspace > www/index.html && cd www && exec python3 -m http.server 8000 --bind 127.0.0.1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let port = free_port();
    let mut forward = alice
        .ssh()
        .args([
            "-N",
            "-L",
            &format!("127.0.0.1:{port}:127.0.0.1:8000"),
            "proxy",
        ])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let body = http_get_eventually(port).await;
    assert!(body.contains("hello-from-workspace"), "{body}");
    forward.kill().await.unwrap();

    let output = run_with_input(
        alice.ssh().args(["-W", "127.0.0.1:8000", "proxy"]),
        b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(
        text(&output.stdout).contains("hello-from-workspace"),
        "{}\n{}",
        text(&output.stdout),
        text(&output.stderr)
    );

    // Policy: forwarding beyond the workspace's loopback is refused, with
    // the reason.
    // (OpenSSH prints a channel's open-failure reason at INFO.)
    let output = run_with_input(
        alice
            .ssh()
            .args(["-o", "LogLevel=INFO", "-W", "10.0.0.5:22", "proxy"]),
        b"",
    )
    .await;
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("forwarding to 10.0.0.5 is not allowed"),
        "{stderr}"
    );
    server.kill().await.unwrap();

    // A remote forward: a port in the workspace reaches a server here.
    let laptop = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let laptop_port = laptop.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt as _;
        while let Ok((mut stream, _)) = laptop.accept().await {
            let _ = stream.write_all(b"pong-from-laptop\n").await;
        }
    });
    let output = run(alice.ssh().args([
        "-o",
        "ExitOnForwardFailure=yes",
        "-R",
        &format!("127.0.0.1:9100:127.0.0.1:{laptop_port}"),
        "proxy",
        "exec 3<>/dev/tcp/127.0.0.1/9100 && head -1 <&3",
    ]))
    .await;
    check(&output, "ssh -R");
    assert_eq!(text(&output.stdout), "pong-from-laptop\n");

    // A unix socket in the workspace, forwarded to one here
    // (direct-streamlocal@openssh.com).
    let mut socket_server = alice
        .ssh()
        .args([
            "proxy",
            "exec python3 -c \"import os, socket; p = '/tmp/echo.sock'; os.path.exists(p) and os.remove(p); s = socket.socket(socket.AF_UNIX); s.bind(p); s.listen(); c, _ = s.accept(); c.sendall(b'unix-hello\\n'); c.close()\"",
        ])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let local_socket = alice.dir.path().join("forwarded.sock");
    let mut socket_forward = alice
        .ssh()
        .arg("-N")
        .arg("-L")
        .arg(format!("{}:/tmp/echo.sock", local_socket.display()))
        .arg("proxy")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let greeting = unix_read_eventually(&local_socket).await;
    assert_eq!(greeting, "unix-hello\n");
    socket_forward.kill().await.unwrap();
    let _ = socket_server.kill().await;

    // Agent forwarding: the key of a local agent is listed inside.
    let agent_dir = tempfile::tempdir().unwrap();
    let socket = agent_dir.path().join("agent.sock");
    let mut agent = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&socket)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for_path(&socket).await;
    let output = run(Command::new("ssh-add")
        .arg(alice.key())
        .env("SSH_AUTH_SOCK", &socket))
    .await;
    check(&output, "ssh-add");
    let output = run(alice
        .ssh()
        .args(["-A", "proxy", "ssh-add -l; echo \"sock=$SSH_AUTH_SOCK\""])
        .env("SSH_AUTH_SOCK", &socket))
    .await;
    check(&output, "ssh -A");
    let stdout = text(&output.stdout);
    assert!(stdout.contains("ED25519"), "{stdout}");
    assert!(stdout.contains("sock=/tmp/k8shell-ssh-"), "{stdout}");
    agent.kill().await.unwrap();

    platform.stop().await.unwrap();
}

#[tokio::test]
async fn logins_certificates_cold_start_and_refusals() {
    let platform = TestPlatform::start_with_workspaces().await.unwrap();
    let alice = user(&platform, "frank").await;
    let bob = user(&platform, "bob").await;
    let mut identity = identity_client(&platform).await;

    // Certificate login: a certificate from identity's user CA, with no
    // registered key behind it.
    let login = identity
        .password_login(identity::PasswordLoginRequest {
            username: alice.name.clone(),
            password: "correct horse".into(),
            source: "127.0.0.1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let other_key = alice.dir.path().join("id_cert");
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other_key)
        .status()
        .unwrap();
    assert!(status.success());
    let certificate = identity
        .issue_ssh_certificate(identity::IssueSshCertificateRequest {
            token: login.token.clone(),
            public_key: std::fs::read_to_string(other_key.with_extension("pub"))
                .unwrap()
                .trim()
                .into(),
            valid_seconds: 600,
        })
        .await
        .unwrap()
        .into_inner();
    let cert_path = alice.dir.path().join("id_cert-cert.pub");
    std::fs::write(&cert_path, format!("{}\n", certificate.certificate)).unwrap();
    let output = run(alice
        .ssh()
        .args(["-o", "IdentityFile=none", "-i"])
        .arg(&other_key)
        .arg("-o")
        .arg(format!("CertificateFile={}", cert_path.display()))
        .args(["proxy", "id -un"]))
    .await;
    check(&output, "certificate login");

    // Cold start from stopped: the next connection starts it again.
    let mut provisioner = ProvisionerServiceClient::connect(platform.url("provisioner", "grpc"))
        .await
        .unwrap();
    let workspaces = provisioner
        .list_workspaces(provisioner::ListWorkspacesRequest {
            username: alice.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .workspaces;
    let workspace = workspaces.first().unwrap().id.clone();
    provisioner
        .stop_workspace(provisioner::StopWorkspaceRequest {
            id: workspace.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_for_state(
        &mut provisioner,
        &workspace,
        provisioner::WorkspaceState::Stopped,
    )
    .await;
    let output = run(alice.ssh().args(["proxy", "echo back"])).await;
    check(&output, "cold start");
    assert_eq!(text(&output.stdout), "back\n");
    assert!(
        text(&output.stderr).contains("is provisioning")
            || text(&output.stderr).contains("is requested"),
        "{}",
        text(&output.stderr)
    );

    // Another user's workspace: refused with the reason.
    let output = run(bob
        .ssh()
        .arg("-l")
        .arg(format!("{}~ws={workspace}", bob.name))
        .args(["proxy", "true"]))
    .await;
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("permission denied"),
        "{}",
        text(&output.stderr)
    );

    // A bad user string says what is wrong.
    let output = run(alice.ssh().args(["-l", "Frank~", "proxy", "true"])).await;
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("bad user string"),
        "{}",
        text(&output.stderr)
    );

    // Repeated bad passwords: each is an ssh.auth_failed event.
    let mut failures = events(&platform, "k8shell.evt.ssh.>").await;
    let askpass = askpass(&alice, "askpass", "echo wrong-password");
    let output = run(alice.with_askpass(&askpass, "password").args([
        "-o",
        "NumberOfPasswordPrompts=3",
        "proxy",
        "true",
    ]))
    .await;
    assert!(!output.status.success());
    for _ in 0..3 {
        let failed = next_event(&mut failures, "k8shell.ssh.auth_failed.v1").await;
        assert_eq!(failed["data"]["method"], "password");
        assert_eq!(failed["data"]["source"], "127.0.0.1");
        assert_eq!(failed["data"]["username"], format!("{}~dev", alice.name));
    }

    // The right password works (keyboard-interactive as well).
    std::fs::write(&askpass, "#!/bin/sh\necho 'correct horse'\n").unwrap();
    for method in ["password", "keyboard-interactive"] {
        let output = run(alice
            .with_askpass(&askpass, method)
            .args(["proxy", "echo in"]))
        .await;
        check(&output, method);
        assert_eq!(text(&output.stdout), "in\n");
    }

    platform.stop().await.unwrap();
}

async fn wait_for_state(
    provisioner: &mut ProvisionerServiceClient<tonic::transport::Channel>,
    id: &str,
    state: provisioner::WorkspaceState,
) {
    for _ in 0..240 {
        let workspace = provisioner
            .get_workspace(provisioner::GetWorkspaceRequest {
                id: id.into(),
                min_version: 0,
            })
            .await
            .unwrap()
            .into_inner();
        if workspace.state() == state {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("workspace {id} never reached {state:?}");
}

fn base64_url(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = text.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        let digits = chunk.len() + 1;
        for i in 0..digits {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn http_get_eventually(port: u16) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    for _ in 0..240 {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let _ = stream
                .write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
                .await;
            let mut body = String::new();
            let _ = stream.read_to_string(&mut body).await;
            if body.contains("200") {
                return body;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("nothing answered on the forwarded port {port}");
}

/// Reads what the server behind a forwarded unix socket says, retrying
/// while the forward or the server is still starting.
async fn unix_read_eventually(path: &Path) -> String {
    use tokio::io::AsyncReadExt as _;
    for _ in 0..240 {
        if let Ok(mut stream) = tokio::net::UnixStream::connect(path).await {
            let mut text = String::new();
            let _ = stream.read_to_string(&mut text).await;
            if !text.is_empty() {
                return text;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("nothing answered on {}", path.display());
}

async fn wait_for_path(path: &Path) {
    for _ in 0..100 {
        if path.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} never appeared", path.display());
}

/// Behind a load balancer: with `proxy_protocol` on, the address in the
/// PROXY header is the client's (events carry it), and a connection
/// without a header is refused.
#[tokio::test]
async fn proxy_protocol_headers_name_the_client() {
    let platform = TestPlatform::start_with_workspaces().await.unwrap();
    let alice = user(&platform, "gina").await;
    let state = k8shell_platform::PlatformState::read(platform.dir())
        .unwrap()
        .unwrap();
    let keys = tempfile::tempdir().unwrap();
    let shutdown = k8shell_service::Shutdown::new();
    let behind_balancer = k8shell_sshproxy::start(
        k8shell_sshproxy::Config {
            ssh_addr: "127.0.0.1:0".parse().unwrap(),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            bus: k8shell_bus::BusConfig {
                url: state.nats_url.clone(),
                ..Default::default()
            },
            identity_url: platform.url("identity", "grpc"),
            authz_url: platform.url("authz", "grpc"),
            provisioner_url: platform.url("provisioner", "grpc"),
            host_key_dir: keys.path().to_owned(),
            proxy_protocol: true,
            ..Default::default()
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let port = behind_balancer.listener("ssh").unwrap().port();
    // The balancer: a PROXY v1 header, then the bytes both ways.
    let balancer = alice.dir.path().join("balancer.py");
    std::fs::write(
        &balancer,
        format!(
            "import socket, sys, threading\n\
             s = socket.create_connection(('127.0.0.1', {port}))\n\
             s.sendall(b'PROXY TCP4 192.0.2.7 127.0.0.1 50000 22\\r\\n')\n\
             def up():\n\
             \x20   while True:\n\
             \x20       d = sys.stdin.buffer.read1(65536)\n\
             \x20       if not d:\n\
             \x20           s.shutdown(socket.SHUT_WR)\n\
             \x20           return\n\
             \x20       s.sendall(d)\n\
             threading.Thread(target=up, daemon=True).start()\n\
             while True:\n\
             \x20   d = s.recv(65536)\n\
             \x20   if not d:\n\
             \x20       break\n\
             \x20   sys.stdout.buffer.write(d)\n\
             \x20   sys.stdout.buffer.flush()\n"
        ),
    )
    .unwrap();
    let mut sessions = events(&platform, "k8shell.evt.session.>").await;
    let output = run(alice.ssh().args([
        "-o",
        &format!("ProxyCommand=python3 {}", balancer.display()),
        "proxy",
        "echo through-the-balancer",
    ]))
    .await;
    check(&output, "ssh through the balancer");
    assert_eq!(text(&output.stdout), "through-the-balancer\n");
    let started = next_event(&mut sessions, "k8shell.session.started.v1").await;
    assert_eq!(started["data"]["client_address"], "192.0.2.7");

    // Straight in, without a header: refused.
    let output = run(alice
        .ssh()
        .args(["-o", &format!("Port={port}"), "proxy", "true"]))
    .await;
    assert!(!output.status.success());
    shutdown.trigger();
    behind_balancer.task.await.unwrap().unwrap();
    platform.stop().await.unwrap();
}

/// A session outliving its user token: the proxy logs in again with the
/// key the client proved to hold, so new channels keep working.
#[tokio::test]
async fn long_sessions_renew_the_login() {
    let platform = TestPlatform::start_with_workspaces_and(|config| {
        // Both lifetimes shorter than the renewal margin: every channel
        // needs a fresh workspace token, and the login's token is gone
        // after a few seconds.
        config.token_ttls = k8shell_platform::TokenTtls {
            user: Duration::from_secs(4),
            workspace: Duration::from_secs(4),
        };
    })
    .await
    .unwrap();
    let alice = user(&platform, "hana").await;
    let askpass = askpass(&alice, "askpass", "echo 'correct horse'");
    // Per login method, one connection, a first channel, a pause past the
    // token's life, then more channels on the same connection (a control
    // master multiplexes them, as VS Code does). The key login renews by
    // logging in again with the key; the password login, which the proxy
    // cannot repeat, through identity's RenewLogin before the token expires.
    let master = |method: &str, extra: &[&str]| {
        let mut command = match method {
            "publickey" => alice.ssh(),
            _ => alice.with_askpass(&askpass, method),
        };
        command
            .arg("-o")
            .arg(format!(
                "ControlPath={}",
                alice.dir.path().join(method).display()
            ))
            .args(extra);
        command
    };
    let methods = ["publickey", "password"];
    for method in methods {
        let output = run(&mut master(
            method,
            &[
                "-o",
                "ControlMaster=yes",
                "-o",
                "ControlPersist=60",
                "proxy",
                "echo first",
            ],
        ))
        .await;
        check(&output, &format!("first channel ({method})"));
    }
    // identity accepts a token up to 30 s past its expiry (clock skew).
    tokio::time::sleep(Duration::from_secs(40)).await;
    for method in methods {
        for round in 0..2 {
            let output = run(&mut master(
                method,
                &["-o", "ControlMaster=no", "proxy", "echo again"],
            ))
            .await;
            check(
                &output,
                &format!("channel {round} after the token expired ({method})"),
            );
            assert_eq!(text(&output.stdout), "again\n");
        }
        let _ = run(&mut master(method, &["-O", "exit", "proxy"])).await;
    }
    platform.stop().await.unwrap();
}

/// Unknown users onboard over SSH: keyboard-interactive shows the
/// provider's address and code, waits while they log in at a browser, and
/// lets them in as the account the provider vouched for.
#[tokio::test]
async fn unknown_users_onboard_with_the_device_flow() {
    use k8shell_identity::oidc::OnboardingAction;
    use tokio::io::AsyncBufReadExt as _;

    let unused_redirect = "http://127.0.0.1:9/callback";
    let provider = k8shell_testkit::TestOidcProvider::start(unused_redirect)
        .await
        .unwrap();
    let sign_in = k8shell_platform::SignIn {
        oidc_providers: vec![provider.identity_config(
            "corp",
            &[
                ("mallory*", OnboardingAction::Reject),
                ("*", OnboardingAction::Allow),
            ],
        )],
        ssh_onboarding_provider: "corp".into(),
    };
    let platform = TestPlatform::start_with_workspaces_and(move |config| config.sign_in = sign_in)
        .await
        .unwrap();
    let mut sessions = events(&platform, "k8shell.evt.session.>").await;

    // The provider's account decides who logs in: dave here.
    let dave = ssh_user(&platform, "dave");
    let output = device_login(&dave, &dave.name, "id -un").await;
    check(&output, "device-flow login");
    assert_eq!(text(&output.stdout), format!("{}\n", dave.name));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("k8shell login"), "{stderr}");
    let started = next_event(&mut sessions, "k8shell.session.started.v1").await;
    assert_eq!(started["data"]["username"], dave.name.as_str());
    assert_eq!(started["data"]["auth_method"], "oidc-device");
    let onboarded = identity_client(&platform)
        .await
        .get_user(identity::GetUserRequest {
            username: dave.name.clone(),
            min_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(onboarded.origin, "oidc:corp");

    // Logging in at the provider as somebody else does not open another
    // user's workspace.
    let erin = ssh_user(&platform, "erin");
    let output = device_login(&erin, &unique("frank"), "true").await;
    assert!(!output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).is_empty());
    platform.stop().await.unwrap();

    /// Runs `command` as `user`, logging in with the device flow: reads
    /// the instructions ssh prints, logs in at the provider as `login`
    /// with the code, then lets askpass press Enter.
    async fn device_login(user: &SshUser, login: &str, command: &str) -> Output {
        let approved = user.dir.path().join("approved");
        let askpass = askpass(
            user,
            "askpass-device",
            &format!(
                "while [ ! -e '{}' ]; do sleep 0.1; done\necho",
                approved.display()
            ),
        );
        let mut ssh = user.with_askpass(&askpass, "keyboard-interactive");
        // OpenSSH prints keyboard-interactive instructions at INFO.
        ssh.args(["-o", "LogLevel=INFO", "-o", "NumberOfPasswordPrompts=1"])
            .args(["proxy", command])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = ssh.spawn().unwrap();
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let mut shown = Vec::new();
        let (url, code) = tokio::time::timeout(Duration::from_secs(60), async {
            let mut url = None;
            while let Some(line) = lines.next_line().await.unwrap() {
                shown.push(line.clone());
                if let Some(rest) = line.strip_prefix("To log in, visit ") {
                    url = Some(rest.trim().to_owned());
                }
                if let Some(code) = line.strip_prefix("and enter the code ") {
                    return (
                        url.expect("the address comes first"),
                        code.trim().to_owned(),
                    );
                }
            }
            panic!("ssh ended without showing a code: {shown:?}");
        })
        .await
        .expect("no device code within a minute");
        let mut browser = k8shell_testkit::OidcBrowser::new(login).unwrap();
        let journey = browser
            .run(&url, "http://127.0.0.1:9/", Some(&code))
            .await
            .unwrap();
        assert!(
            matches!(journey, k8shell_testkit::Journey::DeviceApproved),
            "{journey:?}"
        );
        std::fs::write(&approved, "").unwrap();
        let rest = tokio::spawn(async move {
            let mut rest = String::new();
            while let Ok(Some(line)) = lines.next_line().await {
                rest.push_str(&line);
                rest.push('\n');
            }
            rest
        });
        let mut output = tokio::time::timeout(Duration::from_secs(240), child.wait_with_output())
            .await
            .expect("ssh did not finish in 4 minutes")
            .unwrap();
        output.stderr = format!("{}\n{}", shown.join("\n"), rest.await.unwrap()).into_bytes();
        output
    }
}

/// A blueprint that asks for recording gets its terminal sessions
/// recorded, keystrokes included, as `session.recording_*` events in
/// asciicast v2 form; other blueprints' sessions are not recorded.
#[tokio::test]
async fn blueprints_ask_for_recordings() {
    let platform = TestPlatform::start_with_workspaces().await.unwrap();
    let blueprints = platform.dir().join("blueprints");
    let dev = std::fs::read_to_string(blueprints.join("dev.yaml")).unwrap();
    assert!(dev.contains("\nname: dev\n"));
    std::fs::write(
        blueprints.join("recorded.yaml"),
        dev.replace("\nname: dev\n", "\nname: recorded\n") + "recording: input\n",
    )
    .unwrap();
    let mut provisioner = ProvisionerServiceClient::connect(platform.url("provisioner", "grpc"))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let listed = provisioner
                .list_blueprints(provisioner::ListBlueprintsRequest::default())
                .await
                .unwrap()
                .into_inner();
            if let Some(recorded) = listed.blueprints.iter().find(|b| b.name == "recorded") {
                assert_eq!(recorded.recording, "input");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the new blueprint was not loaded");

    let alice = user(&platform, "alice").await;
    let mut sessions = events(&platform, "k8shell.evt.session.>").await;
    let output = run_with_input(
        alice
            .ssh()
            .args(["-tt", "-l", &format!("{}~recorded", alice.name), "proxy"]),
        b"echo \"rec-$((6 * 7))\"; exit\n",
    )
    .await;
    check(&output, "recorded shell");
    assert!(text(&output.stdout).contains("rec-42"));

    let started = next_event(&mut sessions, "k8shell.session.started.v1").await;
    assert_eq!(started["data"]["record"], "input");
    let recording = next_event(&mut sessions, "k8shell.session.recording_started.v1").await;
    assert_eq!(recording["data"]["mode"], "input+output");
    let header: serde_json::Value =
        serde_json::from_str(recording["data"]["header"].as_str().unwrap()).unwrap();
    assert_eq!(header["version"], 2);
    let recording_id = recording["data"]["recording_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Chunks until the end, in order, without gaps.
    let mut lines = String::new();
    let mut seq = 0;
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let message = sessions.next().await.unwrap();
            let envelope: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
            let data = &envelope["data"];
            if data["recording_id"] != recording_id.as_str() {
                continue;
            }
            match envelope["type"].as_str().unwrap() {
                "k8shell.session.recording_chunk.v1" => {
                    assert_eq!(data["seq"], seq);
                    seq += 1;
                    lines.push_str(data["lines"].as_str().unwrap());
                }
                "k8shell.session.recording_ended.v1" => return envelope,
                _ => {}
            }
        }
    })
    .await
    .expect("the recording did not end");
    assert_eq!(ended["data"]["chunks"], seq);
    let (mut output, mut input) = (String::new(), String::new());
    for line in lines.lines() {
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        let data = event[2].as_str().unwrap();
        match event[1].as_str().unwrap() {
            "o" => output.push_str(data),
            "i" => input.push_str(data),
            _ => {}
        }
    }
    assert!(output.contains("rec-42"), "{output}");
    assert!(input.contains("echo \"rec-$((6 * 7))\""), "{input}");

    // The default blueprint asks for nothing: no recording.
    let output = run_with_input(alice.ssh().args(["-tt", "proxy"]), b"exit\n").await;
    check(&output, "unrecorded shell");
    let started = next_event(&mut sessions, "k8shell.session.started.v1").await;
    assert_eq!(started["data"]["record"], "none");
    let session_id = started["data"]["session_id"].clone();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let message = sessions.next().await.unwrap();
            let envelope: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
            if envelope["data"]["session_id"] != session_id {
                continue;
            }
            let kind = envelope["type"].as_str().unwrap();
            assert!(!kind.contains("recording"), "{envelope}");
            if kind == "k8shell.session.ended.v1" {
                break;
            }
        }
    })
    .await
    .expect("the unrecorded session did not end");
    platform.stop().await.unwrap();
}
