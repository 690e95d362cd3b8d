//! SFTP, served by k8shelld itself so no image needs an sftp-server.
//!
//! The `Sftp` RPC starts `k8shelld sftp-server` (this same binary) as the
//! workspace user and pumps the protocol through its stdin and stdout: every
//! file operation then runs with the user's own permissions, and new files
//! belong to the user without any chown bookkeeping.

use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};

use k8shell_proto::k8shelld::v1::{self as pb, sftp_request};
use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle, Name, OpenFlags, Status, StatusCode, Version,
};
use russh_sftp::server::StatusReply;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::{Status as GrpcStatus, Streaming};

use crate::users;

/// Largest read answered at once (the protocol lets clients ask for more).
const MAX_READ: u32 = 256 * 1024;

enum Open {
    File(tokio::fs::File),
    Dir { entries: Vec<File>, sent: bool },
}

/// One client's SFTP session.
struct Server {
    handles: HashMap<String, Open>,
    next_handle: u64,
    home: PathBuf,
}

fn status(id: u32, code: StatusCode, message: &str) -> Status {
    Status {
        id,
        status_code: code,
        error_message: message.to_owned(),
        language_tag: "en-US".to_owned(),
    }
}

fn io_error(error: std::io::Error) -> StatusReply {
    let code = match error.kind() {
        std::io::ErrorKind::NotFound => StatusCode::NoSuchFile,
        std::io::ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
        _ => StatusCode::Failure,
    };
    code.with_message(error.to_string())
}

impl Server {
    fn path(&self, name: &str) -> PathBuf {
        let path = PathBuf::from(name);
        if path.is_absolute() {
            path
        } else {
            self.home.join(path)
        }
    }

    fn insert(&mut self, open: Open) -> String {
        self.next_handle += 1;
        let handle = self.next_handle.to_string();
        self.handles.insert(handle.clone(), open);
        handle
    }

    fn file(&mut self, handle: &str) -> Result<&mut tokio::fs::File, StatusReply> {
        match self.handles.get_mut(handle) {
            Some(Open::File(file)) => Ok(file),
            _ => Err(StatusCode::Failure.with_message("invalid handle")),
        }
    }
}

fn apply_attrs(path: &std::path::Path, attrs: &FileAttributes) -> std::io::Result<()> {
    if let Some(mode) = attrs.permissions {
        std::fs::set_permissions(
            path,
            std::os::unix::fs::PermissionsExt::from_mode(mode & 0o7777),
        )?;
    }
    if let Some(size) = attrs.size {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)?
            .set_len(size)?;
    }
    Ok(())
}

impl russh_sftp::server::Handler for Server {
    type Error = StatusReply;

    fn unimplemented(&self) -> Self::Error {
        StatusCode::OpUnsupported.into()
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, Self::Error> {
        Ok(Version::new())
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        attrs: FileAttributes,
    ) -> Result<Handle, Self::Error> {
        let path = self.path(&filename);
        let mut options = tokio::fs::OpenOptions::new();
        options
            .read(pflags.contains(OpenFlags::READ))
            .write(pflags.contains(OpenFlags::WRITE) || pflags.contains(OpenFlags::APPEND))
            .append(pflags.contains(OpenFlags::APPEND))
            .truncate(pflags.contains(OpenFlags::TRUNCATE))
            .mode(attrs.permissions.unwrap_or(0o644) & 0o7777);
        if pflags.contains(OpenFlags::CREATE) {
            if pflags.contains(OpenFlags::EXCLUDE) {
                options.create_new(true);
            } else {
                options.create(true);
            }
        }
        let file = options.open(&path).await.map_err(io_error)?;
        Ok(Handle {
            id,
            handle: self.insert(Open::File(file)),
        })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        match self.handles.remove(&handle) {
            Some(Open::File(mut file)) => {
                file.flush().await.map_err(io_error)?;
                Ok(status(id, StatusCode::Ok, ""))
            }
            Some(Open::Dir { .. }) => Ok(status(id, StatusCode::Ok, "")),
            None => Err(StatusCode::Failure.with_message("invalid handle")),
        }
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, Self::Error> {
        let file = self.file(&handle)?;
        file.seek(SeekFrom::Start(offset)).await.map_err(io_error)?;
        let mut data = vec![0u8; len.min(MAX_READ) as usize];
        let n = file.read(&mut data).await.map_err(io_error)?;
        if n == 0 {
            return Err(StatusCode::Eof.into());
        }
        data.truncate(n);
        Ok(Data { id, data })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, Self::Error> {
        let file = self.file(&handle)?;
        file.seek(SeekFrom::Start(offset)).await.map_err(io_error)?;
        file.write_all(&data).await.map_err(io_error)?;
        Ok(status(id, StatusCode::Ok, ""))
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let meta = tokio::fs::symlink_metadata(self.path(&path))
            .await
            .map_err(io_error)?;
        Ok(Attrs {
            id,
            attrs: (&meta).into(),
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let meta = tokio::fs::metadata(self.path(&path))
            .await
            .map_err(io_error)?;
        Ok(Attrs {
            id,
            attrs: (&meta).into(),
        })
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let meta = self.file(&handle)?.metadata().await.map_err(io_error)?;
        Ok(Attrs {
            id,
            attrs: (&meta).into(),
        })
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        apply_attrs(&self.path(&path), &attrs).map_err(io_error)?;
        Ok(status(id, StatusCode::Ok, ""))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let file = self.file(&handle)?;
        if let Some(mode) = attrs.permissions {
            file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode & 0o7777))
                .await
                .map_err(io_error)?;
        }
        if let Some(size) = attrs.size {
            file.set_len(size).await.map_err(io_error)?;
        }
        Ok(status(id, StatusCode::Ok, ""))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        let dir = self.path(&path);
        let mut reader = tokio::fs::read_dir(&dir).await.map_err(io_error)?;
        let mut entries = Vec::new();
        for name in [".", ".."] {
            if let Ok(meta) = tokio::fs::metadata(dir.join(name)).await {
                entries.push(File::new(name, (&meta).into()));
            }
        }
        while let Some(entry) = reader.next_entry().await.map_err(io_error)? {
            if let Ok(meta) = entry.metadata().await {
                entries.push(File::new(
                    entry.file_name().to_string_lossy(),
                    (&meta).into(),
                ));
            }
        }
        Ok(Handle {
            id,
            handle: self.insert(Open::Dir {
                entries,
                sent: false,
            }),
        })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        match self.handles.get_mut(&handle) {
            Some(Open::Dir { entries, sent }) if !*sent => {
                *sent = true;
                Ok(Name {
                    id,
                    files: std::mem::take(entries),
                })
            }
            Some(Open::Dir { .. }) => Err(StatusCode::Eof.into()),
            _ => Err(StatusCode::Failure.with_message("invalid handle")),
        }
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        tokio::fs::remove_file(self.path(&filename))
            .await
            .map_err(io_error)?;
        Ok(status(id, StatusCode::Ok, ""))
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let path = self.path(&path);
        tokio::fs::create_dir(&path).await.map_err(io_error)?;
        if attrs.permissions.is_some() {
            apply_attrs(&path, &attrs).map_err(io_error)?;
        }
        Ok(status(id, StatusCode::Ok, ""))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, Self::Error> {
        tokio::fs::remove_dir(self.path(&path))
            .await
            .map_err(io_error)?;
        Ok(status(id, StatusCode::Ok, ""))
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let path = self.path(if path.is_empty() { "." } else { &path });
        let resolved = tokio::fs::canonicalize(&path).await.unwrap_or(path);
        Ok(Name {
            id,
            files: vec![File::dummy(resolved.to_string_lossy())],
        })
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, Self::Error> {
        tokio::fs::rename(self.path(&oldpath), self.path(&newpath))
            .await
            .map_err(io_error)?;
        Ok(status(id, StatusCode::Ok, ""))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let target = tokio::fs::read_link(self.path(&path))
            .await
            .map_err(io_error)?;
        Ok(Name {
            id,
            files: vec![File::dummy(target.to_string_lossy())],
        })
    }

    async fn symlink(
        &mut self,
        id: u32,
        linkpath: String,
        targetpath: String,
    ) -> Result<Status, Self::Error> {
        tokio::fs::symlink(targetpath, self.path(&linkpath))
            .await
            .map_err(io_error)?;
        Ok(status(id, StatusCode::Ok, ""))
    }
}

/// `k8shelld sftp-server`: the protocol on stdin and stdout, as the calling
/// user, rooted at `$HOME` for relative paths.
pub fn serve_stdio() -> ExitCode {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(_) => return ExitCode::FAILURE,
    };
    runtime.block_on(async move {
        let stream = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let server = Server {
            handles: HashMap::new(),
            next_handle: 0,
            home,
        };
        // russh-sftp runs the session on a task and ends it at EOF; keep the
        // process until then by watching stdin through the stream's drop.
        russh_sftp::server::run(
            WatchDrop {
                inner: stream,
                done: Some(done_tx),
            },
            server,
        )
        .await;
        let _ = done_rx.await;
    });
    ExitCode::SUCCESS
}

/// A stream that tells when it is dropped (the SFTP session ended).
struct WatchDrop<S> {
    inner: S,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl<S> Drop for WatchDrop<S> {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WatchDrop<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WatchDrop<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

pub type SftpStream = tokio_stream::wrappers::ReceiverStream<Result<pb::SftpData, GrpcStatus>>;

/// `Sftp`: starts the SFTP server as the user and pumps bytes both ways.
pub async fn sftp(
    mut requests: Streaming<pb::SftpRequest>,
    default_user: &str,
    server_binary: &std::path::Path,
) -> Result<SftpStream, GrpcStatus> {
    let Some(sftp_request::Msg::Start(start)) = requests.message().await?.and_then(|r| r.msg)
    else {
        return Err(GrpcStatus::invalid_argument(
            "the first SftpRequest must be `start`",
        ));
    };
    let account = users::resolve(&start.user, default_user)?;
    let mut command = tokio::process::Command::new(server_binary);
    command
        .arg("sftp-server")
        .env_clear()
        .envs(users::base_env(&account))
        .current_dir(&account.home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    if account.uid != nix::unistd::Uid::effective() {
        command.uid(account.uid.as_raw()).gid(account.gid.as_raw());
    }
    let mut child = command
        .spawn()
        .map_err(|e| GrpcStatus::internal(format!("cannot start the sftp server: {e}")))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| GrpcStatus::internal("no stdin"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| GrpcStatus::internal("no stdout"))?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Ok(Some(request)) = requests.message().await {
            if let Some(sftp_request::Msg::Data(bytes)) = request.msg
                && let Err(error) = stdin.write_all(&bytes).await
            {
                tracing::debug!(%error, "sftp server went away");
                break;
            }
        }
        // Client done: EOF ends the server.
        drop(stdin);
    });
    tokio::spawn(async move {
        let _ = crate::chunks::relay(stdout, &tx, |data| pb::SftpData { data }).await;
        let _ = child.wait().await;
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
}
