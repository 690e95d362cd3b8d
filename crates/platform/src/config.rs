use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use k8shell_embedded::Durability;

/// Ports of the embedded platform. Zero picks a free port (tests).
#[derive(Clone, Debug)]
pub struct Ports {
    /// SSH (sshproxy), reserved until the proxy lands.
    pub ssh: u16,
    /// HTTP: API, console, app proxy, and the apiserver's health.
    pub http: u16,
    /// Provisioner gRPC.
    pub provisioner_grpc: u16,
    /// Admin (health and metrics) endpoints.
    pub identity_admin: u16,
    pub authz_admin: u16,
    pub session_admin: u16,
    pub provisioner_admin: u16,
    pub sshproxy_admin: u16,
    pub nfgate_admin: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            ssh: 2222,
            http: 8080,
            provisioner_grpc: 7404,
            identity_admin: 7501,
            authz_admin: 7502,
            session_admin: 7503,
            provisioner_admin: 7504,
            sshproxy_admin: 7505,
            nfgate_admin: 7507,
        }
    }
}

impl Ports {
    /// Every port zero: the kernel picks free ones.
    pub fn ephemeral() -> Self {
        Self {
            ssh: 0,
            http: 0,
            provisioner_grpc: 0,
            identity_admin: 0,
            authz_admin: 0,
            session_admin: 0,
            provisioner_admin: 0,
            sshproxy_admin: 0,
            nfgate_admin: 0,
        }
    }
}

/// How to run the platform.
#[derive(Clone, Debug)]
pub struct PlatformConfig {
    /// Where private NATS and PostgreSQL keep their data, and the state file.
    pub data_dir: PathBuf,
    /// External NATS; a private server is started when `None`.
    pub nats_url: Option<String>,
    /// External PostgreSQL; a private cluster is started when `None`.
    pub database_url: Option<String>,
    /// Address every listener binds to.
    pub bind: IpAddr,
    /// Ports.
    pub ports: Ports,
    /// Durability of the private PostgreSQL cluster.
    pub durability: Durability,
}

impl PlatformConfig {
    /// Defaults for `k8shell up`: loopback, standard ports, durable data.
    pub fn embedded(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            nats_url: None,
            database_url: None,
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            ports: Ports::default(),
            durability: Durability::Durable,
        }
    }
}

/// `$K8SHELL_DATA_DIR`, else `/var/lib/k8shell` for root (PostgreSQL runs
/// as an unprivileged user that cannot enter /root), else
/// `$XDG_DATA_HOME/k8shell` or `~/.local/share/k8shell`.
pub fn default_data_dir(env: &std::collections::HashMap<String, String>) -> PathBuf {
    if let Some(dir) = env.get("K8SHELL_DATA_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if nix::unistd::Uid::effective().is_root() {
        return PathBuf::from("/var/lib/k8shell");
    }
    if let Some(xdg) = env.get("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(xdg).join("k8shell");
    }
    let home = env.get("HOME").cloned().unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".local/share/k8shell")
}
