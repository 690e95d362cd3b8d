//! Authz decision latency and throughput with the default policies:
//! in-process beside a one-line policy (the engine's floor), and over gRPC
//! beside the same server's `grpc.health.v1` check (the RPC's floor).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8shell_authz::policy::PolicySet;
use k8shell_proto::authz::v1 as pb;
use k8shell_proto::authz::v1::authz_service_client::AuthzServiceClient;
use k8shell_service::Shutdown;
use k8shell_testkit::TestInfra;

use crate::report::{Section, per_sec, percentile_rows, rate};

fn policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

fn input() -> serde_json::Value {
    serde_json::json!({
        "subject": {"sub": "alice", "roles": [], "scopes": [], "kind": "user", "amr": ["pwd"]},
        "action": "ssh:shell",
        "resource": {"type": "workspace", "id": "alice-1a7fd88", "attributes": {"owner": "alice"}},
        "context": {"pty": "true"},
    })
}

fn request() -> pb::EvaluateRequest {
    pb::EvaluateRequest {
        subject: Some(pb::Subject {
            sub: "alice".into(),
            kind: "user".into(),
            amr: vec!["pwd".into()],
            ..Default::default()
        }),
        action: "ssh:shell".into(),
        resource: Some(pb::Resource {
            r#type: "workspace".into(),
            id: "alice-1a7fd88".into(),
            attributes: HashMap::from([("owner".to_owned(), "alice".to_owned())]),
        }),
        context: HashMap::from([("pty".to_owned(), "true".to_owned())]),
        capability_check: false,
    }
}

fn time_each(runs: usize, mut f: impl FnMut()) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        f();
        samples.push(started.elapsed());
    }
    samples.sort();
    samples
}

pub async fn decisions(runs: usize) -> anyhow::Result<Section> {
    let limit = Duration::from_millis(100);
    let set = PolicySet::load(&policies(), limit).map_err(|e| anyhow::anyhow!(e.join("; ")))?;
    let floor = PolicySet::compile(
        vec![(
            PathBuf::from("floor.rego"),
            "package k8shell.authz\ndecision := {\"allow\": true, \"reasons\": [], \"obligations\": {}}\n"
                .to_owned(),
        )],
        limit,
    )
    .map_err(|e| anyhow::anyhow!(e.join("; ")))?;
    let input = input();
    anyhow::ensure!(
        set.evaluate(&input)?.allow,
        "the benchmark input must be allowed"
    );
    // Warm-up.
    for _ in 0..200 {
        set.evaluate(&input)?;
        floor.evaluate(&input)?;
    }
    let ours = time_each(runs, || {
        let _ = set.evaluate(&input);
    });
    let baseline = time_each(runs, || {
        let _ = floor.evaluate(&input);
    });
    let mut rows = Vec::new();
    for mut row in percentile_rows(&ours, &baseline, ["", "≤ 100 µs"]) {
        row[0] = format!("in-process evaluate, {}", row[0]);
        rows.push(row);
    }
    let started = Instant::now();
    let per_core = runs * 2;
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let set = set.clone();
            let input = input.clone();
            std::thread::spawn(move || {
                for _ in 0..per_core {
                    let _ = set.evaluate(&input);
                }
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    let throughput = rate(per_core * 2, started.elapsed());

    // Over gRPC, with the decision log on (as in production).
    let infra = TestInfra::start().await?;
    let shutdown = Shutdown::new();
    let running = k8shell_authz::start(
        k8shell_authz::Config {
            grpc_addr: "127.0.0.1:0".parse()?,
            admin_addr: "127.0.0.1:0".parse()?,
            bus: infra.bus_config(),
            database_url: infra.postgres.url().to_owned(),
            policies_dir: policies(),
            ..Default::default()
        },
        shutdown.clone(),
    )
    .await?;
    let address = running
        .listener("grpc")
        .ok_or_else(|| anyhow::anyhow!("no grpc listener"))?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
        .connect()
        .await?;
    let mut client = AuthzServiceClient::new(channel.clone());
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let grpc_runs = (runs / 5).max(100);
    for _ in 0..100 {
        client.evaluate(request()).await?;
        health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await?;
    }
    let mut over_grpc = Vec::with_capacity(grpc_runs);
    let mut rpc_floor = Vec::with_capacity(grpc_runs);
    for _ in 0..grpc_runs {
        let started = Instant::now();
        client.evaluate(request()).await?;
        over_grpc.push(started.elapsed());
        let started = Instant::now();
        health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await?;
        rpc_floor.push(started.elapsed());
    }
    over_grpc.sort();
    rpc_floor.sort();
    for mut row in percentile_rows(&over_grpc, &rpc_floor, ["", "≤ 1 ms"]) {
        row[0] = format!("gRPC Evaluate, {}", row[0]);
        rows.push(row);
    }
    rows.push([
        "in-process decisions/s, 2 threads".to_owned(),
        per_sec(throughput),
        "—".to_owned(),
        "—".to_owned(),
        String::new(),
    ]);
    shutdown.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(10), running.task).await;
    Ok(Section {
        title: format!(
            "Authz decisions, regorus engine, default policies ({runs} in-process, {grpc_runs} over gRPC)"
        ),
        rows,
        note:
            "Input: `alice` asks `ssh:shell` on her own workspace. In-process baseline: a one-line \
               policy (`decision := {\"allow\": true}`) on the same engine, the floor of any \
               evaluation. gRPC baseline: `grpc.health.v1.Health/Check` on the same server and \
               connection, the floor of any RPC; the Evaluate path also hands the decision to \
               the folding decision log."
                .to_owned(),
    })
}

/// The wasm engine. No `opa` compiler is available on the benchmark
/// machines, so the default policies cannot be compiled to WebAssembly
/// here; this measures the engine's own cost — instance pool, fuel
/// metering, the JSON in and out of the module, the OPA ABI calls — with
/// the hand-written ABI module of authz's tests, against the regorus floor.
pub async fn wasm_decisions(runs: usize) -> anyhow::Result<Section> {
    use k8shell_authz::wasm::{DEFAULT_ENTRYPOINT, WasmEngine, WasmPolicy};
    use std::sync::Arc;

    let module = wat::parse_str(include_str!(
        "../../../services/authz/tests/wasm/opa_abi.wat"
    ))?;
    let engine = Arc::new(WasmEngine::new()?);
    let policy = Arc::new(
        WasmPolicy::load(
            engine,
            Path::new("opa_abi.wat"),
            &module,
            DEFAULT_ENTRYPOINT,
            20_000_000,
        )
        .await?,
    );
    let floor = PolicySet::compile(
        vec![(
            PathBuf::from("floor.rego"),
            "package k8shell.authz\ndecision := {\"allow\": true, \"reasons\": [], \"obligations\": {}}\n"
                .to_owned(),
        )],
        Duration::from_millis(100),
    )
    .map_err(|e| anyhow::anyhow!(e.join("; ")))?;
    let mut input = input();
    input["subject"]["roles"] = serde_json::json!(["admin"]);
    anyhow::ensure!(
        policy.evaluate(&input).await?.allow,
        "the input must be allowed"
    );
    for _ in 0..200 {
        policy.evaluate(&input).await?;
        floor.evaluate(&input)?;
    }
    let mut ours = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let _ = policy.evaluate(&input).await;
        ours.push(started.elapsed());
    }
    ours.sort();
    let baseline = time_each(runs, || {
        let _ = floor.evaluate(&input);
    });
    let mut rows = Vec::new();
    for mut row in percentile_rows(&ours, &baseline, ["", "≤ 100 µs"]) {
        row[0] = format!("in-process evaluate (wasm), {}", row[0]);
        rows.push(row);
    }
    let started = Instant::now();
    let per_task = runs * 2;
    let tasks: Vec<_> = (0..2)
        .map(|_| {
            let policy = Arc::clone(&policy);
            let input = input.clone();
            tokio::spawn(async move {
                for _ in 0..per_task {
                    let _ = policy.evaluate(&input).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await?;
    }
    rows.push([
        "in-process decisions/s (wasm), 2 tasks".to_owned(),
        per_sec(rate(per_task * 2, started.elapsed())),
        "—".to_owned(),
        "—".to_owned(),
        String::new(),
    ]);
    Ok(Section {
        title: format!("Authz decisions, wasm engine (opa-wasm on wasmtime), {runs} in-process"),
        rows,
        note: "Module: the hand-written OPA ABI 1.2 module of authz's tests (scans the input \
               for an admin role), since no `opa` compiler can be installed here to build the \
               default policies; so this is the engine's overhead, not the default policies' \
               cost. Baseline: the one-line Rego policy on regorus. Fuel budget 20 M."
            .to_owned(),
    })
}
