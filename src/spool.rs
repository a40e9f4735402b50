//! The folder where downloaded objects wait between download and load: one per run, made with
//! mkdtemp's guarantees (a new, unpredictable, owner-only folder that no one can have planted),
//! inside a base folder the user chose (`--temp-dir`), the mirror's `.dap-spool`, or the system's
//! temporary folder.
//!
//! A shared base such as /tmp is someone else's ground: nothing here follows a symbolic link,
//! the mirror's `.dap-spool` is refused when it is a link or another user's, and only what a run
//! made is ever removed. A run that was killed leaves its folder behind; the next run removes it
//! once the folder's lock shows that no process uses it any more, and only if it is a real folder
//! of ours (`std::fs::remove_dir_all` itself never follows links inside it).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// Every run's folder starts with this, so that leftovers can be recognised.
const PREFIX: &str = "dap-spool-";
/// Held (locked) by the run using the folder; a folder whose lock can be taken is abandoned.
const IN_USE: &str = ".in-use";
/// How long a run folder must be untouched before the cleaner looks at its lock.
const SETTLED: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(
        "{}: the spool folder is a symbolic link; dap does not follow links in a folder others may write to. Remove the link, or pass --temp-dir with a folder of your own",
        .0.display()
    )]
    Link(PathBuf),
    #[error(
        "{}: the spool folder belongs to another user; pass --temp-dir with a folder of your own",
        .0.display()
    )]
    NotOurs(PathBuf),
    #[error(
        "{}: the spool folder cannot be made ({source}); pass --temp-dir with a folder you can write to",
        path.display()
    )]
    Io { path: PathBuf, source: std::io::Error },
}

/// A run's spool folder; removed with everything in it when dropped.
pub struct Spool {
    folder: tempfile::TempDir,
    _in_use: File,
}

impl Spool {
    /// A new folder for this run inside `base`, after removing the folders of runs that died.
    /// `base` is made (owner-only) when missing; `private_base` says it must be a real folder of
    /// this user (the mirror's `.dap-spool`, which dap itself makes), whereas a `--temp-dir` or the
    /// system's temporary folder may be shared or a link the user chose.
    pub fn create(base: &Path, private_base: bool) -> Result<Spool, SpoolError> {
        let io = |source| SpoolError::Io { path: base.to_path_buf(), source };
        if !base.exists() {
            crate::privacy::create_private_dir(base).map_err(io)?;
        }
        if private_base {
            check_ours(base)?;
        }
        remove_abandoned(base);
        let folder = tempfile::Builder::new().prefix(PREFIX).tempdir_in(base).map_err(io)?;
        // tempfile makes the folder with mode 0700 and a random name, failing if it exists.
        let lock_path = folder.path().join(IN_USE);
        let in_use = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&lock_path)
            .map_err(|source| SpoolError::Io { path: lock_path.clone(), source })?;
        in_use.lock().map_err(|source| SpoolError::Io { path: lock_path, source })?;
        Ok(Spool { folder, _in_use: in_use })
    }

    pub fn path(&self) -> &Path {
        self.folder.path()
    }
}

/// Refuses a folder that is a symbolic link or belongs to another user.
fn check_ours(path: &Path) -> Result<(), SpoolError> {
    let meta = std::fs::symlink_metadata(path).map_err(|source| SpoolError::Io { path: path.to_path_buf(), source })?;
    if meta.file_type().is_symlink() {
        return Err(SpoolError::Link(path.to_path_buf()));
    }
    if !meta.is_dir() || !owned_by_us(&meta) {
        return Err(SpoolError::NotOurs(path.to_path_buf()));
    }
    Ok(())
}

#[cfg(unix)]
fn owned_by_us(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    meta.uid() == unsafe { libc::geteuid() }
}

#[cfg(not(unix))]
fn owned_by_us(_: &std::fs::Metadata) -> bool {
    true
}

/// Removes the run folders in `base` whose run is over: real folders (not links) of this user,
/// named as dap names them, whose lock no process holds.
fn remove_abandoned(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        let path = entry.path();
        // `symlink_metadata`: a link named like a spool folder is never followed.
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if !meta.is_dir() || meta.file_type().is_symlink() || !owned_by_us(&meta) {
            continue;
        }
        // A folder made a moment ago may not hold its lock yet (another run is between making
        // it and locking it): only folders left alone for a while are candidates.
        let recent = meta.modified().ok().and_then(|m| m.elapsed().ok()).is_none_or(|age| age < SETTLED);
        if recent {
            continue;
        }
        let abandoned = match OpenOptions::new().write(true).open(path.join(IN_USE)) {
            Ok(lock) => lock.try_lock().is_ok(),
            // A folder without its lock file died before it made one.
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        };
        if abandoned {
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::debug!("{}: could not remove an abandoned spool folder: {e}", path.display());
            } else {
                tracing::debug!("{}: removed the spool folder of a run that ended early", path.display());
            }
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn a_run_gets_its_own_folder_and_abandoned_ones_go_but_not_through_links() {
        let base = tempfile::tempdir().unwrap();
        let victim = tempfile::tempdir().unwrap();
        std::fs::create_dir(victim.path().join("dap-spool-keep")).unwrap();
        std::fs::write(victim.path().join("dap-spool-keep/data"), b"precious").unwrap();
        // A link named like a spool folder, and a link to a folder that holds spool-named folders.
        std::os::unix::fs::symlink(victim.path().join("dap-spool-keep"), base.path().join("dap-spool-link")).unwrap();
        let abandoned = base.path().join("dap-spool-dead");
        std::fs::create_dir(&abandoned).unwrap();
        std::fs::write(abandoned.join(IN_USE), b"").unwrap();
        std::fs::write(abandoned.join("object.gz"), b"x").unwrap();
        let long_ago = std::time::SystemTime::now() - 2 * SETTLED;
        std::fs::File::open(&abandoned).unwrap().set_modified(long_ago).unwrap();
        // Another run's folder a moment after it was made, before it holds its lock.
        let starting = base.path().join("dap-spool-starting");
        std::fs::create_dir(&starting).unwrap();

        let first = Spool::create(base.path(), false).unwrap();
        let second = Spool::create(base.path(), false).unwrap();
        assert_ne!(first.path(), second.path());
        assert!(first.path().is_dir() && second.path().is_dir(), "a live run's folder is never taken");
        assert!(!abandoned.exists(), "the folder of a run that died is removed");
        assert!(starting.exists(), "a run's folder is not taken before it could lock it");
        assert_eq!(std::fs::read(victim.path().join("dap-spool-keep/data")).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(base.path().join("dap-spool-link")).is_ok(), "links are left alone");
        let gone = first.path().to_path_buf();
        drop(first);
        assert!(!gone.exists());

        // The mirror's own .dap-spool must be a real folder of ours.
        let link = base.path().join(".dap-spool");
        std::os::unix::fs::symlink(victim.path(), &link).unwrap();
        assert!(matches!(Spool::create(&link, true), Err(SpoolError::Link(_))));
        assert!(victim.path().join("dap-spool-keep/data").exists());
    }
}
