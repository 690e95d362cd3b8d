//! `k8shell login`: a password login that leaves behind what a developer
//! needs — a user token for the CLI and a short-lived SSH certificate next
//! to their key, so plain `ssh` (and VS Code's second connection) log in
//! through the proxy with no prompt.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use k8shell_proto::identity::v1 as pb;
use k8shell_proto::identity::v1::identity_service_client::IdentityServiceClient;

#[derive(Args)]
pub struct LoginArgs {
    /// Username (default: $USER).
    #[arg(long)]
    user: Option<String>,
    /// Public key to certify (default: the first of ~/.ssh/id_{ed25519,ecdsa,rsa}.pub).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Certificate lifetime (`8h`); identity's default when unset.
    #[arg(long, value_parser = humantime::parse_duration)]
    valid: Option<std::time::Duration>,
    /// Log in through this OpenID Provider (device flow: open the URL shown,
    /// enter the code) instead of with a password.
    #[arg(long)]
    provider: Option<String>,
}

/// A device login: shows where to go and waits for the provider's answer.
async fn device_login(
    client: &mut IdentityServiceClient<tonic::transport::Channel>,
    provider: &str,
) -> anyhow::Result<pb::LoginResponse> {
    let mut updates = client
        .oidc_device_login(pb::OidcDeviceLoginRequest {
            provider: provider.to_owned(),
            source: "k8shell-cli".to_owned(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    loop {
        let update = updates
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .context("identity ended the login without an answer")?;
        match update.update {
            Some(pb::oidc_device_login_update::Update::Prompt(prompt)) => {
                println!(
                    "to log in, open {} and enter the code {}",
                    prompt.verification_uri, prompt.user_code
                );
                if !prompt.verification_uri_complete.is_empty() {
                    println!("(or open {})", prompt.verification_uri_complete);
                }
                println!("waiting for the identity provider…");
            }
            Some(pb::oidc_device_login_update::Update::Completed(login)) => return Ok(login),
            None => {}
        }
    }
}

/// Identity's gRPC URL: `K8SHELL_IDENTITY_URL`, else the local platform's.
fn identity_url(data_dir: &Path, env: &HashMap<String, String>) -> anyhow::Result<String> {
    if let Some(url) = env.get("K8SHELL_IDENTITY_URL").filter(|u| !u.is_empty()) {
        return Ok(url.clone());
    }
    let state = k8shell_platform::PlatformState::read(data_dir)?.with_context(|| {
        format!(
            "no platform is running with data directory {} (or set K8SHELL_IDENTITY_URL)",
            data_dir.display()
        )
    })?;
    let address = state
        .services
        .iter()
        .find(|s| s.name == "identity")
        .and_then(|s| s.listeners.get("grpc"))
        .context("the platform state names no identity service")?;
    Ok(format!("http://{address}"))
}

/// Reads the password: `K8SHELL_PASSWORD`, else a prompt without echo on a
/// terminal, else a line of stdin.
fn password(env: &HashMap<String, String>) -> anyhow::Result<String> {
    if let Some(password) = env.get("K8SHELL_PASSWORD") {
        return Ok(password.clone());
    }
    let stdin = std::io::stdin();
    let terminal = stdin.is_terminal();
    let saved = if terminal {
        eprint!("password: ");
        std::io::stderr().flush()?;
        let original =
            rustix::termios::tcgetattr(&stdin).context("cannot read the terminal mode")?;
        let mut quiet = original.clone();
        quiet.local_modes.remove(rustix::termios::LocalModes::ECHO);
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &quiet)
            .context("cannot turn off echo")?;
        Some(original)
    } else {
        None
    };
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if let Some(original) = saved {
        let _ =
            rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &original);
        eprintln!();
    }
    read.context("cannot read the password")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}

pub async fn run(
    args: LoginArgs,
    data_dir: &Path,
    env: &HashMap<String, String>,
) -> anyhow::Result<ExitCode> {
    let home = env.get("HOME").map(PathBuf::from);
    let key = match args.key {
        Some(key) => Some(key),
        None => home
            .as_deref()
            .and_then(k8shell_identity::bootstrap::find_public_key),
    };
    let url = identity_url(data_dir, env)?;
    let mut client = IdentityServiceClient::connect(url.clone())
        .await
        .with_context(|| format!("cannot reach identity at {url}"))?;
    let login = match &args.provider {
        Some(provider) => device_login(&mut client, provider).await?,
        None => {
            let username = args
                .user
                .or_else(|| env.get("USER").cloned())
                .context("give --user (USER is not set)")?;
            let password = password(env)?;
            client
                .password_login(pb::PasswordLoginRequest {
                    username,
                    password,
                    source: "k8shell-cli".to_owned(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner()
        }
    };
    let username = login
        .user
        .as_ref()
        .map(|u| u.username.clone())
        .unwrap_or_default();
    let token_path = home
        .as_deref()
        .map(|h| h.join(".config/k8shell/token"))
        .context("HOME is not set; nowhere to keep the token")?;
    write_private(&token_path, &login.token)?;
    println!("logged in as {username}; token in {}", token_path.display());

    let Some(key) = key else {
        println!("no SSH public key found (give --key); no certificate issued");
        return Ok(ExitCode::SUCCESS);
    };
    let public_key =
        std::fs::read_to_string(&key).with_context(|| format!("cannot read {}", key.display()))?;
    let issued = client
        .issue_ssh_certificate(pb::IssueSshCertificateRequest {
            token: login.token,
            public_key,
            valid_seconds: args
                .valid
                .map_or(0, |d| d.as_secs().min(u64::from(u32::MAX)) as u32),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let key_name = key.to_string_lossy();
    let cert_path = PathBuf::from(format!(
        "{}-cert.pub",
        key_name.strip_suffix(".pub").unwrap_or(&key_name)
    ));
    std::fs::write(&cert_path, format!("{}\n", issued.certificate))
        .with_context(|| format!("cannot write {}", cert_path.display()))?;
    println!("SSH certificate {}", cert_path.display());
    Ok(ExitCode::SUCCESS)
}
