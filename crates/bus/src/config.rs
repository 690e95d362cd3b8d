use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How to reach NATS and how streams are configured.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    /// NATS server URL.
    pub url: String,
    /// Client name shown in `nats server report connections`.
    pub client_name: String,
    /// Timeout of one connection attempt.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Timeout of JetStream API requests and publish acknowledgements.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// JetStream de-duplication window (`Nats-Msg-Id`).
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Maximum age of events; zero keeps them forever (event sourcing needs
    /// the full history to rebuild projections, so that is the default).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Maximum bytes per stream; -1 for unlimited.
    pub max_bytes: i64,
    /// Stream replicas (1 for a single server).
    pub replicas: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            client_name: "k8shell".to_owned(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::ZERO,
            max_bytes: -1,
            replicas: 1,
        }
    }
}
