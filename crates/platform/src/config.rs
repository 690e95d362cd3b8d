use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use k8shell_embedded::Durability;

/// Ports of the embedded platform. Zero picks a free port (tests).
#[derive(Clone, Debug)]
pub struct Ports {
    /// SSH (sshproxy).
    pub ssh: u16,
    /// HTTP: API, console, app proxy, and the apiserver's health.
    pub http: u16,
    /// Provisioner gRPC.
    pub provisioner_grpc: u16,
    /// Identity gRPC.
    pub identity_grpc: u16,
    /// Authz gRPC.
    pub authz_grpc: u16,
    /// Identity's public HTTP (JWKS, discovery).
    pub identity_http: u16,
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
            identity_grpc: 7401,
            authz_grpc: 7402,
            identity_http: 7601,
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
            identity_grpc: 0,
            authz_grpc: 0,
            identity_http: 0,
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
    /// How workspaces are built and run.
    pub workspaces: WorkspaceOptions,
    /// Authorization policies (Rego).
    pub policies_dir: PathBuf,
    /// Lifetimes of identity's user and workspace tokens.
    pub token_ttls: TokenTtls,
    /// External identity providers and who may onboard through them.
    pub sign_in: SignIn,
}

/// How people sign in besides local passwords and keys.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    /// OpenID Connect providers (identity's `oidc_providers`).
    #[serde(default)]
    pub oidc_providers: Vec<k8shell_identity::oidc::OidcProviderConfig>,
    /// The provider SSH users who do not exist yet onboard through with
    /// the device flow (keyboard-interactive); empty: none.
    #[serde(default)]
    pub ssh_onboarding_provider: String,
}

impl SignIn {
    /// Reads a sign-in file: TOML with `ssh_onboarding_provider` and
    /// `[[oidc_providers]]` tables, as in identity's own configuration.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let sign_in: Self =
            toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))?;
        let onboarding = &sign_in.ssh_onboarding_provider;
        if !onboarding.is_empty() && !sign_in.oidc_providers.iter().any(|p| &p.name == onboarding) {
            anyhow::bail!(
                "{}: ssh_onboarding_provider {onboarding:?} is not one of the oidc_providers",
                path.display()
            );
        }
        Ok(sign_in)
    }
}

/// How long identity's tokens live.
#[derive(Clone, Debug)]
pub struct TokenTtls {
    /// User tokens (logins).
    pub user: std::time::Duration,
    /// Workspace-audience tokens (k8shelld calls).
    pub workspace: std::time::Duration,
}

impl Default for TokenTtls {
    fn default() -> Self {
        let identity = k8shell_identity::Config::default();
        Self {
            user: identity.user_token_ttl,
            workspace: identity.workspace_token_ttl,
        }
    }
}

/// `$K8SHELL_POLICIES_DIR`, else `./policies` in a checkout, else
/// /etc/k8shell/policies.
pub fn default_policies_dir(env: &std::collections::HashMap<String, String>) -> PathBuf {
    if let Some(dir) = env.get("K8SHELL_POLICIES_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let local = PathBuf::from("policies");
    if local.is_dir() {
        local
    } else {
        PathBuf::from("/etc/k8shell/policies")
    }
}

/// Workspace settings of an embedded platform.
#[derive(Clone, Debug)]
pub struct WorkspaceOptions {
    /// Blueprint directory.
    pub blueprints_dir: PathBuf,
    /// The static k8shelld the install image is built from.
    pub k8shelld_binary: Option<PathBuf>,
    /// containers.conf for podman (else podman's own lookup, which honours
    /// `CONTAINERS_CONF` in the environment).
    pub containers_conf: Option<PathBuf>,
    /// `podman kube play --network`.
    pub network: String,
    /// How often the blueprint directory is checked for changes.
    pub blueprint_reload_interval: std::time::Duration,
    /// Lifecycle settings.
    pub lifecycle: k8shell_provisioner::LifecycleConfig,
}

impl WorkspaceOptions {
    /// Defaults: `./blueprints` when it exists (a checkout), else
    /// /etc/k8shell/blueprints; bridge networking.
    pub fn detect(env: &std::collections::HashMap<String, String>) -> Self {
        let var = |name: &str| env.get(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        let blueprints_dir = var("K8SHELL_BLUEPRINTS_DIR").unwrap_or_else(|| {
            let local = PathBuf::from("blueprints");
            if local.is_dir() {
                local
            } else {
                PathBuf::from("/etc/k8shell/blueprints")
            }
        });
        Self {
            blueprints_dir,
            k8shelld_binary: var("K8SHELL_K8SHELLD_STATIC"),
            containers_conf: var("CONTAINERS_CONF"),
            network: env
                .get("K8SHELL_WORKSPACE_NETWORK")
                .filter(|v| !v.is_empty())
                .cloned()
                .unwrap_or_else(|| "bridge".to_owned()),
            blueprint_reload_interval: std::time::Duration::from_secs(2),
            lifecycle: k8shell_provisioner::LifecycleConfig::default(),
        }
    }
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
            workspaces: WorkspaceOptions::detect(&std::collections::HashMap::new()),
            policies_dir: default_policies_dir(&std::collections::HashMap::new()),
            token_ttls: TokenTtls::default(),
            sign_in: SignIn::default(),
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn sign_in(text: &str) -> anyhow::Result<SignIn> {
        let dir = std::env::temp_dir().join(format!(
            "k8shell-sign-in-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sign-in.toml");
        std::fs::write(&path, text).unwrap();
        let result = SignIn::from_file(&path);
        std::fs::remove_dir_all(&dir).unwrap();
        result
    }

    const CORP: &str = r#"
[[oidc_providers]]
name = "corp"
issuer = "https://sso.example.com"
client_id = "k8shell"
client_secret = "s3cret"
[[oidc_providers.onboarding]]
username = "*"
action = "allow"
"#;

    #[test]
    fn a_sign_in_file_names_providers_and_the_ssh_onboarding_one() {
        let parsed = sign_in(&format!("ssh_onboarding_provider = \"corp\"\n{CORP}")).unwrap();
        assert_eq!(parsed.ssh_onboarding_provider, "corp");
        assert_eq!(parsed.oidc_providers.len(), 1);
        assert_eq!(parsed.oidc_providers[0].issuer, "https://sso.example.com");
        assert_eq!(parsed.oidc_providers[0].onboarding.len(), 1);
    }

    #[test]
    fn mistakes_in_a_sign_in_file_are_named() {
        let unknown = sign_in(&format!("ssh_onboarding_provider = \"okta\"\n{CORP}")).unwrap_err();
        assert!(
            format!("{unknown:#}").contains("\"okta\" is not one of the oidc_providers"),
            "{unknown:#}"
        );
        let typo = sign_in(&format!("ssh_onboarding = \"corp\"\n{CORP}")).unwrap_err();
        assert!(format!("{typo:#}").contains("ssh_onboarding"), "{typo:#}");
        let missing =
            SignIn::from_file(std::path::Path::new("/nonexistent/sign-in.toml")).unwrap_err();
        assert!(
            format!("{missing:#}").contains("cannot read /nonexistent/sign-in.toml"),
            "{missing:#}"
        );
    }
}
