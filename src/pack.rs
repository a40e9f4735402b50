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

use crate::query::namespace_files;
use crate::state::{StateError, WriterLock};

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
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> PackError + '_ {
    move |source| PackError::Io { path: path.to_path_buf(), source }
}

/// Writes the mirror folder `dir` (only `namespaces` when given) to `output`; returns the manifest.
pub fn pack(dir: &Path, namespaces: &[String], output: &Path) -> Result<Manifest, PackError> {
    let mut files = namespace_files(dir);
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
    for (ns, file) in &files {
        let copy = scratch.path().join(format!("{ns}.db"));
        let fail = |source| PackError::Backup { path: file.clone(), source };
        let source = crate::sink::sqlite::open_read_only(file).map_err(fail)?;
        source.busy_timeout(std::time::Duration::from_secs(30)).map_err(fail)?;
        let mut target = Connection::open(&copy).map_err(fail)?;
        // All pages in one step: one read transaction, so the copy is one consistent state.
        rusqlite::backup::Backup::new(&source, &mut target)
            .and_then(|b| b.run_to_completion(i32::MAX, std::time::Duration::ZERO, None))
            .map_err(fail)?;
        // A self-contained file: no WAL beside it.
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
            append(&mut tar, &format!("{ns}.db"), size, file).map_err(io(output))?;
        }
        if let Ok(state) = std::fs::read(dir.join(STATE)) {
            append(&mut tar, STATE, state.len() as u64, state.as_slice()).map_err(io(output))?;
        }
        tar.into_inner().and_then(|e| e.finish()).map_err(io(output))?.flush().map_err(io(output))?;
    }
    out.as_file().sync_all().map_err(io(output))?;
    out.persist(output).map_err(|e| io(output)(e.error))?;
    Ok(manifest)
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

/// Restores the pack `file` into the mirror folder `dir`; returns the manifest. Every file is
/// extracted and checked (`PRAGMA integrity_check`) before the first one is put in place, and
/// an existing mirror file is replaced only with [`Overwrite::Replace`], under its writer lock.
pub fn unpack(file: &Path, dir: &Path, overwrite: Overwrite) -> Result<Manifest, PackError> {
    let not_a_pack = |reason: String| PackError::NotAPack { path: file.to_path_buf(), reason };
    let input = std::fs::File::open(file).map_err(io(file))?;
    let decoder = zstd::Decoder::new(input).map_err(|e| not_a_pack(format!("not zstd ({e})")))?;
    let mut archive = tar::Archive::new(decoder);
    crate::privacy::create_private_dir(dir).map_err(io(dir))?;
    let scratch = tempfile::tempdir_in(dir).map_err(io(dir))?;
    let mut manifest: Option<Manifest> = None;
    let mut extracted = Vec::new();
    for entry in archive.entries().map_err(|e| not_a_pack(e.to_string()))? {
        let mut entry = entry.map_err(|e| not_a_pack(e.to_string()))?;
        let name = entry.path().map_err(|e| not_a_pack(e.to_string()))?.to_string_lossy().into_owned();
        // Only plain names this module writes: nothing can land outside the folder.
        let allowed = name == MANIFEST
            || name == STATE
            || name.strip_suffix(".db").is_some_and(|ns| !ns.is_empty() && crate::fetch::safe_component(ns) == ns);
        if !allowed {
            return Err(not_a_pack(format!("unexpected entry {name:?}")));
        }
        if name == MANIFEST {
            let mut text = String::new();
            entry.read_to_string(&mut text).map_err(|e| not_a_pack(e.to_string()))?;
            let m: Manifest = serde_json::from_str(&text).map_err(|e| not_a_pack(format!("bad manifest: {e}")))?;
            if m.format != FORMAT {
                return Err(not_a_pack(format!("pack format {} (this dap reads {FORMAT}); use a newer dap", m.format)));
            }
            manifest = Some(m);
            continue;
        }
        if manifest.is_none() {
            return Err(not_a_pack("the manifest is missing".into()));
        }
        let path = scratch.path().join(&name);
        let mut out = std::fs::File::create(&path).map_err(io(&path))?;
        std::io::copy(&mut entry, &mut out).map_err(|e| not_a_pack(format!("{name} is cut off ({e})")))?;
        out.sync_all().map_err(io(&path))?;
        extracted.push(name);
    }
    let manifest = manifest.ok_or_else(|| not_a_pack("the manifest is missing".into()))?;
    for ns in &manifest.namespaces {
        let name = format!("{ns}.db");
        if !extracted.contains(&name) {
            return Err(not_a_pack(format!("{name} is listed but missing")));
        }
        let conn = Connection::open_with_flags(scratch.path().join(&name), OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| not_a_pack(format!("{name}: {e}")))?;
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(|e| not_a_pack(format!("{name}: {e}")))?;
        if check != "ok" {
            return Err(not_a_pack(format!("{name} fails SQLite's integrity check: {check}")));
        }
    }
    let targets: Vec<PathBuf> = extracted.iter().map(|n| dir.join(n)).collect();
    if overwrite == Overwrite::Refuse
        && let Some(existing) = targets.iter().find(|t| t.exists())
    {
        return Err(PackError::Exists(existing.clone()));
    }
    let mut locks = Vec::new();
    for t in targets.iter().filter(|t| t.extension().is_some_and(|e| e == "db")) {
        locks.push(WriterLock::acquire(t)?);
    }
    for name in &extracted {
        let target = dir.join(name);
        if name.ends_with(".db") {
            // A WAL left by the replaced file would be applied to the new one.
            for suffix in ["-wal", "-shm"] {
                let stale = PathBuf::from(format!("{}{suffix}", target.display()));
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
