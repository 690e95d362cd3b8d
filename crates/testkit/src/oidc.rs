//! A real OpenID Provider for tests (the npm package `oidc-provider`, run
//! by node from `tests/oidc-provider`), and a minimal scripted browser that
//! logs a user in through its pages: cookies, redirects and forms, as a
//! person at a browser would.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running provider with one confidential client.
pub struct TestOidcProvider {
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    pub redirect_uri: String,
    _child: Child,
}

impl TestOidcProvider {
    /// Starts the provider; `redirect_uri` is registered for the client.
    pub async fn start(redirect_uri: &str) -> anyhow::Result<Self> {
        let dir = crate::repo_root().join("tests/oidc-provider");
        if !dir.join("node_modules/oidc-provider").is_dir() {
            bail!(
                "{} has no node_modules: run ./scripts/test, which installs the test OpenID Provider (npm ci)",
                dir.display()
            );
        }
        let client_id = "k8shell".to_owned();
        let client_secret = "k8shell-test-secret".to_owned();
        let mut child = Command::new("node")
            .arg("server.mjs")
            .current_dir(&dir)
            .env("OIDC_CLIENT_ID", &client_id)
            .env("OIDC_CLIENT_SECRET", &client_secret)
            .env("OIDC_REDIRECT_URI", redirect_uri)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot run node (the test OpenID Provider needs Node.js)")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let issuer = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(issuer) = line.strip_prefix("listening ") {
                    return Ok::<_, anyhow::Error>(issuer.trim().to_owned());
                }
            }
            bail!("the OpenID Provider exited before listening")
        })
        .await
        .context("the OpenID Provider did not start within 30 s")??;
        // Keep draining stdout so the provider never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            issuer,
            client_id,
            client_secret,
            redirect_uri: redirect_uri.to_owned(),
            _child: child,
        })
    }
}

impl TestOidcProvider {
    /// identity's configuration of this provider as `name`: its client,
    /// the default scopes and claim mapping, and the onboarding rules
    /// (pattern, action), first match first.
    pub fn identity_config(
        &self,
        name: &str,
        onboarding: &[(&str, k8shell_identity::oidc::OnboardingAction)],
    ) -> k8shell_identity::oidc::OidcProviderConfig {
        k8shell_identity::oidc::OidcProviderConfig {
            name: name.to_owned(),
            display_name: format!("{} SSO", capitalized(name)),
            issuer: self.issuer.clone(),
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone(),
            client_secret_file: None,
            redirect_uri: self.redirect_uri.clone(),
            scopes: ["openid", "email", "profile"].map(String::from).to_vec(),
            claims: Default::default(),
            onboarding: onboarding
                .iter()
                .map(
                    |(username, action)| k8shell_identity::oidc::OnboardingRule {
                        username: (*username).to_owned(),
                        action: *action,
                    },
                )
                .collect(),
        }
    }
}

fn capitalized(name: &str) -> String {
    let mut chars = name.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// A scripted browser: one cookie jar, no automatic redirects.
pub struct OidcBrowser {
    http: reqwest::Client,
    cookies: BTreeMap<String, String>,
    login: String,
}

/// Where a browser journey ended.
#[derive(Debug)]
pub enum Journey {
    /// Sent back to the relying party: the full redirect URL.
    Redirected(String),
    /// The provider's "device login complete" page.
    DeviceApproved,
}

fn attribute(tag: &str, name: &str) -> Option<String> {
    let re = regex_lite::Regex::new(&format!(r#"\b{name}="([^"]*)""#)).ok()?;
    re.captures(tag)
        .and_then(|c| c.get(1))
        .map(|m| m.as_str().replace("&amp;", "&"))
}

impl OidcBrowser {
    /// A browser whose user types `login` at the provider's login page.
    pub fn new(login: &str) -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(20))
                .build()?,
            cookies: BTreeMap::new(),
            login: login.to_owned(),
        })
    }

    fn keep_cookies(&mut self, response: &reqwest::Response) {
        for value in response.headers().get_all(reqwest::header::SET_COOKIE) {
            let Ok(value) = value.to_str() else { continue };
            let pair = value.split(';').next().unwrap_or_default();
            let Some((name, content)) = pair.split_once('=') else {
                continue;
            };
            let lower = value.to_ascii_lowercase();
            if content.is_empty() || lower.contains("expires=thu, 01 jan 1970") {
                self.cookies.remove(name.trim());
            } else {
                self.cookies
                    .insert(name.trim().to_owned(), content.trim().to_owned());
            }
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Opens `url` and goes through the provider's pages, filling in the
    /// user-code form with `user_code` and the login form with the login,
    /// until the provider redirects to `stop_at` or shows the device
    /// login's success page.
    pub async fn run(
        &mut self,
        url: &str,
        stop_at: &str,
        user_code: Option<&str>,
    ) -> anyhow::Result<Journey> {
        let mut next: (reqwest::Method, String, Vec<(String, String)>) =
            (reqwest::Method::GET, url.to_owned(), Vec::new());
        for _ in 0..20 {
            let (method, url, form) = next;
            let mut request = self
                .http
                .request(method.clone(), &url)
                .header(reqwest::header::COOKIE, self.cookie_header());
            if method == reqwest::Method::POST {
                request = request.form(&form);
            }
            let response = request.send().await.with_context(|| url.clone())?;
            self.keep_cookies(&response);
            let status = response.status();
            if status.is_redirection() {
                let location = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .context("redirect without Location")?
                    .to_str()?
                    .to_owned();
                let target = reqwest::Url::parse(&url)?.join(&location)?.to_string();
                if target.starts_with(stop_at) {
                    return Ok(Journey::Redirected(target));
                }
                next = (reqwest::Method::GET, target, Vec::new());
                continue;
            }
            let body = response.text().await?;
            if !status.is_success() {
                bail!("{url} answered {status}: {body}");
            }
            if body.contains("device-login-complete") {
                return Ok(Journey::DeviceApproved);
            }
            let form_tag = regex_lite::Regex::new(r"<form[^>]*>")?
                .find(&body)
                .with_context(|| format!("no form on {url}: {body}"))?
                .as_str()
                .to_owned();
            let action = attribute(&form_tag, "action").context("form without action")?;
            let mut fields = Vec::new();
            for input in regex_lite::Regex::new(r"<input[^>]*>")?.find_iter(&body) {
                let tag = input.as_str();
                let Some(name) = attribute(tag, "name") else {
                    continue;
                };
                let value = match (name.as_str(), attribute(tag, "value")) {
                    (_, Some(value)) => value,
                    ("login", None) => self.login.clone(),
                    ("user_code", None) => {
                        user_code.context("a user code is asked for")?.to_owned()
                    }
                    (other, None) => bail!("unexpected input {other} on {url}"),
                };
                fields.push((name, value));
            }
            let target = reqwest::Url::parse(&url)?.join(&action)?.to_string();
            next = (reqwest::Method::POST, target, fields);
        }
        bail!("the login did not finish within 20 pages")
    }
}
