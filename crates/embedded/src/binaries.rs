use std::path::{Path, PathBuf};

use crate::EmbeddedError;

/// Finds `program` on PATH or in the given extra directories (Debian puts
/// `nats-server` in /usr/sbin and PostgreSQL under /usr/lib/postgresql/<v>/bin,
/// neither of which is on a normal user's PATH).
pub(crate) fn find(
    program: &'static str,
    extra: &[PathBuf],
    hint: &'static str,
) -> Result<PathBuf, EmbeddedError> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(extra.iter().cloned());
    for dir in &dirs {
        let candidate = dir.join(program);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(EmbeddedError::MissingBinary {
        program,
        searched: dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":"),
        hint,
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// PostgreSQL's server binaries, newest major version first.
pub(crate) fn postgres_bin_dirs() -> Vec<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
    versions.into_iter().map(|(_, dir)| dir).collect()
}
