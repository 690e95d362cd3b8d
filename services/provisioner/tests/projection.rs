//! The workspace projection's set-based batches give the same rows as
//! applying the events one by one, against a real PostgreSQL.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use k8shell_bus::{Projection, StoredEvent};
use k8shell_events::workspace::{
    WorkspaceDeleted, WorkspaceRequested, WorkspaceRunning, WorkspaceStopped,
};
use k8shell_events::{AggregateId, CloudEvent, DomainEvent, EventData};
use k8shell_provisioner::WorkspaceProjection;
use k8shell_testkit::TestInfra;
use sqlx::PgPool;

fn stored<E: EventData>(sequence: u64, id: &str, data: &E) -> (StoredEvent, DomainEvent) {
    let aggregate = AggregateId::new(id).unwrap();
    let envelope = CloudEvent::new("k8shell/test", &aggregate, data).unwrap();
    let decoded = DomainEvent::decode(&envelope).unwrap();
    (
        StoredEvent {
            sequence,
            subject: format!("k8shell.evt.workspace.{id}"),
            envelope,
        },
        decoded,
    )
}

fn requested(sequence: u64, id: &str, username: &str) -> (StoredEvent, DomainEvent) {
    stored(
        sequence,
        id,
        &WorkspaceRequested {
            workspace_id: id.into(),
            username: username.into(),
            blueprint: "dev".into(),
            metadata: Default::default(),
        },
    )
}

fn history() -> Vec<(StoredEvent, DomainEvent)> {
    vec![
        requested(1, "a-1", "a"),
        requested(2, "b-1", "b"),
        stored(
            3,
            "a-1",
            &WorkspaceRunning {
                endpoint: "unix:///x".into(),
                splash: "welcome".into(),
            },
        ),
        // A second request for a live workspace changes nothing.
        requested(4, "a-1", "a"),
        stored(
            5,
            "b-1",
            &WorkspaceDeleted {
                volumes_retained: false,
            },
        ),
        // Re-requested after deletion: the row starts afresh.
        requested(6, "b-1", "b"),
        // An update for a workspace that was never requested is a no-op.
        stored(7, "ghost-1", &WorkspaceStopped { reason: "x".into() }),
        stored(
            8,
            "a-1",
            &WorkspaceStopped {
                reason: "idle".into(),
            },
        ),
        // A request whose id disagrees with its subject is rejected.
        {
            let (mut s, d) = requested(9, "c-1", "c");
            s.envelope.subject = "d-1".into();
            (s, d)
        },
    ]
}

async fn rows(pool: &PgPool) -> Vec<(String, String, String, i64, i64)> {
    sqlx::query_as("SELECT id, state, reason, created_seq, version FROM workspaces ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn batch_equals_one_by_one() {
    let infra = TestInfra::start().await.unwrap();
    let one_by_one = infra.pool("provisioner").await.unwrap();
    k8shell_provisioner::migrate(&one_by_one).await.unwrap();
    let batched = infra.pool("provisioner_batched").await.unwrap();
    k8shell_provisioner::migrate(&batched).await.unwrap();

    let events = history();
    let mut rejected_singly = 0;
    for (stored, decoded) in &events {
        let mut tx = one_by_one.begin().await.unwrap();
        if WorkspaceProjection
            .apply(&mut tx, stored, decoded)
            .await
            .is_err()
        {
            rejected_singly += 1;
        }
        tx.commit().await.unwrap();
    }
    let mut tx = batched.begin().await.unwrap();
    let rejected = WorkspaceProjection
        .apply_batch(&mut tx, &events)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].sequence, 9);
    assert_eq!(rejected_singly, 1);
    let expected = vec![
        (
            "a-1".to_owned(),
            "stopped".to_owned(),
            "idle".to_owned(),
            1,
            8,
        ),
        (
            "b-1".to_owned(),
            "requested".to_owned(),
            String::new(),
            6,
            6,
        ),
    ];
    assert_eq!(rows(&one_by_one).await, expected);
    assert_eq!(rows(&batched).await, expected);
}
