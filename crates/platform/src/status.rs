use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::PlatformState;

/// Health of one service as seen through its admin endpoint.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ServiceHealth {
    /// Service name.
    pub name: String,
    /// Admin address probed.
    pub admin: Option<SocketAddr>,
    /// `/healthz` answered 200.
    pub live: bool,
    /// `/readyz` answered 200.
    pub ready: bool,
    /// The `/readyz` body, or the error.
    pub detail: serde_json::Value,
}

/// Probes `/healthz` and `/readyz` of every service in the state.
pub async fn probe_services(state: &PlatformState) -> Vec<ServiceHealth> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut out = Vec::new();
    for service in &state.services {
        let admin = service.listeners.get("admin").copied();
        let Some(addr) = admin else {
            out.push(ServiceHealth {
                name: service.name.clone(),
                admin: None,
                live: false,
                ready: false,
                detail: serde_json::json!("no admin listener recorded"),
            });
            continue;
        };
        let live = get(&client, addr, "/healthz")
            .await
            .is_ok_and(|(s, _)| s == 200);
        let (ready, detail) = match get(&client, addr, "/readyz").await {
            Ok((status, body)) => (
                status == 200,
                serde_json::from_slice(&body)
                    .unwrap_or_else(|_| serde_json::json!(String::from_utf8_lossy(&body))),
            ),
            Err(error) => (false, serde_json::json!(error)),
        };
        out.push(ServiceHealth {
            name: service.name.clone(),
            admin: Some(addr),
            live,
            ready,
            detail,
        });
    }
    out
}

async fn get(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
    path: &str,
) -> Result<(u16, Bytes), String> {
    let uri: hyper::Uri = format!("http://{addr}{path}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let response = tokio::time::timeout(Duration::from_secs(3), client.get(uri))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| format!("{e}"))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{e}"))?
        .to_bytes();
    Ok((status, body))
}
