use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::{Gid, Uid, User};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio::process::{Child, Command};

use crate::process::{log_tail, signal_child, stop_child, stop_leftover};
use crate::{EmbeddedError, binaries, io_error};

/// Whether the cluster must survive a machine crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync on: the embedded platform's data.
    Durable,
    /// fsync off and small buffers: throw-away clusters for tests.
    Ephemeral,
}

/// How to start a private PostgreSQL cluster.
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// Directory holding `data/` (PGDATA), `run/` (the socket) and the log.
    pub dir: PathBuf,
    /// Durability settings.
    pub durability: Durability,
}

/// A running private PostgreSQL cluster listening only on a unix socket.
#[derive(Debug)]
pub struct PostgresCluster {
    child: Option<Child>,
    options: PostgresOptions,
    url: String,
}

/// Database created in the cluster for the platform.
const DATABASE: &str = "k8shell";
/// Superuser created by initdb.
const SUPERUSER: &str = "k8shell";

struct RunAs {
    uid: Uid,
    gid: Gid,
    name: String,
}

impl PostgresCluster {
    /// Initialises the cluster on first use, starts it, waits until it
    /// accepts connections and creates the `k8shell` database.
    pub async fn start(options: PostgresOptions) -> Result<Self, EmbeddedError> {
        let extra = binaries::postgres_bin_dirs();
        let hint = "apt-get install postgresql";
        let initdb = binaries::find("initdb", &extra, hint)?;
        let postgres = binaries::find("postgres", &extra, hint)?;
        let dir = &options.dir;
        let data = dir.join("data");
        let run = dir.join("run");
        let log = dir.join("postgres.log");
        for d in [dir, &run] {
            std::fs::create_dir_all(d)
                .map_err(io_error(format!("cannot create {}", d.display())))?;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
                .map_err(io_error(format!("cannot restrict {}", d.display())))?;
        }
        let run_as = run_as_user()?;
        if let Some(user) = &run_as {
            check_reachable(dir, user)?;
            for path in [dir.as_path(), run.as_path()] {
                chown(path, user)?;
            }
            if data.exists() {
                chown(&data, user)?;
            }
        }
        stop_leftover(&data.join("postmaster.pid"), "postgres", Signal::SIGINT).await;
        if !data.join("PG_VERSION").exists() {
            let mut command = Command::new(&initdb);
            command.arg("-D").arg(&data).args([
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
            ]);
            if options.durability == Durability::Ephemeral {
                command.arg("--no-sync");
            }
            apply_user(&mut command, run_as.as_ref());
            let output = command
                .stdin(Stdio::null())
                .output()
                .await
                .map_err(io_error(format!("cannot run {}", initdb.display())))?;
            if !output.status.success() {
                return Err(EmbeddedError::NotReady {
                    server: "postgres",
                    detail: format!(
                        "initdb failed: {}{}",
                        String::from_utf8_lossy(&output.stdout),
                        String::from_utf8_lossy(&output.stderr)
                    ),
                });
            }
        }
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io_error(format!("cannot open {}", log.display())))?;
        let mut command = Command::new(&postgres);
        command
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&run)
            // Unix socket only: nothing listens on TCP.
            .args([
                "-c",
                "listen_addresses=",
                "-c",
                "unix_socket_permissions=0700",
            ])
            .args(["-c", "max_connections=200"]);
        if options.durability == Durability::Ephemeral {
            command.args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "shared_buffers=32MB",
            ]);
        }
        apply_user(&mut command, run_as.as_ref());
        let stderr = log_file
            .try_clone()
            .map_err(io_error("cannot duplicate log handle"))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file))
            .stderr(Stdio::from(stderr))
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(io_error(format!("cannot start {}", postgres.display())))?;
        let url = format!(
            "postgres://{SUPERUSER}@localhost/{DATABASE}?host={}",
            run.display()
        );
        let mut cluster = Self {
            child: Some(child),
            options,
            url,
        };
        cluster.wait_ready(&run, &log).await?;
        tracing::info!(socket = %run.display(), "private postgres started");
        Ok(cluster)
    }

    async fn wait_ready(&mut self, run: &Path, log: &Path) -> Result<(), EmbeddedError> {
        let admin = PgConnectOptions::new()
            .socket(run)
            .username(SUPERUSER)
            .database("postgres");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(EmbeddedError::NotReady {
                    server: "postgres",
                    detail: format!("exited with {status}:\n{}", log_tail(log, 20)),
                });
            }
            if let Ok(mut connection) = admin.connect().await {
                let exists: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
                )
                .bind(DATABASE)
                .fetch_one(&mut connection)
                .await
                .map_err(|e| not_ready(format!("cannot query: {e}")))?;
                if !exists {
                    sqlx::query(&format!("CREATE DATABASE {DATABASE}"))
                        .execute(&mut connection)
                        .await
                        .map_err(|e| not_ready(format!("cannot create database: {e}")))?;
                }
                let _ = connection.close().await;
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(not_ready(format!(
                    "no connection after 60s:\n{}",
                    log_tail(log, 20)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Connection URL (unix socket) of the `k8shell` database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Connection options equivalent to [`PostgresCluster::url`].
    pub fn connect_options(&self) -> PgConnectOptions {
        // The URL is built by us from a path; it always parses.
        PgConnectOptions::from_str(&self.url).unwrap_or_else(|_| PgConnectOptions::new())
    }

    /// Stops the cluster with a fast shutdown (SIGINT).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Signal::SIGINT, Duration::from_secs(10)).await;
        }
    }

    /// Starts a stopped cluster again on the same data (tests use this to
    /// exercise outages).
    pub async fn start_again(&mut self) -> Result<(), EmbeddedError> {
        self.stop().await;
        *self = Self::start(self.options.clone()).await?;
        Ok(())
    }
}

impl Drop for PostgresCluster {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // Immediate shutdown: nothing waits for us in Drop.
            signal_child(child, Signal::SIGQUIT);
        }
    }
}

fn not_ready(detail: String) -> EmbeddedError {
    EmbeddedError::NotReady {
        server: "postgres",
        detail,
    }
}

/// PostgreSQL refuses to run as root: as root, run it as `postgres` (the
/// Debian package's user) or, failing that, `nobody`.
fn run_as_user() -> Result<Option<RunAs>, EmbeddedError> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        if let Ok(Some(user)) = User::from_name(name) {
            return Ok(Some(RunAs {
                uid: user.uid,
                gid: user.gid,
                name: name.to_owned(),
            }));
        }
    }
    Err(EmbeddedError::DataDir(
        "running as root, and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL"
            .into(),
    ))
}

fn apply_user(command: &mut Command, user: Option<&RunAs>) {
    if let Some(user) = user {
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
}

fn chown(path: &Path, user: &RunAs) -> Result<(), EmbeddedError> {
    nix::unistd::chown(path, Some(user.uid), Some(user.gid)).map_err(|errno| EmbeddedError::Io {
        action: format!("cannot give {} to {}", path.display(), user.name),
        source: errno.into(),
    })
}

/// Every ancestor of `dir` must be searchable by the user PostgreSQL runs
/// as; /root is not, which is why root's default data directory is /var/lib/k8shell.
fn check_reachable(dir: &Path, user: &RunAs) -> Result<(), EmbeddedError> {
    let dir = dir
        .canonicalize()
        .map_err(io_error(format!("cannot resolve {}", dir.display())))?;
    for ancestor in dir.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(ancestor) else {
            continue;
        };
        let mode = meta.permissions().mode();
        let searchable = mode & 0o001 != 0
            || (meta.uid() == user.uid.as_raw() && mode & 0o100 != 0)
            || (meta.gid() == user.gid.as_raw() && mode & 0o010 != 0);
        if !searchable {
            return Err(EmbeddedError::DataDir(format!(
                "PostgreSQL runs as '{}', which cannot reach {}: {} is not searchable; \
                 choose a data directory it can reach (K8SHELL_DATA_DIR=/var/lib/k8shell) \
                 or run `chmod o+x {}`",
                user.name,
                dir.display(),
                ancestor.display(),
                ancestor.display()
            )));
        }
    }
    Ok(())
}
