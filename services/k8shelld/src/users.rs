//! Accounts processes run as.

use std::path::PathBuf;

use nix::unistd::{Gid, Uid};
use tonic::Status;

/// A resolved account.
#[derive(Clone, Debug)]
pub struct Account {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    pub home: PathBuf,
    pub shell: PathBuf,
}

impl Account {
    /// What to run for a start request: its `argv`, or its `command` for
    /// the login shell (`<shell> -c <command>`, as sshd does), or neither:
    /// the login shell itself (`-l`). Both at once is an error.
    pub fn program(&self, argv: &[String], command: &str) -> Result<Vec<String>, Status> {
        let shell = self.shell.display().to_string();
        match (argv.is_empty(), command.is_empty()) {
            (true, true) => Ok(vec![shell, "-l".into()]),
            (true, false) => Ok(vec![shell, "-c".into(), command.to_owned()]),
            (false, true) => Ok(argv.to_vec()),
            (false, false) => Err(Status::invalid_argument("give argv or command, not both")),
        }
    }
}

/// An entry of /etc/passwd.
///
/// Read directly rather than through getpwnam: k8shelld is a static binary
/// that must work in images without a libc, where glibc's NSS modules are
/// absent; containers keep their accounts in /etc/passwd anyway.
fn passwd_entries(passwd: &str) -> impl Iterator<Item = Account> + '_ {
    passwd.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || line.starts_with('#') {
            return None;
        }
        Some(Account {
            name: fields[0].to_owned(),
            uid: Uid::from_raw(fields[2].parse().ok()?),
            gid: Gid::from_raw(fields[3].parse().ok()?),
            home: PathBuf::from(if fields[5].is_empty() { "/" } else { fields[5] }),
            shell: PathBuf::from(if fields[6].is_empty() {
                "/bin/sh"
            } else {
                fields[6]
            }),
        })
    })
}

fn read_passwd() -> Result<String, Status> {
    std::fs::read_to_string("/etc/passwd")
        .map_err(|e| Status::internal(format!("cannot read /etc/passwd: {e}")))
}

/// Resolves `name` (the workspace user when empty). Switching to another
/// account needs root; otherwise only the daemon's own account is allowed.
pub fn resolve(name: &str, default_user: &str) -> Result<Account, Status> {
    let name = if name.is_empty() { default_user } else { name };
    let passwd = read_passwd()?;
    let account = passwd_entries(&passwd)
        .find(|a| a.name == name)
        .ok_or_else(|| Status::invalid_argument(format!("no such user {name:?}")))?;
    if !Uid::effective().is_root() && account.uid != Uid::effective() {
        return Err(Status::permission_denied(format!(
            "k8shelld does not run as root and cannot run processes as {name:?}"
        )));
    }
    Ok(account)
}

/// The environment every process starts with, before the caller's additions.
pub fn base_env(account: &Account) -> Vec<(String, String)> {
    vec![
        ("HOME".into(), account.home.display().to_string()),
        ("USER".into(), account.name.clone()),
        ("LOGNAME".into(), account.name.clone()),
        ("SHELL".into(), account.shell.display().to_string()),
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
    ]
}

/// The account k8shelld itself runs as (the default when none is configured).
pub fn current_user_name() -> String {
    let uid = Uid::effective();
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| {
            passwd_entries(&passwd)
                .find(|a| a.uid == uid)
                .map(|a| a.name)
        })
        .unwrap_or_else(|| {
            if uid.is_root() {
                "root".into()
            } else {
                uid.to_string()
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_come_from_argv_a_command_or_the_login_shell() {
        let account = Account {
            name: "alice".into(),
            uid: Uid::from_raw(1000),
            gid: Gid::from_raw(1000),
            home: "/home/alice".into(),
            shell: "/bin/bash".into(),
        };
        assert_eq!(account.program(&[], "").unwrap(), ["/bin/bash", "-l"]);
        assert_eq!(
            account.program(&[], "echo hi").unwrap(),
            ["/bin/bash", "-c", "echo hi"]
        );
        assert_eq!(account.program(&["ls".into()], "").unwrap(), ["ls"]);
        assert!(account.program(&["ls".into()], "true").is_err());
    }

    #[test]
    fn parses_passwd_lines() {
        let passwd = "# comment\nroot:x:0:0:root:/root:/bin/bash\nbroken line\ndev:x:1000:1000::/home/dev:\n";
        let accounts: Vec<Account> = passwd_entries(passwd).collect();
        assert_eq!(accounts.len(), 2);
        assert_eq!(accounts[1].name, "dev");
        assert_eq!(accounts[1].uid.as_raw(), 1000);
        assert_eq!(accounts[1].home, PathBuf::from("/home/dev"));
        assert_eq!(
            accounts[1].shell,
            PathBuf::from("/bin/sh"),
            "empty shell means /bin/sh"
        );
    }
}
