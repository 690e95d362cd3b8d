//! The recording tee against a real JetStream: what lands on the session's
//! stream concatenates into an asciicast v2 file, in order, with UTF-8
//! characters split across writes intact and every chunk in sequence.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use k8shell_events::{AggregateId, Context};
use k8shell_sshproxy::audit::Audit;
use k8shell_sshproxy::recording::{CHUNK_BYTES, Mode, Recorder, Terminal};
use k8shell_testkit::TestInfra;

#[tokio::test]
async fn a_recording_concatenates_into_an_asciicast_file() {
    let infra = TestInfra::start().await.unwrap();
    let bus = infra.bus().await.unwrap();
    let store = bus.event_store();
    let audit = Audit::new(store.clone());
    let session = "ses_0123456789abcdef";
    let recorder = Recorder::start(
        audit,
        session,
        3,
        Mode::InputOutput,
        Terminal {
            width: 100,
            height: 30,
            term: "xterm-256color".into(),
            title: "alice@alice-1a7fd88".into(),
        },
    );
    recorder.output(b"$ ").await;
    recorder.input(b"ls\r").await;
    // A euro sign cut in two by the transport.
    let euro = "€".as_bytes();
    recorder.output(&[b'a', euro[0]]).await;
    recorder.output(&euro[1..]).await;
    recorder.resize(120, 40).await;
    // Enough output for several chunks.
    let bulk = "x".repeat(1000) + "\r\n";
    for _ in 0..(CHUNK_BYTES / 1000) * 3 {
        recorder.output(bulk.as_bytes()).await;
    }
    drop(recorder);

    let aggregate = AggregateId::new(session).unwrap();
    let events = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let loaded = store.load(Context::Session, &aggregate).await.unwrap();
            let ended = loaded
                .events
                .iter()
                .any(|e| e.envelope.event_type == "k8shell.session.recording_ended.v1");
            if ended {
                return loaded.events;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the recording did not end");

    let types: Vec<&str> = events
        .iter()
        .map(|e| e.envelope.event_type.as_str())
        .collect();
    assert_eq!(types[0], "k8shell.session.recording_started.v1");
    assert_eq!(*types.last().unwrap(), "k8shell.session.recording_ended.v1");
    let started = &events[0].envelope.data;
    assert_eq!(started["mode"], "input+output");
    assert_eq!(started["recording_id"], "ses_0123456789abcdef-3");
    let header: serde_json::Value =
        serde_json::from_str(started["header"].as_str().unwrap()).unwrap();
    assert_eq!(header["version"], 2);
    assert_eq!(header["width"], 100);
    assert_eq!(header["height"], 30);

    // Chunks in sequence, each at most a chunk's worth (plus one line).
    let chunks: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e.envelope.event_type == "k8shell.session.recording_chunk.v1")
        .map(|e| &e.envelope.data)
        .collect();
    assert!(chunks.len() >= 3, "{} chunks", chunks.len());
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(chunk["seq"], i as u64);
        assert!(chunk["lines"].as_str().unwrap().len() <= CHUNK_BYTES + 1100);
    }
    let ended = &events.last().unwrap().envelope.data;
    assert_eq!(ended["chunks"], chunks.len() as u64);

    // The file: header, then every line; times never go back.
    let mut file = started["header"].as_str().unwrap().to_owned() + "\n";
    for chunk in &chunks {
        file.push_str(chunk["lines"].as_str().unwrap());
    }
    let mut lines = file.lines();
    lines.next();
    let mut last = 0.0;
    let mut output = String::new();
    let mut kinds = Vec::new();
    for line in lines {
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        let at = event[0].as_f64().unwrap();
        assert!(at >= last, "time went back in {line}");
        last = at;
        let kind = event[1].as_str().unwrap().to_owned();
        if kind == "o" {
            output.push_str(event[2].as_str().unwrap());
        }
        kinds.push(kind);
    }
    assert!(output.starts_with("$ a€x"), "{}", &output[..20]);
    assert!(kinds.contains(&"i".to_owned()));
    assert!(kinds.contains(&"r".to_owned()));
    assert_eq!(
        ended["bytes"].as_u64().unwrap(),
        (2 + 3 + 2 + 2 + (CHUNK_BYTES / 1000) * 3 * 1002) as u64
    );
}
