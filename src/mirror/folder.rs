//! The mirror's folder: where it is by default, its namespace files, the writer lock of each
//! file, and `state.json` beside them; and which paths belong to it (so that nothing else is
//! written over them).
//!
//! The state file records, per mirror file and table: watermark, schema version, rows, last job,
//! last run and its result. Every change re-reads it and rewrites it atomically (temporary file,
//! fsync, rename) under an exclusive lock, so processes writing different mirror files of one
//! folder never lose each other's updates. It is rebuilt from the databases when missing or
//! corrupt, and never trusted over them: every run reconciles it with the bookkeeping rows.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::sink::{Bookkeeping, Refusal, SinkError};
use crate::time;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "the mirror {} is being written by another dap process ({holder}); waited {} s for it (--lock-timeout). Run the command again once it finishes, or give it a longer --lock-timeout",
        path.display(),
        waited.as_secs()
    )]
    Locked { path: PathBuf, holder: String, waited: std::time::Duration },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Folder(#[from] FolderError),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StateError + '_ {
    move |source| match FolderError::writing(path, source) {
        Ok(refused) => StateError::Folder(refused),
        Err(source) => StateError::Io { path: path.to_path_buf(), source },
    }
}

/// A mirror folder this user may not use, named, with what to do.
#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    #[error(
        "cannot read the mirror folder {} ({}): run dap as the user that owns it (`ls -ld` shows who), or have it shared with you (read and search rights on the folder, read on its files)",
        folder.display(),
        cause(folder, path, source)
    )]
    Unreadable { folder: PathBuf, path: PathBuf, source: std::io::Error },
    #[error(
        "cannot write in the mirror folder {} ({}): dap keeps the mirror, its lock and state.json there. Run dap as the user that owns it, make the folder writable, or point --dir (or DAP_MIRROR_DIR) at a writable one; status, query, export and pack only read it",
        folder.display(),
        cause(folder, path, source)
    )]
    ReadOnly { folder: PathBuf, path: PathBuf, source: std::io::Error },
}

/// What failed, on which file of `folder` (its name only: the line names the folder once).
fn cause(folder: &Path, path: &Path, source: &std::io::Error) -> String {
    let what = std::io::Error::new(source.kind(), source.to_string().split(" at path ").next().unwrap_or_default());
    match path.strip_prefix(folder) {
        Ok(rest) if !rest.as_os_str().is_empty() => format!("{what}, on {}", rest.display()),
        _ => what.to_string(),
    }
}

/// Whether the mirror file `path` is there; one this user may not read (or whose folder it may
/// not search) is refused, named, rather than taken for missing.
pub fn mirror_file_present(path: &Path) -> Result<bool, FolderError> {
    match File::open(path) {
        Ok(file) => Ok(file.metadata().is_ok_and(|m| m.is_file())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => FolderError::reading(path, e).map_or(Ok(false), Err),
    }
}

impl FolderError {
    /// The refusal a target reports; its message names the folder, once.
    pub fn refusal(self) -> SinkError {
        let folder = match &self {
            FolderError::Unreadable { folder, .. } | FolderError::ReadOnly { folder, .. } => {
                folder.display().to_string()
            }
        };
        SinkError::refused(&folder, Refusal::NotAllowed, self.to_string())
    }

    /// The folder of `path` (or `path` itself when it is one).
    fn folder_of(path: &Path) -> PathBuf {
        if path.is_dir() {
            return path.to_path_buf();
        }
        path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf()
    }

    /// `source` as a refusal when it says the folder of `path` may not be written; else itself.
    pub fn writing(path: &Path, source: std::io::Error) -> Result<FolderError, std::io::Error> {
        use std::io::ErrorKind::{PermissionDenied, ReadOnlyFilesystem};
        match source.kind() {
            PermissionDenied | ReadOnlyFilesystem => {
                Ok(FolderError::ReadOnly { folder: Self::folder_of(path), path: path.to_path_buf(), source })
            }
            _ => Err(source),
        }
    }

    /// `source` as a refusal when it says `path` (the folder or a file in it) may not be read.
    pub fn reading(path: &Path, source: std::io::Error) -> Result<FolderError, std::io::Error> {
        match source.kind() {
            std::io::ErrorKind::PermissionDenied => {
                Ok(FolderError::Unreadable { folder: Self::folder_of(path), path: path.to_path_buf(), source })
            }
            _ => Err(source),
        }
    }
}

/// Exclusive right to write one mirror file, held until dropped.
pub struct WriterLock {
    _file: File,
}

impl WriterLock {
    /// Takes the lock of `db` (a `<db>.lock` file), or says which process holds it.
    pub fn acquire(db: &Path) -> Result<WriterLock, StateError> {
        Self::acquire_waiting(db, std::time::Duration::ZERO)
    }

    /// Takes the lock of `db`, waiting up to `wait` for another process to let it go (saying
    /// once who holds it), then says which process holds it.
    pub fn acquire_waiting(db: &Path, wait: std::time::Duration) -> Result<WriterLock, StateError> {
        let path = PathBuf::from(format!("{}.lock", db.display()));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io(&path))?;
        let started = std::time::Instant::now();
        let mut told = false;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) => {
                    let mut holder = String::new();
                    let _ = file.rewind();
                    let _ = file.read_to_string(&mut holder);
                    let holder =
                        if holder.trim().is_empty() { "unknown process".into() } else { holder.trim().to_string() };
                    let holder = crate::term::safe(&holder).into_owned();
                    if started.elapsed() >= wait {
                        return Err(StateError::Locked { path: db.to_path_buf(), holder, waited: started.elapsed() });
                    }
                    if !told {
                        tracing::warn!(
                            "{} is being written by another dap process ({holder}); waiting up to {} s for it to finish",
                            db.display(),
                            wait.as_secs()
                        );
                        told = true;
                    }
                    std::thread::sleep((wait - started.elapsed()).min(std::time::Duration::from_millis(200)));
                }
                Err(TryLockError::Error(e)) => return Err(io(&path)(e)),
            }
        }
        file.set_len(0).map_err(io(&path))?;
        file.rewind().map_err(io(&path))?;
        write!(
            file,
            "pid {} on {} since {}",
            std::process::id(),
            crate::sink::protocol::hostname(),
            time::format_wire(time::now())
        )
        .map_err(io(&path))?;
        Ok(WriterLock { _file: file })
    }
}

/// Runs `write` on the mirror file `db` as its writer: under its writer lock (waiting up to
/// `wait` for another writer) and SQLite's busy timeout. For the short writes beside a run
/// (`--keep-days`, the record of runs, what an archive holds); the error says what failed.
pub fn with_writer<T>(
    db: &Path,
    wait: std::time::Duration,
    write: impl FnOnce(&mut rusqlite::Connection) -> rusqlite::Result<T>,
) -> Result<T, String> {
    let _lock = WriterLock::acquire_waiting(db, wait).map_err(|e| e.to_string())?;
    let mut conn = rusqlite::Connection::open(db).map_err(|e| e.to_string())?;
    conn.busy_timeout(wait).map_err(|e| e.to_string())?;
    write(&mut conn).map_err(|e| e.to_string())
}

/// The profile (Canvas instance) of this process, chosen once at start (`--profile`).
static PROFILE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Makes the default mirror folder the profile's own: `profiles/NAME` in the platform data
/// folder, so that the mirrors of two Canvas instances never mix.
pub fn use_profile(name: &str) {
    let _ = PROFILE.set(name.to_string());
}

/// The profile chosen for this process (`--profile`), if any.
pub fn profile() -> Option<&'static str> {
    PROFILE.get().map(String::as_str)
}

/// The mirror folder this process was given with `--dir`, chosen once at start.
static CHOSEN_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Makes `dir` the mirror folder of every command of this process (`--dir`), before
/// `DAP_MIRROR_DIR` and the platform data folder.
pub fn use_dir(dir: &Path) {
    let _ = CHOSEN_DIR.set(dir.to_path_buf());
}

/// The default mirror folder: `--dir`, else `DAP_MIRROR_DIR`, else the platform data folder
/// (its `profiles/NAME` under `--profile NAME`).
pub fn default_dir() -> Result<PathBuf, SinkError> {
    if let Some(d) = CHOSEN_DIR.get() {
        return Ok(d.clone());
    }
    if let Some(d) = std::env::var_os("DAP_MIRROR_DIR") {
        return Ok(PathBuf::from(d));
    }
    let base = directories::ProjectDirs::from("", "", "dap-replica").map(|p| p.data_dir().to_path_buf());
    let base = base.map(|b| match PROFILE.get() {
        Some(name) => b.join("profiles").join(name),
        None => b,
    });
    base.ok_or_else(|| {
        SinkError::refused(
            "the default mirror",
            Refusal::Missing,
            "there is no home folder to keep it in; pass --dir (or DAP_MIRROR_DIR) or --connection-string sqlite:///PATH.db",
        )
    })
}

/// Why a `.db` file of a mirror folder is left out of the folder's namespaces (a file this user
/// may not read is refused instead).
fn unusable(path: &Path, namespace: &str) -> Result<Option<String>, FolderError> {
    let safe = !namespace.is_empty() && namespace.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !safe {
        return Ok(Some("its name is not a namespace name (letters, digits and _ only)".into()));
    }
    if ["main", "temp"].iter().any(|reserved| namespace.eq_ignore_ascii_case(reserved)) {
        return Ok(Some(format!("{namespace} is a name SQLite reserves for its own databases")));
    }
    match super::format::sqlite_header(path) {
        Ok(true) => Ok(None),
        Ok(false) => Ok(Some("it is not a SQLite database".into())),
        Err(e) => match FolderError::reading(path, e) {
            Ok(refused) => Err(refused),
            Err(e) => Ok(Some(format!("it cannot be read ({e})"))),
        },
    }
}

/// The namespace files of a mirror folder: `(namespace, file)` for each `*.db` that is a SQLite
/// database named like a namespace, sorted. Any other `.db` there (a file named so that it
/// could not be attached safely, `temp.db`, a text file) is left out with a warning, so that one
/// stray file never breaks the folder. A folder that does not exist has none; one this user may
/// not read (or a namespace file in it) is refused, named.
pub fn namespace_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, FolderError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => return FolderError::reading(dir, e).map_or(Ok(Vec::new()), Err),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        let Some(namespace) = name.to_string_lossy().strip_suffix(".db").map(String::from) else { continue };
        if !path.is_file() {
            continue;
        }
        if let Some(why) = unusable(&path, &namespace)? {
            tracing::warn!("{}: left out of the mirror: {why}", crate::term::safe(&path.display().to_string()));
            continue;
        }
        out.push((namespace, path));
    }
    out.sort();
    Ok(out)
}

/// Refuses an output file (of `export` or `pack`) that would replace a part of the mirror in
/// `dir`: a namespace file or any `.db` there (which would become a namespace), a file's
/// `-wal`/`-shm`/`-journal`, lock or load file, `state.json`, or the spool; followed through links.
pub fn refuse_mirror_output(dir: &Path, output: &Path) -> Result<(), String> {
    let canonical = |p: &Path| std::fs::canonicalize(p).ok();
    let Some(mirror) = canonical(dir) else { return Ok(()) };
    // Where the output would land: its folder's real path, and its real path when it exists.
    let folder = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let landing = canonical(output).or_else(|| canonical(folder).map(|f| f.join(&name)));
    let Some(landing) = landing else { return Ok(()) };
    if landing.parent() != Some(mirror.as_path()) {
        return Ok(());
    }
    let landed = landing.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let part_of_the_mirror = landed.ends_with(".db")
        || [".db-wal", ".db-shm", ".db-journal", ".db.lock", ".db-load", ".db-load-wal", ".db-load-shm"]
            .iter()
            .any(|s| landed.ends_with(s))
        || ["state.json", "state.json.lock", "state.json.partial", ".dap-spool"].contains(&landed.as_str());
    if part_of_the_mirror {
        return Err(format!(
            "{} is part of the mirror in {} (or would become one of its namespaces); write the output elsewhere",
            output.display(),
            dir.display()
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TableEntry {
    pub namespace: String,
    pub table: String,
    /// The database file holding the table.
    pub file: PathBuf,
    pub watermark: Option<String>,
    pub schema_version: Option<u32>,
    pub rows: Option<u64>,
    pub last_job: Option<String>,
    pub last_command: Option<String>,
    pub last_run: Option<String>,
    /// `ok`, or the error of the last run.
    pub last_result: Option<String>,
    /// When a run last succeeded on the table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StateFile {
    pub format: u32,
    /// [`StateFile::key`] → entry.
    pub tables: BTreeMap<String, TableEntry>,
    /// File name → the file as the last clean run left it ([`super::seal`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub seals: BTreeMap<String, super::seal::Seal>,
}

impl StateFile {
    /// `state.json` of the mirror folder holding `db`.
    pub fn path_for(db: &Path) -> PathBuf {
        db.parent().unwrap_or(Path::new(".")).join("state.json")
    }

    /// The key of a table's entry: `namespace.table` in the namespace's own file (`canvas.db`),
    /// else prefixed by the file's name (`archive.db:canvas.users`), so that files sharing a
    /// folder never share an entry.
    pub fn key(db: &Path, namespace: &str, table: &str) -> String {
        let file = db.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        if file == format!("{namespace}.db") {
            format!("{namespace}.{table}")
        } else {
            format!("{file}:{namespace}.{table}")
        }
    }

    /// The entry of a table of `db`.
    pub fn entry(&self, db: &Path, namespace: &str, table: &str) -> Option<&TableEntry> {
        self.tables.get(&Self::key(db, namespace, table))
    }

    /// Applies `change` to the state file beside `db`: under an exclusive lock (`state.json.lock`),
    /// it is read afresh, changed and written back, so concurrent writers keep each other's
    /// updates.
    pub fn update(db: &Path, change: impl FnOnce(&mut StateFile)) -> Result<(), StateError> {
        let path = Self::path_for(db);
        let lock_path = path.with_extension("json.lock");
        let lock =
            OpenOptions::new().create(true).write(true).truncate(false).open(&lock_path).map_err(io(&lock_path))?;
        lock.lock().map_err(io(&lock_path))?;
        let mut state = Self::load(&path);
        change(&mut state);
        state.save(&path)
    }

    /// Reads the state file; a missing or unreadable one yields an empty state (it is rebuilt
    /// from the databases by [`StateFile::reconcile`]).
    pub fn load(path: &Path) -> StateFile {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!("{} is corrupt ({e}); rebuilding it from the databases", path.display());
                StateFile::default()
            }),
            Err(_) => StateFile::default(),
        }
    }

    /// Makes the entries of `db`'s namespace agree with its bookkeeping rows (and the row counts
    /// given): the database is the authority.
    pub fn reconcile(&mut self, namespace: &str, db: &Path, bookkeeping: &[Bookkeeping], rows: &BTreeMap<String, u64>) {
        self.tables.retain(|key, e| {
            // Entries of this file under another key were written by an older dap.
            let stale = *key != Self::key(&e.file, &e.namespace, &e.table);
            !(e.namespace == namespace && e.file == db && (stale || !bookkeeping.iter().any(|b| b.table == e.table)))
        });
        for b in bookkeeping {
            let e = self.tables.entry(Self::key(db, namespace, &b.table)).or_default();
            e.namespace = namespace.to_string();
            e.table = b.table.clone();
            e.file = db.to_path_buf();
            e.watermark = Some(time::format_wire(b.watermark));
            e.schema_version = Some(b.schema_version);
            if let Some(n) = rows.get(&b.table) {
                e.rows = Some(*n);
            }
        }
    }

    /// Records the outcome of a run on a table.
    pub fn record_run(
        &mut self,
        namespace: &str,
        table: &str,
        db: &Path,
        command: &str,
        job: Option<&str>,
        result: Result<(), String>,
    ) {
        let e = self.tables.entry(Self::key(db, namespace, table)).or_default();
        e.namespace = namespace.to_string();
        e.table = table.to_string();
        e.file = db.to_path_buf();
        e.last_command = Some(command.to_string());
        e.last_run = Some(time::format_wire(time::now()));
        if let Some(j) = job {
            e.last_job = Some(j.to_string());
        }
        if result.is_ok() {
            e.last_success = e.last_run.clone();
        }
        e.last_result = Some(match result {
            Ok(()) => "ok".into(),
            Err(e) => crate::secrets::scrub(&e).into_owned(),
        });
    }

    /// Writes the file atomically: temporary file, fsync, rename.
    pub fn save(&mut self, path: &Path) -> Result<(), StateError> {
        self.format = 1;
        let temp = path.with_extension("json.partial");
        let mut f = File::create(&temp).map_err(io(&temp))?;
        f.write_all(&serde_json::to_vec_pretty(self).expect("state serialises")).map_err(io(&temp))?;
        f.sync_all().map_err(io(&temp))?;
        std::fs::rename(&temp, path).map_err(io(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bk(table: &str, watermark: i64) -> Bookkeeping {
        Bookkeeping {
            namespace: "canvas".into(),
            table: table.into(),
            watermark,
            schema_version: 2,
            schema_description: "{}".into(),
        }
    }

    #[test]
    fn a_second_writer_is_told_who_holds_the_mirror() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("canvas.db");
        let first = WriterLock::acquire(&db).unwrap();
        let e = WriterLock::acquire(&db).err().unwrap().to_string();
        assert!(e.contains("another dap process") && e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(first);
        assert!(WriterLock::acquire(&db).is_ok());
    }

    #[test]
    fn state_is_rebuilt_from_the_databases_and_saved_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("canvas.db");
        let path = StateFile::path_for(&db);
        std::fs::write(&path, b"{ not json").unwrap();
        let mut s = StateFile::load(&path);
        assert!(s.tables.is_empty(), "a corrupt file is not trusted");
        s.tables.insert(
            "canvas.gone".into(),
            TableEntry { namespace: "canvas".into(), table: "gone".into(), file: db.clone(), ..Default::default() },
        );
        let rows = BTreeMap::from([("users".to_string(), 7)]);
        s.reconcile("canvas", &db, &[bk("users", 1_000_000)], &rows);
        s.record_run("canvas", "users", &db, "syncdb", Some("job-1"), Ok(()));
        s.save(&path).unwrap();
        let back = StateFile::load(&path);
        assert_eq!(back, s);
        assert!(!back.tables.contains_key("canvas.gone"), "tables the database no longer has are dropped");
        let users = &back.tables["canvas.users"];
        assert_eq!((users.rows, users.schema_version, users.last_result.as_deref()), (Some(7), Some(2), Some("ok")));
        assert_eq!(users.watermark.as_deref(), Some("1970-01-01T00:00:01Z"));
    }

    #[test]
    fn files_sharing_a_folder_keep_their_own_entries_and_concurrent_writers_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<PathBuf> = ["canvas.db", "a.db", "b.db", "c.db"].iter().map(|f| dir.path().join(f)).collect();
        let writers: Vec<_> = files
            .iter()
            .cloned()
            .map(|db| {
                std::thread::spawn(move || {
                    for i in 0..40 {
                        let tables: Vec<Bookkeeping> =
                            (0..=i).map(|n| bk(&format!("t{n}"), n)).chain([bk("users", i)]).collect();
                        StateFile::update(&db, |s| {
                            s.record_run("canvas", &format!("t{i}"), &db, "initdb", None, Ok(()));
                            s.reconcile("canvas", &db, &tables, &BTreeMap::new());
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let s = StateFile::load(&StateFile::path_for(&files[0]));
        for db in &files {
            assert_eq!(s.entry(db, "canvas", "users").map(|e| &e.file), Some(db), "{}", db.display());
            for i in 0..40 {
                let run = s.entry(db, "canvas", &format!("t{i}")).and_then(|e| e.last_command.as_deref());
                assert_eq!(run, Some("initdb"), "{}: the run of t{i} was lost", db.display());
            }
        }
        assert!(s.tables.contains_key("canvas.users") && s.tables.contains_key("a.db:canvas.users"));
    }
}
