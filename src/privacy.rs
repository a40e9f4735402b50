//! Student data stays with its owner: what `dap` creates is owner-only, mirrors that others can
//! read are named in a warning, and files holding secrets are refused unless only their owner can
//! read them.
//!
//! On Unix the process mask is set once at start ([`restrict_new_files`]), so every file and
//! folder `dap` creates, including the ones SQLite, the spool and the exports create on their own,
//! is 0600 / 0700. On Windows, files inherit the ACL of the folder they are created in; the
//! default mirror lives in the user's profile, which only that user (and administrators) can read.

use std::path::{Path, PathBuf};

/// What to do about an existing mirror that other users can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SharedFiles {
    /// Warn once per file, naming it and the command that makes it private.
    #[default]
    Warn,
    /// Accepted on purpose (`--allow-shared`): a shared analysis host where a group reads the mirror.
    Accept,
}

/// Makes everything this process creates from now on owner-only (umask 077).
pub fn restrict_new_files() {
    #[cfg(unix)]
    // SAFETY: umask only swaps the process' file mode mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

/// The permission bits that give other users access to `path`, if it exists and has any.
fn shared_bits(path: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then_some(mode)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Warns about each part of the mirror file `db` (its folder, the file, its WAL and shared-memory
/// files, `state.json`) that other users can read, unless `policy` accepts it. Nothing is changed:
/// the owner decides.
pub fn check_mirror(db: &Path, policy: SharedFiles) {
    if policy == SharedFiles::Accept {
        return;
    }
    let folder = db.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut parts: Vec<(PathBuf, u32)> = Vec::new();
    if let Some(mode) = shared_bits(folder) {
        parts.push((folder.to_path_buf(), mode));
    }
    let name = db.as_os_str().to_string_lossy();
    for file in
        [db.to_path_buf(), format!("{name}-wal").into(), format!("{name}-shm").into(), folder.join("state.json")]
    {
        if let Some(mode) = shared_bits(&file) {
            parts.push((file, mode));
        }
    }
    // Once per path and process: a folder of several namespace files is one warning, not one
    // per file.
    static WARNED: std::sync::Mutex<std::collections::BTreeSet<PathBuf>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    for (path, mode) in parts {
        if !WARNED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(path.clone()) {
            continue;
        }
        let fix = if path.is_dir() { "chmod 700" } else { "chmod 600" };
        tracing::warn!(
            "{} can be read by other users (mode {mode:04o}) and holds student data; make it private with `{fix} '{}'`, or pass --allow-shared if the sharing is on purpose",
            path.display(),
            path.display()
        );
    }
}

/// Why a file that should hold a secret was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("cannot read {}: {source}", path.display())]
    Unreadable { path: PathBuf, source: std::io::Error },
    #[error(
        "{} can be read by other users (mode {mode:04o}); a file holding a secret must be private: run `chmod 600 '{}'` and try again",
        path.display(),
        path.display()
    )]
    Shared { path: PathBuf, mode: u32 },
}

/// Reads a file that holds a secret, refusing it when other users can read it (as ssh does with
/// private keys): a secret others can read is no longer a secret.
pub fn read_private_file(path: &Path) -> Result<String, SecretFileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| SecretFileError::Unreadable { path: path.to_path_buf(), source })?;
    if let Some(mode) = shared_bits(path) {
        return Err(SecretFileError::Shared { path: path.to_path_buf(), mode });
    }
    Ok(text)
}

/// Writes `contents` to `path` owner-only (folder 0700, file 0600), replacing it atomically.
pub fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    create_private_dir(folder)?;
    let mut file = tempfile::NamedTempFile::new_in(folder)?;
    file.write_all(contents)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Creates `dir` and its missing parents as 0700.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_secret_file_others_can_read_is_refused_and_a_private_one_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_private_file(&path).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        assert!(!e.to_string().contains("s3cret"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_private_file(&path).unwrap(), "s3cret\n");
    }

    #[test]
    fn private_files_are_written_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/config.json");
        write_private_file(&path, b"{}").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
    }
}
