//! First things at boot: the workspace user (and sudo), before gRPC serves;
//! init scripts, after, in the background.
//!
//! Account files are edited directly (append a line, write a temporary file,
//! rename): images may have no `useradd`, and k8shelld must not depend on the
//! image.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The account the workspace belongs to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// `/home/<name>` when empty.
    #[serde(default)]
    pub home: String,
    /// `/bin/sh` when empty.
    #[serde(default)]
    pub shell: String,
    /// Passwordless sudo (written to /etc/sudoers.d).
    #[serde(default)]
    pub sudo: bool,
}

/// A script run once in the workspace's life, in order, after the daemon serves.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InitScript {
    pub name: String,
    /// Run with `/bin/sh -c`.
    pub script: String,
    /// Run as root instead of the workspace user.
    #[serde(default)]
    pub as_root: bool,
}

/// Why bootstrap failed.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("{action}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("user {name} exists with uid {existing}, not {wanted}")]
    UidMismatch {
        name: String,
        existing: u32,
        wanted: u32,
    },
    #[error("invalid user name {0:?}")]
    Name(String),
}

fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> BootstrapError {
    let action = action.into();
    move |source| BootstrapError::Io { action, source }
}

fn replace_file(path: &Path, contents: &str, mode: u32) -> Result<(), BootstrapError> {
    let tmp = path.with_extension("k8shell-tmp");
    let mut file =
        std::fs::File::create(&tmp).map_err(io(format!("cannot write {}", tmp.display())))?;
    file.write_all(contents.as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(io(format!("cannot write {}", tmp.display())))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("cannot chmod {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("cannot replace {}", path.display())))
}

fn append_line(path: &Path, line: &str, mode: u32) -> Result<(), BootstrapError> {
    let mut contents = std::fs::read_to_string(path).unwrap_or_default();
    if !contents.is_empty() && !contents.ends_with('\n') {
        contents.push('\n');
    }
    contents.push_str(line);
    contents.push('\n');
    replace_file(path, &contents, mode)
}

fn field_exists(path: &Path, index: usize, value: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.get(index) == Some(&value)).then(|| line.to_owned())
        })
}

/// Creates the user, group, home and sudo rule under `root` (normally `/`)
/// unless they exist. Idempotent.
pub fn ensure_user(root: &Path, user: &WorkspaceUser) -> Result<PathBuf, BootstrapError> {
    let valid = !user.name.is_empty()
        && user.name.len() <= 32
        && user
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !valid {
        return Err(BootstrapError::Name(user.name.clone()));
    }
    let home = if user.home.is_empty() {
        format!("/home/{}", user.name)
    } else {
        user.home.clone()
    };
    let shell = if user.shell.is_empty() {
        "/bin/sh"
    } else {
        user.shell.as_str()
    };
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc).map_err(io(format!("cannot create {}", etc.display())))?;
    let passwd = etc.join("passwd");
    match field_exists(&passwd, 0, &user.name) {
        Some(line) => {
            let existing: u32 = line
                .split(':')
                .nth(2)
                .and_then(|u| u.parse().ok())
                .unwrap_or(u32::MAX);
            if existing != user.uid {
                return Err(BootstrapError::UidMismatch {
                    name: user.name.clone(),
                    existing,
                    wanted: user.uid,
                });
            }
        }
        None => append_line(
            &passwd,
            &format!(
                "{}:x:{}:{}:{}:{home}:{shell}",
                user.name, user.uid, user.gid, user.name
            ),
            0o644,
        )?,
    }
    let group = etc.join("group");
    if field_exists(&group, 2, &user.gid.to_string()).is_none() {
        append_line(&group, &format!("{}:x:{}:", user.name, user.gid), 0o644)?;
    }
    let shadow = etc.join("shadow");
    if shadow.exists() && field_exists(&shadow, 0, &user.name).is_none() {
        // Locked password: the workspace is entered with tokens, never passwords.
        append_line(
            &shadow,
            &format!("{}:!:19000:0:99999:7:::", user.name),
            0o640,
        )?;
    }
    let home_dir = root.join(home.trim_start_matches('/'));
    if !home_dir.exists() {
        std::fs::create_dir_all(&home_dir)
            .map_err(io(format!("cannot create {}", home_dir.display())))?;
        std::fs::set_permissions(&home_dir, std::fs::Permissions::from_mode(0o755))
            .map_err(io(format!("cannot chmod {}", home_dir.display())))?;
        let _ = nix::unistd::chown(
            &home_dir,
            Some(nix::unistd::Uid::from_raw(user.uid)),
            Some(nix::unistd::Gid::from_raw(user.gid)),
        );
    } else {
        hand_over_mount_point(&home_dir, user)?;
    }
    if user.sudo {
        let sudoers = etc.join("sudoers.d");
        std::fs::create_dir_all(&sudoers)
            .map_err(io(format!("cannot create {}", sudoers.display())))?;
        replace_file(
            &sudoers.join(format!("k8shell-{}", user.name)),
            &format!("{} ALL=(ALL) NOPASSWD:ALL\n", user.name),
            0o440,
        )?;
    }
    Ok(home_dir)
}

/// A directory on a fresh volume is a root-owned mount point: give it to
/// the workspace user (the directory only; what is inside was put there by
/// someone and keeps its owner). A missing path is left alone.
pub fn hand_over_mount_point(path: &Path, user: &WorkspaceUser) -> Result<(), BootstrapError> {
    use std::os::unix::fs::MetadataExt;
    if user.uid == 0 {
        return Ok(());
    }
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(io(format!("cannot stat {}", path.display()))(error)),
    };
    if metadata.is_dir() && metadata.uid() == 0 {
        nix::unistd::chown(
            path,
            Some(nix::unistd::Uid::from_raw(user.uid)),
            Some(nix::unistd::Gid::from_raw(user.gid)),
        )
        .map_err(|e| io(format!("cannot chown {}", path.display()))(std::io::Error::from(e)))?;
    }
    Ok(())
}

/// Outcome of one init script, as recorded across restarts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ScriptRecord {
    Running {
        started_at: u64,
    },
    Succeeded {
        finished_at: u64,
    },
    Failed {
        finished_at: u64,
        exit_code: Option<i32>,
        detail: String,
    },
}

/// Where init scripts' state and logs live.
pub struct InitState {
    dir: PathBuf,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl InitState {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn file(&self) -> PathBuf {
        self.dir.join("init-scripts.json")
    }

    /// Every recorded script.
    pub fn records(&self) -> BTreeMap<String, ScriptRecord> {
        std::fs::read_to_string(self.file())
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    fn record(&self, name: &str, record: ScriptRecord) {
        let mut records = self.records();
        records.insert(name.to_owned(), record);
        let written = std::fs::create_dir_all(&self.dir)
            .map_err(io("cannot create the state directory"))
            .and_then(|_| {
                replace_file(
                    &self.file(),
                    &serde_json::to_string_pretty(&records).unwrap_or_default(),
                    0o600,
                )
            });
        if let Err(error) = written {
            tracing::error!(%error, "cannot record init script state");
        }
    }

    /// The script's log file.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("init-{name}.log"))
    }

    /// Runs, in order, the scripts that never finished (a script
    /// interrupted by a restart runs again; one that finished, even failed,
    /// does not). A failure is recorded and logged, and the next one runs.
    pub async fn run(&self, scripts: &[InitScript], user: &crate::users::Account) {
        for script in scripts {
            match self.records().get(&script.name) {
                Some(ScriptRecord::Succeeded { .. } | ScriptRecord::Failed { .. }) => continue,
                Some(ScriptRecord::Running { .. }) => {
                    tracing::warn!(script = %script.name, "init script was interrupted; running it again")
                }
                None => {}
            }
            self.record(
                &script.name,
                ScriptRecord::Running {
                    started_at: unix_now(),
                },
            );
            let outcome = self.run_one(script, user).await;
            let record = match outcome {
                Ok(status) if status.success() => ScriptRecord::Succeeded {
                    finished_at: unix_now(),
                },
                Ok(status) => ScriptRecord::Failed {
                    finished_at: unix_now(),
                    exit_code: status.code(),
                    detail: format!("exited with {status}"),
                },
                Err(error) => ScriptRecord::Failed {
                    finished_at: unix_now(),
                    exit_code: None,
                    detail: error.to_string(),
                },
            };
            match &record {
                ScriptRecord::Failed { detail, .. } => {
                    tracing::error!(script = %script.name, detail, log = %self.log_path(&script.name).display(), "init script failed")
                }
                _ => tracing::info!(script = %script.name, "init script succeeded"),
            }
            self.record(&script.name, record);
        }
    }

    async fn run_one(
        &self,
        script: &InitScript,
        user: &crate::users::Account,
    ) -> std::io::Result<std::process::ExitStatus> {
        std::fs::create_dir_all(&self.dir)?;
        let log = std::fs::File::create(self.log_path(&script.name))?;
        let mut command = tokio::process::Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(&script.script)
            .env_clear()
            .envs(crate::users::base_env(user))
            .current_dir(&user.home)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if !script.as_root && user.uid != nix::unistd::Uid::effective() {
            command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        command.status().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_user_writes_account_files_once() {
        let root = std::env::temp_dir().join(format!("k8shell-bootstrap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        std::fs::write(root.join("etc/shadow"), "root:*:19000:0:99999:7:::\n").unwrap();
        let user = WorkspaceUser {
            name: "dev".into(),
            uid: 1000,
            gid: 1000,
            home: String::new(),
            shell: "/bin/bash".into(),
            sudo: true,
        };
        for _ in 0..2 {
            ensure_user(&root, &user).unwrap();
        }
        let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
        assert_eq!(
            passwd,
            "root:x:0:0:root:/root:/bin/sh\ndev:x:1000:1000:dev:/home/dev:/bin/bash\n"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("etc/group")).unwrap(),
            "dev:x:1000:\n"
        );
        assert!(
            std::fs::read_to_string(root.join("etc/shadow"))
                .unwrap()
                .contains("dev:!:")
        );
        assert!(root.join("home/dev").is_dir());
        let sudoers = root.join("etc/sudoers.d/k8shell-dev");
        assert_eq!(
            std::fs::read_to_string(&sudoers).unwrap(),
            "dev ALL=(ALL) NOPASSWD:ALL\n"
        );
        assert_eq!(
            std::fs::metadata(&sudoers).unwrap().permissions().mode() & 0o777,
            0o440
        );

        let other_uid = WorkspaceUser { uid: 1001, ..user };
        assert!(matches!(
            ensure_user(&root, &other_uid),
            Err(BootstrapError::UidMismatch { .. })
        ));
        let bad = WorkspaceUser {
            name: "a:b".into(),
            ..other_uid
        };
        assert!(matches!(
            ensure_user(&root, &bad),
            Err(BootstrapError::Name(_))
        ));
        let _ = std::fs::remove_dir_all(&root);
    }
}
