//! Authz over gRPC on real NATS and PostgreSQL with the default policies.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use k8shell_proto::authz::v1 as pb;
use k8shell_proto::authz::v1::authz_service_client::AuthzServiceClient;
use k8shell_service::Shutdown;
use k8shell_testkit::TestInfra;
use tonic::Code;

fn subject(sub: &str, roles: &[&str], scopes: &[&str]) -> Option<pb::Subject> {
    Some(pb::Subject {
        sub: sub.into(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        kind: "user".into(),
        amr: vec!["pwd".into()],
    })
}

fn workspace(owner: &str) -> Option<pb::Resource> {
    Some(pb::Resource {
        r#type: "workspace".into(),
        id: format!("{owner}-1a7fd88"),
        attributes: HashMap::from([("owner".to_owned(), owner.to_owned())]),
    })
}

fn request(
    sub: Option<pb::Subject>,
    action: &str,
    resource: Option<pb::Resource>,
) -> pb::EvaluateRequest {
    pb::EvaluateRequest {
        subject: sub,
        action: action.into(),
        resource,
        context: HashMap::new(),
        capability_check: false,
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test]
async fn decisions_obligations_bad_input_and_the_folded_log() {
    let infra = TestInfra::start().await.unwrap();
    let policies = tempfile::tempdir().unwrap();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    copy_dir(&repo, policies.path());
    let shutdown = Shutdown::new();
    let running = k8shell_authz::start(
        k8shell_authz::Config {
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            bus: infra.bus_config(),
            database_url: infra.postgres.url().to_owned(),
            policies_dir: policies.path().to_owned(),
            reload_interval: Duration::from_millis(100),
            fold_window: Duration::from_millis(300),
            ..Default::default()
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let mut client =
        AuthzServiceClient::connect(format!("http://{}", running.listener("grpc").unwrap()))
            .await
            .unwrap();

    let own = client
        .evaluate(request(
            subject("alice", &[], &[]),
            "ssh:shell",
            workspace("alice"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(own.allow, "{own:?}");
    assert_eq!(own.reasons, ["own workspace"]);
    let other = client
        .evaluate(request(
            subject("alice", &[], &[]),
            "ssh:shell",
            workspace("bob"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!other.allow);
    assert_eq!(other.reasons, ["no rule allows ssh:shell"]);
    let admin = client
        .evaluate(request(
            subject("root", &["admin"], &[]),
            "workspace:delete",
            workspace("bob"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(admin.allow);

    let mut session = request(
        subject("alice", &[], &[]),
        "session:start",
        workspace("alice"),
    );
    session
        .context
        .insert("session_type".into(), "shell".into());
    let started = client.evaluate(session).await.unwrap().into_inner();
    assert_eq!(
        started.obligations.get("record").map(String::as_str),
        Some("none")
    );

    let batch = client
        .batch_evaluate(pb::BatchEvaluateRequest {
            requests: vec![
                request(
                    subject("alice", &[], &["workspace:*"]),
                    "workspace:read",
                    workspace("alice"),
                ),
                request(
                    subject("alice", &[], &["workspace:*"]),
                    "ssh:shell",
                    workspace("alice"),
                ),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        batch.decisions.iter().map(|d| d.allow).collect::<Vec<_>>(),
        [true, false],
        "a scoped token is narrowed"
    );

    // Bad input gets a clear error; nothing crashes.
    for action in ["", "shell", "SSH:shell", "ssh:sh ell"] {
        let error = client
            .evaluate(request(
                subject("alice", &[], &[]),
                action,
                workspace("alice"),
            ))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{action:?}");
    }
    let mut huge = request(subject("alice", &[], &[]), "ssh:exec", workspace("alice"));
    huge.context.insert("command".into(), "x".repeat(100_000));
    let error = client.evaluate(huge).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("limit"), "{error:?}");

    // The same decision three more times: folded into one event.
    for _ in 0..3 {
        client
            .evaluate(request(
                subject("alice", &[], &[]),
                "ssh:shell",
                workspace("alice"),
            ))
            .await
            .unwrap();
    }
    let pool = infra.pool("authz").await.unwrap();
    let mut folded = None;
    for _ in 0..100 {
        folded = sqlx::query_scalar::<_, i64>(
            "SELECT count FROM decisions WHERE subject = 'alice' AND action = 'ssh:shell' AND allow",
        )
        .fetch_optional(&pool)
        .await
        .unwrap();
        if folded.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(folded, Some(4), "four identical decisions, one row");
    let denied: i64 = {
        let mut n = 0;
        for _ in 0..50 {
            n = sqlx::query_scalar(
                "SELECT count(*) FROM decisions WHERE NOT allow AND subject = 'alice'",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            if n >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        n
    };
    assert!(denied >= 2, "denials are logged too");

    // Hot reload: a broken policy keeps the last good set, and says where.
    std::fs::write(
        policies.path().join("k8shell/broken.rego"),
        "package k8shell.authz\ngrants contains \"x\" if {\n",
    )
    .unwrap();
    let mut errors = Vec::new();
    for _ in 0..50 {
        errors = client
            .policy_status(pb::PolicyStatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .errors;
        if !errors.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        errors.iter().any(|e| e.contains("broken.rego")),
        "{errors:?}"
    );
    let still = client
        .evaluate(request(
            subject("alice", &[], &[]),
            "ssh:shell",
            workspace("alice"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(still.allow, "the last good set is in force");
    shutdown.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(10), running.task).await;
}

/// The wasm engine behind the same API: decisions from an OPA-ABI module
/// (hand-written, assembled here), hot reload of the module file, and a
/// broken module keeping the last good one.
#[tokio::test]
async fn the_wasm_engine_serves_the_same_api() {
    let infra = TestInfra::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("policy.wasm");
    let source = include_str!("wasm/opa_abi.wat");
    std::fs::write(&module, wat::parse_str(source).unwrap()).unwrap();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    let shutdown = Shutdown::new();
    let running = k8shell_authz::start(
        k8shell_authz::Config {
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            bus: infra.bus_config(),
            database_url: infra.postgres.url().to_owned(),
            policies_dir: repo,
            reload_interval: Duration::from_millis(100),
            engine: k8shell_authz::engine::EngineKind::Wasm,
            wasm_policy: module.clone(),
            ..Default::default()
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let address = running.listener("grpc").unwrap();
    let mut client = AuthzServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let status = client
        .policy_status(pb::PolicyStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.engine, "wasm");
    let admin = client
        .evaluate(request(
            subject("root", &["admin"], &[]),
            "ssh:shell",
            workspace("bob"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(admin.allow);
    assert_eq!(
        admin.obligations.get("record").map(String::as_str),
        Some("true")
    );
    let user = client
        .evaluate(request(
            subject("alice", &[], &[]),
            "ssh:shell",
            workspace("bob"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!user.allow);

    // A broken module is reported and the last good one keeps deciding.
    std::fs::write(&module, b"\0asm broken").unwrap();
    let mut errors = Vec::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        errors = client
            .policy_status(pb::PolicyStatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .errors;
        if !errors.is_empty() {
            break;
        }
    }
    assert!(errors[0].contains("policy.wasm"), "{errors:?}");
    let still = client
        .evaluate(request(
            subject("root", &["admin"], &[]),
            "ssh:shell",
            workspace("bob"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(still.allow);

    // A fixed module takes over.
    let fixed = source.replace("only admins (wasm test policy)", "only admins (fixed)");
    std::fs::write(&module, wat::parse_str(fixed).unwrap()).unwrap();
    let mut reasons = Vec::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        reasons = client
            .evaluate(request(
                subject("alice", &[], &[]),
                "ssh:shell",
                workspace("bob"),
            ))
            .await
            .unwrap()
            .into_inner()
            .reasons;
        if reasons == ["only admins (fixed)"] {
            break;
        }
    }
    assert_eq!(reasons, vec!["only admins (fixed)".to_owned()]);

    // Misconfiguration stops start-up with a clear message.
    let missing = k8shell_authz::start(
        k8shell_authz::Config {
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            bus: infra.bus_config(),
            database_url: infra.postgres.url().to_owned(),
            policies_dir: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies"),
            engine: k8shell_authz::engine::EngineKind::Wasm,
            ..Default::default()
        },
        Shutdown::new(),
    )
    .await
    .err()
    .unwrap();
    assert!(missing.to_string().contains("wasm_policy"), "{missing}");
    shutdown.trigger();
    running.task.await.unwrap().unwrap();
}
