//! Every way people write a mirror's location works with every command that takes one: the
//! SQLite URL forms (`sqlite:///ABS`, SQLAlchemy's `sqlite:////ABS`, `sqlite:/ABS`,
//! `sqlite://REL`, `sqlite:REL`), paths with spaces, `%`, `#`, `?` and unicode, and symlinked
//! folders; each checked against the emulator's truth after an initdb and a sync, then through
//! listdb, status, replicate (`--from`, `--to`, `--replicate-to`, `status --to`) and dropdb.

use crate::common;

use std::path::{Path, PathBuf};

use common::truth::{Limit, assert_same_rows_within};
use common::*;
use dap_replica::emulator::{ChangeCounts, Emulator, EmulatorConfig};
use serde_json::Value;

/// One way of writing a location: the text given to dap, the file it must name, and the folder
/// dap runs in.
struct Form {
    label: &'static str,
    url: String,
    file: PathBuf,
    cwd: PathBuf,
}

/// The forms, each naming a file of its own under `root`.
fn forms(root: &Path) -> Vec<Form> {
    let abs = |label: &'static str, folder: &str, url: &dyn Fn(&Path) -> String| {
        let file = root.join(folder).join("canvas.db");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        Form { label, url: url(&file), file, cwd: root.to_path_buf() }
    };
    let mut out = vec![
        abs("sqlite:///ABS", "three", &|f| format!("sqlite://{}", f.display())),
        abs("sqlite:////ABS (SQLAlchemy)", "four", &|f| format!("sqlite:///{}", f.display())),
        abs("sqlite:/ABS", "one", &|f| format!("sqlite:{}", f.display())),
        abs("spaces, %, #, ? and unicode", "my data 100% #1 ?ü", &|f| format!("sqlite:///{}", f.display())),
        abs("percent-encoded", "en coded", &|f| format!("sqlite://{}", f.display()).replace(' ', "%20")),
    ];
    for (label, url) in [("sqlite://REL", "sqlite://rel/a/canvas.db"), ("sqlite:REL", "sqlite:rel/b/canvas.db")] {
        let file = root.join(url.trim_start_matches("sqlite:").trim_start_matches("//"));
        out.push(Form { label, url: url.to_string(), file, cwd: root.to_path_buf() });
    }
    // A symlinked folder: the link is what the user types, the file lives in the real folder.
    let real = root.join("real-folder");
    std::fs::create_dir_all(&real).unwrap();
    std::os::unix::fs::symlink(&real, root.join("linked")).unwrap();
    out.push(Form {
        label: "symlinked folder",
        url: format!("sqlite:///{}", root.join("linked/canvas.db").display()),
        file: real.join("canvas.db"),
        cwd: root.to_path_buf(),
    });
    out
}

async fn ok(emu: &Emulator, form: &Form, args: &[&str]) -> String {
    let out = run_ours_with(emu, &form.cwd, args, &[("DAP_ALLOW_SHARED", "true")]).await;
    assert!(
        out.status.success(),
        "[{}] dap {args:?} failed ({}):\n{}",
        form.label,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_table_is_truth(emu: &Emulator, file: &Path, table: &str, what: &str) {
    let def = emu.table_def("canvas", table).unwrap();
    let rows = common::truth::sqlite_rows(file, &def);
    assert_same_rows_within(&def, &rows, &emu.truth("canvas", table).unwrap(), what, &[Limit::NoNegativeZero]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_location_form_works_with_every_command() {
    let emu = emulator(EmulatorConfig { rows: 12, part_rows: 8, ..EmulatorConfig::default() }).await;
    let root = tempfile::tempdir().unwrap();
    let all = forms(root.path());
    for (i, form) in all.iter().enumerate() {
        let url = form.url.as_str();
        let cs = ["--connection-string", url];
        let label = form.label;
        ok(&emu, form, &[&["initdb", "--namespace", "canvas", "--table", "accounts,users"][..], &cs].concat()).await;
        assert!(form.file.is_file(), "[{label}] {url} did not make {}", form.file.display());
        emu.commit("canvas", "accounts", ChangeCounts { inserts: 2, updates: 2, soft_deletes: 1, hard_deletes: 1 })
            .unwrap();
        let synced = run_ours_with(
            &emu,
            &form.cwd,
            &[&["syncdb", "--namespace", "canvas", "--table", "all"][..], &cs].concat(),
            &[("DAP_ALLOW_SHARED", "true")],
        )
        .await;
        let stderr = String::from_utf8_lossy(&synced.stderr);
        assert!(synced.status.success() && stderr.contains("2 succeeded, 0 failed"), "[{label}] syncdb: {stderr}");
        assert_table_is_truth(&emu, &form.file, "accounts", &format!("[{label}] after syncdb"));

        let listed: Vec<Value> =
            serde_json::from_str(&ok(&emu, form, &[&["listdb", "--namespace", "canvas"][..], &cs].concat()).await)
                .unwrap();
        let accounts = listed.iter().find(|r| r["name"] == "accounts").expect("accounts listed");
        assert_eq!(accounts["command"], "syncdb", "[{label}] listdb");
        let status: Vec<Value> = serde_json::from_str(
            &ok(&emu, form, &[&["status", "--json", "--namespace", "canvas"][..], &cs].concat()).await,
        )
        .unwrap();
        assert_eq!(status.len(), 2, "[{label}] status: {status:?}");

        // Replication: from this form to the next form's file (written in the next form), and back
        // in through --replicate-to and status --to.
        let other = &all[(i + 1) % all.len()];
        let target = format!("{}.replica.db", other.file.display());
        let target_url = other.url.replace("canvas.db", "canvas.db.replica.db");
        let replicate = ["replicate", "--namespace", "canvas", "--table", "all", "--from", url, "--to", &target_url];
        ok(&emu, form, &replicate).await;
        let replica = PathBuf::from(&target);
        assert_table_is_truth(&emu, &replica, "accounts", &format!("[{label}] replicated to {target_url}"));
        emu.commit("canvas", "accounts", ChangeCounts { inserts: 1, updates: 1, ..Default::default() }).unwrap();
        ok(
            &emu,
            form,
            &[&["syncdb", "--namespace", "canvas", "--table", "accounts", "--replicate-to", &target_url][..], &cs]
                .concat(),
        )
        .await;
        assert_table_is_truth(&emu, &replica, "accounts", &format!("[{label}] after --replicate-to {target_url}"));
        let status: Vec<Value> = serde_json::from_str(
            &ok(&emu, form, &[&["status", "--json", "--namespace", "canvas", "--to", &target_url][..], &cs].concat())
                .await,
        )
        .unwrap();
        let accounts = status.iter().find(|r| r["table"] == "accounts").unwrap();
        assert_eq!(accounts["targets"][0]["state"], "current", "[{label}] status --to: {accounts}");

        ok(&emu, form, &[&["dropdb", "--namespace", "canvas", "--table", "users"][..], &cs].concat()).await;
        let conn = rusqlite::Connection::open(&form.file).unwrap();
        let left: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'users'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0, "[{label}] dropdb left users");
    }
}

/// One `--dir` names the mirror folder for every mirror command, before `DAP_MIRROR_DIR` (set
/// here to a decoy that must stay empty), and unpack's hint names the folder it restored into.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dir_names_the_mirror_for_every_command() {
    let emu = emulator(EmulatorConfig { rows: 12, part_rows: 8, ..EmulatorConfig::default() }).await;
    let root = tempfile::tempdir().unwrap();
    let (dir, decoy, restored) =
        (root.path().join("my mirror"), root.path().join("decoy"), root.path().join("restored"));
    std::fs::create_dir_all(&decoy).unwrap();
    let d = dir.to_str().unwrap();
    let env = [("DAP_ALLOW_SHARED", "true"), ("DAP_MIRROR_DIR", decoy.to_str().unwrap())];
    let cwd = root.path();
    run_ok(&emu, cwd, vec!["initdb", "--namespace", "canvas", "--table", "accounts,users", "--dir", d], &env).await;
    emu.commit("canvas", "accounts", ChangeCounts { inserts: 2, updates: 2, soft_deletes: 1, hard_deletes: 1 })
        .unwrap();
    run_ok(&emu, cwd, vec!["syncdb", "--namespace", "canvas", "--table", "all", "--dir", d], &env).await;
    assert_table_is_truth(&emu, &dir.join("canvas.db"), "accounts", "after syncdb --dir");
    let (listed, _) = run_ok(&emu, cwd, vec!["listdb", "--namespace", "canvas", "--dir", d], &env).await;
    assert!(listed.contains("\"accounts\""), "{listed}");
    let (status, _) = run_ok(&emu, cwd, vec!["status", "--json", "--dir", d], &env).await;
    assert_eq!(serde_json::from_str::<Vec<Value>>(&status).unwrap().len(), 2, "{status}");
    let (count, _) =
        run_ok(&emu, cwd, vec!["query", "--dir", d, "--format", "csv", "SELECT count(*) AS n FROM canvas.users"], &env)
            .await;
    assert_eq!(count, format!("n\n{}\n", emu.truth("canvas", "users").unwrap().len()));
    let replica = root.path().join("replica.db");
    let to = format!("sqlite://{}", replica.display());
    run_ok(&emu, cwd, vec!["replicate", "--namespace", "canvas", "--table", "all", "--dir", d, "--to", &to], &env)
        .await;
    assert_table_is_truth(&emu, &replica, "accounts", "replicate --dir");
    let pack = root.path().join("mirror.pack");
    run_ok(&emu, cwd, vec!["pack", "--dir", d, "-o", pack.to_str().unwrap()], &env).await;
    let (_, said) =
        run_ok(&emu, cwd, vec!["unpack", pack.to_str().unwrap(), "--dir", restored.to_str().unwrap()], &env).await;
    assert!(said.contains(&format!("--dir '{}'", restored.display())), "the hint names the folder: {said}");
    run_ok(&emu, cwd, vec!["dropdb", "--namespace", "canvas", "--table", "users", "--dir", d], &env).await;
    let conn = rusqlite::Connection::open(dir.join("canvas.db")).unwrap();
    let left: i64 =
        conn.query_row("SELECT count(*) FROM sqlite_master WHERE name = 'users'", [], |r| r.get(0)).unwrap();
    assert_eq!(left, 0, "dropdb --dir dropped users");
    assert_eq!(std::fs::read_dir(&decoy).unwrap().count(), 0, "DAP_MIRROR_DIR was not touched");
    let both = run_ours_with(
        &emu,
        root.path(),
        &["syncdb", "--namespace", "canvas", "--table", "all", "--dir", d, "--connection-string", "sqlite:///x.db"],
        &env,
    )
    .await;
    assert_eq!(both.status.code(), Some(2), "--dir and --connection-string are one choice");
}

async fn run_ok(emu: &Emulator, cwd: &Path, args: Vec<&str>, env: &[(&str, &str)]) -> (String, String) {
    let out = run_ours_with(emu, cwd, &args, env).await;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "dap {args:?}: {err}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), err)
}

/// Runs dap as a user other than the folder's owner: as `nobody` when the tests run as root
/// (root reads and writes any folder), else as the test's own user.
async fn as_another_user(emu: &Emulator, cwd: &Path, args: &[&str]) -> std::process::Output {
    let root = std::process::Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    let mut cmd = ours_command(emu, cwd);
    let dap = env!("CARGO_BIN_EXE_dap");
    if root {
        let std = cmd.as_std_mut();
        let envs: Vec<(std::ffi::OsString, std::ffi::OsString)> =
            std.get_envs().filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))).collect();
        let mut other = tokio::process::Command::new("setpriv");
        other.current_dir(cwd).args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", dap]);
        other.envs(envs).env("HOME", cwd).env_remove("DAP_CONNECTION_STRING").arg("--non-interactive");
        cmd = other;
    }
    cmd.args(args).output().await.expect("dap runs")
}

/// A mirror folder this user may not read is named as such with the fix (not "no tables yet",
/// not "there is no mirror"), by every command; one it may read but not write is read by
/// status, query and pack, and refused by the writing commands, named, with the fix, the
/// mirror unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folders_this_user_cannot_read_or_write_are_named_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let emu = emulator(EmulatorConfig { rows: 8, ..EmulatorConfig::default() }).await;
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let mirror = root.path().join("mirror");
    let m = mirror.to_str().unwrap();
    ours_ok(&emu, root.path(), &["initdb", "--dir", m, "--namespace", "canvas", "--table", "accounts"]).await;
    let file = mirror.join("canvas.db");
    let before = std::fs::read(&file).unwrap();
    let from = format!("sqlite:///{}", file.display());
    let elsewhere = format!("sqlite:///{}", root.path().join("copy.db").display());
    let pack = root.path().join("p.tar").display().to_string();

    // Unreadable: the folder closed to others.
    std::fs::set_permissions(&mirror, std::fs::Permissions::from_mode(0o700)).unwrap();
    let commands: Vec<Vec<&str>> = vec![
        vec!["status", "--dir", m],
        vec!["query", "--dir", m, "SELECT count(*) FROM accounts"],
        vec!["export", "--dir", m, "--namespace", "canvas", "--table", "accounts", "-o", "x.csv"],
        vec!["pack", "--dir", m, "-o", &pack],
        vec!["syncdb", "--dir", m, "--namespace", "canvas", "--table", "accounts"],
        vec!["replicate", "--from", &from, "--to", &elsewhere, "--namespace", "canvas", "--table", "all"],
    ];
    for args in &commands {
        let out = as_another_user(&emu, root.path(), args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} in an unreadable folder must fail: {stderr}");
        assert!(
            stderr.contains("cannot read the mirror folder") && stderr.contains(m) && stderr.contains("owns it"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("no mirror") && !stderr.contains("mirrored yet"), "{args:?}: {stderr}");
    }

    // Read-only: readable by others, writable by its owner only.
    std::fs::set_permissions(&mirror, std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in std::fs::read_dir(&mirror).unwrap().flatten().filter(|e| e.path().is_file()) {
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    for args in
        [vec!["status", "--dir", m, "--allow-shared"], vec!["query", "--dir", m, "SELECT count(*) FROM accounts"]]
    {
        let out = as_another_user(&emu, root.path(), &args).await;
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{args:?} reads a read-only folder: {stderr}");
        assert!(stdout.contains("accounts") || stdout.contains('8'), "{args:?}: {stdout}");
    }
    for args in [
        vec!["syncdb", "--dir", m, "--namespace", "canvas", "--table", "accounts", "--allow-shared"],
        vec!["initdb", "--dir", m, "--namespace", "canvas", "--table", "courses", "--allow-shared"],
        vec!["dropdb", "--dir", m, "--namespace", "canvas", "--table", "accounts", "--allow-shared"],
    ] {
        let out = as_another_user(&emu, root.path(), &args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} in a read-only folder must fail");
        assert!(
            stderr.contains("cannot write in the mirror folder")
                && stderr.contains("--dir")
                && !stderr.contains("os error 30)\n"),
            "{args:?}: {stderr}"
        );
        assert_eq!(stderr.matches(m).count(), 1, "{args:?}: the folder is named once: {stderr}");
    }
    assert_eq!(std::fs::read(&file).unwrap(), before, "the mirror is unchanged");

    // A copy of the file with a write-ahead log holding committed changes, but without its WAL
    // index (`-shm`), in a folder this user cannot write: SQLite could only read the file alone,
    // which would silently miss the changes. Refused, naming the log and the way out.
    let copy = root.path().join("copied");
    std::fs::create_dir(&copy).unwrap();
    let writer = rusqlite::Connection::open(&file).unwrap();
    writer.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    let deleted =
        writer.execute("DELETE FROM accounts WHERE rowid IN (SELECT rowid FROM accounts LIMIT 3)", []).unwrap();
    assert_eq!(deleted, 3);
    for suffix in ["", "-wal"] {
        let name = format!("canvas.db{suffix}");
        std::fs::copy(mirror.join(&name), copy.join(&name)).unwrap();
        std::fs::set_permissions(copy.join(&name), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    drop(writer);
    assert!(std::fs::metadata(copy.join("canvas.db-wal")).unwrap().len() > 0, "the copy's log holds the delete");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let c = copy.to_str().unwrap();
    for args in
        [vec!["status", "--dir", c, "--allow-shared"], vec!["query", "--dir", c, "SELECT count(*) FROM accounts"]]
    {
        let out = as_another_user(&emu, root.path(), &args).await;
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "{args:?} answered without the changes in the log: {stdout}");
        assert!(
            stderr.contains(&format!("{c}/canvas.db-wal holds changes not yet written"))
                && stderr.contains("as a user who may write it"),
            "{args:?}: {stderr}"
        );
    }
    // Its owner, who may write the folder, reads the changes.
    let out = ours_ok(&emu, root.path(), &["query", "--dir", c, "SELECT count(*) FROM accounts"]).await;
    assert!(out.contains('5'), "8 accounts less the 3 deleted: {out}");
}
