//! `dap pack` and `dap unpack`: the mirror as one compressed file to hand to a colleague or move
//! to another machine. Each namespace file is copied with SQLite's online backup in one step (one
//! read transaction: a consistent snapshot, even while a sync is writing), and the copies, with
//! `state.json` and a manifest, go into a tar stream compressed with zstd. Unpacking checks every
//! file before anything is put in place, and the unpacked mirror syncs from where the pack left off
//! (each file carries its own bookkeeping).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};

use crate::mirror::folder::{StateError, StateFile, WriterLock, namespace_files, refuse_mirror_output};
use crate::mirror::format::{LeaveNoTrace, UserViews, foreign_objects, open_read_only, sibling};

/// The manifest's name inside a pack; it comes first.
const MANIFEST: &str = "dap-pack.json";
const STATE: &str = "state.json";
/// Bumped when a pack's layout changes incompatibly.
const FORMAT: u32 = 1;

/// What a pack holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub created: String,
    pub created_by: String,
    pub namespaces: Vec<String>,
}

/// Whether unpacking may replace an existing mirror file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overwrite {
    Refuse,
    Replace,
}

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("there is no mirror in {}: nothing to pack", .0.display())]
    NoMirror(PathBuf),
    #[error("namespace {0} is not in the mirror (it has: {1})")]
    UnknownNamespace(String, String),
    #[error("copying {}: {source}", path.display())]
    Backup { path: PathBuf, source: rusqlite::Error },
    #[error("{0}")]
    Output(String),
    #[error(transparent)]
    Interrupted(#[from] crate::interrupt::Interrupted),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{} is not a dap pack: {reason}", path.display())]
    NotAPack { path: PathBuf, reason: String },
    #[error(
        "{} already exists; unpacking would replace it. Pass --force to replace it, or --dir to unpack elsewhere",
        .0.display()
    )]
    Exists(PathBuf),
    #[error(transparent)]
    Locked(#[from] StateError),
    #[error(transparent)]
    Folder(#[from] crate::mirror::folder::FolderError),
}

/// An error writing into the destination folder `dir`: one this user may not write is named so.
fn writing(dir: &Path) -> impl Fn(std::io::Error) -> PackError + '_ {
    move |source| match crate::mirror::folder::FolderError::writing(dir, source) {
        Ok(refused) => PackError::Folder(refused),
        Err(source) => PackError::Io { path: dir.to_path_buf(), source },
    }
}

impl PackError {
    fn from_sql(path: &Path, source: rusqlite::Error) -> PackError {
        if crate::interrupt::is_sqlite_interrupt(&source) {
            return PackError::Interrupted(crate::interrupt::Interrupted);
        }
        PackError::Backup { path: path.to_path_buf(), source }
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> PackError + '_ {
    move |source| PackError::Io { path: path.to_path_buf(), source }
}

/// Writes the mirror folder `dir` (only `namespaces` when given) to `output`; returns the manifest.
pub fn pack(dir: &Path, namespaces: &[String], output: &Path) -> Result<Manifest, PackError> {
    refuse_mirror_output(dir, output).map_err(PackError::Output)?;
    let mut files = namespace_files(dir)?;
    if files.is_empty() {
        return Err(PackError::NoMirror(dir.to_path_buf()));
    }
    if !namespaces.is_empty() {
        let known: Vec<String> = files.iter().map(|(ns, _)| ns.clone()).collect();
        if let Some(unknown) = namespaces.iter().find(|ns| !known.contains(ns)) {
            return Err(PackError::UnknownNamespace(unknown.clone(), known.join(", ")));
        }
        files.retain(|(ns, _)| namespaces.contains(ns));
    }
    let folder = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let scratch = tempfile::tempdir_in(folder).map_err(io(folder))?;
    let _tidy = LeaveNoTrace::note(files.iter().map(|(_, f)| f.as_path()));
    for (ns, file) in &files {
        crate::interrupt::check()?;
        let copy = scratch.path().join(format!("{ns}.db"));
        let fail = |source| PackError::from_sql(file, source);
        let source = open_read_only(file).map_err(fail)?;
        source.busy_timeout(std::time::Duration::from_secs(30)).map_err(fail)?;
        crate::interrupt::watch(&source);
        // One read transaction, so the copy is one consistent state even while a sync writes;
        // compact, and interruptible by Ctrl-C.
        source.execute("VACUUM INTO ?1", [copy.to_string_lossy()]).map_err(fail)?;
        // A self-contained file: no WAL beside it.
        let target = Connection::open(&copy).map_err(fail)?;
        target.pragma_update(None, "journal_mode", "DELETE").map_err(fail)?;
    }
    let manifest = Manifest {
        format: FORMAT,
        created: crate::time::format_wire(crate::time::now()),
        created_by: concat!("dap-replica ", env!("CARGO_PKG_VERSION")).into(),
        namespaces: files.iter().map(|(ns, _)| ns.clone()).collect(),
    };
    let mut out = tempfile::NamedTempFile::new_in(folder).map_err(io(folder))?;
    {
        let encoder = zstd::Encoder::new(&mut out, 3).map_err(io(output))?;
        let mut tar = tar::Builder::new(encoder);
        let manifest_json = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
        append(&mut tar, MANIFEST, manifest_json.len() as u64, manifest_json.as_slice()).map_err(io(output))?;
        for (ns, _) in &files {
            let copy = scratch.path().join(format!("{ns}.db"));
            let file = std::fs::File::open(&copy).map_err(io(&copy))?;
            let size = file.metadata().map_err(io(&copy))?.len();
            append(&mut tar, &format!("{ns}.db"), size, Interruptible(file)).map_err(io(output))?;
        }
        // The state travels without the packer's folders: only file names, which unpack places.
        if dir.join(STATE).is_file() {
            let mut state = StateFile::load(&dir.join(STATE));
            state.tables.retain(|_, e| files.iter().any(|(_, f)| f.file_name() == e.file.file_name()));
            for entry in state.tables.values_mut() {
                entry.file = entry.file.file_name().map(PathBuf::from).unwrap_or_default();
            }
            let json = serde_json::to_vec_pretty(&state).expect("a state serialises");
            append(&mut tar, STATE, json.len() as u64, json.as_slice()).map_err(io(output))?;
        }
        tar.into_inner().and_then(|e| e.finish()).map_err(io(output))?.flush().map_err(io(output))?;
    }
    crate::interrupt::check()?;
    out.as_file().sync_all().map_err(io(output))?;
    out.persist(output).map_err(|e| io(output)(e.error))?;
    Ok(manifest)
}

/// A reader that fails once Ctrl-C was pressed, so that a long copy stops within a chunk.
struct Interruptible<R>(R);

impl<R: Read> Read for Interruptible<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        crate::interrupt::check().map_err(|e| std::io::Error::new(std::io::ErrorKind::Interrupted, e))?;
        self.0.read(buf)
    }
}

/// Adds one owner-only entry of `size` bytes read from `data`, stamped with the time of packing.
fn append<W: Write>(tar: &mut tar::Builder<W>, name: &str, size: u64, data: impl Read) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o600);
    header.set_mtime(crate::time::now().max(0) as u64 / 1_000_000);
    header.set_cksum();
    tar.append_data(&mut header, name, data)
}

/// What unpacking accepts of a pack, beyond what dap itself writes.
#[derive(Debug, Clone, Copy)]
pub struct UnpackOptions {
    pub overwrite: Overwrite,
    pub views: UserViews,
    /// The most the pack may unpack to, in bytes; `None`: 100 times the pack's size, at least
    /// 64 MiB (a mirror compresses a few times, a decompression bomb thousands of times).
    pub max_size: Option<u64>,
}

/// Entries a pack may hold: its manifest, a state file, and a file per namespace.
const MAX_ENTRIES: usize = 256;
/// The longest entry name read (dap writes `<namespace>.db`).
const MAX_NAME: usize = 255;
/// The largest manifest or state file read into memory.
const MAX_SMALL_ENTRY: u64 = 16 << 20;
const DEFAULT_RATIO: u64 = 100;
const DEFAULT_FLOOR: u64 = 64 << 20;

/// An entry name for a message: escaped, and cut when long.
fn shown_name(name: &[u8]) -> String {
    let text = String::from_utf8_lossy(&name[..name.len().min(80)]);
    let cut = if name.len() > 80 { format!("… ({} bytes)", name.len()) } else { String::new() };
    format!("{:?}{cut}", crate::term::safe(&text))
}

/// Restores the pack `file` into the mirror folder `dir`; returns the manifest.
///
/// Nothing of the pack is trusted: every entry must be a regular file that the manifest (the
/// first entry) lists, named as dap names them, with caps on entries, names and total size
/// enforced while reading; every database must pass `PRAGMA integrity_check` and hold only the
/// objects dap makes ([`foreign_objects`]). Entries are extracted into a temporary folder inside
/// `dir` (removed on any refusal), and put in place only when all passed, each under its
/// mirror's writer lock. An existing mirror file is replaced only with [`Overwrite::Replace`],
/// which is checked before anything is extracted. A `dir` this made is removed again on failure.
pub fn unpack(file: &Path, dir: &Path, options: UnpackOptions) -> Result<Manifest, PackError> {
    let made_dir = !dir.exists();
    let result = unpack_into(file, dir, options);
    if result.is_err() && made_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

fn unpack_into(file: &Path, dir: &Path, options: UnpackOptions) -> Result<Manifest, PackError> {
    let not_a_pack = |reason: String| PackError::NotAPack { path: file.to_path_buf(), reason };
    let input = std::fs::File::open(file).map_err(io(file))?;
    let pack_size = input.metadata().map_err(io(file))?.len();
    let budget = options.max_size.unwrap_or_else(|| pack_size.saturating_mul(DEFAULT_RATIO).max(DEFAULT_FLOOR));
    let decoder = zstd::Decoder::new(input).map_err(|e| not_a_pack(format!("not zstd ({e})")))?;
    let mut archive = tar::Archive::new(decoder);
    let mut entries = archive.entries().map_err(|e| not_a_pack(e.to_string()))?;
    // Raw entries: the tar reader neither reads GNU long names nor PAX headers into memory
    // (dap writes neither); they are refused below by their type.
    entries = entries.raw(true);
    let mut scratch: Option<tempfile::TempDir> = None;
    let mut manifest: Option<Manifest> = None;
    let mut extracted: Vec<String> = Vec::new();
    let mut written = 0u64;
    for (index, entry) in entries.enumerate() {
        crate::interrupt::check()?;
        if index >= MAX_ENTRIES {
            return Err(not_a_pack(format!("it holds more than {MAX_ENTRIES} entries")));
        }
        let mut entry = entry.map_err(|e| not_a_pack(format!("entry {}: {e}", index + 1)))?;
        let raw_name = entry.path_bytes().into_owned();
        let shown = shown_name(&raw_name);
        if raw_name.len() > MAX_NAME {
            return Err(not_a_pack(format!("entry {shown} has a name longer than {MAX_NAME} bytes")));
        }
        let kind = entry.header().entry_type();
        if !matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous) {
            return Err(not_a_pack(format!(
                "entry {shown} is a {} (dap packs hold regular files only)",
                describe_kind(kind)
            )));
        }
        let name = String::from_utf8(raw_name).map_err(|_| not_a_pack(format!("entry {shown} is not UTF-8")))?;
        let size = entry.header().size().map_err(|e| not_a_pack(format!("entry {shown}: {e}")))?;
        if index == 0 {
            if name != MANIFEST {
                return Err(not_a_pack(format!("it does not begin with its manifest {MANIFEST} but with {shown}")));
            }
            let m: Manifest = serde_json::from_slice(&read_small(&mut entry, size, &shown).map_err(not_a_pack)?)
                .map_err(|e| not_a_pack(format!("bad manifest: {e}")))?;
            check_manifest(&m).map_err(not_a_pack)?;
            // Refusals that need no extraction come first: nothing is written for them.
            if options.overwrite == Overwrite::Refuse
                && let Some(existing) = m.namespaces.iter().map(|ns| dir.join(format!("{ns}.db"))).find(|t| t.exists())
            {
                return Err(PackError::Exists(existing));
            }
            manifest = Some(m);
            continue;
        }
        let listed = manifest.as_ref().expect("the first entry is the manifest");
        let expected =
            name == STATE || name.strip_suffix(".db").is_some_and(|ns| listed.namespaces.iter().any(|n| n == ns));
        if !expected {
            return Err(not_a_pack(format!("entry {shown} is not listed in its manifest")));
        }
        if extracted.contains(&name) {
            return Err(not_a_pack(format!("it holds {shown} twice")));
        }
        if size > budget.saturating_sub(written) {
            return Err(too_large(file, budget));
        }
        let scratch = match &mut scratch {
            Some(s) => s,
            none => {
                crate::privacy::create_private_dir(dir).map_err(writing(dir))?;
                none.insert(tempfile::Builder::new().prefix(".dap-unpack-").tempdir_in(dir).map_err(writing(dir))?)
            }
        };
        let path = scratch.path().join(&name);
        let mut out = std::fs::OpenOptions::new().write(true).create_new(true).open(&path).map_err(io(&path))?;
        let copied = copy_capped(&mut entry, &mut out, size).map_err(|e| {
            if e.kind() == std::io::ErrorKind::Interrupted {
                PackError::Interrupted(crate::interrupt::Interrupted)
            } else {
                not_a_pack(format!("{shown} is cut off ({e})"))
            }
        })?;
        if copied != size {
            return Err(not_a_pack(format!("{shown} is cut off ({copied} of {size} bytes)")));
        }
        written += copied;
        out.sync_all().map_err(io(&path))?;
        extracted.push(name);
    }
    let manifest = manifest.ok_or_else(|| not_a_pack("it is empty".into()))?;
    let scratch = scratch.ok_or_else(|| not_a_pack("it holds no mirror file".into()))?;
    for ns in &manifest.namespaces {
        let name = format!("{ns}.db");
        if !extracted.contains(&name) {
            return Err(not_a_pack(format!("{name} is listed in its manifest but missing")));
        }
        check_database(&scratch.path().join(&name), options.views)
            .map_err(|why| not_a_pack(format!("{name}: {why}")))?;
    }
    if extracted.iter().any(|n| n == STATE) {
        let path = scratch.path().join(STATE);
        let text = std::fs::read(&path).map_err(io(&path))?;
        let mut state: StateFile =
            serde_json::from_slice(&text).map_err(|e| not_a_pack(format!("{STATE} is not a dap state file ({e})")))?;
        // Entries name the files they describe in the folder unpacked into.
        state.tables.retain(|_, e| extracted.iter().any(|n| Some(std::ffi::OsStr::new(n)) == e.file.file_name()));
        for entry in state.tables.values_mut() {
            entry.file = dir.join(entry.file.file_name().unwrap_or_default());
        }
        state
            .save(&path)
            .map_err(|e| PackError::Io { path: path.clone(), source: std::io::Error::other(e.to_string()) })?;
    }
    let targets: Vec<PathBuf> = extracted.iter().map(|n| dir.join(n)).collect();
    let mut locks = Vec::new();
    for t in targets.iter().filter(|t| t.extension().is_some_and(|e| e == "db")) {
        locks.push(WriterLock::acquire(t)?);
    }
    crate::interrupt::check()?;
    for name in &extracted {
        let target = dir.join(name);
        if name.ends_with(".db") {
            // A WAL left by the replaced file would be applied to the new one.
            for suffix in ["-wal", "-shm", "-journal"] {
                let stale = sibling(&target, suffix);
                if stale.exists() {
                    std::fs::remove_file(&stale).map_err(io(&stale))?;
                }
            }
        }
        std::fs::rename(scratch.path().join(name), &target).map_err(io(&target))?;
    }
    drop(locks);
    Ok(manifest)
}

fn too_large(file: &Path, budget: u64) -> PackError {
    PackError::NotAPack {
        path: file.to_path_buf(),
        reason: format!(
            "it unpacks to more than {:.0} MB (a decompression bomb?); if it is a pack you trust, pass --max-size with its real size",
            budget as f64 / 1e6
        ),
    }
}

fn describe_kind(kind: tar::EntryType) -> &'static str {
    match kind {
        tar::EntryType::Symlink => "symbolic link",
        tar::EntryType::Link => "hard link",
        tar::EntryType::Char => "character device",
        tar::EntryType::Block => "block device",
        tar::EntryType::Fifo => "FIFO",
        tar::EntryType::Directory => "directory",
        tar::EntryType::GNULongName | tar::EntryType::GNULongLink => "GNU long name",
        tar::EntryType::XHeader | tar::EntryType::XGlobalHeader => "PAX header",
        _ => "special entry",
    }
}

/// A manifest dap can act on: its format, and namespace names that are plain file names.
fn check_manifest(m: &Manifest) -> Result<(), String> {
    if m.format != FORMAT {
        return Err(format!("pack format {} (this dap reads {FORMAT}); use a newer dap", m.format));
    }
    if m.namespaces.is_empty() {
        return Err("its manifest lists no namespace".into());
    }
    for ns in &m.namespaces {
        let plain = !ns.is_empty() && ns.len() <= 64 && ns.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !plain || ["main", "temp"].iter().any(|r| ns.eq_ignore_ascii_case(r)) {
            return Err(format!("its manifest lists {:?}, which is no namespace name", crate::term::safe(ns)));
        }
    }
    let mut sorted = m.namespaces.clone();
    sorted.sort();
    sorted.dedup();
    if sorted.len() != m.namespaces.len() {
        return Err("its manifest lists a namespace twice".into());
    }
    Ok(())
}

/// Reads an entry small enough to hold in memory (a manifest).
fn read_small(entry: &mut impl Read, size: u64, shown: &str) -> Result<Vec<u8>, String> {
    if size > MAX_SMALL_ENTRY {
        return Err(format!("entry {shown} is {size} bytes, more than a manifest can be"));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    entry.take(size).read_to_end(&mut bytes).map_err(|e| format!("{shown} is cut off ({e})"))?;
    Ok(bytes)
}

/// Copies at most `size` bytes in chunks, stopping at Ctrl-C.
fn copy_capped(from: &mut impl Read, to: &mut impl Write, size: u64) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 16];
    let mut copied = 0u64;
    let mut from = from.take(size);
    loop {
        crate::interrupt::check().map_err(|e| std::io::Error::new(std::io::ErrorKind::Interrupted, e))?;
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(copied);
        }
        to.write_all(&buf[..n])?;
        copied += n as u64;
    }
}

/// A database file from a pack: SQLite's full integrity check, and only what dap makes.
fn check_database(path: &Path, views: UserViews) -> Result<(), String> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| e.to_string())?;
    // A hostile schema must not run anything while it is checked.
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true).map_err(|e| e.to_string())?;
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false).map_err(|e| e.to_string())?;
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).map_err(|e| e.to_string())?;
    if check != "ok" {
        return Err(format!("it fails SQLite's integrity check: {}", crate::term::safe(&check)));
    }
    let foreign = foreign_objects(&conn, views).map_err(|e| e.to_string())?;
    if !foreign.is_empty() {
        let hint = if views == UserViews::Refuse && foreign.iter().all(|f| f.starts_with("view ")) {
            " (if the pack is your own, --allow-views accepts views)"
        } else {
            ""
        };
        return Err(format!("it holds what dap never makes: {}{hint}", foreign.join(", ")));
    }
    Ok(())
}
