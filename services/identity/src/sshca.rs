//! The SSH user CA: an Ed25519 key, sealed in Postgres, that signs
//! short-lived OpenSSH user certificates whose principal is the username,
//! so plain `ssh` logs in through the proxy with no prompt.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::PgPool;
use ssh_key::certificate::{Builder, CertType};
use ssh_key::rand_core::{OsRng, RngCore};
use ssh_key::{Algorithm, LineEnding, PrivateKey, PublicKey};

use crate::kek::Kek;

const SECRET_NAME: &str = "ssh-user-ca";

/// The CA.
pub struct SshUserCa {
    key: PrivateKey,
}

/// A certificate could not be issued or the CA loaded.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Postgres.
    #[error("CA store: {0}")]
    Database(#[from] sqlx::Error),
    /// Key or certificate work.
    #[error("{0}")]
    Ssh(String),
}

impl From<ssh_key::Error> for CaError {
    fn from(error: ssh_key::Error) -> Self {
        CaError::Ssh(error.to_string())
    }
}

/// An issued certificate.
pub struct Issued {
    /// The `*-cert-v01@openssh.com` line.
    pub certificate: String,
    /// Serial.
    pub serial: u64,
    /// Fingerprint of the certified key.
    pub fingerprint: String,
    /// End of validity (seconds since the epoch).
    pub valid_before: u64,
}

impl SshUserCa {
    /// Loads the CA key, creating it on first use (one per deployment; an
    /// advisory lock keeps two replicas from making two).
    pub async fn load_or_create(pool: &PgPool, kek: &Kek) -> Result<Self, CaError> {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('identity.ssh-user-ca'))")
            .execute(&mut *tx)
            .await?;
        let sealed: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT value FROM secrets WHERE name = $1")
                .bind(SECRET_NAME)
                .fetch_optional(&mut *tx)
                .await?;
        let key = match sealed {
            Some(sealed) => {
                let pem = kek.open(&sealed).map_err(|e| CaError::Ssh(e.to_string()))?;
                let pem = String::from_utf8(pem).map_err(|e| CaError::Ssh(e.to_string()))?;
                PrivateKey::from_openssh(&pem)?
            }
            None => {
                let mut key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519)?;
                key.set_comment("k8shell user CA");
                let pem = key.to_openssh(LineEnding::LF)?;
                sqlx::query("INSERT INTO secrets (name, value) VALUES ($1, $2)")
                    .bind(SECRET_NAME)
                    .bind(kek.seal(pem.as_bytes()))
                    .execute(&mut *tx)
                    .await?;
                tracing::info!("created the SSH user CA");
                key
            }
        };
        tx.commit().await?;
        Ok(Self { key })
    }

    /// The CA's public key line (for `TrustedUserCAKeys`, `cert-authority`).
    pub fn public_key(&self) -> String {
        self.key.public_key().to_openssh().unwrap_or_default()
    }

    /// Certifies `public_key` for `username`, valid from five minutes ago
    /// (clock skew) for `ttl`.
    pub fn issue(
        &self,
        username: &str,
        public_key: &str,
        ttl: Duration,
    ) -> Result<Issued, CaError> {
        let subject = PublicKey::from_openssh(public_key.trim())
            .map_err(|e| CaError::Ssh(format!("not an OpenSSH public key: {e}")))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let valid_after = now.saturating_sub(300);
        let valid_before = now + ttl.as_secs().max(60);
        let serial = OsRng.next_u64();
        let mut builder = Builder::new_with_random_nonce(
            &mut OsRng,
            subject.key_data().clone(),
            valid_after,
            valid_before,
        )?;
        builder.serial(serial)?;
        builder.key_id(format!("k8shell:{username}:{serial}"))?;
        builder.cert_type(CertType::User)?;
        builder.valid_principal(username)?;
        for extension in [
            "permit-agent-forwarding",
            "permit-port-forwarding",
            "permit-pty",
            "permit-user-rc",
        ] {
            builder.extension(extension, "")?;
        }
        builder.comment(format!("{username}@k8shell"))?;
        let certificate = builder.sign(&self.key)?;
        Ok(Issued {
            certificate: certificate.to_openssh()?,
            serial,
            fingerprint: subject.fingerprint(ssh_key::HashAlg::Sha256).to_string(),
            valid_before,
        })
    }

    /// Checks an OpenSSH certificate line: signed by this CA, of type user,
    /// valid now, for `username`. Returns the certified key's fingerprint.
    pub fn check(&self, username: &str, line: &str) -> Result<String, CaError> {
        let certificate = ssh_key::Certificate::from_openssh(line.trim())?;
        let ca = self.key.public_key().fingerprint(ssh_key::HashAlg::Sha256);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        certificate
            .validate_at(now, [&ca])
            .map_err(|e| CaError::Ssh(format!("certificate not valid: {e}")))?;
        if certificate.cert_type() != CertType::User {
            return Err(CaError::Ssh("not a user certificate".to_owned()));
        }
        if !certificate.valid_principals().iter().any(|p| p == username) {
            return Err(CaError::Ssh(format!("certificate is not for {username}")));
        }
        Ok(PublicKey::from(certificate.public_key().clone())
            .fingerprint(ssh_key::HashAlg::Sha256)
            .to_string())
    }
}
