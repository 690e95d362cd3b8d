use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::process::{Child, Command};

use crate::process::{log_tail, signal_child, stop_child};
use crate::{EmbeddedError, binaries, io_error};

/// How to start a private NATS server.
#[derive(Clone, Debug)]
pub struct NatsOptions {
    /// Directory for the JetStream store, the log and the ports file.
    pub dir: PathBuf,
    /// Client port; a free one is chosen when `None`.
    pub port: Option<u16>,
}

/// A running private `nats-server -js` bound to 127.0.0.1.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    options: NatsOptions,
    port: u16,
}

impl NatsServer {
    /// Starts the server and waits until it accepts connections.
    pub async fn start(options: NatsOptions) -> Result<Self, EmbeddedError> {
        let binary = binaries::find(
            "nats-server",
            &[PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/bin")],
            "apt-get install nats-server",
        )?;
        let store = options.dir.join("jetstream");
        let ports_dir = options.dir.join("ports");
        std::fs::create_dir_all(&store)
            .map_err(io_error(format!("cannot create {}", store.display())))?;
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir)
            .map_err(io_error(format!("cannot create {}", ports_dir.display())))?;
        let log = options.dir.join("nats-server.log");
        let pid_file = options.dir.join("nats-server.pid");
        crate::process::stop_leftover(&pid_file, "nats-server", Signal::SIGTERM).await;
        let port_arg = options
            .port
            .map_or_else(|| "-1".to_owned(), |p| p.to_string());
        let child = Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", &port_arg, "-js", "-n", "k8shell"])
            .arg("-sd")
            .arg(&store)
            .arg("-l")
            .arg(&log)
            .arg("-P")
            .arg(&pid_file)
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: a Ctrl-C at the terminal reaches only
            // `k8shell up`, which then stops the services before the bus.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(io_error(format!("cannot start {}", binary.display())))?;
        let mut server = Self {
            child: Some(child),
            options,
            port: 0,
        };
        server.port = server.wait_ready(&ports_dir, &log).await?;
        tracing::info!(port = server.port, "private nats-server started");
        Ok(server)
    }

    async fn wait_ready(&mut self, ports_dir: &Path, log: &Path) -> Result<u16, EmbeddedError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(EmbeddedError::NotReady {
                    server: "nats-server",
                    detail: format!("exited with {status}:\n{}", log_tail(log, 20)),
                });
            }
            if let Some(port) = read_port(ports_dir)
                && tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            {
                return Ok(port);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(EmbeddedError::NotReady {
                    server: "nats-server",
                    detail: format!("no client port after 20s:\n{}", log_tail(log, 20)),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (SIGTERM, then SIGKILL after 5 s).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Signal::SIGTERM, Duration::from_secs(5)).await;
        }
    }

    /// Stops and starts again on the same port and store (tests use this
    /// to exercise reconnects).
    pub async fn restart(&mut self) -> Result<(), EmbeddedError> {
        self.stop().await;
        let options = NatsOptions {
            port: Some(self.port),
            ..self.options.clone()
        };
        *self = Self::start(options).await?;
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            signal_child(child, Signal::SIGTERM);
        }
    }
}

fn read_port(ports_dir: &Path) -> Option<u16> {
    let entry = std::fs::read_dir(ports_dir).ok()?.flatten().next()?;
    let text = std::fs::read_to_string(entry.path()).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let url = json["nats"].as_array()?.first()?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}
