//! `k8shelld install <dir>`: the init step of a workspace pod copies the
//! running static binary into a volume the workspace container shares, so
//! any image, with or without a libc, gets k8shelld and kbox.

use std::path::Path;
use std::process::ExitCode;

/// Copies this executable to `<dir>/k8shelld` (atomically, so a container
/// starting at the same moment never sees half a binary) and links `kbox`.
pub fn install_self(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let target = dir.join("k8shelld");
    let partial = dir.join(".k8shelld.partial");
    std::fs::copy("/proc/self/exe", &partial)?;
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&partial, &target)?;
    let kbox = dir.join("kbox");
    match std::fs::symlink_metadata(&kbox) {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            std::os::unix::fs::symlink("k8shelld", &kbox)?;
        }
        Err(error) => return Err(error),
    }
    Ok(())
}

/// Entry point of `k8shelld install <dir>`.
pub fn main(args: &[String]) -> ExitCode {
    let [dir] = args else {
        eprintln!("usage: k8shelld install <directory>");
        return ExitCode::from(2);
    };
    match install_self(Path::new(dir)) {
        Ok(()) => {
            println!("k8shelld installed in {dir}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("k8shelld install {dir}: {error}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_itself_and_kbox_twice_without_error() {
        let dir = tempfile::tempdir().unwrap();
        install_self(dir.path()).unwrap();
        install_self(dir.path()).unwrap();
        let me = std::fs::read("/proc/self/exe").unwrap();
        assert_eq!(std::fs::read(dir.path().join("k8shelld")).unwrap(), me);
        assert_eq!(
            std::fs::read_link(dir.path().join("kbox")).unwrap(),
            Path::new("k8shelld")
        );
        assert!(!dir.path().join(".k8shelld.partial").exists());
    }
}
