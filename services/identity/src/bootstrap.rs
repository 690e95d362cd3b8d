//! The first administrator of a fresh installation: `admin`, logging in
//! with the operator's SSH key (`~/.ssh/*.pub`), or with a key pair
//! generated into the data directory when the operator has none.

use std::path::{Path, PathBuf};

use k8shell_proto::identity::v1 as pb;
use k8shell_proto::identity::v1::identity_service_client::IdentityServiceClient;
use ssh_key::rand_core::OsRng;
use ssh_key::{Algorithm, LineEnding, PrivateKey};
use tonic::transport::Channel;

/// Name of the bootstrap administrator.
pub const ADMIN: &str = "admin";

/// What the bootstrap did, for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// The admin existed already.
    Exists,
    /// Created with the operator's public key.
    WithKey(PathBuf),
    /// Created with a generated key pair; the private key's path.
    Generated(PathBuf),
}

/// The operator's public key: the first of the usual names in `~/.ssh`,
/// else any `*.pub` there.
pub fn find_public_key(home: &Path) -> Option<PathBuf> {
    let ssh = home.join(".ssh");
    for name in ["id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub"] {
        let path = ssh.join(name);
        if path.is_file() {
            return Some(path);
        }
    }
    let mut others: Vec<PathBuf> = std::fs::read_dir(&ssh)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "pub") && !p.to_string_lossy().ends_with("-cert.pub")
        })
        .collect();
    others.sort();
    others.into_iter().next()
}

/// Generates an Ed25519 key pair at `path` (private, 0600) and `path.pub`.
pub fn generate_key(path: &Path) -> Result<String, String> {
    let mut key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519).map_err(|e| e.to_string())?;
    key.set_comment("k8shell admin");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    key.write_openssh_file(path, LineEnding::LF)
        .map_err(|e| e.to_string())?;
    let public = key.public_key().to_openssh().map_err(|e| e.to_string())?;
    std::fs::write(path.with_extension("pub"), format!("{public}\n")).map_err(|e| e.to_string())?;
    Ok(public)
}

/// Creates `admin` unless it exists.
pub async fn ensure_admin(
    client: &mut IdentityServiceClient<Channel>,
    home: Option<&Path>,
    data_dir: &Path,
) -> Result<Bootstrap, String> {
    match client
        .get_user(pb::GetUserRequest {
            username: ADMIN.to_owned(),
            min_version: 0,
        })
        .await
    {
        Ok(_) => return Ok(Bootstrap::Exists),
        Err(status) if status.code() == tonic::Code::NotFound => {}
        Err(status) => return Err(status.message().to_owned()),
    }
    let (public_key, outcome) = match home.and_then(find_public_key) {
        Some(path) => {
            let key =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            (key, Bootstrap::WithKey(path))
        }
        None => {
            let path = data_dir.join("admin_ed25519");
            let public = if path.is_file() {
                std::fs::read_to_string(path.with_extension("pub"))
                    .map_err(|e| format!("{}: {e}", path.display()))?
            } else {
                generate_key(&path)?
            };
            (public, Bootstrap::Generated(path))
        }
    };
    client
        .create_user(pb::CreateUserRequest {
            username: ADMIN.to_owned(),
            display_name: "Administrator".to_owned(),
            roles: vec!["admin".to_owned()],
            ..Default::default()
        })
        .await
        .map_err(|s| s.message().to_owned())?;
    client
        .add_ssh_key(pb::AddSshKeyRequest {
            username: ADMIN.to_owned(),
            public_key,
        })
        .await
        .map_err(|s| s.message().to_owned())?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_in_the_usual_order_or_generated() {
        let home = tempfile::tempdir().unwrap();
        assert_eq!(find_public_key(home.path()), None);
        let ssh = home.path().join(".ssh");
        std::fs::create_dir_all(&ssh).unwrap();
        std::fs::write(ssh.join("work.pub"), "x").unwrap();
        std::fs::write(ssh.join("work-cert.pub"), "x").unwrap();
        assert_eq!(find_public_key(home.path()), Some(ssh.join("work.pub")));
        std::fs::write(ssh.join("id_rsa.pub"), "x").unwrap();
        std::fs::write(ssh.join("id_ed25519.pub"), "x").unwrap();
        assert_eq!(
            find_public_key(home.path()),
            Some(ssh.join("id_ed25519.pub"))
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/admin_ed25519");
        let public = generate_key(&path).unwrap();
        assert!(public.starts_with("ssh-ed25519 "));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the private key is the owner's only");
        assert!(crate::credentials::parse_ssh_key(&public).is_ok());
    }
}
