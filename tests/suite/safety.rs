//! Nothing touched outside dap's own files, whatever others put in its way: symbolic links planted
//! at every spool path, SQL hidden in file names, hostile packs (traversal, links, devices,
//! duplicates, lying manifests, triggers, bombs, huge names), outputs aimed at the mirror itself,
//! Ctrl-C in the middle of long commands, and terminal control sequences in files.

use crate::common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use dap_replica::emulator::{ChangeCounts, Emulator, EmulatorConfig};

/// Every file under `dir` with its bytes (symbolic links as their target), for "unchanged" checks.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() {
                out.insert(rel, std::fs::read_link(&p).unwrap().into_os_string().into_encoded_bytes());
            } else if meta.is_dir() {
                out.insert(rel.clone(), b"<dir>".to_vec());
                walk(root, &p, out);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A folder of someone else's that dap must never touch: subfolders named like spool folders.
fn victim(root: &Path) -> PathBuf {
    let v = root.join("victim");
    for sub in ["dap-spool-1", "job_x", "canvas.db", "keep"] {
        std::fs::create_dir_all(v.join(sub)).unwrap();
        std::fs::write(v.join(sub).join("data.txt"), format!("precious {sub}")).unwrap();
    }
    v
}

async fn dap(emu: &Emulator, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut all = vec![("DAP_ALLOW_SHARED", "true")];
    all.extend_from_slice(env);
    run_ours_with(emu, dir, args, &all).await
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_planted_at_every_spool_path_never_lead_dap_outside_its_files() {
    let emu = emulator(EmulatorConfig { rows: 40, part_rows: 10, ..EmulatorConfig::default() }).await;
    let root = tempfile::tempdir().unwrap();
    let victim = victim(root.path());
    let before = tree(&victim);
    // A shared temporary folder with links where dap once put (or might put) its spool.
    let shared = root.path().join("shared-tmp");
    std::fs::create_dir(&shared).unwrap();
    std::fs::create_dir(shared.join(".dap-spool")).unwrap();
    std::os::unix::fs::symlink(&victim, shared.join(".dap-spool/canvas.db")).unwrap();
    for pid in 1..=400 {
        std::os::unix::fs::symlink(&victim, shared.join(format!("dap-spool-{pid}"))).unwrap();
    }
    std::os::unix::fs::symlink(&victim, shared.join("dap-spool-")).unwrap();
    let mirror = root.path().join("mirror");
    let url = format!("sqlite://{}/canvas.db", mirror.display());
    let temp = shared.to_str().unwrap();
    let run = |cmd: &'static str| {
        let (emu, url, root) = (&emu, url.clone(), root.path().to_path_buf());
        async move {
            let args = [cmd, "--namespace", "canvas", "--table", "accounts,users", "--connection-string", &url];
            dap(emu, &root, &[&args[..], &["--temp-dir", temp]].concat(), &[("TMPDIR", temp)]).await
        }
    };
    let out = run("initdb").await;
    assert!(out.status.success(), "{}", stderr(&out));
    emu.commit("canvas", "accounts", ChangeCounts { inserts: 5, updates: 5, ..Default::default() }).unwrap();
    let out = run("syncdb").await;
    assert!(out.status.success(), "{}", stderr(&out));
    // A server target's spool, in the system's temporary folder ($TMPDIR): PostgreSQL.
    let (pg, _client) = fresh_postgres("spool_links").await;
    let args = ["initdb", "--namespace", "canvas", "--table", "accounts", "--connection-string", &pg];
    let out = dap(&emu, root.path(), &args, &[("TMPDIR", temp)]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(tree(&victim), before, "the victim folder changed");
    for pid in 1..=400 {
        assert!(std::fs::symlink_metadata(shared.join(format!("dap-spool-{pid}"))).is_ok(), "a planted link went");
    }
    // Nothing of dap's is left in the shared folder: only what was planted.
    let left: Vec<String> = std::fs::read_dir(&shared)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !(n.starts_with("dap-spool-") && std::fs::symlink_metadata(shared.join(n)).unwrap().is_symlink()))
        .collect();
    assert_eq!(left, [".dap-spool"], "dap left files in the shared folder");

    // The mirror's own spool folder as a link: refused, with the way out, and the victim untouched.
    std::fs::remove_dir_all(mirror.join(".dap-spool")).ok();
    std::os::unix::fs::symlink(&victim, mirror.join(".dap-spool")).unwrap();
    let args = ["syncdb", "--namespace", "canvas", "--table", "all", "--connection-string", &url];
    let out = dap(&emu, root.path(), &args, &[]).await;
    assert!(!out.status.success(), "a linked spool folder was used");
    assert!(stderr(&out).contains("symbolic link") && stderr(&out).contains("--temp-dir"), "{}", stderr(&out));
    assert_eq!(tree(&victim), before, "the victim folder changed");
}

/// A mirror folder with canvas.accounts in it.
async fn small_mirror(emu: &Emulator, root: &Path) -> PathBuf {
    let mirror = root.join("mirror");
    let url = format!("sqlite://{}/canvas.db", mirror.display());
    let args = ["initdb", "--namespace", "canvas", "--table", "accounts", "--connection-string", &url];
    let out = dap(emu, root, &args, &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    mirror
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_in_a_file_name_never_runs_and_stray_files_do_not_break_query() {
    let emu = emulator(EmulatorConfig { rows: 20, ..EmulatorConfig::default() }).await;
    let root = tempfile::tempdir().unwrap();
    let mirror = small_mirror(&emu, root.path()).await;
    let hostile = "x\" AS y; SELECT writefile('pwned.txt', 'owned'); --";
    rusqlite::Connection::open(mirror.join(format!("{hostile}.db")))
        .unwrap()
        .execute_batch("CREATE TABLE t (a)")
        .unwrap();
    std::fs::write(mirror.join("notes.db"), b"just some text, not a database").unwrap();
    rusqlite::Connection::open(mirror.join("temp.db")).unwrap().execute_batch("CREATE TABLE t (a)").unwrap();
    rusqlite::Connection::open(mirror.join("main.db")).unwrap().execute_batch("CREATE TABLE t (a)").unwrap();
    let dir = mirror.to_str().unwrap();
    let truth = emu.truth("canvas", "accounts").unwrap().len();
    // A statement, and the interactive sqlite3 shell fed on stdin.
    let out = dap(&emu, root.path(), &["query", "--dir", dir, "SELECT count(*) AS n FROM canvas.accounts"], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("n\n{truth}\n"));
    for skipped in ["notes.db", "temp.db", "main.db", "writefile"] {
        assert!(stderr(&out).contains(skipped), "no warning about {skipped}: {}", stderr(&out));
    }
    let mut shell = std::process::Command::new(env!("CARGO_BIN_EXE_dap"))
        .current_dir(root.path())
        .args(["query", "--dir", dir])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    shell.stdin.take().unwrap().write_all(b"SELECT count(*) FROM canvas.accounts;\n").unwrap();
    let out = shell.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), truth.to_string());
    for cwd in [root.path(), mirror.as_path()] {
        assert!(!cwd.join("pwned.txt").exists(), "SQL in a file name ran");
    }
    // Reading left nothing behind: no -wal or -shm beside any file.
    let stray: Vec<_> = std::fs::read_dir(&mirror)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("-wal") || n.ends_with("-shm"))
        .collect();
    assert!(stray.is_empty(), "reads left {stray:?}");
    // Positive control: a reader that does not tidy leaves them, so the check above can fail.
    let conn = rusqlite::Connection::open_with_flags(
        format!("file:{}/canvas.db?mode=ro", mirror.display()),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
    )
    .unwrap();
    conn.query_row("SELECT count(*) FROM accounts", [], |r| r.get::<_, i64>(0)).unwrap();
    drop(conn);
    assert!(mirror.join("canvas.db-shm").exists(), "the positive control made no -shm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_pack_never_write_over_the_mirror() {
    let emu = emulator(EmulatorConfig { rows: 20, ..EmulatorConfig::default() }).await;
    let root = tempfile::tempdir().unwrap();
    let mirror = small_mirror(&emu, root.path()).await;
    std::os::unix::fs::symlink(mirror.join("canvas.db"), root.path().join("link-to-mirror.csv")).unwrap();
    let before = tree(&mirror);
    let dir = mirror.to_str().unwrap();
    for output in [
        mirror.join("canvas.db"),
        mirror.join("canvas.db-wal"),
        mirror.join("canvas.db.lock"),
        mirror.join("state.json"),
        mirror.join("new.db"),
        mirror.join("../mirror/canvas.db"),
        root.path().join("link-to-mirror.csv"),
    ] {
        let o = output.to_str().unwrap();
        for args in [vec!["export", "--dir", dir, "--table", "accounts", "-o", o], vec!["pack", "--dir", dir, "-o", o]]
        {
            let out = dap(&emu, root.path(), &args, &[]).await;
            assert!(!out.status.success(), "{args:?} succeeded");
            assert!(stderr(&out).contains("part of the mirror"), "{args:?}: {}", stderr(&out));
            assert_eq!(tree(&mirror), before, "{args:?} changed the mirror");
        }
    }
    // Beside the mirror, not in it: fine.
    let csv = root.path().join("accounts.csv");
    let out =
        dap(&emu, root.path(), &["export", "--dir", dir, "--table", "accounts", "-o", csv.to_str().unwrap()], &[])
            .await;
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Sends SIGINT to `child` once `ready` holds, then gives the time it took to exit and its output.
fn interrupt_when(mut child: std::process::Child, ready: impl Fn() -> bool) -> (Duration, Output) {
    let started = Instant::now();
    while !ready() {
        assert!(started.elapsed() < Duration::from_secs(60), "the command never reached the point to interrupt");
        assert!(child.try_wait().unwrap().is_none(), "the command ended before it could be interrupted");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill sends a signal to a child process of ours.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let sent = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(sent.elapsed() < Duration::from_secs(10), "the command ignored Ctrl-C");
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = sent.elapsed();
    let mut stderr = Vec::new();
    std::io::Read::read_to_end(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    (took, Output { status, stdout: Vec::new(), stderr })
}

fn spawn_dap(cwd: &Path, args: &[&str]) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_dap"))
        .current_dir(cwd)
        .env("DAP_ALLOW_SHARED", "true")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Files in `dir` whose names start with a dot or `.tmp` (temporary output).
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp") || n.starts_with(".dap-unpack"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_ends_query_export_and_unpack_within_a_second_and_removes_their_output() {
    let emu = emulator(EmulatorConfig { rows: 20, ..EmulatorConfig::default() }).await;
    let root = tempfile::tempdir().unwrap();
    let mirror = small_mirror(&emu, root.path()).await;
    let dir = mirror.to_str().unwrap();
    let endless =
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x, printf('%0200d', x) FROM c";
    let out_dir = root.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();

    // export: interrupted once its temporary file holds data.
    let csv = out_dir.join("endless.csv");
    let child = spawn_dap(root.path(), &["export", "--dir", dir, "--query", endless, "-o", csv.to_str().unwrap()]);
    let grown = || {
        std::fs::read_dir(&out_dir).unwrap().flatten().any(|e| e.metadata().map(|m| m.len() > 1 << 20).unwrap_or(false))
    };
    let (took, out) = interrupt_when(child, grown);
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(took < Duration::from_secs(1), "export took {took:?} to stop");
    assert!(!csv.exists() && temporaries(&out_dir).is_empty(), "export left {:?}", tree(&out_dir).keys());

    // query: a statement that returns no row for a long time is interrupted too.
    let slow =
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 2000000000) SELECT count(*) FROM c";
    let child = spawn_dap(root.path(), &["query", "--dir", dir, slow]);
    let started = Instant::now();
    let (took, out) = interrupt_when(child, || started.elapsed() > Duration::from_millis(700));
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(took < Duration::from_secs(1), "query took {took:?} to stop");

    // unpack: a pack of 3 GiB (of zeros) interrupted while it is being extracted.
    let pack = root.path().join("big.dap.zst");
    write_pack(&pack, &[manifest_entry(&["canvas"]), Entry::zeros("canvas.db", 3 << 30)]);
    let dest = root.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(dest.join("keep.txt"), b"mine").unwrap();
    let child = spawn_dap(
        root.path(),
        &["unpack", pack.to_str().unwrap(), "--dir", dest.to_str().unwrap(), "--max-size", "4G"],
    );
    let extracting = || {
        std::fs::read_dir(&dest).unwrap().flatten().any(|e| e.file_name().to_string_lossy().starts_with(".dap-unpack"))
    };
    let (took, out) = interrupt_when(child, extracting);
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(took < Duration::from_secs(1), "unpack took {took:?} to stop");
    assert_eq!(tree(&dest).keys().collect::<Vec<_>>(), [Path::new("keep.txt")], "unpack left files");
}

/// One entry of a hand-made pack.
struct Entry {
    name: Vec<u8>,
    kind: tar::EntryType,
    data: EntryData,
    link: Option<&'static str>,
}

enum EntryData {
    Bytes(Vec<u8>),
    /// `n` zero bytes, streamed (a bomb is never held in memory).
    Zeros(u64),
}

impl Entry {
    fn file(name: &str, data: Vec<u8>) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            kind: tar::EntryType::Regular,
            data: EntryData::Bytes(data),
            link: None,
        }
    }
    fn zeros(name: &str, n: u64) -> Entry {
        Entry { name: name.as_bytes().to_vec(), kind: tar::EntryType::Regular, data: EntryData::Zeros(n), link: None }
    }
    fn special(name: &str, kind: tar::EntryType, link: Option<&'static str>) -> Entry {
        Entry { name: name.as_bytes().to_vec(), kind, data: EntryData::Bytes(Vec::new()), link }
    }
}

fn manifest_entry(namespaces: &[&str]) -> Entry {
    let manifest = serde_json::json!({
        "format": 1, "created": "2026-12-01T00:00:00Z", "created_by": "test", "namespaces": namespaces
    });
    Entry::file("dap-pack.json", serde_json::to_vec(&manifest).unwrap())
}

/// Writes a zstd tar of `entries`, headers set by hand (so names and types can be anything).
fn write_pack(path: &Path, entries: &[Entry]) {
    let file = std::fs::File::create(path).unwrap();
    let mut out = zstd::Encoder::new(file, 3).unwrap();
    for e in entries {
        let size = match &e.data {
            EntryData::Bytes(b) => b.len() as u64,
            EntryData::Zeros(n) => *n,
        };
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(e.kind);
        header.set_size(size);
        header.set_mode(0o600);
        if let Some(link) = e.link {
            header.set_link_name(link).unwrap();
        }
        // Names as given, even ones the tar crate would refuse (`..`, absolute).
        let raw = header.as_old_mut();
        raw.name = [0; 100];
        raw.name[..e.name.len().min(100)].copy_from_slice(&e.name[..e.name.len().min(100)]);
        header.set_cksum();
        out.write_all(header.as_bytes()).unwrap();
        match &e.data {
            EntryData::Bytes(b) => out.write_all(b).unwrap(),
            EntryData::Zeros(n) => {
                let chunk = vec![0u8; 1 << 20];
                let mut left = *n;
                while left > 0 {
                    let k = left.min(chunk.len() as u64) as usize;
                    out.write_all(&chunk[..k]).unwrap();
                    left -= k as u64;
                }
            }
        }
        let pad = (512 - size % 512) % 512;
        out.write_all(&vec![0u8; pad as usize]).unwrap();
    }
    out.write_all(&[0u8; 1024]).unwrap();
    out.finish().unwrap();
}

/// A GNU long-name entry announcing a name of `n` bytes (streamed zeros).
fn long_name(n: u64) -> Entry {
    Entry { name: b"././@LongLink".to_vec(), kind: tar::EntryType::GNULongName, data: EntryData::Zeros(n), link: None }
}

/// A SQLite database made by `sql`, as bytes.
fn database(sql: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.db");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(sql).unwrap();
    drop(conn);
    std::fs::read(path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_packs_are_refused_before_anything_is_put_in_place() {
    let emu = emulator(EmulatorConfig { rows: 30, ..EmulatorConfig::default() }).await;
    let root = tempfile::tempdir().unwrap();
    let mirror = small_mirror(&emu, root.path()).await;
    // A genuine pack of the mirror, whose database is the base of the hostile ones.
    let good = root.path().join("good.dap.zst");
    let out =
        dap(&emu, root.path(), &["pack", "--dir", mirror.to_str().unwrap(), "-o", good.to_str().unwrap()], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let genuine = std::fs::read(mirror.join("canvas.db")).unwrap();
    let altered = |sql: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("canvas.db");
        std::fs::write(&path, &genuine).unwrap();
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(&format!("PRAGMA journal_mode = DELETE; {sql}")).unwrap();
        drop(conn);
        std::fs::read(path).unwrap()
    };
    let m = || manifest_entry(&["canvas"]);
    let canvas = || Entry::file("canvas.db", genuine.clone());
    let cases: Vec<(&str, Vec<Entry>, &str)> = vec![
        ("traversal", vec![m(), Entry::file("../evil.db", genuine.clone())], "not listed"),
        ("absolute name", vec![m(), Entry::file("/tmp/evil-dap.db", genuine.clone())], "not listed"),
        (
            "symlink",
            vec![m(), Entry::special("canvas.db", tar::EntryType::Symlink, Some("/etc/passwd"))],
            "symbolic link",
        ),
        ("hard link", vec![m(), Entry::special("canvas.db", tar::EntryType::Link, Some("dap-pack.json"))], "hard link"),
        ("device", vec![m(), Entry::special("canvas.db", tar::EntryType::Char, None)], "character device"),
        ("fifo", vec![m(), Entry::special("canvas.db", tar::EntryType::Fifo, None)], "FIFO"),
        ("directory", vec![m(), Entry::special("canvas.db", tar::EntryType::Directory, None)], "directory"),
        ("duplicate", vec![m(), canvas(), canvas()], "twice"),
        ("manifest missing", vec![canvas()], "manifest"),
        ("manifest second", vec![canvas(), m()], "manifest"),
        ("listed but missing", vec![manifest_entry(&["canvas", "catalog"]), canvas()], "missing"),
        ("unlisted file", vec![m(), canvas(), Entry::file("catalog.db", genuine.clone())], "not listed"),
        ("bad namespace in manifest", vec![manifest_entry(&["../x"]), canvas()], "no namespace name"),
        (
            "reserved namespace",
            vec![manifest_entry(&["main"]), Entry::file("main.db", genuine.clone())],
            "no namespace name",
        ),
        ("not SQLite", vec![m(), Entry::file("canvas.db", b"a text file, not a database".to_vec())], "not a database"),
        (
            "damaged",
            vec![
                m(),
                Entry::file("canvas.db", {
                    let mut d = genuine.clone();
                    let n = d.len();
                    d.truncate(n - 1024);
                    d
                }),
            ],
            "canvas.db",
        ),
        (
            "trigger",
            vec![
                m(),
                Entry::file(
                    "canvas.db",
                    altered("CREATE TRIGGER t AFTER UPDATE ON accounts BEGIN UPDATE accounts SET name = 'x'; END"),
                ),
            ],
            "trigger",
        ),
        ("view", vec![m(), Entry::file("canvas.db", altered("CREATE VIEW v AS SELECT * FROM accounts"))], "view"),
        (
            "virtual table",
            vec![m(), Entry::file("canvas.db", altered("CREATE VIRTUAL TABLE f USING fts5(a)"))],
            "virtual table",
        ),
        ("foreign table", vec![m(), Entry::file("canvas.db", altered("CREATE TABLE extra (a)"))], "no bookkeeping row"),
        (
            "constraint on a replicated table",
            vec![m(), Entry::file("canvas.db", altered("ALTER TABLE accounts ADD COLUMN c INTEGER DEFAULT 7"))],
            "DEFAULT",
        ),
        ("bomb", vec![m(), Entry::zeros("canvas.db", 1 << 30)], "decompression bomb"),
        (
            "bomb in parts",
            vec![
                manifest_entry(&["canvas", "other"]),
                Entry::zeros("canvas.db", 60 << 20),
                Entry::zeros("other.db", 60 << 20),
            ],
            "decompression bomb",
        ),
        ("huge long name", vec![m(), long_name(1 << 30), canvas()], "GNU long name"),
        ("huge manifest", vec![Entry::zeros("dap-pack.json", 200 << 20)], "manifest"),
        (
            "not even a database header",
            vec![m(), Entry::file("canvas.db", database("CREATE TABLE t (a)")[..100].to_vec())],
            "canvas.db",
        ),
    ];
    let dest = root.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(dest.join("keep.txt"), b"mine").unwrap();
    let before = tree(&dest);
    for (label, entries, expected) in cases {
        let pack = root.path().join(format!("{}.dap.zst", label.replace(' ', "-")));
        write_pack(&pack, &entries);
        let time_file = root.path().join("rss.txt");
        let out = std::process::Command::new("/usr/bin/time")
            .args(["-f", "%M", "-o", time_file.to_str().unwrap()])
            .arg(env!("CARGO_BIN_EXE_dap"))
            .args(["unpack", pack.to_str().unwrap(), "--dir", dest.to_str().unwrap(), "--force"])
            .env("DAP_ALLOW_SHARED", "true")
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(!out.status.success(), "[{label}] was accepted");
        assert!(err.contains(expected), "[{label}] the message does not say {expected:?}: {err}");
        assert!(err.lines().all(|l| l.len() < 2000), "[{label}] a message line is huge");
        let rss_kb: u64 = std::fs::read_to_string(&time_file).unwrap().trim().lines().last().unwrap().parse().unwrap();
        assert!(rss_kb < 100_000, "[{label}] peak memory {rss_kb} kB");
        assert_eq!(tree(&dest), before, "[{label}] the destination changed");
        assert!(!Path::new("/tmp/evil-dap.db").exists() && !root.path().join("evil.db").exists(), "[{label}]");
    }
    // A destination that did not exist is not left behind by a refusal.
    let fresh = root.path().join("fresh");
    let pack = root.path().join("trigger.dap.zst");
    let out = dap(&emu, root.path(), &["unpack", pack.to_str().unwrap(), "--dir", fresh.to_str().unwrap()], &[]).await;
    assert!(!out.status.success() && !fresh.exists(), "{}", stderr(&out));
    // The positive control: the genuine pack unpacks, and syncs on.
    let out = dap(&emu, root.path(), &["unpack", good.to_str().unwrap(), "--dir", fresh.to_str().unwrap()], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let state = std::fs::read_to_string(fresh.join("state.json")).unwrap();
    assert!(!state.contains(mirror.to_str().unwrap()), "the packer's folders travelled: {state}");
    let url = format!("sqlite://{}/canvas.db", fresh.display());
    let out = dap(
        &emu,
        root.path(),
        &["syncdb", "--namespace", "canvas", "--table", "all", "--connection-string", &url],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_sequences_from_files_are_shown_not_obeyed() {
    let emu = emulator(EmulatorConfig { rows: 20, ..EmulatorConfig::default() }).await;
    let root = tempfile::tempdir().unwrap();
    let mirror = small_mirror(&emu, root.path()).await;
    let state_path = mirror.join("state.json");
    let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    state["tables"]["canvas.accounts"]["last_result"] = "failed \u{1b}]0;owned\u{7}\u{1b}[2J now".into();
    std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();
    let out = dap(&emu, root.path(), &["status", "--dir", mirror.to_str().unwrap()], &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(!shown.contains('\u{1b}') && !shown.contains('\u{7}'), "raw control characters: {shown:?}");
    assert!(shown.contains("\\x1b]0;owned\\x07"), "{shown}");
    // Cells of a query.
    let db = rusqlite::Connection::open(mirror.join("canvas.db")).unwrap();
    db.execute("UPDATE accounts SET name = 'a\u{1b}[31mred' WHERE rowid = (SELECT min(rowid) FROM accounts)", [])
        .unwrap();
    drop(db);
    let out = dap(
        &emu,
        root.path(),
        &["query", "--format", "table", "--dir", mirror.to_str().unwrap(), "SELECT name FROM canvas.accounts"],
        &[],
    )
    .await;
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(!shown.contains('\u{1b}') && shown.contains("a\\x1b[31mred"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_names_and_paths_from_the_command_line_stay_in_their_place() {
    let emu = emulator(EmulatorConfig { rows: 10, ..EmulatorConfig::default() }).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    // An unencoded '/' in a password: never printed, whatever fails; a warning that `ps` shows it.
    for url in [
        "postgresql://repl:Pg/Secr3t@127.0.0.1:1/dap",
        "mysql://repl:My/Secr3t@127.0.0.1:1/dap",
        "postgresql://repl:Pg/Secr3t@127.0.0.1:99999/dap",
    ] {
        let out = dap(
            &emu,
            dir,
            &["initdb", "--namespace", "canvas", "--table", "accounts", "--connection-string", url],
            &[],
        )
        .await;
        let err = stderr(&out);
        assert!(!out.status.success(), "{url}");
        assert!(!err.contains("Secr3t"), "{url}: the password was printed: {err}");
        assert!(err.contains("can be seen by every user"), "{url}: no warning: {err}");
    }
    let out = dap(
        &emu,
        dir,
        &["list", "--namespace", "canvas"],
        &[("DAP_API_URL", "http://proxyuser:Pr0xy/Secr3t@127.0.0.1:1")],
    )
    .await;
    assert!(!out.status.success() && !stderr(&out).contains("Secr3t"), "{}", stderr(&out));
    // Names go into API paths as one segment each: no other route is reached.
    let before = emu.stats();
    let out = dap(
        &emu,
        dir,
        &[
            "schema",
            "--namespace",
            "canvas",
            "--table",
            "../../../dap/job/x",
            "--output-directory",
            dir.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert!(!out.status.success());
    let after = emu.stats();
    assert_eq!(
        after.count(dap_replica::emulator::Endpoint::Job, 200) + after.count(dap_replica::emulator::Endpoint::Job, 404),
        before.count(dap_replica::emulator::Endpoint::Job, 200)
            + before.count(dap_replica::emulator::Endpoint::Job, 404),
        "a table name reached the job route"
    );
    // A folder given as the mirror file: refused, and no lock file left beside it.
    let folder = dir.join("a-folder");
    std::fs::create_dir(&folder).unwrap();
    let url = format!("sqlite://{}", folder.display());
    let out =
        dap(&emu, dir, &["initdb", "--namespace", "canvas", "--table", "accounts", "--connection-string", &url], &[])
            .await;
    assert!(!out.status.success() && stderr(&out).contains("folder"), "{}", stderr(&out));
    assert!(!dir.join("a-folder.lock").exists(), "a lock file was left");
    // An unreadable CA file is named as such, not as an unreachable server.
    let url = format!("mysql://repl:pw@127.0.0.1:3306/x?ssl=verify-full&sslrootcert={}/missing-ca.pem", dir.display());
    let out =
        dap(&emu, dir, &["initdb", "--namespace", "canvas", "--table", "accounts", "--connection-string", &url], &[])
            .await;
    assert!(stderr(&out).contains("cannot read sslrootcert"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_output_cuts_long_cells_and_lines_up_wide_characters() {
    let emu = emulator(EmulatorConfig { rows: 5, ..EmulatorConfig::default() }).await;
    let root = tempfile::tempdir().unwrap();
    let mirror = small_mirror(&emu, root.path()).await;
    let sql = "SELECT 'é日🎓' || printf('%.80c', 'x') AS wide, 'ab' AS b UNION ALL SELECT '日本', 'c'";
    let args = ["query", "--format", "table", "--max-width", "20", "--dir", mirror.to_str().unwrap(), sql];
    let out = dap(&emu, root.path(), &args, &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[2].starts_with("é日🎓xx") && lines[2].contains('…'), "{text}");
    // The second column starts at the same terminal column on every line.
    let column_of_b = |line: &str| {
        let start = line.trim_end().rfind(' ').map_or(0, |i| i + 1);
        unicode_width::UnicodeWidthStr::width(&line[..start])
    };
    let starts: Vec<usize> = lines.iter().map(|l| column_of_b(l)).collect();
    assert!(starts.windows(2).all(|w| w[0] == w[1]), "misaligned: {starts:?}\n{text}");
    assert!(lines.iter().all(|l| unicode_width::UnicodeWidthStr::width(*l) <= 20 + 2 + 2), "{text}");
}
