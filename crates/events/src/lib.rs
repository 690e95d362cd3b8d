//! Every event type of k8shell, shared by all services.
//!
//! Events travel as CloudEvents 1.0 in structured JSON ([`CloudEvent`]) on
//! subjects `k8shell.evt.<context>.<aggregate-id>` ([`subject`]). Payloads are
//! plain serde types with a JSON Schema; [`DomainEvent::decode`] turns an
//! envelope back into a typed value and yields [`DomainEvent::Unknown`] for a
//! type this build does not know, so consumers log and skip instead of failing.
//!
//! This crate depends on nothing but serde and friends: it must stay cheap to
//! link from every service and from external tools.

pub mod authz;
mod catalogue;
mod decode;
mod envelope;
pub mod session;
pub mod shield;
mod subject;
pub mod user;
pub mod workspace;

pub use catalogue::{EventTypeInfo, catalogue, catalogue_markdown, json_schema_document};
pub use decode::{DecodeError, DomainEvent};
pub use envelope::{CloudEvent, EnvelopeError, SPEC_VERSION};
pub use subject::{AggregateId, Context, InvalidAggregateId, SUBJECT_PREFIX, subject};

/// A payload type that can be carried in a [`CloudEvent`].
///
/// `TYPE` is the CloudEvents `type`: `k8shell.<context>.<fact>.v<N>`, past
/// tense, never reused for a different shape. A breaking change gets a new
/// type with a new version suffix.
pub trait EventData: serde::Serialize + serde::de::DeserializeOwned + schemars::JsonSchema {
    /// CloudEvents `type` attribute.
    const TYPE: &'static str;
    /// Bounded context whose stream carries the event.
    const CONTEXT: Context;
    /// One line for the catalogue: what happened.
    const DESCRIPTION: &'static str;
}
