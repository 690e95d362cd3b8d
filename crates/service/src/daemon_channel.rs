//! gRPC channels to a workspace's k8shelld, however its runtime publishes
//! it: `unix:///…/k8shelld.sock` (podman: the pod's socket on the host),
//! `https://host:port` (Kubernetes: mutual TLS with the workspace CA) or
//! `http://host:port` (plain TCP, for tests), and requests carrying the
//! bearer token k8shelld also requires. One place, so the provisioner, the
//! SSH proxy and the tests reach k8shelld the same way.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

/// Client credentials for k8shelld's mutual TLS (PEM).
#[derive(Clone)]
pub struct DaemonClientTls {
    /// The workspace CA, which signed k8shelld's server certificate.
    pub ca_pem: String,
    /// This client's certificate, from the same CA.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

impl std::fmt::Debug for DaemonClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonClientTls").finish_non_exhaustive()
    }
}

impl DaemonClientTls {
    /// Reads the three PEM files.
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, DaemonEndpointError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| DaemonEndpointError::Read {
                path: path.to_owned(),
                source,
            })
        };
        Ok(Self {
            ca_pem: read(ca)?,
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        })
    }
}

/// Why a k8shelld endpoint cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DaemonEndpointError {
    /// Not a scheme k8shelld is published with.
    #[error(
        "unsupported k8shelld endpoint {0:?}: expected unix:///path, https://host:port or http://host:port"
    )]
    Unsupported(String),
    /// A TLS endpoint, and no client credentials to present.
    #[error("k8shelld at {0} requires mutual TLS, and no client certificate is configured")]
    NoTls(String),
    /// A malformed address or unusable TLS settings.
    #[error("k8shelld endpoint {endpoint}: {message}")]
    Invalid {
        /// The endpoint.
        endpoint: String,
        /// What is wrong.
        message: String,
    },
    /// A credentials file cannot be read.
    #[error("cannot read {path}: {source}", path = path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// How to reach one k8shelld; [`DaemonEndpoint::configure`] sets timeouts
/// and keepalives, then [`DaemonEndpoint::lazy`] or
/// [`DaemonEndpoint::connect`] makes the channel.
pub struct DaemonEndpoint {
    endpoint: Endpoint,
    socket: Option<PathBuf>,
}

impl DaemonEndpoint {
    /// The endpoint `endpoint`; `tls` is presented to `https://` ones.
    pub fn new(endpoint: &str, tls: Option<&DaemonClientTls>) -> Result<Self, DaemonEndpointError> {
        if let Some(path) = endpoint.strip_prefix("unix://") {
            return Ok(Self::unix(PathBuf::from(path)));
        }
        let invalid = |message: String| DaemonEndpointError::Invalid {
            endpoint: endpoint.to_owned(),
            message,
        };
        let secure = endpoint.starts_with("https://");
        if !secure && !endpoint.starts_with("http://") {
            return Err(DaemonEndpointError::Unsupported(endpoint.to_owned()));
        }
        let mut tcp = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| invalid(e.to_string()))?
            .tcp_nodelay(true);
        if secure {
            let tls = tls.ok_or_else(|| DaemonEndpointError::NoTls(endpoint.to_owned()))?;
            // k8shelld's certificate names the address it is reached at.
            let host = tcp
                .uri()
                .host()
                .unwrap_or_default()
                .trim_matches(['[', ']'])
                .to_owned();
            tcp = tcp
                .tls_config(
                    ClientTlsConfig::new()
                        .domain_name(host)
                        .ca_certificate(Certificate::from_pem(&tls.ca_pem))
                        .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem)),
                )
                .map_err(|e| invalid(e.to_string()))?;
        }
        Ok(Self {
            endpoint: tcp,
            socket: None,
        })
    }

    /// k8shelld's unix socket at `socket`.
    pub fn unix(socket: PathBuf) -> Self {
        Self {
            // The URI is not used to connect; it names the authority.
            endpoint: Endpoint::from_static("http://k8shelld.invalid"),
            socket: Some(socket),
        }
    }

    /// Adjusts the underlying endpoint (timeouts, keepalives).
    pub fn configure(mut self, adjust: impl FnOnce(Endpoint) -> Endpoint) -> Self {
        self.endpoint = adjust(self.endpoint);
        self
    }

    /// A channel that connects on first use and reconnects after failures.
    pub fn lazy(self) -> Channel {
        match self.socket {
            Some(socket) => self
                .endpoint
                .connect_with_connector_lazy(unix_connector(socket)),
            None => self.endpoint.connect_lazy(),
        }
    }

    /// A channel connected now: fails at once when k8shelld is not there.
    pub async fn connect(self) -> Result<Channel, tonic::transport::Error> {
        match self.socket {
            Some(socket) => {
                self.endpoint
                    .connect_with_connector(unix_connector(socket))
                    .await
            }
            None => self.endpoint.connect().await,
        }
    }
}

type UnixConnect = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<UnixStream>>> + Send>>;

fn unix_connector(
    socket: PathBuf,
) -> tower::util::ServiceFn<impl FnMut(Uri) -> UnixConnect + Clone> {
    tower::service_fn(move |_: Uri| {
        let socket = socket.clone();
        Box::pin(async move { Ok(TokioIo::new(UnixStream::connect(socket).await?)) }) as UnixConnect
    })
}

/// `message` with `authorization: Bearer <token>`.
pub fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn endpoints_are_checked_before_any_connection() {
        assert!(matches!(
            DaemonEndpoint::new("tcp://10.0.0.1:7500", None),
            Err(DaemonEndpointError::Unsupported(_))
        ));
        let no_tls = DaemonEndpoint::new("https://10.0.0.1:7500", None)
            .err()
            .unwrap();
        assert_eq!(
            no_tls.to_string(),
            "k8shelld at https://10.0.0.1:7500 requires mutual TLS, and no client certificate is configured"
        );
        assert!(matches!(
            DaemonEndpoint::new("http://bad host:1", None),
            Err(DaemonEndpointError::Invalid { .. })
        ));
        assert!(DaemonEndpoint::new("unix:///run/k8shelld.sock", None).is_ok());
        assert!(DaemonEndpoint::new("http://127.0.0.1:7500", None).is_ok());
    }

    #[test]
    fn requests_carry_the_bearer_token() {
        let request = bearer((), "abc");
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer abc"
        );
    }
}
