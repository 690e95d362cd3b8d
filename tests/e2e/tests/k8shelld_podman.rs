//! k8shelld as PID 1 in a podman container built from an image with no libc
//! (busybox-static), reached over a bind-mounted unix socket.
//!
//! Needs the static k8shelld that `scripts/test` builds (its path in
//! `K8SHELL_K8SHELLD_STATIC`), podman, and busybox-static; a missing piece
//! fails the test with what to do.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8shell_proto::k8shelld::v1::k8shelld_client::K8shelldClient;
use k8shell_proto::k8shelld::v1::{
    self as pb, ExecRequest, ExecStart, ShellRequest, ShellStart, exec_request, exec_response,
    shell_request, shell_response,
};
use k8shell_testkit::{TokenIssuer, bearer, unix_channel};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const WORKSPACE: &str = "e2e-1234567";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn podman(args: &[&str]) -> std::process::Output {
    Command::new("podman")
        .args(args)
        .env(
            "CONTAINERS_CONF",
            repo_root().join("deploy/local/containers.conf"),
        )
        .output()
        .expect("podman is installed (scripts/test installs it)")
}

fn static_k8shelld() -> PathBuf {
    let path = std::env::var_os("K8SHELL_K8SHELLD_STATIC")
        .map(PathBuf::from)
        .expect("K8SHELL_K8SHELLD_STATIC must name the static k8shelld; run ./scripts/test, which builds it");
    assert!(
        path.is_file(),
        "{} does not exist; run ./scripts/test",
        path.display()
    );
    path
}

/// A root filesystem with busybox-static only: no libc, no loader.
fn import_busybox_image(dir: &Path, tag: &str) {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.is_file(),
        "busybox-static is missing; scripts/test installs it"
    );
    let root = dir.join("rootfs");
    for sub in [
        "bin",
        "etc",
        "tmp",
        "proc",
        "sys",
        "dev",
        "run/k8shell",
        "root",
        "home",
    ] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    for applet in ["sh", "sleep", "cat", "echo", "id", "ls", "true", "stat"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        // No workspace user: k8shelld creates it at boot.
        "root:x:0:0:root:/root:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    let tar = dir.join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    let imported = podman(&["import", "-q", tar.to_str().unwrap(), tag]);
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
}

struct Container {
    name: String,
    /// A throw-away image to remove with the container.
    temporary_image: Option<String>,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.name]);
        if let Some(image) = &self.temporary_image {
            let _ = podman(&["rmi", "-f", image]);
        }
    }
}

async fn exec(
    client: &mut K8shelldClient<Channel>,
    token: &str,
    argv: &[&str],
    user: &str,
) -> (String, pb::ExitStatus) {
    let (tx, rx) = mpsc::channel(2);
    tx.send(ExecRequest {
        msg: Some(exec_request::Msg::Start(ExecStart {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            user: user.into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    drop(tx);
    let mut stream = client
        .exec(bearer(ReceiverStream::new(rx), token))
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        match message.msg.unwrap() {
            exec_response::Msg::Stdout(b) => out.extend(b),
            exec_response::Msg::Stderr(_) => {}
            exec_response::Msg::Exit(exit) => return (String::from_utf8(out).unwrap(), exit),
        }
    }
    panic!("no exit status");
}

#[tokio::test]
async fn k8shelld_is_pid_1_in_an_image_without_libc() {
    let dir = tempfile::tempdir().unwrap();
    let tag = format!("localhost/k8shell-e2e-busybox:{}", std::process::id());
    import_busybox_image(dir.path(), &tag);
    scenario(dir.path(), &tag, Some(tag.clone()), "busybox").await;
}

#[tokio::test]
async fn k8shelld_is_pid_1_in_the_debian_workspace_image() {
    let image = std::env::var("K8SHELL_WORKSPACE_IMAGE")
        .expect("K8SHELL_WORKSPACE_IMAGE must name the Debian workspace image; run ./scripts/test, which builds it");
    let dir = tempfile::tempdir().unwrap();
    scenario(dir.path(), &image, None, "debian").await;
}

/// Runs k8shelld as PID 1 in `image` and drives it from the host.
async fn scenario(dir: &Path, tag: &str, temporary_image: Option<String>, flavour: &str) {
    let binary = static_k8shelld();
    let id = std::process::id();
    let sockets = dir.join("run");
    std::fs::create_dir_all(&sockets).unwrap();
    let issuer = TokenIssuer::new("e2e").unwrap();
    std::fs::write(sockets.join("jwks.json"), issuer.jwks()).unwrap();
    std::fs::write(
        sockets.join("k8shelld.toml"),
        format!(
            "workspace_id = \"{WORKSPACE}\"\n\
             jwks_path = \"/run/k8shell/jwks.json\"\n\n\
             [bootstrap_user]\nname = \"dev\"\nuid = 1000\ngid = 1000\nsudo = true\n\n\
             [[init_scripts]]\nname = \"mark\"\nscript = \"echo ran-as-$(id -u) >> $HOME/init-ran\"\n"
        ),
    )
    .unwrap();
    let container = Container {
        name: format!("k8shell-e2e-{flavour}-{id}"),
        temporary_image,
    };
    let run = podman(&[
        "run",
        "-d",
        "--name",
        &container.name,
        "--network",
        "none",
        "-v",
        &format!("{}:/run/k8shell", sockets.display()),
        "-v",
        &format!("{}:/k8shelld:ro", binary.display()),
        // kbox is the same binary under another name.
        "-v",
        &format!("{}:/usr/local/bin/kbox:ro", binary.display()),
        "--entrypoint",
        "/k8shelld",
        tag,
        "--config",
        "/run/k8shell/k8shelld.toml",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let socket = sockets.join("k8shelld.sock");
    wait_for_socket(&socket, &container.name).await;
    let token = issuer.token("alice", WORKSPACE, 300);
    let mut client = K8shelldClient::new(unix_channel(&socket).await.unwrap());

    let (comm, exit) = exec(&mut client, &token, &["cat", "/proc/1/comm"], "").await;
    assert_eq!(
        (comm.trim(), exit.code),
        ("k8shelld", Some(0)),
        "k8shelld is PID 1"
    );
    let (uid, _) = exec(&mut client, &token, &["id", "-u"], "").await;
    assert_eq!(
        uid.trim(),
        "1000",
        "the bootstrapped user is the default account"
    );
    let (sudoers, _) = exec(
        &mut client,
        &token,
        &["cat", "/etc/sudoers.d/k8shell-dev"],
        "root",
    )
    .await;
    assert_eq!(sudoers, "dev ALL=(ALL) NOPASSWD:ALL\n");

    // A shell on a PTY.
    let (tx, rx) = mpsc::channel(8);
    tx.send(ShellRequest {
        msg: Some(shell_request::Msg::Start(ShellStart {
            argv: vec!["sh".into()],
            user: "dev".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    tx.send(ShellRequest {
        msg: Some(shell_request::Msg::Input(
            b"echo pty-$((40+2)); exit 5\n".to_vec(),
        )),
    })
    .await
    .unwrap();
    let mut stream = client
        .shell(bearer(ReceiverStream::new(rx), &token))
        .await
        .unwrap()
        .into_inner();
    let mut output = String::new();
    let code = loop {
        match stream.message().await.unwrap().unwrap().msg.unwrap() {
            shell_response::Msg::Output(bytes) => output.push_str(&String::from_utf8_lossy(&bytes)),
            shell_response::Msg::Exit(exit) => break exit.code,
            _ => {}
        }
    };
    assert!(output.contains("pty-42"), "{output:?}");
    assert_eq!(code, Some(5));

    // Orphans are reaped by PID 1.
    let (orphan, _) = exec(
        &mut client,
        &token,
        &["sh", "-c", "sleep 0.3 >/dev/null & echo $!"],
        "",
    )
    .await;
    let stat = format!("/proc/{}/stat", orphan.trim());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, exit) = exec(&mut client, &token, &["cat", &stat], "").await;
    assert_ne!(
        exit.code,
        Some(0),
        "the orphan {} was reaped, not left a zombie",
        orphan.trim()
    );

    // kbox works in an image without libc, as the workspace user, through
    // the local API.
    let (listing, exit) = exec(&mut client, &token, &["kbox", "--json", "uptime"], "").await;
    assert_eq!(exit.code, Some(0), "{listing}");
    let uptime: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert!(uptime["daemon_uptime_seconds"].is_u64());

    // Files written over SFTP belong to the workspace user.
    {
        use tokio::io::AsyncWriteExt;
        let sftp = k8shell_testkit::sftp_session(client.clone(), &token, "")
            .await
            .unwrap();
        let mut file = sftp.create("uploaded.txt").await.unwrap();
        file.write_all(b"via sftp\n").await.unwrap();
        file.shutdown().await.unwrap();
    }
    let (owner, _) = exec(
        &mut client,
        &token,
        &["stat", "-c", "%u:%g", "/home/dev/uploaded.txt"],
        "",
    )
    .await;
    assert_eq!(owner.trim(), "1000:1000", "owned by the workspace user");

    // The init script ran once, as the user; a restart does not rerun it.

    let marker = wait_for_file(&mut client, &token, "/home/dev/init-ran").await;
    assert_eq!(marker, "ran-as-1000\n");
    drop(client);
    let restart = podman(&["restart", "-t", "10", &container.name]);
    assert!(
        restart.status.success(),
        "{}",
        String::from_utf8_lossy(&restart.stderr)
    );
    wait_for_socket(&socket, &container.name).await;
    let mut client = K8shelldClient::new(unix_channel(&socket).await.unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (marker, _) = exec(&mut client, &token, &["cat", "/home/dev/init-ran"], "").await;
    assert_eq!(marker, "ran-as-1000\n", "not rerun after a restart");

    // podman stop sends SIGTERM to PID 1: a prompt exit, not the 10 s kill.
    let started = Instant::now();
    let stop = podman(&["stop", "-t", "10", &container.name]);
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "podman stop took {took:?}");
    let state = podman(&["inspect", "-f", "{{.State.ExitCode}}", &container.name]);
    assert_eq!(
        String::from_utf8_lossy(&state.stdout).trim(),
        "0",
        "k8shelld exited cleanly"
    );
}

async fn wait_for_socket(socket: &Path, container: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            return;
        }
        if Instant::now() > deadline {
            let logs = podman(&["logs", container]);
            panic!(
                "k8shelld did not listen within 20s; logs:\n{}{}",
                String::from_utf8_lossy(&logs.stdout),
                String::from_utf8_lossy(&logs.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for_file(client: &mut K8shelldClient<Channel>, token: &str, path: &str) -> String {
    for _ in 0..100 {
        let (contents, exit) = exec(client, token, &["cat", path], "").await;
        if exit.code == Some(0) {
            return contents;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{path} never appeared");
}
