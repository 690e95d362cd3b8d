use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{AggregateId, EventData};

/// The CloudEvents specification version we emit.
pub const SPEC_VERSION: &str = "1.0";

/// A CloudEvents 1.0 envelope in structured JSON mode.
///
/// `subject` is the aggregate id; `traceparent` is the CloudEvents
/// distributed-tracing extension, duplicated from the NATS header so a trace
/// survives tools that only keep the body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    /// Always `1.0`.
    pub specversion: String,
    /// Unique event id (UUIDv7); also the JetStream `Nats-Msg-Id`.
    pub id: String,
    /// URI-reference of the producer, e.g. `k8shell/provisioner`.
    pub source: String,
    /// Versioned event type, e.g. `k8shell.workspace.requested.v1`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Aggregate id the event belongs to.
    pub subject: String,
    /// When the fact happened.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// Always `application/json`.
    pub datacontenttype: String,
    /// The payload, as described by the type's JSON Schema.
    pub data: serde_json::Value,
    /// W3C trace context of the producing span, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// Failure to build or parse an envelope.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// The payload could not be serialised.
    #[error("cannot serialise payload of {event_type}")]
    Serialize {
        /// Type being encoded.
        event_type: &'static str,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The bytes are not a CloudEvents JSON document.
    #[error("malformed cloudevent envelope")]
    Malformed(#[source] serde_json::Error),
    /// The envelope is JSON but declares an unsupported spec version.
    #[error("unsupported cloudevents specversion {0:?}")]
    SpecVersion(String),
}

impl CloudEvent {
    /// Builds an envelope for a typed payload with a fresh id and the current time.
    pub fn new<E: EventData>(
        source: &str,
        aggregate: &AggregateId,
        data: &E,
    ) -> Result<Self, EnvelopeError> {
        let data = serde_json::to_value(data).map_err(|source| EnvelopeError::Serialize {
            event_type: E::TYPE,
            source,
        })?;
        Ok(Self {
            specversion: SPEC_VERSION.to_owned(),
            id: Uuid::now_v7().to_string(),
            source: source.to_owned(),
            event_type: E::TYPE.to_owned(),
            subject: aggregate.as_str().to_owned(),
            time: OffsetDateTime::now_utc(),
            datacontenttype: "application/json".to_owned(),
            data,
            traceparent: None,
        })
    }

    /// Encodes the envelope as JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        // A CloudEvent holds only strings, a timestamp and a JSON value, all of
        // which serialise infallibly; fall back to an empty body rather than panic.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a structured-mode JSON envelope.
    pub fn from_json(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let event: CloudEvent = serde_json::from_slice(bytes).map_err(EnvelopeError::Malformed)?;
        if event.specversion != SPEC_VERSION {
            return Err(EnvelopeError::SpecVersion(event.specversion));
        }
        Ok(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workspace::WorkspaceRequested;

    #[test]
    fn round_trips_and_names_the_type() {
        let id = AggregateId::new("bob-0000001").unwrap();
        let data = WorkspaceRequested {
            workspace_id: id.to_string(),
            username: "bob".into(),
            blueprint: "dev".into(),
            metadata: Default::default(),
        };
        let event = CloudEvent::new("k8shell/test", &id, &data).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&event.to_json()).unwrap();
        assert_eq!(json["type"], "k8shell.workspace.requested.v1");
        assert_eq!(json["specversion"], "1.0");
        assert_eq!(json["subject"], "bob-0000001");
        assert_eq!(json["data"]["username"], "bob");
        assert!(json.get("traceparent").is_none());
        assert_eq!(CloudEvent::from_json(&event.to_json()).unwrap(), event);
    }

    #[test]
    fn rejects_garbage_and_other_spec_versions() {
        assert!(matches!(
            CloudEvent::from_json(b"not json"),
            Err(EnvelopeError::Malformed(_))
        ));
        let id = AggregateId::new("x").unwrap();
        let data = WorkspaceRequested {
            workspace_id: "x".into(),
            username: "x".into(),
            blueprint: "x".into(),
            metadata: Default::default(),
        };
        let mut event = CloudEvent::new("k8shell/test", &id, &data).unwrap();
        event.specversion = "0.3".into();
        assert!(matches!(
            CloudEvent::from_json(&event.to_json()),
            Err(EnvelopeError::SpecVersion(_))
        ));
    }
}
