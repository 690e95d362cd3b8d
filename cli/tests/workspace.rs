//! `k8shell workspace …` against a provisioner on real podman.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use k8shell_testkit::TestProvisioner;

const BIN: &str = env!("CARGO_BIN_EXE_k8shell");

fn k8shell(url: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["workspace"])
        .args(args)
        .env("K8SHELL_PROVISIONER_URL", url)
        .output()
        .unwrap()
}

fn json_lines(output: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn create_list_get_stop_start_delete_from_the_cli() {
    let provisioner = TestProvisioner::start("").await.unwrap();
    let url = provisioner.url.clone();
    let run = move |args: Vec<&'static str>| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || k8shell(&url, &args))
    };

    let created = run(vec!["create", "gina~dev", "--json"]).await.unwrap();
    assert!(created.status.success(), "{created:?}");
    let lines = json_lines(&created);
    let last = lines.last().unwrap();
    assert_eq!(last["workspace"]["state"], "running", "{lines:?}");
    assert!(
        lines.iter().any(|l| l["event"] == "provisioning"),
        "progress is streamed: {lines:?}"
    );
    let id = last["workspace"]["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("gina-"));

    let listed = run(vec!["list", "--user", "gina", "--json"]).await.unwrap();
    let list: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], id.as_str());

    let id_static: &'static str = Box::leak(id.clone().into_boxed_str());
    let stopped = run(vec!["stop", id_static, "--json"]).await.unwrap();
    assert!(stopped.status.success(), "{stopped:?}");
    assert_eq!(
        json_lines(&stopped).last().unwrap()["workspace"]["state"],
        "stopped"
    );

    let got = run(vec!["get", id_static]).await.unwrap();
    let text = String::from_utf8_lossy(&got.stdout);
    assert!(text.contains("state:     stopped"), "{text}");

    let started = run(vec!["start", id_static]).await.unwrap();
    assert!(started.status.success(), "{started:?}");
    assert!(String::from_utf8_lossy(&started.stdout).contains("state:     running"));

    let deleted = run(vec!["delete", id_static]).await.unwrap();
    assert!(deleted.status.success());
    // The record stays, for audit, in state deleted.
    let gone = run(vec!["get", id_static]).await.unwrap();
    assert!(
        String::from_utf8_lossy(&gone.stdout).contains("state:     deleted"),
        "{gone:?}"
    );
    let again = run(vec!["stop", id_static]).await.unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("not found"),
        "{again:?}"
    );

    // Bad input: a clear message and a failure exit code.
    let bad = run(vec!["create", "Gina~dev"]).await.unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("invalid user"),
        "{bad:?}"
    );
    provisioner.stop().await;
}
