//! Login through external OpenID Providers: identity is a relying party
//! (authorization code with PKCE for browsers, the device authorization
//! grant for the CLI and SSH), maps the provider's claims to a user with
//! CEL, and onboards newcomers by rule.

mod client;
mod mapping;
mod onboarding;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use client::{DevicePrompt, OidcError, VerifiedAccount};
pub use mapping::{ClaimMapping, ClaimMappingConfig, MappedUser, MappingError};
pub use onboarding::{Onboarding, OnboardingAction, OnboardingRule, RuleError};

/// One OpenID Provider as configured.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcProviderConfig {
    /// Short name, used in requests and in `oidc:<name>` origins.
    pub name: String,
    /// Shown on login pages.
    #[serde(default)]
    pub display_name: String,
    /// Issuer URL; discovery is at `<issuer>/.well-known/openid-configuration`.
    pub issuer: String,
    pub client_id: String,
    /// The client secret, or…
    #[serde(default)]
    pub client_secret: String,
    /// …a file holding it (preferred: keeps it out of config files).
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Where the provider sends browsers back to (must be registered with
    /// the provider). Empty: no browser login through this provider.
    #[serde(default)]
    pub redirect_uri: String,
    /// Scopes asked for; `openid` is always included.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// Claims → user fields.
    #[serde(default)]
    pub claims: ClaimMappingConfig,
    /// First-login rules; none matching rejects.
    #[serde(default)]
    pub onboarding: Vec<OnboardingRule>,
}

fn default_scopes() -> Vec<String> {
    ["openid", "email", "profile"].map(str::to_owned).to_vec()
}

/// A provider configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum OidcConfigError {
    #[error("OIDC provider {0:?} is configured twice")]
    Duplicate(String),
    #[error("OIDC provider {provider:?}: {message}")]
    Invalid { provider: String, message: String },
}

/// One provider, ready to use.
pub struct Provider {
    pub name: String,
    pub display_name: String,
    pub mapping: ClaimMapping,
    pub onboarding: Onboarding,
    client: client::ProviderClient,
}

impl Provider {
    /// Whether browsers can log in through it.
    pub fn browser_login(&self) -> bool {
        self.client.has_redirect()
    }

    /// The provider's endpoints.
    pub fn client(&self) -> &client::ProviderClient {
        &self.client
    }
}

/// The configured providers by name.
#[derive(Default)]
pub struct OidcProviders {
    providers: BTreeMap<String, Arc<Provider>>,
}

impl OidcProviders {
    /// Validates the configuration: names, URLs, secrets, expressions and
    /// patterns are checked here, so a mistake stops start-up rather than
    /// a user's login. Providers themselves are contacted lazily.
    pub fn from_config(
        configs: &[OidcProviderConfig],
        timeout: Duration,
    ) -> Result<Self, OidcConfigError> {
        let http = client::http_client(timeout).map_err(|message| OidcConfigError::Invalid {
            provider: String::new(),
            message,
        })?;
        let mut providers = BTreeMap::new();
        for config in configs {
            let invalid = |message: String| OidcConfigError::Invalid {
                provider: config.name.clone(),
                message,
            };
            if config.name.is_empty()
                || !config
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(invalid(
                    "the name must be letters, digits, - and _".to_owned(),
                ));
            }
            if providers.contains_key(&config.name) {
                return Err(OidcConfigError::Duplicate(config.name.clone()));
            }
            let secret = match &config.client_secret_file {
                Some(path) => std::fs::read_to_string(path)
                    .map(|s| s.trim().to_owned())
                    .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?,
                None => config.client_secret.clone(),
            };
            let mapping =
                ClaimMapping::compile(&config.claims).map_err(|e| invalid(e.to_string()))?;
            let onboarding =
                Onboarding::compile(&config.onboarding).map_err(|e| invalid(e.to_string()))?;
            let client =
                client::ProviderClient::new(config, secret, http.clone()).map_err(invalid)?;
            providers.insert(
                config.name.clone(),
                Arc::new(Provider {
                    name: config.name.clone(),
                    display_name: if config.display_name.is_empty() {
                        config.name.clone()
                    } else {
                        config.display_name.clone()
                    },
                    mapping,
                    onboarding,
                    client,
                }),
            );
        }
        Ok(Self { providers })
    }

    /// A provider by name.
    pub fn get(&self, name: &str) -> Option<Arc<Provider>> {
        self.providers.get(name).cloned()
    }

    /// All providers, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Provider>> {
        self.providers.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(name: &str) -> OidcProviderConfig {
        OidcProviderConfig {
            name: name.to_owned(),
            display_name: String::new(),
            issuer: "https://sso.example.test".to_owned(),
            client_id: "k8shell".to_owned(),
            client_secret: "s".to_owned(),
            client_secret_file: None,
            redirect_uri: String::new(),
            scopes: default_scopes(),
            claims: ClaimMappingConfig::default(),
            onboarding: Vec::new(),
        }
    }

    fn error(configs: &[OidcProviderConfig]) -> String {
        match OidcProviders::from_config(configs, Duration::from_secs(1)) {
            Ok(_) => panic!("accepted"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn mistakes_stop_start_up_with_the_provider_named() {
        let ok = OidcProviders::from_config(&[config("corp")], Duration::from_secs(1)).unwrap();
        let corp = ok.get("corp").unwrap();
        assert_eq!(corp.display_name, "corp");
        assert!(!corp.browser_login());
        assert!(error(&[config("a"), config("a")]).contains("twice"));
        assert!(error(&[config("bad name")]).contains("letters"));
        let mut bad_cel = config("corp");
        bad_cel.claims.username = "claims.(".to_owned();
        let message = error(&[bad_cel]);
        assert!(
            message.contains("corp") && message.contains("username"),
            "{message}"
        );
        let mut bad_url = config("corp");
        bad_url.issuer = "not a url".to_owned();
        assert!(error(&[bad_url]).contains("issuer"));
        let mut missing_secret = config("corp");
        missing_secret.client_secret_file = Some(PathBuf::from("/nonexistent/secret"));
        assert!(error(&[missing_secret]).contains("/nonexistent/secret"));
        let mut bad_rule = config("corp");
        bad_rule.onboarding = vec![OnboardingRule {
            username: String::new(),
            action: OnboardingAction::Allow,
        }];
        assert!(error(&[bad_rule]).contains("onboarding rule 0"));
    }
}
