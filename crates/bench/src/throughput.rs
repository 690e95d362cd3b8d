use std::time::Instant;

use k8shell_bus::ExpectedVersion;
use k8shell_events::workspace::WorkspaceStopped;
use k8shell_events::{AggregateId, CloudEvent, Context, subject};

use crate::report::{Section, per_sec, rate};
use crate::setup::BenchEnv;

fn event(id: &AggregateId, n: usize) -> CloudEvent {
    CloudEvent::new(
        "k8shell/bench",
        id,
        &WorkspaceStopped {
            reason: format!("bench {n}"),
        },
    )
    .unwrap()
}

/// Sequential appends to one aggregate, each expecting the previous
/// version, against sequential raw publishes of the same payloads awaiting
/// each acknowledgement (the same round-trip pattern without the checks).
pub async fn one_aggregate(env: &BenchEnv, count: usize) -> anyhow::Result<Section> {
    let raw_id = AggregateId::new("bench-raw-one")?;
    let raw_subject = subject(Context::Workspace, &raw_id);
    let payloads: Vec<bytes::Bytes> = (0..count)
        .map(|n| event(&raw_id, n).to_json().into())
        .collect();
    let js = env.bus.jetstream();
    let started = Instant::now();
    for payload in payloads {
        js.publish(raw_subject.clone(), payload).await?.await?;
    }
    let raw = rate(count, started.elapsed());

    let id = AggregateId::new("bench-occ-one")?;
    let events: Vec<CloudEvent> = (0..count).map(|n| event(&id, n)).collect();
    let store = env.bus.event_store();
    let mut expected = ExpectedVersion::NoStream;
    let started = Instant::now();
    for event in &events {
        let version = store
            .append(
                Context::Workspace,
                &id,
                expected,
                std::slice::from_ref(event),
            )
            .await?;
        expected = ExpectedVersion::Exact(version);
    }
    let ours = rate(count, started.elapsed());
    Ok(Section {
        title: "Append throughput, one aggregate".into(),
        rows: vec![[
            format!("{count} sequential appends (expected version, msg id)"),
            per_sec(ours),
            per_sec(raw),
            format!("{:.0}%", ours / raw * 100.0),
            "≥ 50% of raw".into(),
        ]],
        note: "Baseline: `js.publish` of the same CloudEvent bytes, awaiting each ack. One aggregate is \
               inherently sequential: each append needs the previous one's sequence."
            .into(),
    })
}

/// Appends spread over many aggregates by `concurrency` writers, each
/// owning a slice of the aggregates and tracking their versions, against the
/// same writers doing raw publishes.
pub async fn many_aggregates(
    env: &BenchEnv,
    count: usize,
    aggregates: usize,
    concurrency: usize,
) -> anyhow::Result<Section> {
    let js = env.bus.jetstream().clone();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for writer in 0..concurrency {
        let js = js.clone();
        tasks.push(tokio::spawn(async move {
            for n in (writer..count).step_by(concurrency) {
                let id = AggregateId::new(format!("bench-raw-{}", n % aggregates)).unwrap();
                let payload: bytes::Bytes = event(&id, n).to_json().into();
                js.publish(subject(Context::Workspace, &id), payload)
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let raw = rate(count, started.elapsed());

    let per_writer = aggregates.div_ceil(concurrency);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for writer in 0..concurrency {
        let store = env.bus.event_store();
        tasks.push(tokio::spawn(async move {
            let mut versions = std::collections::HashMap::new();
            for n in (writer..count).step_by(concurrency) {
                // Writer w owns aggregates w, w + c, w + 2c, ..., so its
                // versions stay exact without reloading.
                let aggregate = writer + concurrency * ((n / concurrency) % per_writer);
                let id = AggregateId::new(format!("bench-occ-{aggregate}")).unwrap();
                let expected = versions
                    .get(&aggregate)
                    .map_or(ExpectedVersion::NoStream, |v| ExpectedVersion::Exact(*v));
                let version = store
                    .append(Context::Workspace, &id, expected, &[event(&id, n)])
                    .await
                    .unwrap();
                versions.insert(aggregate, version);
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let ours = rate(count, started.elapsed());
    Ok(Section {
        title: format!("Append throughput, {} aggregates", per_writer * concurrency),
        rows: vec![[
            format!("{count} appends by {concurrency} concurrent writers"),
            per_sec(ours),
            per_sec(raw),
            format!("{:.0}%", ours / raw * 100.0),
            "≥ 50% of raw".into(),
        ]],
        note: format!(
            "Baseline: the same {concurrency} writers doing `js.publish` of equivalent payloads to the same \
             subjects, awaiting each ack."
        ),
    })
}
