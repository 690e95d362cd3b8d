//! Credentials: password hashes (argon2id), the lockout window, personal
//! access tokens (only their hashes are kept) and SSH public keys.

use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

/// Lockout policy.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LockoutConfig {
    /// Failures that lock an account...
    pub max_failures: u32,
    /// ...within this window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long the lock lasts.
    #[serde(with = "humantime_serde")]
    pub lock_for: Duration,
}

impl Default for LockoutConfig {
    fn default() -> Self {
        Self {
            max_failures: 5,
            window: Duration::from_secs(15 * 60),
            lock_for: Duration::from_secs(15 * 60),
        }
    }
}

/// Hashes a password with argon2id and a random salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Checks a password against a stored hash. With no hash (unknown user, no
/// password) a dummy hash is checked anyway, so the answer takes as long
/// whether or not the user exists.
pub fn verify_password(password: &str, stored: Option<&str>) -> bool {
    const DUMMY: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Ctt1vBNtHcCEi0VF8r6IbSGfnTbnJqcMKXl0uKJ2Rbw";
    let (hash, real) = match stored {
        Some(hash) => (hash, true),
        None => (DUMMY, false),
    };
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let ok = Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok();
    ok && real
}

/// Records a failure and returns how many are in the window now.
pub async fn record_failure(
    pool: &PgPool,
    username: &str,
    source: &str,
    window: Duration,
) -> Result<u32, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "DELETE FROM login_failures WHERE username = $1 AND at < now() - make_interval(secs => $2)",
    )
    .bind(username)
    .bind(window.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO login_failures (username, source) VALUES ($1, $2)")
        .bind(username)
        .bind(source)
        .execute(&mut *tx)
        .await?;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM login_failures WHERE username = $1")
        .bind(username)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(u32::try_from(count).unwrap_or(u32::MAX))
}

/// Forgets failures after a successful login.
pub async fn clear_failures(pool: &PgPool, username: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM login_failures WHERE username = $1")
        .bind(username)
        .execute(pool)
        .await?;
    Ok(())
}

/// Prefix of personal access tokens (so secret scanners can find leaks).
pub const PAT_PREFIX: &str = "k8sh_";

/// A new token: its id (public) and the secret `k8sh_<id>_<random>`.
pub fn new_pat() -> (String, String) {
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut id);
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    (id.clone(), format!("{PAT_PREFIX}{id}_{secret}"))
}

/// The id part of a token secret, if it has the right shape.
pub fn pat_id(secret: &str) -> Option<&str> {
    let rest = secret.strip_prefix(PAT_PREFIX)?;
    let (id, random) = rest.split_once('_')?;
    (id.len() == 16 && random.len() == 64 && rest.is_ascii()).then_some(id)
}

/// What is stored of a token: SHA-256 of the whole secret (the secret has
/// 256 random bits, so a fast hash is enough; argon2 is for passwords).
pub fn pat_hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Compares without an early exit.
pub fn same_hash(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A parsed SSH public key.
pub struct ParsedKey {
    pub fingerprint: String,
    pub algorithm: String,
    pub comment: String,
    /// The key line without its comment.
    pub public_key: String,
}

/// Parses an OpenSSH public key line.
pub fn parse_ssh_key(line: &str) -> Result<ParsedKey, String> {
    let key = ssh_key::PublicKey::from_openssh(line.trim())
        .map_err(|e| format!("not an OpenSSH public key: {e}"))?;
    let fingerprint = key.fingerprint(ssh_key::HashAlg::Sha256).to_string();
    let comment = key.comment().to_owned();
    let mut bare = key.clone();
    bare.set_comment("");
    Ok(ParsedKey {
        fingerprint,
        algorithm: key.algorithm().as_str().to_owned(),
        comment,
        public_key: bare
            .to_openssh()
            .map_err(|e| e.to_string())?
            .trim()
            .to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_with_their_hash() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", Some(&hash)));
        assert!(!verify_password("wrong", Some(&hash)));
        assert!(!verify_password("correct horse", None), "no user, no login");
        assert!(!verify_password("x", Some("not a hash")));
    }

    #[test]
    fn token_secrets_have_an_id_and_a_hash() {
        let (id, secret) = new_pat();
        assert_eq!(pat_id(&secret), Some(id.as_str()));
        assert!(secret.starts_with("k8sh_"));
        assert!(same_hash(&pat_hash(&secret), &pat_hash(&secret)));
        assert!(!same_hash(&pat_hash(&secret), &pat_hash("k8sh_x")));
        for bad in [
            "",
            "k8sh_",
            "k8sh_abc_def",
            "ghp_0123456789abcdef_00",
            &secret[..40],
        ] {
            assert_eq!(pat_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn ssh_keys_parse_with_openssh_fingerprints() {
        let line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO9fLTEC1cB4OGrKg0GY3ITl3JPnIasLO9PBR0tMFbLz alice@laptop";
        let key = parse_ssh_key(line).unwrap();
        assert_eq!(key.algorithm, "ssh-ed25519");
        assert_eq!(key.comment, "alice@laptop");
        assert!(key.fingerprint.starts_with("SHA256:"));
        assert!(!key.public_key.contains("alice@laptop"));
        assert!(parse_ssh_key("ssh-ed25519 garbage").is_err());
    }
}
