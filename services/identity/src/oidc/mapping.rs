//! Claim mapping: CEL expressions, written by the operator per provider,
//! that turn an OpenID Provider's claims into k8shell's user fields.

use std::sync::Arc;

use cel_interpreter::{Context, Program};
use serde::{Deserialize, Serialize};

/// The expressions, as configured. Each sees `claims`: the ID token's
/// claims merged with the UserInfo response.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClaimMappingConfig {
    /// The k8shell username (lowercased after evaluation).
    pub username: String,
    /// Contact address.
    pub email: String,
    /// Human name.
    pub display_name: String,
    /// Roles (a list of strings). Empty: the provider does not manage
    /// roles, which stay as administrators set them; otherwise they are
    /// set on creation and brought in line at every login.
    pub roles: String,
}

impl Default for ClaimMappingConfig {
    fn default() -> Self {
        Self {
            username: "claims.preferred_username".to_owned(),
            email: "has(claims.email) ? claims.email : ''".to_owned(),
            display_name: "has(claims.name) ? claims.name : ''".to_owned(),
            roles: String::new(),
        }
    }
}

/// What the mapping made of one account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedUser {
    pub username: String,
    pub email: String,
    pub display_name: String,
    /// `None` when the provider does not manage roles.
    pub roles: Option<Vec<String>>,
}

/// A mapping that failed, naming the field and the expression.
#[derive(Debug, thiserror::Error)]
#[error("claim mapping `{field}` ({source_text}): {message}")]
pub struct MappingError {
    pub field: &'static str,
    pub source_text: String,
    pub message: String,
}

struct Compiled {
    field: &'static str,
    source_text: String,
    program: Arc<Program>,
}

impl Compiled {
    fn new(field: &'static str, source_text: &str) -> Result<Self, MappingError> {
        let program = Program::compile(source_text).map_err(|e| MappingError {
            field,
            source_text: source_text.to_owned(),
            message: format!("does not compile: {e}"),
        })?;
        Ok(Self {
            field,
            source_text: source_text.to_owned(),
            program: Arc::new(program),
        })
    }

    fn error(&self, message: String) -> MappingError {
        MappingError {
            field: self.field,
            source_text: self.source_text.clone(),
            message,
        }
    }

    fn eval(&self, context: &Context<'_>) -> Result<serde_json::Value, MappingError> {
        let value = self
            .program
            .execute(context)
            .map_err(|e| self.error(e.to_string()))?;
        value.json().map_err(|e| self.error(format!("{e:?}")))
    }

    fn string(&self, context: &Context<'_>) -> Result<String, MappingError> {
        match self.eval(context)? {
            serde_json::Value::String(s) => Ok(s),
            serde_json::Value::Null => Ok(String::new()),
            other => Err(self.error(format!("gave {other}, not a string"))),
        }
    }
}

/// The compiled expressions of one provider.
pub struct ClaimMapping {
    username: Compiled,
    email: Compiled,
    display_name: Compiled,
    roles: Option<Compiled>,
}

impl ClaimMapping {
    /// Compiles the expressions; a syntax error is a configuration error.
    pub fn compile(config: &ClaimMappingConfig) -> Result<Self, MappingError> {
        Ok(Self {
            username: Compiled::new("username", &config.username)?,
            email: Compiled::new("email", &config.email)?,
            display_name: Compiled::new("display_name", &config.display_name)?,
            roles: if config.roles.trim().is_empty() {
                None
            } else {
                Some(Compiled::new("roles", &config.roles)?)
            },
        })
    }

    /// Maps `claims` to user fields.
    pub fn apply(&self, claims: &serde_json::Value) -> Result<MappedUser, MappingError> {
        let mut context = Context::default();
        context.add_variable_from_value("claims", k8shell_cel::json_to_cel(claims));
        let roles = match &self.roles {
            None => None,
            Some(roles) => match roles.eval(&context)? {
                serde_json::Value::Array(items) => Some(
                    items
                        .into_iter()
                        .map(|item| match item {
                            serde_json::Value::String(s) => Ok(s),
                            other => Err(roles.error(format!("gave {other} in the list"))),
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
                other => return Err(roles.error(format!("gave {other}, not a list"))),
            },
        };
        Ok(MappedUser {
            username: self.username.string(&context)?.to_lowercase(),
            email: self.email.string(&context)?,
            display_name: self.display_name.string(&context)?,
            roles,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_map_standard_claims() {
        let mapping = ClaimMapping::compile(&ClaimMappingConfig::default()).unwrap();
        let user = mapping
            .apply(&serde_json::json!({"sub": "1", "preferred_username": "Alice", "email": "a@x", "name": "Alice A"}))
            .unwrap();
        assert_eq!(user.username, "alice");
        assert_eq!(user.email, "a@x");
        assert_eq!(user.display_name, "Alice A");
        assert_eq!(user.roles, None);
        let bare = mapping
            .apply(&serde_json::json!({"sub": "1", "preferred_username": "bob"}))
            .unwrap();
        assert_eq!((bare.email.as_str(), bare.display_name.as_str()), ("", ""));
    }

    #[test]
    fn roles_come_from_groups() {
        let mapping = ClaimMapping::compile(&ClaimMappingConfig {
            roles: "'admins' in claims.groups ? ['admin'] : []".to_owned(),
            ..Default::default()
        })
        .unwrap();
        let admin = mapping
            .apply(&serde_json::json!({"preferred_username": "carol", "groups": ["admins"]}))
            .unwrap();
        assert_eq!(admin.roles, Some(vec!["admin".to_owned()]));
        let user = mapping
            .apply(&serde_json::json!({"preferred_username": "dave", "groups": ["devs"]}))
            .unwrap();
        assert_eq!(user.roles, Some(vec![]));
    }

    #[test]
    fn errors_name_the_field() {
        let error = ClaimMapping::compile(&ClaimMappingConfig {
            email: "claims.(".to_owned(),
            ..Default::default()
        })
        .err()
        .unwrap();
        assert_eq!(error.field, "email");
        let mapping = ClaimMapping::compile(&ClaimMappingConfig::default()).unwrap();
        let error = mapping.apply(&serde_json::json!({"sub": "x"})).unwrap_err();
        assert_eq!(error.field, "username");
        let mapping = ClaimMapping::compile(&ClaimMappingConfig {
            roles: "claims.sub".to_owned(),
            ..Default::default()
        })
        .unwrap();
        let error = mapping
            .apply(&serde_json::json!({"sub": "x", "preferred_username": "x"}))
            .unwrap_err();
        assert!(error.to_string().contains("not a list"), "{error}");
    }
}
