//! `k8shell login` against a real identity service: a token is kept and
//! the user's SSH key gets a certificate OpenSSH reads.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use k8shell_proto::identity::v1 as pb;
use k8shell_proto::identity::v1::identity_service_client::IdentityServiceClient;
use k8shell_service::Shutdown;
use k8shell_testkit::TestInfra;

const BIN: &str = env!("CARGO_BIN_EXE_k8shell");

#[tokio::test]
async fn login_keeps_a_token_and_certifies_the_ssh_key() {
    let infra = TestInfra::start().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let shutdown = Shutdown::new();
    let running = k8shell_identity::start(
        k8shell_identity::Config {
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            bus: infra.bus_config(),
            database_url: infra.postgres.url().to_owned(),
            state_dir: state.path().to_owned(),
            ..Default::default()
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let url = format!("http://{}", running.listener("grpc").unwrap());
    let mut client = IdentityServiceClient::connect(url.clone()).await.unwrap();
    client
        .create_user(pb::CreateUserRequest {
            username: "dora".into(),
            password: "doras long password".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join(".ssh")).unwrap();
    let key = home.path().join(".ssh/id_ed25519");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f", key.to_str().unwrap()])
        .status()
        .expect("ssh-keygen (openssh-client) is installed");
    assert!(made.success());

    let run = |password: &str| {
        let (url, home, password) = (url.clone(), home.path().to_owned(), password.to_owned());
        tokio::task::spawn_blocking(move || {
            Command::new(BIN)
                .args(["login", "--user", "dora"])
                .env("K8SHELL_IDENTITY_URL", url)
                .env("K8SHELL_PASSWORD", password)
                .env("HOME", home)
                .output()
                .unwrap()
        })
    };
    let wrong = run("nope").await.unwrap();
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("invalid username or credentials"),
        "{wrong:?}"
    );

    let ok = run("doras long password").await.unwrap();
    assert!(ok.status.success(), "{ok:?}");
    let token = std::fs::read_to_string(home.path().join(".config/k8shell/token")).unwrap();
    assert_eq!(token.split('.').count(), 3, "a JWT");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(home.path().join(".config/k8shell/token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let cert = home.path().join(".ssh/id_ed25519-cert.pub");
    let listed = Command::new("ssh-keygen")
        .args(["-L", "-f", cert.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{listed:?}");
    assert!(
        text.contains("user certificate") && text.contains("dora"),
        "{text}"
    );
    shutdown.trigger();
}

/// `k8shell login --provider`: the device flow against a real OpenID
/// Provider; the person at the browser is scripted.
#[tokio::test]
async fn login_through_an_openid_provider_with_the_device_flow() {
    use k8shell_identity::oidc::{
        ClaimMappingConfig, OidcProviderConfig, OnboardingAction, OnboardingRule,
    };
    use k8shell_testkit::{Journey, OidcBrowser, TestOidcProvider};
    use tokio::io::AsyncBufReadExt;

    let provider = TestOidcProvider::start("http://127.0.0.1:9/cb")
        .await
        .unwrap();
    let infra = TestInfra::start().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let shutdown = Shutdown::new();
    let running = k8shell_identity::start(
        k8shell_identity::Config {
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            bus: infra.bus_config(),
            database_url: infra.postgres.url().to_owned(),
            state_dir: state.path().to_owned(),
            oidc_providers: vec![OidcProviderConfig {
                name: "corp".into(),
                display_name: String::new(),
                issuer: provider.issuer.clone(),
                client_id: provider.client_id.clone(),
                client_secret: provider.client_secret.clone(),
                client_secret_file: None,
                redirect_uri: String::new(),
                scopes: vec!["openid".into(), "email".into(), "profile".into()],
                claims: ClaimMappingConfig::default(),
                onboarding: vec![OnboardingRule {
                    username: "*".into(),
                    action: OnboardingAction::Allow,
                }],
            }],
            ..Default::default()
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let url = format!("http://{}", running.listener("grpc").unwrap());
    let home = tempfile::tempdir().unwrap();
    let mut login = tokio::process::Command::new(BIN)
        .args(["login", "--provider", "corp"])
        .env("K8SHELL_IDENTITY_URL", &url)
        .env("HOME", home.path())
        .env_remove("USER")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(login.stdout.take().unwrap()).lines();
    let prompt = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
        .await
        .expect("the CLI shows the prompt")
        .unwrap()
        .unwrap();
    // "to log in, open <uri> and enter the code <code>"
    let words: Vec<&str> = prompt.split_whitespace().collect();
    let uri = words[words.iter().position(|w| *w == "open").unwrap() + 1];
    let code = words.last().unwrap();
    let mut browser = OidcBrowser::new("hannah").unwrap();
    let journey = browser
        .run(uri, "http://127.0.0.1:9/cb", Some(code))
        .await
        .unwrap();
    assert!(matches!(journey, Journey::DeviceApproved), "{journey:?}");
    let mut rest = Vec::new();
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            rest.push(line);
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), read)
        .await
        .expect("the CLI finishes");
    let status = login.wait().await.unwrap();
    assert!(status.success(), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("logged in as hannah")),
        "{rest:?}"
    );
    let token = std::fs::read_to_string(home.path().join(".config/k8shell/token")).unwrap();
    assert_eq!(token.split('.').count(), 3, "a JWT");

    // An unknown provider is a clear error.
    // (tokio's Command: a blocking wait would stall identity, which runs
    // on this test's runtime.)
    let unknown = tokio::process::Command::new(BIN)
        .args(["login", "--provider", "nope"])
        .env("K8SHELL_IDENTITY_URL", &url)
        .env("HOME", home.path())
        .output()
        .await
        .unwrap();
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no OpenID Provider named"),
        "{unknown:?}"
    );
    shutdown.trigger();
}
