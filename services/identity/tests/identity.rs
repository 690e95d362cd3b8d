//! Identity on real NATS and PostgreSQL, with OpenSSH's `ssh-keygen`
//! checking the certificates it issues.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use k8shell_identity::keyring::{Claims, KeyRing, TokenRequest};
use k8shell_identity::oidc::{ClaimMappingConfig, OidcProviderConfig, OnboardingAction};
use k8shell_proto::identity::v1 as pb;
use k8shell_proto::identity::v1::identity_service_client::IdentityServiceClient;
use k8shell_service::Shutdown;
use k8shell_testkit::TestInfra;
use k8shell_testkit::{Journey, OidcBrowser, TestOidcProvider};
use tonic::Code;
use tonic::transport::Channel;

struct Identity {
    client: IdentityServiceClient<Channel>,
    http: String,
    issuer: String,
    shutdown: Shutdown,
    _dir: tempfile::TempDir,
    infra: TestInfra,
}

async fn start() -> Identity {
    start_with(Vec::new()).await
}

async fn start_with(oidc_providers: Vec<OidcProviderConfig>) -> Identity {
    start_and(|config| config.oidc_providers = oidc_providers).await
}

async fn start_and(configure: impl FnOnce(&mut k8shell_identity::Config)) -> Identity {
    let infra = TestInfra::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http_addr = http.local_addr().unwrap();
    drop(http);
    let issuer = format!("http://{http_addr}");
    let mut config = k8shell_identity::Config {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr,
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        issuer: issuer.clone(),
        bus: infra.bus_config(),
        database_url: infra.postgres.url().to_owned(),
        state_dir: dir.path().to_owned(),
        lockout: k8shell_identity::LockoutConfig {
            max_failures: 3,
            window: Duration::from_secs(60),
            lock_for: Duration::from_secs(60),
        },
        ..Default::default()
    };
    configure(&mut config);
    let shutdown = Shutdown::new();
    let running = k8shell_identity::start(config, shutdown.clone())
        .await
        .unwrap();
    let grpc = running.listener("grpc").unwrap();
    let client = IdentityServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    Identity {
        client,
        http: format!("http://{http_addr}"),
        issuer,
        shutdown,
        _dir: dir,
        infra,
    }
}

/// Verifies a token the way any service does: with the published JWKS.
async fn verify(identity: &Identity, token: &str, audience: &str) -> Result<Claims, String> {
    let jwks: JwkSet = fetch_json(&format!("{}/.well-known/jwks.json", identity.http)).await;
    let kid = jsonwebtoken::decode_header(token)
        .map_err(|e| e.to_string())?
        .kid
        .ok_or("no kid")?;
    let jwk = jwks.find(&kid).ok_or("unknown kid")?;
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_audience(&[audience]);
    validation.set_issuer(&[&identity.issuer]);
    jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_jwk(jwk).unwrap(), &validation)
        .map(|d| d.claims)
        .map_err(|e| e.to_string())
}

async fn fetch_json<T: serde::de::DeserializeOwned>(url: &str) -> T {
    let url = url.to_owned();
    let body = tokio::task::spawn_blocking(move || {
        Command::new("curl").args(["-sf", &url]).output().unwrap()
    })
    .await
    .unwrap();
    assert!(body.status.success(), "GET {:?}", body);
    serde_json::from_slice(&body.stdout).unwrap()
}

async fn create(identity: &mut Identity, username: &str, password: &str, roles: &[&str]) {
    identity
        .client
        .create_user(pb::CreateUserRequest {
            username: username.into(),
            email: format!("{username}@example.test"),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            password: password.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn login(
    identity: &mut Identity,
    username: &str,
    password: &str,
) -> Result<String, tonic::Status> {
    identity
        .client
        .password_login(pb::PasswordLoginRequest {
            username: username.into(),
            password: password.into(),
            source: "192.0.2.7".into(),
        })
        .await
        .map(|r| r.into_inner().token)
}

#[tokio::test]
async fn password_login_lockout_and_uniform_errors() {
    let mut identity = start().await;
    create(&mut identity, "alice", "correct horse battery", &["admin"]).await;

    let token = login(&mut identity, "alice", "correct horse battery")
        .await
        .unwrap();
    let claims = verify(&identity, &token, "k8shell").await.unwrap();
    assert_eq!(claims.sub, "alice");
    assert_eq!(claims.roles, ["admin"]);
    assert_eq!(claims.amr, ["pwd"]);
    let discovery: serde_json::Value = fetch_json(&format!(
        "{}/.well-known/openid-configuration",
        identity.http
    ))
    .await;
    assert_eq!(discovery["issuer"], identity.issuer);
    assert_eq!(
        discovery["jwks_uri"],
        format!("{}/.well-known/jwks.json", identity.issuer)
    );

    // The same answer whether the user exists or not.
    let unknown = login(&mut identity, "mallory", "whatever")
        .await
        .unwrap_err();
    let wrong = login(&mut identity, "alice", "wrong").await.unwrap_err();
    assert_eq!(
        (unknown.code(), unknown.message()),
        (wrong.code(), wrong.message())
    );
    assert_eq!(wrong.code(), Code::Unauthenticated);

    // Three failures in the window lock the account: even the right
    // password is refused, with the same message.
    login(&mut identity, "alice", "wrong").await.unwrap_err();
    login(&mut identity, "alice", "wrong").await.unwrap_err();
    let locked = login(&mut identity, "alice", "correct horse battery")
        .await
        .unwrap_err();
    assert_eq!(locked.message(), wrong.message());
    let user = identity
        .client
        .get_user(pb::GetUserRequest {
            username: "alice".into(),
            min_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(user.locked_until.is_some(), "admins see the lock");

    // The events tell the story, without secrets.
    let bus = identity.infra.bus().await.unwrap();
    let id = k8shell_events::AggregateId::new("alice").unwrap();
    let events = bus
        .event_store()
        .load(k8shell_events::Context::User, &id)
        .await
        .unwrap()
        .events;
    let types: Vec<&str> = events
        .iter()
        .map(|e| e.envelope.event_type.as_str())
        .collect();
    assert_eq!(
        types,
        [
            "k8shell.user.created.v1",
            "k8shell.user.password_set.v1",
            "k8shell.user.login_failed.v1",
            "k8shell.user.login_failed.v1",
            "k8shell.user.login_failed.v1",
            "k8shell.user.locked.v1",
        ]
    );
    let all = serde_json::to_string(&events.iter().map(|e| &e.envelope.data).collect::<Vec<_>>())
        .unwrap();
    assert!(
        !all.contains("correct horse") && !all.contains("argon2"),
        "{all}"
    );

    // A new password (an admin's reset) unlocks.
    identity
        .client
        .set_password(pb::SetPasswordRequest {
            username: "alice".into(),
            password: "a new long password".into(),
        })
        .await
        .unwrap();
    login(&mut identity, "alice", "a new long password")
        .await
        .unwrap();

    // Bad input.
    let bad = identity
        .client
        .create_user(pb::CreateUserRequest {
            username: "Bad Name".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let twice = identity
        .client
        .create_user(pb::CreateUserRequest {
            username: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::AlreadyExists);
    let short = identity
        .client
        .set_password(pb::SetPasswordRequest {
            username: "alice".into(),
            password: "short".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(short.code(), Code::InvalidArgument);
    identity.shutdown.trigger();
}

#[tokio::test]
async fn personal_access_tokens_narrow_and_revoke() {
    let mut identity = start().await;
    create(&mut identity, "bob", "bobs long password", &[]).await;
    let created = identity
        .client
        .create_pat(pb::CreatePatRequest {
            username: "bob".into(),
            name: "ci".into(),
            scopes: vec!["workspace:*".into()],
            valid_days: 7,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.secret.starts_with("k8sh_"));
    let pat = created.pat.unwrap();

    let exchanged = identity
        .client
        .exchange_pat(pb::ExchangePatRequest {
            secret: created.secret.clone(),
            source: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let claims = verify(&identity, &exchanged.token, "k8shell")
        .await
        .unwrap();
    assert_eq!(
        claims.scopes,
        ["workspace:*"],
        "the token carries its narrowing"
    );
    assert_eq!(claims.amr, ["pat"]);
    let listed = identity
        .client
        .list_pats(pb::ListPatsRequest {
            username: "bob".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.pats[0].last_used_at.is_some());
    assert!(!listed.pats[0].revoked);

    // Only the hash is stored.
    let pool = identity.infra.pool("identity").await.unwrap();
    let stored: Vec<u8> = sqlx::query_scalar("SELECT hash FROM pat_secrets WHERE id = $1")
        .bind(&pat.id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored.len(), 32);
    assert!(!String::from_utf8_lossy(&stored).contains(&created.secret[5..20]));

    // The same token with its last digit changed (to a different digit).
    let last = if created.secret.ends_with('0') {
        '1'
    } else {
        '0'
    };
    let forged = format!("{}{last}", &created.secret[..created.secret.len() - 1]);
    for secret in [forged.as_str(), "k8sh_nope", "", "not a token"] {
        let refused = identity
            .client
            .exchange_pat(pb::ExchangePatRequest {
                secret: secret.into(),
                source: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{secret}");
    }

    identity
        .client
        .revoke_pat(pb::RevokePatRequest {
            username: "bob".into(),
            id: pat.id.clone(),
        })
        .await
        .unwrap();
    let revoked = identity
        .client
        .exchange_pat(pb::ExchangePatRequest {
            secret: created.secret,
            source: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(revoked.code(), Code::Unauthenticated);
    let bad_scope = identity
        .client
        .create_pat(pb::CreatePatRequest {
            username: "bob".into(),
            name: "x".into(),
            scopes: vec!["rm -rf".into()],
            valid_days: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(bad_scope.code(), Code::InvalidArgument);
    identity.shutdown.trigger();
}

fn ssh_keygen(args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new("ssh-keygen")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ssh-keygen (openssh-client) is installed");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn ssh_keys_and_certificates_openssh_accepts() {
    let mut identity = start().await;
    create(&mut identity, "carol", "carols long password", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id_ed25519");
    let key_path = key.to_str().unwrap();
    let generated = ssh_keygen(
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "carol@laptop",
            "-f",
            key_path,
        ],
        None,
    );
    assert!(generated.status.success());
    let public = std::fs::read_to_string(format!("{key_path}.pub")).unwrap();

    let added = identity
        .client
        .add_ssh_key(pb::AddSshKeyRequest {
            username: "carol".into(),
            public_key: public.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let printed = ssh_keygen(&["-l", "-f", &format!("{key_path}.pub")], None);
    let openssh_fingerprint = String::from_utf8_lossy(&printed.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
    assert_eq!(
        added.fingerprint, openssh_fingerprint,
        "fingerprints as ssh-keygen -l prints them"
    );
    assert_eq!(added.comment, "carol@laptop");
    let twice = identity
        .client
        .add_ssh_key(pb::AddSshKeyRequest {
            username: "carol".into(),
            public_key: public.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::AlreadyExists);
    let garbage = identity
        .client
        .add_ssh_key(pb::AddSshKeyRequest {
            username: "carol".into(),
            public_key: "ssh-rsa notbase64".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(garbage.code(), Code::InvalidArgument);

    // Key login for the proxy.
    let by_key = identity
        .client
        .public_key_login(pb::PublicKeyLoginRequest {
            username: "carol".into(),
            public_key: public.clone(),
            source: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        verify(&identity, &by_key.token, "k8shell")
            .await
            .unwrap()
            .amr,
        ["publickey"]
    );

    // A certificate for the key, after a login.
    let token = login(&mut identity, "carol", "carols long password")
        .await
        .unwrap();
    let issued = identity
        .client
        .issue_ssh_certificate(pb::IssueSshCertificateRequest {
            token: token.clone(),
            public_key: public.clone(),
            valid_seconds: 3600,
        })
        .await
        .unwrap()
        .into_inner();
    let cert_path = format!("{key_path}-cert.pub");
    std::fs::write(&cert_path, format!("{}\n", issued.certificate)).unwrap();
    let listing = ssh_keygen(&["-L", "-f", &cert_path], None);
    let text = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.status.success(), "{listing:?}");
    assert!(
        text.contains("Type: ssh-ed25519-cert-v01@openssh.com user certificate"),
        "{text}"
    );
    assert!(
        text.contains("Principals: \n                carol"),
        "{text}"
    );
    assert!(text.contains("permit-pty"), "{text}");

    // OpenSSH accepts it: a signature made with the certified key verifies
    // against `cert-authority` trust in the CA, as sshd's TrustedUserCAKeys.
    let ca = identity
        .client
        .get_ssh_user_ca(pb::GetSshUserCaRequest {})
        .await
        .unwrap()
        .into_inner()
        .public_key;
    let message = dir.path().join("message");
    std::fs::write(&message, b"hello from carol").unwrap();
    // Signing through the certificate file embeds the certificate.
    let signed = ssh_keygen(
        &[
            "-Y",
            "sign",
            "-f",
            &cert_path,
            "-n",
            "file",
            message.to_str().unwrap(),
        ],
        None,
    );
    assert!(signed.status.success(), "{signed:?}");
    let signers = dir.path().join("allowed_signers");
    std::fs::write(&signers, format!("carol cert-authority {ca}\n")).unwrap();
    let verified = ssh_keygen(
        &[
            "-Y",
            "verify",
            "-f",
            signers.to_str().unwrap(),
            "-I",
            "carol",
            "-n",
            "file",
            "-s",
            &format!("{}.sig", message.display()),
        ],
        Some(b"hello from carol"),
    );
    assert!(verified.status.success(), "{verified:?}");
    std::fs::write(&signers, format!("dave cert-authority {ca}\n")).unwrap();
    let other = ssh_keygen(
        &[
            "-Y",
            "verify",
            "-f",
            signers.to_str().unwrap(),
            "-I",
            "dave",
            "-n",
            "file",
            "-s",
            &format!("{}.sig", message.display()),
        ],
        Some(b"hello from carol"),
    );
    assert!(!other.status.success(), "the certificate is carol's only");

    // The proxy accepts the certificate as a login too, even with the key
    // itself removed.
    identity
        .client
        .remove_ssh_key(pb::RemoveSshKeyRequest {
            username: "carol".into(),
            fingerprint: added.fingerprint.clone(),
        })
        .await
        .unwrap();
    let by_cert = identity
        .client
        .public_key_login(pb::PublicKeyLoginRequest {
            username: "carol".into(),
            public_key: issued.certificate.clone(),
            source: String::new(),
        })
        .await;
    assert!(by_cert.is_ok(), "{by_cert:?}");
    let removed_key = identity
        .client
        .public_key_login(pb::PublicKeyLoginRequest {
            username: "carol".into(),
            public_key: public,
            source: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(removed_key.code(), Code::Unauthenticated);

    // Tokens: malformed or for the wrong audience are refused.
    for bad in ["", "not.a.jwt", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJjYXJvbCJ9."] {
        let refused = identity
            .client
            .issue_ssh_certificate(pb::IssueSshCertificateRequest {
                token: bad.into(),
                public_key: issued.certificate.clone(),
                valid_seconds: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{bad}");
    }
    let workspace = identity
        .client
        .issue_workspace_token(pb::IssueWorkspaceTokenRequest {
            token,
            workspace_id: "carol-1a7fd88".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let claims = verify(&identity, &workspace.token, "carol-1a7fd88")
        .await
        .unwrap();
    assert_eq!(
        (claims.kind.as_str(), claims.sub.as_str()),
        ("workspace", "carol")
    );
    assert!(
        verify(&identity, &workspace.token, "k8shell")
            .await
            .is_err()
    );
    identity.shutdown.trigger();
}

#[tokio::test]
async fn rotated_keys_keep_verifying_until_their_tokens_expire() {
    let infra = TestInfra::start().await.unwrap();
    let pool = infra.pool("identity").await.unwrap();
    k8shell_identity::migrate(&pool).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kek = k8shell_identity::kek::Kek::load_or_create(&dir.path().join("kek")).unwrap();
    let ring = KeyRing::open(
        pool.clone(),
        kek.clone(),
        "https://id.example".into(),
        Duration::from_secs(3600),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let request = TokenRequest {
        sub: "erin",
        aud: "k8shell",
        kind: "user",
        roles: &[],
        scopes: &[],
        amr: &["pwd"],
        org: "default",
        ttl: Duration::from_secs(60),
        auth_time: None,
    };
    let (old, _) = ring.sign(&request).unwrap();
    let old_kid = jsonwebtoken::decode_header(&old).unwrap().kid.unwrap();
    // The key that signs after the rotation is published before it.
    let before: JwkSet = serde_json::from_str(&ring.jwks()).unwrap();
    assert_eq!(before.keys.len(), 2, "the signer and the next key");
    ring.rotate_now().await.unwrap();
    let (new, _) = ring.sign(&request).unwrap();
    let new_kid = jsonwebtoken::decode_header(&new).unwrap().kid.unwrap();
    assert_ne!(old_kid, new_kid, "a new key signs");
    assert!(
        before.find(&new_kid).is_some(),
        "verifiers that cached the JWKS before the rotation know the new signer"
    );
    assert!(
        ring.verify(&old, "k8shell").is_ok(),
        "the old key still verifies"
    );
    assert!(ring.verify(&new, "k8shell").is_ok());
    let jwks: JwkSet = serde_json::from_str(&ring.jwks()).unwrap();
    assert_eq!(
        jwks.keys.len(),
        3,
        "old and new published during the overlap, and the next one"
    );

    // Another replica sees the same keys (they live in Postgres, sealed).
    let replica = KeyRing::open(
        pool.clone(),
        kek,
        "https://id.example".into(),
        Duration::from_secs(3600),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert!(replica.verify(&old, "k8shell").is_ok());
    let sealed: Vec<u8> = sqlx::query_scalar("SELECT private_key FROM signing_keys LIMIT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&sealed).contains("PRIVATE KEY"),
        "sealed at rest"
    );

    // Once the old key's tokens can no longer be valid, it is gone.
    sqlx::query("UPDATE signing_keys SET expires_at = now() - interval '1 second' WHERE kid = $1")
        .bind(&old_kid)
        .execute(&pool)
        .await
        .unwrap();
    ring.refresh().await.unwrap();
    assert!(ring.verify(&old, "k8shell").is_err());
    assert!(ring.verify(&new, "k8shell").is_ok());
    let jwks: JwkSet = serde_json::from_str(&ring.jwks()).unwrap();
    assert_eq!(jwks.keys.len(), 2, "the signer and the next key");
    // Wrong audience, tampering and `alg: none` are refused.
    assert!(ring.verify(&new, "alice-1a7fd88").is_err());
    let mut parts: Vec<&str> = new.split('.').collect();
    let none_header = "eyJhbGciOiJub25lIiwia2lkIjoieCJ9";
    parts[0] = none_header;
    assert!(ring.verify(&parts.join("."), "k8shell").is_err());
}

/// Where the test provider sends browsers back to; nothing listens there:
/// the scripted browser stops at the redirect, as the apiserver's callback
/// page would take over.
const REDIRECT_URI: &str = "http://127.0.0.1:9/oidc/callback";

fn corp(provider: &TestOidcProvider) -> OidcProviderConfig {
    let mut config = provider.identity_config(
        "corp",
        &[
            ("mallory*", OnboardingAction::Reject),
            ("wait-*", OnboardingAction::Waitlist),
            ("*", OnboardingAction::Allow),
        ],
    );
    config.scopes.push("groups".into());
    config.claims = ClaimMappingConfig {
        roles: "'k8shell-admins' in claims.groups ? ['admin'] : []".into(),
        ..Default::default()
    };
    config
}

/// A browser login through `corp` as `login`: begin, the provider's pages,
/// and the `code` + `state` the redirect brings back.
async fn browser_login(identity: &mut Identity, login: &str) -> (String, String) {
    let begun = identity
        .client
        .begin_oidc_login(pb::BeginOidcLoginRequest {
            provider: "corp".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        begun
            .authorization_url
            .contains("code_challenge_method=S256")
    );
    let mut browser = OidcBrowser::new(login).unwrap();
    let Journey::Redirected(back) = browser
        .run(&begun.authorization_url, REDIRECT_URI, None)
        .await
        .unwrap()
    else {
        panic!("no redirect back");
    };
    let back = url::Url::parse(&back).unwrap();
    let param = |name: &str| {
        back.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    assert_eq!(param("state"), begun.state);
    (param("code"), param("state"))
}

async fn complete(
    identity: &mut Identity,
    code: &str,
    state: &str,
) -> Result<pb::LoginResponse, tonic::Status> {
    identity
        .client
        .complete_oidc_login(pb::CompleteOidcLoginRequest {
            state: state.into(),
            code: code.into(),
            source: "192.0.2.9".into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn oidc_code_flow_with_pkce_links_maps_and_onboards() {
    let provider = TestOidcProvider::start(REDIRECT_URI).await.unwrap();
    let mut identity = start_with(vec![corp(&provider)]).await;

    let providers = identity
        .client
        .list_oidc_providers(pb::ListOidcProvidersRequest {})
        .await
        .unwrap()
        .into_inner()
        .providers;
    assert_eq!(providers.len(), 1);
    assert_eq!(providers[0].display_name, "Corp SSO");
    assert!(providers[0].browser_login);

    // First login creates the user from the mapped claims.
    let (code, state) = browser_login(&mut identity, "alice").await;
    let login = complete(&mut identity, &code, &state).await.unwrap();
    let claims = verify(&identity, &login.token, "k8shell").await.unwrap();
    assert_eq!(claims.sub, "alice");
    assert_eq!(claims.amr, vec!["oidc".to_owned()]);
    let user = login.user.unwrap();
    assert_eq!(user.origin, "oidc:corp");
    assert_eq!(user.email, "alice@example.test");
    assert_eq!(user.display_name, "User alice");
    assert_eq!(user.linked_providers, vec!["corp".to_owned()]);
    assert!(user.roles.is_empty());

    // A state completes once: the replayed redirect is refused.
    let replay = complete(&mut identity, &code, &state).await.unwrap_err();
    assert_eq!(replay.code(), Code::FailedPrecondition, "{replay:?}");

    // The second login finds the linked user.
    let (code, state) = browser_login(&mut identity, "alice").await;
    let again = complete(&mut identity, &code, &state).await.unwrap();
    assert_eq!(again.user.unwrap().version, user.version);

    // Roles come from the groups claim.
    let (code, state) = browser_login(&mut identity, "admin-bob").await;
    let admin = complete(&mut identity, &code, &state).await.unwrap();
    assert_eq!(admin.user.unwrap().roles, vec!["admin".to_owned()]);

    // Onboarding: rejected names never get an account.
    let (code, state) = browser_login(&mut identity, "mallory").await;
    let rejected = complete(&mut identity, &code, &state).await.unwrap_err();
    assert_eq!(rejected.code(), Code::PermissionDenied, "{rejected:?}");
    let missing = identity
        .client
        .get_user(pb::GetUserRequest {
            username: "mallory".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // Waitlisted names get an account that cannot log in until approved.
    let (code, state) = browser_login(&mut identity, "wait-carl").await;
    let waiting = complete(&mut identity, &code, &state).await.unwrap_err();
    assert_eq!(waiting.code(), Code::PermissionDenied);
    assert!(waiting.message().contains("approval"), "{waiting:?}");
    let listed = identity
        .client
        .get_user(pb::GetUserRequest {
            username: "wait-carl".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.waitlisted);
    identity
        .client
        .approve_user(pb::ApproveUserRequest {
            username: "wait-carl".into(),
            approved_by: "admin".into(),
        })
        .await
        .unwrap();
    let (code, state) = browser_login(&mut identity, "wait-carl").await;
    complete(&mut identity, &code, &state).await.unwrap();

    // A local user of the same name is not taken over.
    create(&mut identity, "erin", "correct horse battery", &[]).await;
    let (code, state) = browser_login(&mut identity, "erin").await;
    let taken = complete(&mut identity, &code, &state).await.unwrap_err();
    assert_eq!(taken.code(), Code::PermissionDenied);
    assert!(taken.message().contains("not linked"), "{taken:?}");

    // Bad input: unknown provider, unknown state, a provider's refusal, a
    // forged code.
    let unknown = identity
        .client
        .begin_oidc_login(pb::BeginOidcLoginRequest {
            provider: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let forged_state = complete(&mut identity, "x", "not-a-state")
        .await
        .unwrap_err();
    assert_eq!(forged_state.code(), Code::FailedPrecondition);
    let begun = identity
        .client
        .begin_oidc_login(pb::BeginOidcLoginRequest {
            provider: "corp".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let denied = identity
        .client
        .complete_oidc_login(pb::CompleteOidcLoginRequest {
            state: begun.state,
            error: "access_denied".into(),
            error_description: "the user said no".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("access_denied"));
    let begun = identity
        .client
        .begin_oidc_login(pb::BeginOidcLoginRequest {
            provider: "corp".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let forged = complete(&mut identity, "forged-code", &begun.state)
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::Unauthenticated, "{forged:?}");
    identity.shutdown.trigger();
}

#[tokio::test]
async fn oidc_device_flow_logs_in_the_cli() {
    let provider = TestOidcProvider::start(REDIRECT_URI).await.unwrap();
    let mut identity = start_with(vec![corp(&provider)]).await;
    let mut updates = identity
        .client
        .oidc_device_login(pb::OidcDeviceLoginRequest {
            provider: "corp".into(),
            source: "192.0.2.10".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::oidc_device_login_update::Update::Prompt(prompt)) =
        updates.message().await.unwrap().unwrap().update
    else {
        panic!("the first update is the prompt");
    };
    assert!(prompt.verification_uri.starts_with(&provider.issuer));
    assert!(!prompt.user_code.is_empty());
    // The user, at a browser elsewhere, types the code and logs in.
    let mut browser = OidcBrowser::new("dave").unwrap();
    let journey = browser
        .run(
            &prompt.verification_uri,
            REDIRECT_URI,
            Some(&prompt.user_code),
        )
        .await
        .unwrap();
    assert!(matches!(journey, Journey::DeviceApproved), "{journey:?}");
    let completed = tokio::time::timeout(Duration::from_secs(30), updates.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(pb::oidc_device_login_update::Update::Completed(login)) = completed.update else {
        panic!("the last update carries the token");
    };
    let claims = verify(&identity, &login.token, "k8shell").await.unwrap();
    assert_eq!(claims.sub, "dave");
    assert_eq!(login.user.unwrap().origin, "oidc:corp");

    // An abandoned device login ends with the call; a wrong user code at
    // the provider does not log anyone in.
    let mut abandoned = identity
        .client
        .oidc_device_login(pb::OidcDeviceLoginRequest {
            provider: "corp".into(),
            source: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(abandoned.message().await.unwrap().is_some());
    let mut wrong = OidcBrowser::new("eve").unwrap();
    let error = wrong
        .run(&prompt.verification_uri, REDIRECT_URI, Some("WRONG-CODE"))
        .await;
    assert!(error.is_err(), "{error:?}");
    drop(abandoned);
    let unknown = identity
        .client
        .oidc_device_login(pb::OidcDeviceLoginRequest {
            provider: "nope".into(),
            source: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    identity.shutdown.trigger();
}

#[tokio::test]
async fn organisations_hold_users_and_reach_tokens() {
    let mut identity = start().await;
    let created = identity
        .client
        .create_org(pb::CreateOrgRequest {
            name: "acme".into(),
            description: "Acme Corp".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.name, "acme");
    let twice = identity
        .client
        .create_org(pb::CreateOrgRequest {
            name: "acme".into(),
            description: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::AlreadyExists);
    for bad in ["Acme", "a_b", "", "default"] {
        let status = identity
            .client
            .create_org(pb::CreateOrgRequest {
                name: bad.into(),
                description: String::new(),
            })
            .await
            .unwrap_err();
        assert!(
            matches!(status.code(), Code::InvalidArgument | Code::AlreadyExists),
            "{bad}: {status:?}"
        );
    }
    // A user in an organisation that does not exist is refused.
    let missing = identity
        .client
        .create_user(pb::CreateUserRequest {
            username: "gina".into(),
            organization: "globex".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::FailedPrecondition);
    identity
        .client
        .create_user(pb::CreateUserRequest {
            username: "gina".into(),
            password: "correct horse battery".into(),
            organization: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let token = login(&mut identity, "gina", "correct horse battery")
        .await
        .unwrap();
    let claims = verify(&identity, &token, "k8shell").await.unwrap();
    assert_eq!(claims.org, "acme");
    // Moving users; the default organisation needs no creating.
    let moved = identity
        .client
        .set_user_organization(pb::SetUserOrganizationRequest {
            username: "gina".into(),
            organization: "default".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.organization, "default");
    // The projection lists both, eventually.
    let mut names = Vec::new();
    for _ in 0..50 {
        names = identity
            .client
            .list_orgs(pb::ListOrgsRequest {})
            .await
            .unwrap()
            .into_inner()
            .orgs
            .into_iter()
            .map(|o| o.name)
            .collect::<Vec<_>>();
        if names.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(names, vec!["default".to_owned(), "acme".to_owned()]);
    let mut listed = String::new();
    for _ in 0..50 {
        listed = identity
            .client
            .list_users(pb::ListUsersRequest::default())
            .await
            .unwrap()
            .into_inner()
            .users
            .into_iter()
            .find(|u| u.username == "gina")
            .map(|u| u.organization)
            .unwrap_or_default();
        if listed == "default" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(listed, "default");
    identity.shutdown.trigger();
}

#[tokio::test]
async fn services_get_workspace_tokens_and_the_jwks_over_grpc() {
    let mut identity = start().await;
    let issued = identity
        .client
        .issue_service_token(pb::IssueServiceTokenRequest {
            service: "provisioner".into(),
            workspace_id: "alice-1a7fd88".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let claims = verify(&identity, &issued.token, "alice-1a7fd88")
        .await
        .unwrap();
    assert_eq!(claims.sub, "system:provisioner");
    assert_eq!(claims.kind, "workspace");
    assert!(verify(&identity, &issued.token, "k8shell").await.is_err());
    let jwks = identity
        .client
        .get_jwks(pb::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner()
        .jwks;
    let published: JwkSet = fetch_json(&format!("{}/.well-known/jwks.json", identity.http)).await;
    let over_grpc: JwkSet = serde_json::from_str(&jwks).unwrap();
    assert_eq!(over_grpc.keys.len(), published.keys.len());
    for bad in [
        ("", "alice-1"),
        ("Prov", "alice-1"),
        ("provisioner", "a.b"),
        ("provisioner", ""),
    ] {
        let status = identity
            .client
            .issue_service_token(pb::IssueServiceTokenRequest {
                service: bad.0.into(),
                workspace_id: bad.1.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
    }
    identity.shutdown.trigger();
}

async fn renew(identity: &mut Identity, token: &str) -> Result<String, tonic::Status> {
    identity
        .client
        .renew_login(pb::RenewLoginRequest {
            token: token.into(),
            source: "192.0.2.7".into(),
        })
        .await
        .map(|r| r.into_inner().token)
}

/// Long SSH sessions renew their token: same login, current roles, never
/// from an expired token, never past the login's maximum age, never for a
/// locked account or a PAT.
#[tokio::test]
async fn logins_renew_until_their_maximum_age() {
    let mut identity = start_and(|config| {
        config.user_token_ttl = Duration::from_secs(3);
        config.login_max_age = Duration::from_secs(6);
    })
    .await;
    create(&mut identity, "alice", "correct horse battery", &[]).await;
    let first = login(&mut identity, "alice", "correct horse battery")
        .await
        .unwrap();
    let logged_in = verify(&identity, &first, "k8shell").await.unwrap();
    assert!(logged_in.auth_time > 0);

    // Renewed with the roles the user has now, as the same login.
    identity
        .client
        .set_roles(pb::SetRolesRequest {
            username: "alice".into(),
            roles: vec!["admin".into()],
        })
        .await
        .unwrap();
    let second = renew(&mut identity, &first).await.unwrap();
    let renewed = verify(&identity, &second, "k8shell").await.unwrap();
    assert_eq!(renewed.sub, "alice");
    assert_eq!(renewed.amr, ["pwd"]);
    assert_eq!(renewed.roles, ["admin"]);
    assert_eq!(renewed.auth_time, logged_in.auth_time);
    assert_ne!(renewed.jti, logged_in.jti);

    // Not what is not a live user token.
    for bad in ["", "garbage", "a.b.c"] {
        let refused = renew(&mut identity, bad).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{bad:?}");
    }
    let workspace_token = identity
        .client
        .issue_workspace_token(pb::IssueWorkspaceTokenRequest {
            token: second.clone(),
            workspace_id: "alice-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let refused = renew(&mut identity, &workspace_token).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let pat = identity
        .client
        .create_pat(pb::CreatePatRequest {
            username: "alice".into(),
            name: "ci".into(),
            scopes: vec!["workspace:*".into()],
            valid_days: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let exchanged = identity
        .client
        .exchange_pat(pb::ExchangePatRequest {
            secret: pat.secret,
            source: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let refused = renew(&mut identity, &exchanged).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("exchange the PAT again"));

    // Renewing every 1.5 s (tokens live 3 s, counted in whole seconds)
    // keeps the login going until it is 6 s old.
    let mut current = second;
    let mut refusal = None;
    let mut renewals = 0;
    for _ in 0..7 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        match renew(&mut identity, &current).await {
            Ok(token) => {
                current = token;
                renewals += 1;
            }
            Err(status) => {
                refusal = Some(status);
                break;
            }
        }
    }
    let refusal = refusal.expect("the login outlived its maximum age");
    assert!(renewals >= 2, "only {renewals} renewals before the refusal");
    assert_eq!(refusal.code(), tonic::Code::Unauthenticated);
    assert!(
        refusal.message().contains("older than 6s"),
        "{}",
        refusal.message()
    );
    // The first token has expired by now: no renewal, even within the
    // verification's clock-skew leeway.
    let refused = renew(&mut identity, &first).await.unwrap_err();
    assert_eq!(refused.message(), "invalid or expired token");

    // A locked account is not renewed.
    create(&mut identity, "bob", "bobs long password", &[]).await;
    let bobs = login(&mut identity, "bob", "bobs long password")
        .await
        .unwrap();
    for _ in 0..3 {
        login(&mut identity, "bob", "wrong").await.unwrap_err();
    }
    let refused = renew(&mut identity, &bobs).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    identity.shutdown.trigger();
}
