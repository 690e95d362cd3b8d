//! The SSH Shield on real NATS (JetStream KV) with the shield policy:
//! thresholds, escalation, expiry, IPv6 and the allow-list.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt;
use k8shell_bus::ExpectedVersion;
use k8shell_events::shield::{SshAuthFailed, address_id};
use k8shell_events::{AggregateId, CloudEvent, Context};
use k8shell_service::Shutdown;
use k8shell_testkit::TestInfra;

/// The repository's policies with a fast schedule (1 s, 2 s, ...).
fn policies(dir: &std::path::Path) {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/k8shell");
    std::fs::create_dir_all(dir.join("k8shell")).unwrap();
    for file in ["authz.rego", "domains.rego"] {
        std::fs::copy(repo.join(file), dir.join("k8shell").join(file)).unwrap();
    }
    let shield = std::fs::read_to_string(repo.join("shield.rego"))
        .unwrap()
        .replace(
            "schedule := [60, 300, 900, 3600, 21600, 86400, 259200]",
            "schedule := [1, 2, 3]",
        );
    assert!(shield.contains("schedule := [1, 2, 3]"));
    std::fs::write(dir.join("k8shell/shield.rego"), shield).unwrap();
}

async fn fail(store: &k8shell_bus::EventStore, source: &str) {
    let id = AggregateId::new(address_id(source)).unwrap();
    let event = CloudEvent::new(
        "test/sshproxy",
        &id,
        &SshAuthFailed {
            source: source.into(),
            username: "root".into(),
            method: "password".into(),
            reason: "bad password".into(),
        },
    )
    .unwrap();
    store
        .append(Context::Ssh, &id, ExpectedVersion::Any, &[event])
        .await
        .unwrap();
}

#[tokio::test]
async fn failures_ban_escalate_expire_and_spare_the_allowlist() {
    let infra = TestInfra::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    policies(dir.path());
    let shutdown = Shutdown::new();
    let running = k8shell_authz::start(
        k8shell_authz::Config {
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            bus: infra.bus_config(),
            database_url: infra.postgres.url().to_owned(),
            policies_dir: dir.path().to_owned(),
            ..Default::default()
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let bus = infra.bus().await.unwrap();
    let store = bus.event_store();
    let nats = async_nats::connect(infra.nats.url()).await.unwrap();
    let mut shield_events = nats.subscribe("k8shell.evt.shield.>").await.unwrap();
    let mut next = async || -> serde_json::Value {
        let message = tokio::time::timeout(Duration::from_secs(10), shield_events.next())
            .await
            .expect("a shield event within 10 s")
            .unwrap();
        serde_json::from_slice(&message.payload).unwrap()
    };

    // Three failures: nothing. The fourth: a 1 s ban (offence 1).
    for _ in 0..3 {
        fail(&store, "192.0.2.7").await;
    }
    fail(&store, "127.0.0.1").await; // allow-listed, never counted to a ban
    for _ in 0..10 {
        fail(&store, "127.0.0.1").await;
    }
    fail(&store, "192.0.2.7").await;
    let banned = next().await;
    assert_eq!(banned["type"], "k8shell.shield.ip_banned.v1");
    assert_eq!(banned["data"]["ip"], "192.0.2.7");
    assert_eq!(banned["data"]["duration_seconds"], 1);
    assert_eq!(banned["data"]["offence"], 1);
    assert_eq!(banned["data"]["failures"], 4);

    let unbanned = next().await;
    assert_eq!(unbanned["type"], "k8shell.shield.ip_unbanned.v1");
    assert_eq!(unbanned["data"]["reason"], "expired");

    // A repeat offender is banned after two failures, for longer.
    fail(&store, "192.0.2.7").await;
    fail(&store, "192.0.2.7").await;
    let again = next().await;
    assert_eq!(again["data"]["offence"], 2);
    assert_eq!(again["data"]["duration_seconds"], 2);
    let _ = next().await; // its expiry

    // IPv6 too, in its canonical form.
    for _ in 0..4 {
        fail(&store, "2001:db8:0::1").await;
    }
    let v6 = next().await;
    assert_eq!(v6["data"]["ip"], "2001:db8::1");
    assert_eq!(
        v6["subject"], "2001-db8--1",
        "the aggregate id of the address"
    );
    shutdown.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(10), running.task).await;
}
