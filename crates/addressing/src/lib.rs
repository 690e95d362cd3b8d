//! SSH user strings (DESIGN §4): `USER[~SPEC]`, where SPEC is a blueprint
//! name (`alice~dev`) or `k=v(+k=v)*` with keys `ws`, `bp`, `pod`, `ns`,
//! `workload` and `user`. A `b64-` prefix carries the whole string
//! base64url-encoded, for clients that reject `~`, `+` or `=`.

use base64::Engine as _;

/// Longest user string accepted, encoded or not.
pub const MAX_LEN: usize = 128;

/// Where a user string points.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserString {
    /// The k8shell user.
    pub username: String,
    /// A workspace id (`ws=`).
    pub workspace: Option<String>,
    /// A blueprint (`alice~dev` or `bp=`).
    pub blueprint: Option<String>,
    /// An existing pod to reach (`pod=`, Kubernetes injection).
    pub pod: Option<String>,
    /// Its namespace (`ns=`).
    pub namespace: Option<String>,
    /// A workload to inject into (`workload=kind/name`).
    pub workload: Option<String>,
    /// The account inside the workspace (`user=`).
    pub login: Option<String>,
}

/// A user string that can't be used, with a message fit for an SSH client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserStringError {
    /// Too long.
    #[error("user string is {0} characters; the limit is {MAX_LEN}")]
    TooLong(usize),
    /// Empty or malformed user part.
    #[error(
        "invalid user {0:?}: use lowercase letters, digits and '-', starting with a letter (then optionally ~blueprint or ~key=value+key=value)"
    )]
    User(String),
    /// Bad base64.
    #[error("the b64- form must be base64url of the whole user string")]
    Base64,
    /// Unknown key in a spec.
    #[error("unknown key {0:?}; use ws, bp, pod, ns, workload or user")]
    UnknownKey(String),
    /// A key given twice.
    #[error("key {0:?} given twice")]
    Duplicate(String),
    /// A value with characters outside the allowed set.
    #[error(
        "invalid value {value:?} for {key}: use lowercase letters, digits, '-', '.', '_' or '/'"
    )]
    Value {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// An empty spec after `~`.
    #[error("nothing after '~': give a blueprint (alice~dev) or key=value pairs")]
    EmptySpec,
}

fn valid_name(value: &str, extra: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= 63
        && value.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || extra.contains(&b)
        })
}

impl UserString {
    /// Parses a user string.
    pub fn parse(input: &str) -> Result<Self, UserStringError> {
        if input.len() > MAX_LEN {
            return Err(UserStringError::TooLong(input.len()));
        }
        if let Some(encoded) = input.strip_prefix("b64-") {
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(encoded.trim_end_matches('='))
                .map_err(|_| UserStringError::Base64)?;
            let decoded = String::from_utf8(bytes).map_err(|_| UserStringError::Base64)?;
            if decoded.starts_with("b64-") {
                return Err(UserStringError::Base64);
            }
            return Self::parse(&decoded);
        }
        let (user, spec) = match input.split_once('~') {
            Some((user, spec)) => (user, Some(spec)),
            None => (input, None),
        };
        let user_ok = valid_name(user, &[]) && user.starts_with(|c: char| c.is_ascii_lowercase());
        if !user_ok || user.len() > 32 {
            return Err(UserStringError::User(user.to_owned()));
        }
        let mut parsed = UserString {
            username: user.to_owned(),
            ..Default::default()
        };
        let Some(spec) = spec else {
            return Ok(parsed);
        };
        if spec.is_empty() {
            return Err(UserStringError::EmptySpec);
        }
        if !spec.contains('=') {
            check_value("bp", spec, &[])?;
            parsed.blueprint = Some(spec.to_owned());
            return Ok(parsed);
        }
        for pair in spec.split('+') {
            let (key, value) = pair.split_once('=').ok_or_else(|| UserStringError::Value {
                key: pair.to_owned(),
                value: String::new(),
            })?;
            let (slot, extra): (&mut Option<String>, &[u8]) = match key {
                "ws" => (&mut parsed.workspace, &[]),
                "bp" => (&mut parsed.blueprint, &[]),
                "pod" => (&mut parsed.pod, b"."),
                "ns" => (&mut parsed.namespace, &[]),
                "workload" => (&mut parsed.workload, b"/."),
                "user" => (&mut parsed.login, b"_"),
                other => return Err(UserStringError::UnknownKey(other.to_owned())),
            };
            if slot.is_some() {
                return Err(UserStringError::Duplicate(key.to_owned()));
            }
            check_value(key, value, extra)?;
            *slot = Some(value.to_owned());
        }
        Ok(parsed)
    }
}

fn check_value(key: &str, value: &str, extra: &[u8]) -> Result<(), UserStringError> {
    if valid_name(value, extra) {
        Ok(())
    } else {
        Err(UserStringError::Value {
            key: key.to_owned(),
            value: value.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(
            UserString::parse("alice").unwrap(),
            UserString {
                username: "alice".into(),
                ..Default::default()
            }
        );
        let dev = UserString::parse("alice~dev").unwrap();
        assert_eq!(dev.blueprint.as_deref(), Some("dev"));
        let full = UserString::parse("alice~ws=alice-1a2b3c4+user=root").unwrap();
        assert_eq!(full.workspace.as_deref(), Some("alice-1a2b3c4"));
        assert_eq!(full.login.as_deref(), Some("root"));
        let injected = UserString::parse("bob~workload=deployment/api+ns=prod").unwrap();
        assert_eq!(injected.workload.as_deref(), Some("deployment/api"));
        assert_eq!(injected.namespace.as_deref(), Some("prod"));
        let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("alice~bp=dev");
        assert_eq!(
            UserString::parse(&format!("b64-{encoded}"))
                .unwrap()
                .blueprint
                .as_deref(),
            Some("dev")
        );
    }

    #[test]
    fn bad_strings_say_why() {
        let cases: [(&str, UserStringError); 8] = [
            ("", UserStringError::User(String::new())),
            ("Alice", UserStringError::User("Alice".into())),
            ("alice~", UserStringError::EmptySpec),
            (
                "alice~color=red",
                UserStringError::UnknownKey("color".into()),
            ),
            ("alice~bp=a+bp=b", UserStringError::Duplicate("bp".into())),
            (
                "alice~bp=Dev",
                UserStringError::Value {
                    key: "bp".into(),
                    value: "Dev".into(),
                },
            ),
            ("b64-!!!", UserStringError::Base64),
            (&"a".repeat(129), UserStringError::TooLong(129)),
        ];
        for (input, want) in cases {
            assert_eq!(UserString::parse(input).unwrap_err(), want, "{input:?}");
        }
        let nested = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("b64-x");
        assert_eq!(
            UserString::parse(&format!("b64-{nested}")).unwrap_err(),
            UserStringError::Base64
        );
    }
}
