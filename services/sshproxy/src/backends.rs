//! The platform services the proxy calls: identity (logins, workspace
//! tokens), authz (decisions) and the provisioner (workspaces). One lazily
//! connected HTTP/2 channel each, shared by every connection.

use std::time::Duration;

use k8shell_proto::authz::v1 as authz;
use k8shell_proto::authz::v1::authz_service_client::AuthzServiceClient;
use k8shell_proto::identity::v1::identity_service_client::IdentityServiceClient;
use k8shell_proto::provisioner::v1::provisioner_service_client::ProvisionerServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::Config;

/// Clients of the platform services.
#[derive(Clone)]
pub struct Backends {
    /// identity.
    pub identity: IdentityServiceClient<Channel>,
    /// authz.
    pub authz: AuthzServiceClient<Channel>,
    /// The provisioner.
    pub provisioner: ProvisionerServiceClient<Channel>,
}

fn lazy(url: &str, what: &str) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| anyhow::anyhow!("{what}_url {url:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30));
    Ok(endpoint.connect_lazy())
}

impl Backends {
    /// Channels to the configured URLs (connected on first use).
    pub fn connect(config: &Config) -> anyhow::Result<Self> {
        Ok(Self {
            identity: IdentityServiceClient::new(lazy(&config.identity_url, "identity")?),
            authz: AuthzServiceClient::new(lazy(&config.authz_url, "authz")?),
            provisioner: ProvisionerServiceClient::new(lazy(
                &config.provisioner_url,
                "provisioner",
            )?),
        })
    }

    /// One authz decision. A failing authz denies (the reason says so).
    pub async fn decide(&self, request: authz::EvaluateRequest) -> authz::Decision {
        let action = request.action.clone();
        match self.authz.clone().evaluate(request).await {
            Ok(decision) => decision.into_inner(),
            Err(status) => {
                tracing::error!(%action, error = %status.message(), "authz unavailable; denying");
                authz::Decision {
                    allow: false,
                    reasons: vec![format!(
                        "authorization is unavailable: {}",
                        status.message()
                    )],
                    ..Default::default()
                }
            }
        }
    }
}
