//! Workspace ids: `<username>-<hex>`, hex from a hash of the user and the
//! workspace spec, lengthened when two specs collide.

use sha2::{Digest, Sha256};

/// Shortest hash suffix, as in `alice-1a7fd88`.
pub const MIN_HEX: usize = 7;
/// Longest suffix tried before giving up on collisions.
pub const MAX_HEX: usize = 16;

/// Why a name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    /// Usernames are DNS-label-like so ids fit in `<port>--<id>.<domain>`.
    #[error(
        "invalid username {0:?}: use 1-32 lowercase letters, digits or '-', starting with a letter and not ending with '-'"
    )]
    Username(String),
    /// Blueprint names follow the same rule, up to 40 characters.
    #[error(
        "invalid blueprint name {0:?}: use 1-40 lowercase letters, digits or '-', starting with a letter or digit"
    )]
    Blueprint(String),
}

fn label_like(value: &str, max: usize, first_digit_ok: bool) -> bool {
    let bytes = value.as_bytes();
    let Some(&first) = bytes.first() else {
        return false;
    };
    value.len() <= max
        && (first.is_ascii_lowercase() || (first_digit_ok && first.is_ascii_digit()))
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && !value.ends_with('-')
}

/// Checks a username.
pub fn validate_username(username: &str) -> Result<(), NameError> {
    if label_like(username, 32, false) {
        Ok(())
    } else {
        Err(NameError::Username(username.to_owned()))
    }
}

/// Checks a blueprint name.
pub fn validate_blueprint(blueprint: &str) -> Result<(), NameError> {
    if label_like(blueprint, 40, true) {
        Ok(())
    } else {
        Err(NameError::Blueprint(blueprint.to_owned()))
    }
}

/// The workspace id for a user and spec with `hex_len` hash digits.
pub fn workspace_id(username: &str, spec: &str, hex_len: usize) -> String {
    let digest = Sha256::new()
        .chain_update(username.as_bytes())
        .chain_update([0u8])
        .chain_update(spec.as_bytes())
        .finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{username}-{}", &hex[..hex_len.min(hex.len())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_dns_safe_and_spec_dependent() {
        let a = workspace_id("alice", "dev", MIN_HEX);
        assert_eq!(a, workspace_id("alice", "dev", MIN_HEX));
        assert_ne!(a, workspace_id("alice", "ops", MIN_HEX));
        assert_eq!(a.len(), "alice-".len() + 7);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        );
        let longest = workspace_id(&"a".repeat(32), "x", MAX_HEX);
        assert!(longest.len() <= 63);
        assert!(workspace_id("alice", "dev", 8).starts_with(&a));
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_username("alice").is_ok());
        assert!(validate_username("a-1").is_ok());
        for bad in ["", "Alice", "1abc", "a_b", "a-", "a.b", &"a".repeat(33)] {
            assert!(validate_username(bad).is_err(), "{bad:?}");
        }
        assert!(validate_blueprint("dev").is_ok());
        assert!(validate_blueprint("0-base").is_ok());
        assert!(validate_blueprint("dev!").is_err());
    }
}
