//! `k8shell up` as a user runs it: the real binary, private NATS and
//! PostgreSQL under a data directory, `k8shell status`, Ctrl-C, and a second
//! start that finds the first one's data.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8shell_proto::identity::v1::identity_service_client::IdentityServiceClient;
use k8shell_proto::provisioner::v1::provisioner_service_client::ProvisionerServiceClient;
use k8shell_proto::provisioner::v1::{CreateWorkspaceRequest, GetWorkspaceRequest};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_k8shell");

fn up(data_dir: &Path) -> Child {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["up", "--ephemeral-ports"])
        .env_remove("NATS_URL")
        .env_remove("DATABASE_URL")
        .env(
            "K8SHELL_BLUEPRINTS_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../blueprints"),
        )
        .env(
            "K8SHELL_POLICIES_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../policies"),
        )
        // No k8shelld to install: this test's workspace is recorded and its
        // provisioning fails fast instead of leaving a pod behind.
        .env_remove("K8SHELL_K8SHELLD_STATIC")
        // A home without ~/.ssh: the admin gets a generated key pair.
        .env("HOME", data_dir.join("home"))
        .env("K8SHELL_WORKSPACE_NETWORK", "none")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("k8shell up starts")
}

fn status(data_dir: &Path) -> (i32, serde_json::Value) {
    let output = Command::new(BIN)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["status", "--json"])
        .output()
        .unwrap();
    let json = serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
    (output.status.code().unwrap_or(-1), json)
}

fn wait_healthy(data_dir: &Path) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, json) = status(data_dir);
        if code == 0 {
            return json;
        }
        assert!(
            Instant::now() < deadline,
            "platform not healthy in 60s: {json}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn interrupt_and_time(child: &mut Child) -> (Duration, std::process::ExitStatus) {
    let started = Instant::now();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (started.elapsed(), status);
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "k8shell up ignored Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn up_reports_healthy_stops_within_five_seconds_and_keeps_data() {
    let dir = tempfile::Builder::new()
        .prefix("k8shell-up-")
        .tempdir()
        .unwrap();
    let (code, json) = status(dir.path());
    assert_eq!(code, 3, "not running yet: {json}");

    let mut first = up(dir.path());
    let health = wait_healthy(dir.path());
    let services: Vec<&str> = health["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    for expected in [
        "identity",
        "authz",
        "session",
        "provisioner",
        "sshproxy",
        "apiserver",
        "nfgate",
    ] {
        assert!(
            services.contains(&expected),
            "{expected} missing from {services:?}"
        );
    }
    assert!(
        health["services"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["ready"] == true)
    );
    // The SSH host keys users check at their first connection, as
    // ssh-keygen prints them.
    let host_keys = health["ssh_host_keys"].as_array().unwrap();
    assert_eq!(host_keys.len(), 3, "{health}");
    let keygen = Command::new("ssh-keygen")
        .args(["-l", "-E", "sha256", "-f"])
        .arg(dir.path().join("sshproxy/ssh_host_ed25519_key"))
        .output()
        .unwrap();
    assert!(keygen.status.success());
    let printed = String::from_utf8_lossy(&keygen.stdout);
    assert_eq!(host_keys[0]["algorithm"], "ssh-ed25519");
    assert!(
        printed.contains(host_keys[0]["sha256"].as_str().unwrap()),
        "{printed} vs {health}"
    );

    // A second `up` on the same data directory is refused with a clear error.
    let second = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["up", "--ephemeral-ports"])
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already running"));

    // The first start made an admin, with a key pair in the data directory.
    let mut identity = IdentityServiceClient::connect(listener_url(dir.path(), "identity", "grpc"))
        .await
        .unwrap();
    // It happens right after start-up, and the key list is a projection:
    // wait for both (bounded).
    let deadline = Instant::now() + Duration::from_secs(20);
    let (admin, keys) = loop {
        let admin = identity
            .get_user(k8shell_proto::identity::v1::GetUserRequest {
                username: "admin".into(),
                min_version: 0,
            })
            .await;
        let keys = identity
            .list_ssh_keys(k8shell_proto::identity::v1::ListSshKeysRequest {
                username: "admin".into(),
            })
            .await
            .map(|r| r.into_inner().keys)
            .unwrap_or_default();
        match admin {
            Ok(admin) if !keys.is_empty() => break (admin.into_inner(), keys),
            _ if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("no admin with a key after 20 s: {other:?} {keys:?}"),
        }
    };
    assert_eq!(admin.roles, ["admin"]);
    let generated = std::fs::read_to_string(dir.path().join("admin_ed25519.pub")).unwrap();
    assert_eq!(keys.len(), 1);
    assert!(
        generated.starts_with(&keys[0].public_key),
        "{generated} vs {keys:?}"
    );
    drop(identity);

    let mut client = ProvisionerServiceClient::connect(grpc_address(dir.path()))
        .await
        .unwrap();
    let created = client
        .create_workspace(CreateWorkspaceRequest {
            username: "carol".into(),
            blueprint: "dev".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    client
        .get_workspace(GetWorkspaceRequest {
            id: created.id.clone(),
            min_version: created.version,
        })
        .await
        .unwrap();
    drop(client);

    let (took, exit) = interrupt_and_time(&mut first);
    assert!(exit.success(), "clean exit: {exit:?}");
    assert!(took < Duration::from_secs(5), "Ctrl-C took {took:?}");
    assert_eq!(status(dir.path()).0, 3, "state file removed");
    assert!(
        !leftover_servers(dir.path()),
        "nats-server or postgres outlived k8shell up"
    );

    // The next start reuses the data: the workspace is still there.
    let mut again = up(dir.path());
    wait_healthy(dir.path());
    let mut client = ProvisionerServiceClient::connect(grpc_address(dir.path()))
        .await
        .unwrap();
    let found = client
        .get_workspace(GetWorkspaceRequest {
            id: created.id.clone(),
            min_version: created.version,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.username, "carol");
    drop(client);
    let (took, exit) = interrupt_and_time(&mut again);
    assert!(
        exit.success() && took < Duration::from_secs(5),
        "{exit:?} after {took:?}"
    );
}

fn listener_url(data_dir: &Path, service: &str, role: &str) -> String {
    let text = std::fs::read_to_string(data_dir.join("platform.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    let found = state["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == service)
        .unwrap();
    format!("http://{}", found["listeners"][role].as_str().unwrap())
}

fn grpc_address(data_dir: &Path) -> String {
    let text = std::fs::read_to_string(data_dir.join("platform.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    let services = state["services"].as_array().unwrap();
    let provisioner = services
        .iter()
        .find(|s| s["name"] == "provisioner")
        .unwrap();
    format!(
        "http://{}",
        provisioner["listeners"]["grpc"].as_str().unwrap()
    )
}

fn leftover_servers(data_dir: &Path) -> bool {
    let needle = data_dir.to_string_lossy().to_string();
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        std::fs::read(entry.path().join("cmdline"))
            .map(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(&needle)
            })
            .unwrap_or(false)
    })
}

#[test]
fn a_broken_sign_in_file_stops_up_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let sign_in = dir.path().join("sign-in.toml");
    std::fs::write(&sign_in, "ssh_onboarding_provider = \"corp\"\n").unwrap();
    let output = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["up", "--ephemeral-ports", "--sign-in"])
        .arg(&sign_in)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "{}: ssh_onboarding_provider \"corp\" is not one of the oidc_providers",
            sign_in.display()
        )),
        "{stderr}"
    );
    // Nothing was started.
    assert!(!dir.path().join("data/platform.json").exists());
}
