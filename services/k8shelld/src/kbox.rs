//! `kbox`: the workspace's own command line, talking to k8shelld's local
//! REST API (`/run/k8shelld.sock`, or `$KBOX_SOCKET`). It is built into the
//! static k8shelld binary (run as `kbox` through a symlink), so it works in
//! any image, and also as a separate binary.

use std::process::ExitCode;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

const USAGE: &str = "usage: kbox [--json] <command>

commands:
  info                      CPU, memory, mounts, uptime
  uptime                    system and daemon uptime
  ports                     listening TCP ports
  apps list                 apps and their state
  apps start|stop|install NAME
  apps logs NAME            the end of an app's output
  sessions                  terminal sessions
      attach [--read-only] ID   this terminal joins a session (kbox detach ID, from
                            elsewhere, or closing the terminal leaves it)
  detach [ID]               detach every client of a session (this one by default)
  logs [LINES]              k8shelld's own log (last 200 lines)
  shutdown                  stop the workspace";

struct Call {
    method: &'static str,
    path: String,
}

fn parse(args: &[String]) -> Result<Call, String> {
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let get = |path: &str| Call {
        method: "GET",
        path: path.to_owned(),
    };
    let post = |path: String| Call {
        method: "POST",
        path,
    };
    Ok(match words.as_slice() {
        ["info"] => get("/v1/info"),
        ["uptime"] => get("/v1/uptime"),
        ["ports"] => get("/v1/ports"),
        ["apps"] | ["apps", "list"] => get("/v1/apps"),
        ["apps", action @ ("start" | "stop" | "install"), name] => {
            post(format!("/v1/apps/{name}/{action}"))
        }
        ["apps", "logs", name] => get(&format!("/v1/apps/{name}/logs")),
        ["sessions"] => get("/v1/sessions"),
        ["detach", id] => post(format!("/v1/sessions/{id}/detach")),
        // Inside a session: detach the session kbox runs in.
        ["detach"] => match std::env::var("K8SHELL_SESSION_ID") {
            Ok(id) if !id.is_empty() => post(format!("/v1/sessions/{id}/detach")),
            _ => return Err("kbox detach: not inside a k8shell session; give a session id".into()),
        },
        ["shutdown"] => post("/v1/shutdown".into()),
        ["logs"] => get("/v1/logs"),
        ["logs", lines] => match lines.parse::<usize>() {
            Ok(n) => get(&format!("/v1/logs?tail={n}")),
            Err(_) => return Err(USAGE.into()),
        },

        _ => return Err(USAGE.into()),
    })
}

async fn request(socket: &str, call: &Call) -> Result<(u16, Bytes), String> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("cannot reach k8shelld at {socket}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("cannot talk to k8shelld: {e}"))?;
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(call.method)
        .uri(&call.path)
        .header("host", "k8shelld")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

/// Human-readable rendering of the JSON answers.
fn render(path: &str, value: &serde_json::Value) -> String {
    let rows = |items: &serde_json::Value, columns: &[&str]| -> String {
        let mut out = columns
            .iter()
            .map(|c| c.to_uppercase())
            .collect::<Vec<_>>()
            .join("\t")
            + "\n";
        for item in items.as_array().into_iter().flatten() {
            let cells: Vec<String> = columns
                .iter()
                .map(|c| match &item[*c] {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => "-".into(),
                    other => other.to_string(),
                })
                .collect();
            out.push_str(&cells.join("\t"));
            out.push('\n');
        }
        out
    };
    match path {
        "/v1/ports" => rows(value, &["address", "port", "process", "pid"]),
        "/v1/apps" => rows(
            value,
            &["name", "state", "pid", "restarts", "port", "version"],
        ),
        "/v1/sessions" => rows(
            value,
            &["id", "owner", "argv", "attached_clients", "detached_since"],
        ),
        _ => serde_json::to_string_pretty(value).unwrap_or_default() + "\n",
    }
}

/// Runs kbox with `args` (without the program name).
pub fn main(args: Vec<String>) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => {
            let code = runtime.block_on(run(args));
            // A blocking stdin read (attach) must not keep the process alive.
            runtime.shutdown_background();
            code
        }
        Err(error) => {
            eprintln!("kbox: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(mut args: Vec<String>) -> ExitCode {
    if args.first().is_some_and(|a| a == "attach") {
        let socket = std::env::var("KBOX_SOCKET").unwrap_or_else(|_| "/run/k8shelld.sock".into());
        return attach(&socket, &args[1..]).await;
    }
    let json = args.iter().any(|a| a == "--json");

    args.retain(|a| a != "--json");
    let call = match parse(&args) {
        Ok(call) => call,
        Err(usage) => {
            eprintln!("{usage}");
            return ExitCode::from(64);
        }
    };
    let socket = std::env::var("KBOX_SOCKET").unwrap_or_else(|_| "/run/k8shelld.sock".into());
    let (status, body) = match request(&socket, &call).await {
        Ok(answer) => answer,
        Err(error) => {
            eprintln!("kbox: {error}");
            return ExitCode::FAILURE;
        }
    };
    if !(200..300).contains(&status) {
        let detail = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|p| p["detail"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        eprintln!("kbox: {detail}");
        return ExitCode::FAILURE;
    }
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(value) if json => println!("{value}"),
        Ok(value) => print!("{}", render(&call.path, &value)),
        // Logs are plain text.
        Err(_) => print!("{}", String::from_utf8_lossy(&body)),
    }
    ExitCode::SUCCESS
}

/// Puts the terminal in raw mode until dropped.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enable() -> Option<Self> {
        let stdin = std::io::stdin();
        if !rustix::termios::isatty(&stdin) {
            return None;
        }
        let saved = rustix::termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

fn terminal_size() -> Option<(u16, u16)> {
    let size = rustix::termios::tcgetwinsize(std::io::stdout()).ok()?;
    (size.ws_row > 0 && size.ws_col > 0).then_some((size.ws_row, size.ws_col))
}

/// `kbox attach`: an HTTP upgrade on the local API, then raw bytes down and
/// input/resize frames up (see `attach`).
async fn attach(socket: &str, args: &[String]) -> ExitCode {
    use crate::attach::{Frame, encode};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (read_only, id) = match args {
        [flag, id] if flag == "--read-only" => (true, id),
        [id] => (false, id),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(64);
        }
    };
    let mut stream = match tokio::net::UnixStream::connect(socket).await {
        Ok(stream) => stream,
        Err(error) => {
            eprintln!("kbox: cannot reach k8shelld at {socket}: {error}");
            return ExitCode::FAILURE;
        }
    };
    let size = terminal_size().map_or(String::new(), |(rows, cols)| {
        format!("&rows={rows}&cols={cols}")
    });
    let request = format!(
        "GET /v1/sessions/{id}/attach?read_only={read_only}{size} HTTP/1.1\r\nHost: k8shelld\r\n\
         Connection: Upgrade\r\nUpgrade: {}\r\n\r\n",
        crate::attach::PROTOCOL
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        eprintln!("kbox: k8shelld closed the connection");
        return ExitCode::FAILURE;
    }
    // The response head, byte by byte: nothing of the terminal stream may be
    // swallowed by a buffered read.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        match stream.read_u8().await {
            Ok(byte) => head.push(byte),
            Err(_) => break,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if !head.starts_with("HTTP/1.1 101") {
        let mut body = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            stream.read_to_end(&mut body),
        )
        .await;
        let detail = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|p| p["detail"].as_str().map(str::to_owned))
            .unwrap_or_else(|| head.lines().next().unwrap_or("no answer").to_owned());
        eprintln!("kbox: {detail}");
        return ExitCode::FAILURE;
    }
    let raw = RawMode::enable();
    let (mut reader, mut writer) = stream.into_split();
    let (frames_tx, mut frames_rx) = tokio::sync::mpsc::channel::<Frame>(64);
    let input = frames_tx.clone();
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buffer = vec![0u8; 4096];
        while let Ok(n) = stdin.read(&mut buffer).await {
            if n == 0
                || input
                    .send(Frame::Input(buffer[..n].to_vec()))
                    .await
                    .is_err()
            {
                break;
            }
        }
    });
    if let Ok(mut winch) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
    {
        tokio::spawn(async move {
            while winch.recv().await.is_some() {
                if let Some((rows, cols)) = terminal_size()
                    && frames_tx.send(Frame::Resize { rows, cols }).await.is_err()
                {
                    break;
                }
            }
        });
    }
    tokio::spawn(async move {
        while let Some(frame) = frames_rx.recv().await {
            if writer.write_all(&encode(&frame)).await.is_err() {
                break;
            }
        }
    });
    let mut stdout = tokio::io::stdout();
    let mut buffer = vec![0u8; 32 * 1024];
    while let Ok(n) = reader.read(&mut buffer).await {
        if n == 0 || stdout.write_all(&buffer[..n]).await.is_err() {
            break;
        }
        let _ = stdout.flush().await;
    }
    drop(raw);
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_map_to_endpoints() {
        let call = |line: &str| {
            parse(&line.split(' ').map(String::from).collect::<Vec<_>>())
                .map(|c| (c.method, c.path))
        };
        assert_eq!(
            call("apps start web"),
            Ok(("POST", "/v1/apps/web/start".into()))
        );
        assert_eq!(
            call("apps logs web"),
            Ok(("GET", "/v1/apps/web/logs".into()))
        );
        assert_eq!(
            call("detach abc"),
            Ok(("POST", "/v1/sessions/abc/detach".into()))
        );
        assert!(call("apps explode web").is_err());
    }
}
