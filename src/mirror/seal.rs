//! A mirror file as dap last left it. Checking a table for damage before each sync reads the
//! whole table (`PRAGMA quick_check`: 10.8 s of a 17.5 s sync at 10^7 rows), though nothing but
//! dap writes the file. So a run that ends cleanly seals the file: its size and modification
//! time go to `state.json`. The next writer finds the file as sealed (and no WAL beside it, so no
//! writer is at work) and skips the check; anything that wrote the file since (another tool, a
//! copy, a crash of ours, which never seals) changes those, and the check runs. A writer breaks
//! the seal as it opens the file, so a run that stops half-way leaves none.

use std::path::Path;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use super::folder::StateFile;
use super::format::sibling;

/// What the file looked like when sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    pub bytes: u64,
    /// Modification time, nanoseconds since 1970.
    pub modified_ns: u128,
}

impl Seal {
    fn of(file: &Path) -> Option<Seal> {
        let meta = std::fs::metadata(file).ok()?;
        let modified_ns = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?.as_nanos();
        Some(Seal { bytes: meta.len(), modified_ns })
    }
}

/// The key of a file's seal in `state.json`.
fn key(file: &Path) -> String {
    file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Whether `file` is as the last clean run left it, taking the seal off either way: the caller
/// is the file's writer, about to change it.
pub fn take(file: &Path) -> bool {
    let state = StateFile::load(&StateFile::path_for(file));
    let Some(sealed) = state.seals.get(&key(file)) else { return false };
    let untouched = Seal::of(file).as_ref() == Some(sealed) && !sibling(file, "-wal").exists();
    if let Err(e) = StateFile::update(file, |s| {
        s.seals.remove(&key(file));
    }) {
        tracing::warn!("{}: could not take its seal off ({e}); its tables are checked", file.display());
        return false;
    }
    untouched
}

/// Seals `file` as it is now, at the clean end of a run that wrote it (its writer closed).
pub fn seal(file: &Path) {
    let Some(now) = Seal::of(file) else { return };
    if sibling(file, "-wal").exists() {
        // Another connection still has it open: the next writer checks its tables.
        return;
    }
    if let Err(e) = StateFile::update(file, |s| {
        s.seals.insert(key(file), now);
    }) {
        tracing::debug!("{}: not sealed ({e}); the next sync checks its tables", file.display());
    }
}
