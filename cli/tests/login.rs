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
