//! SSH Shield: counts `ssh.auth_failed` per source address in a sliding
//! window and bans by the `shield` policy (threshold, escalating schedule,
//! repeat offenders, allow-list). Per-address state lives in a JetStream
//! stream keeping the last message per subject (what a KV bucket is; built
//! by hand because the KV API of our client and nats-server 2.9 disagree),
//! changed with compare-and-set on the subject's last sequence, so replicas
//! agree and only the replica whose update won announces a ban.

use std::time::Duration;

use async_nats::jetstream::{consumer, stream};
use futures::StreamExt;
use k8shell_bus::{Bus, ExpectedVersion, stream_name};
use k8shell_events::shield::{ShieldIpBanned, ShieldIpUnbanned, SshAuthFailed, address_id};
use k8shell_events::{AggregateId, CloudEvent, Context, DomainEvent};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use crate::policy::PolicyCatalog;

/// The rule the shield asks.
pub const VERDICT_RULE: &str = "data.k8shell.shield.verdict";
/// Stream holding the state of each address (last message per subject).
pub const STATE_STREAM: &str = "K8SHELL_SHIELD_STATE";
const STATE_PREFIX: &str = "k8shell.state.shield";

/// What the shield remembers of one address.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AddressState {
    /// The address as seen.
    pub ip: String,
    /// Times (unix seconds) of recent failures.
    pub failures: Vec<i64>,
    /// Bans so far.
    pub offences: u32,
    /// End of the current ban (unix seconds).
    pub banned_until: Option<i64>,
}

#[derive(Deserialize)]
struct Verdict {
    ban: bool,
    duration_seconds: u64,
    window_seconds: u64,
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// The running shield.
pub struct Shield {
    bus: Bus,
    state: stream::Stream,
    catalog: Arc<PolicyCatalog>,
}

impl Shield {
    /// Opens (creating) the state stream.
    pub async fn open(bus: Bus, catalog: Arc<PolicyCatalog>) -> anyhow::Result<Self> {
        let state = bus
            .jetstream()
            .get_or_create_stream(stream::Config {
                name: STATE_STREAM.to_owned(),
                description: Some("k8shell SSH shield: failures and bans per address".to_owned()),
                subjects: vec![format!("{STATE_PREFIX}.>")],
                max_messages_per_subject: 1,
                storage: stream::StorageType::File,
                // An address quiet for 30 days starts afresh.
                max_age: Duration::from_secs(30 * 24 * 3600),
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("cannot create the shield state stream: {e}"))?;
        Ok(Self {
            bus,
            state,
            catalog,
        })
    }

    /// The state of `key` and the sequence to expect when replacing it.
    async fn load(&self, key: &str) -> anyhow::Result<(AddressState, u64)> {
        let subject = format!("{STATE_PREFIX}.{key}");
        match self.state.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => Ok((
                serde_json::from_slice(&message.payload).unwrap_or_default(),
                message.sequence,
            )),
            Err(error) if error.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok((AddressState::default(), 0))
            }
            Err(error) => Err(anyhow::anyhow!("shield state: {error}")),
        }
    }

    /// Replaces `key`'s state if it is still at `expected`; false on a race.
    async fn store(&self, key: &str, state: &AddressState, expected: u64) -> anyhow::Result<bool> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            expected.to_string().as_str(),
        );
        let published = self
            .bus
            .jetstream()
            .publish_with_headers(
                format!("{STATE_PREFIX}.{key}"),
                headers,
                serde_json::to_vec(state)?.into(),
            )
            .await?;
        match published.await {
            Ok(_) => Ok(true),
            Err(error) if error.to_string().contains("wrong last sequence") => Ok(false),
            Err(error) => Err(anyhow::anyhow!("shield state: {error}")),
        }
    }

    /// Consumes failures and expires bans until shutdown.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let stream = self
            .bus
            .jetstream()
            .get_stream(stream_name(Context::Ssh))
            .await
            .map_err(|e| anyhow::anyhow!("ssh stream: {e}"))?;
        let consumer = stream
            .get_or_create_consumer(
                "shield",
                consumer::pull::Config {
                    durable_name: Some("shield".to_owned()),
                    description: Some("k8shell SSH shield".to_owned()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    filter_subject: Context::Ssh.wildcard_subject(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("shield consumer: {e}"))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("shield consumer: {e}"))?;
        let mut expiry = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = expiry.tick() => {
                    if let Err(error) = self.expire_bans().await {
                        tracing::warn!(%error, "shield: cannot expire bans");
                    }
                }
                message = messages.next() => {
                    let Some(message) = message else { return Ok(()) };
                    let message = match message {
                        Ok(message) => message,
                        Err(error) => {
                            tracing::warn!(%error, "shield: consumer error");
                            continue;
                        }
                    };
                    let failed = CloudEvent::from_json(&message.payload)
                        .ok()
                        .and_then(|e| DomainEvent::decode(&e).ok());
                    if let Some(DomainEvent::SshAuthFailed(failed)) = failed
                        && let Err(error) = self.record(&failed).await
                    {
                        // Not acknowledged: redelivered and counted later.
                        tracing::warn!(%error, source = %failed.source, "shield: cannot record a failure");
                        continue;
                    }
                    if let Err(error) = message.ack().await {
                        tracing::debug!(%error, "shield: ack failed");
                    }
                }
            }
        }
    }

    fn verdict(&self, state: &AddressState, failures: u32) -> Result<Verdict, String> {
        let input = serde_json::json!({
            "ip": state.ip,
            "failures": failures,
            "offences": state.offences,
        });
        let value = self
            .catalog
            .current()
            .evaluate_rule(VERDICT_RULE, &input)
            .map_err(|e| e.to_string())?;
        serde_json::from_value(value).map_err(|e| e.to_string())
    }

    /// Counts one failure; bans when the policy says so.
    async fn record(&self, failed: &SshAuthFailed) -> anyhow::Result<()> {
        let ip: std::net::IpAddr = failed
            .source
            .parse()
            .map_err(|_| anyhow::anyhow!("not an address: {:?}", failed.source))?;
        let ip = ip.to_string();
        let key = address_id(&ip);
        for _ in 0..16 {
            let (mut state, revision) = self.load(&key).await?;
            state.ip = ip.clone();
            let now = now();
            let banned = state.banned_until.is_some_and(|until| until > now);
            state.failures.push(now);
            let verdict = self
                .verdict(&state, 0)
                .map_err(|e| anyhow::anyhow!("shield policy: {e}"))?;
            let window = i64::try_from(verdict.window_seconds).unwrap_or(300);
            state.failures.retain(|t| now - t < window);
            let failures = state.failures.len() as u32;
            let mut ban = None;
            if !banned {
                let verdict = self
                    .verdict(&state, failures)
                    .map_err(|e| anyhow::anyhow!("shield policy: {e}"))?;
                if verdict.ban {
                    state.offences += 1;
                    let until = now + i64::try_from(verdict.duration_seconds).unwrap_or(60);
                    state.banned_until = Some(until);
                    state.failures.clear();
                    ban = Some((until, verdict.duration_seconds, failures));
                }
            }
            if !self.store(&key, &state, revision).await? {
                continue; // another replica changed it; count again on its state
            }
            if let Some((until, duration_seconds, failures)) = ban {
                tracing::warn!(
                    ip,
                    duration_seconds,
                    offence = state.offences,
                    "shield: address banned"
                );
                self.announce(
                    &key,
                    &ShieldIpBanned {
                        ip: ip.clone(),
                        until: rfc3339(until),
                        duration_seconds,
                        offence: state.offences,
                        failures,
                    },
                )
                .await?;
            }
            return Ok(());
        }
        anyhow::bail!("the shield state of {ip} kept changing")
    }

    async fn expire_bans(&self) -> anyhow::Result<()> {
        // The current state of every address: the last message per subject.
        let consumer = self
            .state
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                filter_subject: format!("{STATE_PREFIX}.>"),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("shield state: {e}"))?;
        let pending = consumer.cached_info().num_pending;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("shield state: {e}"))?;
        let now = now();
        let mut expired = Vec::new();
        for _ in 0..pending {
            let Some(message) = messages.next().await else {
                break;
            };
            let message = message.map_err(|e| anyhow::anyhow!("shield state: {e}"))?;
            let Ok(state) = serde_json::from_slice::<AddressState>(&message.payload) else {
                continue;
            };
            if state.banned_until.is_some_and(|until| until <= now) {
                let key = message
                    .subject
                    .trim_start_matches(&format!("{STATE_PREFIX}."))
                    .to_owned();
                expired.push(key);
            }
        }
        for key in expired {
            let (mut state, revision) = self.load(&key).await?;
            if state.banned_until.is_none_or(|until| until > now) {
                continue;
            }
            state.banned_until = None;
            if self.store(&key, &state, revision).await? {
                tracing::info!(ip = %state.ip, "shield: ban expired");
                self.announce(
                    &key,
                    &ShieldIpUnbanned {
                        ip: state.ip.clone(),
                        reason: "expired".to_owned(),
                    },
                )
                .await?;
            }
        }
        Ok(())
    }

    async fn announce<E: k8shell_events::EventData + Serialize>(
        &self,
        key: &str,
        event: &E,
    ) -> anyhow::Result<()> {
        let id = AggregateId::new(key.to_owned())?;
        let envelope = CloudEvent::new("k8shell/authz/shield", &id, event)?;
        self.bus
            .event_store()
            .append(Context::Shield, &id, ExpectedVersion::Any, &[envelope])
            .await?;
        Ok(())
    }
}
