//! The SQLite mirror: initdb and rounds of syncdb for every canvas table and web_logs, compared
//! with the emulator's truth as typed values after every round.

use crate::common;

use std::path::Path;

use common::truth::{Limit, assert_same_rows_within};
use common::*;
use dap_replica::emulator::{ChangeCounts, Emulator, EmulatorConfig, SchemaChange};
use serde_json::{Map, Value};

/// Every row of a mirrored table as JSON objects, read back by column type.
fn sqlite_rows(db: &Path, emu: &Emulator, ns: &str, table: &str) -> Vec<Map<String, Value>> {
    common::truth::sqlite_rows(db, &emu.table_def(ns, table).unwrap())
}

/// The truth comparison for the mirror, whose REAL columns keep no negative zero (documented).
fn assert_same_rows(
    def: &dap_replica::schema::TableDef,
    actual: &[Map<String, Value>],
    truth: &[Map<String, Value>],
    what: &str,
) {
    assert_same_rows_within(def, actual, truth, what, &[Limit::NoNegativeZero]);
}

fn assert_mirror_matches(db: &Path, emu: &Emulator, ns: &str, round: &str) {
    for t in emu.tables(ns).unwrap() {
        let def = emu.table_def(ns, &t).unwrap();
        assert_same_rows(&def, &sqlite_rows(db, emu, ns, &t), &emu.truth(ns, &t).unwrap(), round);
    }
}

/// An emulator and a mirror file in a temporary folder.
struct Mirror {
    emu: Emulator,
    dir: tempfile::TempDir,
    db: std::path::PathBuf,
    url: String,
}

impl Mirror {
    async fn new(config: EmulatorConfig, file: &str) -> Mirror {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join(file);
        let url = format!("sqlite://{}", db.display());
        Mirror { emu: emulator(config).await, dir, db, url }
    }
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_canvas_table_and_web_logs_stay_equal_to_the_truth() {
    let emu = emulator(EmulatorConfig { rows: 30, part_rows: 20, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let canvas = dir.path().join("canvas.db");
    let logs = dir.path().join("logs/canvas_logs.db");
    let canvas_url = format!("sqlite://{}", canvas.display());
    let logs_url = format!("sqlite://{}", logs.display());
    let run = |ns: &'static str, cmd: &'static str, url: String| {
        let (emu, dir) = (&emu, dir.path().to_path_buf());
        async move { ours_ok(emu, &dir, &[cmd, "--namespace", ns, "--table", "all", "--connection-string", &url]).await }
    };

    run("canvas", "initdb", canvas_url.clone()).await;
    run("canvas_logs", "initdb", logs_url.clone()).await;
    assert_mirror_matches(&canvas, &emu, "canvas", "after initdb");
    assert_mirror_matches(&logs, &emu, "canvas_logs", "after initdb");

    for round in 1..=3 {
        for t in emu.tables("canvas").unwrap() {
            emu.commit("canvas", &t, ChangeCounts { inserts: 3, updates: 3, soft_deletes: 1, hard_deletes: 2 })
                .unwrap();
        }
        emu.commit("canvas_logs", "web_logs", ChangeCounts { inserts: 15, ..Default::default() }).unwrap();
        if round == 2 {
            let conn = rusqlite::Connection::open(&canvas).unwrap();
            for t in ["accounts", "courses", "enrollments"] {
                conn.execute_batch(&format!("CREATE INDEX user_{t}_idx ON {t} (workflow_state); CREATE VIEW user_{t}_view AS SELECT id, workflow_state FROM {t};")).unwrap();
            }
            emu.evolve("canvas", "accounts", SchemaChange::AddColumn).unwrap();
            emu.evolve("canvas", "courses", SchemaChange::WidenMaxLength).unwrap();
            emu.evolve("canvas", "enrollments", SchemaChange::AddEnumValue).unwrap();
            for t in ["accounts", "courses", "enrollments"] {
                emu.commit("canvas", t, ChangeCounts { inserts: 2, updates: 2, ..Default::default() }).unwrap();
            }
        }
        run("canvas", "syncdb", canvas_url.clone()).await;
        run("canvas_logs", "syncdb", logs_url.clone()).await;
        let label = format!("after syncdb round {round}");
        assert_mirror_matches(&canvas, &emu, "canvas", &label);
        assert_mirror_matches(&logs, &emu, "canvas_logs", &label);
    }

    let conn = rusqlite::Connection::open(&canvas).unwrap();
    for t in ["accounts", "courses", "enrollments"] {
        let objects: i64 = conn
            .query_row(
                &format!("SELECT count(*) FROM sqlite_master WHERE name IN ('user_{t}_idx', 'user_{t}_view')"),
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(objects, 2, "the user index and view on {t} survive the schema change");
        let through_view: usize =
            conn.query_row(&format!("SELECT count(*) FROM user_{t}_view"), [], |r| r.get(0)).unwrap();
        assert_eq!(through_view, emu.truth("canvas", t).unwrap().len());
    }
    let listed =
        ours_ok(&emu, dir.path(), &["listdb", "--namespace", "canvas", "--connection-string", &canvas_url]).await;
    let listed: Vec<Value> = serde_json::from_str(&listed).unwrap();
    let accounts = listed.iter().find(|r| r["name"] == "accounts").unwrap();
    assert_eq!(accounts["command"], "syncdb");
    assert_eq!(accounts["schema"], 2);
    assert_eq!(accounts["records"], emu.truth("canvas", "accounts").unwrap().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_change_nothing() {
    let Mirror { emu, dir, db, url } =
        Mirror::new(EmulatorConfig { rows: 20, ..EmulatorConfig::default() }, "m.db").await;
    ours_ok(&emu, dir.path(), &["initdb", "--namespace", "canvas", "--table", "users", "--connection-string", &url])
        .await;
    let before = sqlite_rows(&db, &emu, "canvas", "users");

    let out = run_ours(
        &emu,
        dir.path(),
        &["initdb", "--namespace", "canvas", "--table", "users", "--connection-string", &url],
    )
    .await;
    // Initialised already: skipped with the way forward, and nothing changes.
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("skipped") && stderr(&out).contains("already initialised"), "{}", stderr(&out));
    let out = run_ours(
        &emu,
        dir.path(),
        &["syncdb", "--namespace", "canvas", "--table", "accounts", "--connection-string", &url],
    )
    .await;
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("run initdb first"), "{}", stderr(&out));
    assert_eq!(sqlite_rows(&db, &emu, "canvas", "users"), before);

    // initdb --replace loads again and swaps atomically.
    emu.commit("canvas", "users", ChangeCounts { inserts: 2, hard_deletes: 2, ..Default::default() }).unwrap();
    emu.expire_jobs();
    ours_ok(
        &emu,
        dir.path(),
        &["initdb", "--replace", "--namespace", "canvas", "--table", "users", "--connection-string", &url],
    )
    .await;
    let def = emu.table_def("canvas", "users").unwrap();
    assert_same_rows(
        &def,
        &sqlite_rows(&db, &emu, "canvas", "users"),
        &emu.truth("canvas", "users").unwrap(),
        "after initdb --replace",
    );

    // catalog.users cannot share the file with canvas.users.
    let out = run_ours(
        &emu,
        dir.path(),
        &["initdb", "--namespace", "catalog", "--table", "users", "--connection-string", &url],
    )
    .await;
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("already holds a table users of namespace canvas"), "{}", stderr(&out));

    ours_ok(&emu, dir.path(), &["dropdb", "--namespace", "canvas", "--table", "users", "--connection-string", &url])
        .await;
    let conn = rusqlite::Connection::open(&db).unwrap();
    let left: i64 =
        conn.query_row("SELECT count(*) FROM sqlite_master WHERE name = 'users'", [], |r| r.get(0)).unwrap();
    assert_eq!(left, 0);
    let out = run_ours(
        &emu,
        dir.path(),
        &["initdb", "--namespace", "canvas", "--table", "users", "--connection-string", "postgresql://u:hunter2@h/db"],
    )
    .await;
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("cannot reach") && !stderr(&out).contains("hunter2"), "{}", stderr(&out));
}

fn state_entries(dir: &Path) -> serde_json::Map<String, Value> {
    let state: Value =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).expect("state.json exists")).unwrap();
    state["tables"].as_object().unwrap().clone()
}

/// The bookkeeping rows of a mirror file: table → (watermark, schema version).
fn bookkeeping(db: &Path) -> Vec<(String, String, i64)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT source_table, timestamp, schema_version FROM instructure_dap__table_sync ORDER BY source_table",
        )
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().collect::<Result<_, _>>().unwrap()
}

fn assert_state_agrees(dir: &Path, db: &Path, emu: &Emulator) {
    let entries = state_entries(dir);
    let rows = bookkeeping(db);
    assert_eq!(entries.len(), rows.len(), "one entry per initialised table");
    for (table, ts, version) in rows {
        let e = &entries[&format!("canvas.{table}")];
        let watermark = dap_replica::time::parse_rfc3339(e["watermark"].as_str().unwrap()).unwrap();
        assert_eq!(watermark, dap_replica::time::parse_rfc3339(&ts).unwrap(), "{table}: watermark");
        assert_eq!(e["schema_version"], version, "{table}: schema version");
        assert_eq!(e["rows"], emu.truth("canvas", &table).unwrap().len(), "{table}: rows");
        assert_eq!(e["last_result"], "ok");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_json_follows_the_databases_and_is_restored_from_them() {
    let Mirror { emu, dir, db, url } =
        Mirror::new(EmulatorConfig { rows: 25, ..EmulatorConfig::default() }, "canvas.db").await;
    let sync = ["syncdb", "--namespace", "canvas", "--table", "all", "--connection-string", url.as_str()];
    ours_ok(
        &emu,
        dir.path(),
        &["initdb", "--namespace", "canvas", "--table", "users,accounts,courses", "--connection-string", &url],
    )
    .await;
    assert_state_agrees(dir.path(), &db, &emu);

    emu.commit("canvas", "users", ChangeCounts { inserts: 4, hard_deletes: 1, ..Default::default() }).unwrap();
    std::fs::remove_file(dir.path().join("state.json")).unwrap();
    ours_ok(&emu, dir.path(), &sync).await;
    assert_state_agrees(dir.path(), &db, &emu);

    std::fs::write(dir.path().join("state.json"), b"{\"tables\": [garbage").unwrap();
    ours_ok(&emu, dir.path(), &sync).await;
    assert_state_agrees(dir.path(), &db, &emu);

    ours_ok(&emu, dir.path(), &["dropdb", "--namespace", "canvas", "--table", "courses", "--connection-string", &url])
        .await;
    assert!(!state_entries(dir.path()).contains_key("canvas.courses"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_corrupt_or_unwritable_mirror_gets_a_clear_error_and_is_left_alone() {
    let Mirror { emu, dir, db, url } =
        Mirror::new(EmulatorConfig { rows: 10, ..EmulatorConfig::default() }, "canvas.db").await;
    ours_ok(&emu, dir.path(), &["initdb", "--namespace", "canvas", "--table", "users", "--connection-string", &url])
        .await;

    let held = dap_replica::mirror::folder::WriterLock::acquire(&db).unwrap();
    let out = run_ours(
        &emu,
        dir.path(),
        &["syncdb", "--namespace", "canvas", "--table", "users", "--connection-string", &url, "--lock-timeout", "0s"],
    )
    .await;
    assert_eq!(out.status.code(), Some(5));
    assert!(
        stderr(&out).contains("being written by another dap process") && stderr(&out).contains("pid"),
        "{}",
        stderr(&out)
    );
    drop(held);

    let corrupt = dir.path().join("corrupt.db");
    std::fs::write(&corrupt, b"this is not a database, it is a shopping list").unwrap();
    let out = run_ours(
        &emu,
        dir.path(),
        &[
            "initdb",
            "--namespace",
            "canvas",
            "--table",
            "users",
            "--connection-string",
            &format!("sqlite://{}", corrupt.display()),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("corrupt.db") && stderr(&out).contains("not a database"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&corrupt).unwrap(), b"this is not a database, it is a shopping list");

    // Copies of the mirror, damaged three ways: cut short (an interrupted copy), refused before
    // SQLite reads a page; every page after the first overwritten; and rows of `users`
    // overwritten where a sync with nothing new would never look (a leaf page's cells, not its
    // header): each refused with the way out, SQLite's words said once, the rows left alone.
    let whole = std::fs::read(&db).unwrap();
    let page_size = usize::from(u16::from_be_bytes([whole[16], whole[17]]));
    assert!(whole.len() >= 3 * page_size, "the mirror has pages to damage");
    let damage = |name: &str, change: &dyn Fn(&mut Vec<u8>)| {
        let mut bytes = whole.clone();
        change(&mut bytes);
        let file = dir.path().join(name);
        std::fs::write(&file, &bytes).unwrap();
        file
    };
    let users_root: usize = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap()
        .query_row("SELECT rootpage FROM sqlite_master WHERE name = 'users'", [], |r| r.get(0))
        .unwrap();
    // Down the right-most children of the table's b-tree to a leaf page (type 13; interior is 5).
    let mut leaf = (users_root - 1) * page_size;
    while whole[leaf] == 0x05 {
        let child = u32::from_be_bytes(whole[leaf + 8..leaf + 12].try_into().unwrap()) as usize;
        leaf = (child - 1) * page_size;
    }
    assert_eq!(whole[leaf], 0x0d, "a leaf page of users");
    let cells = usize::from(u16::from_be_bytes([whole[leaf + 5], whole[leaf + 6]]));
    let cases = [
        (damage("cut.db", &|b| b.truncate(b.len() / 2)), "cut short"),
        (damage("overwritten.db", &|b| b[page_size..].fill(0xA5)), "damaged"),
        (damage("rows.db", &|b| b[leaf + cells..leaf + page_size].fill(0xA5)), "users is damaged"),
    ];
    for (file, says) in cases {
        let before = std::fs::read(&file).unwrap();
        let url = format!("sqlite://{}", file.display());
        let out = run_ours(
            &emu,
            dir.path(),
            &["syncdb", "--namespace", "canvas", "--table", "users", "--connection-string", &url],
        )
        .await;
        let err = stderr(&out);
        assert!(!out.status.success(), "{}: synced", file.display());
        assert!(err.contains(says) && err.contains("dap initdb --namespace"), "{}: {err}", file.display());
        assert!(!err.contains("Error code"), "SQLite's words repeated: {err}");
        if !file.ends_with("overwritten.db") {
            assert_eq!(std::fs::read(&file).unwrap(), before, "{}: a refused file was changed", file.display());
        }
    }

    // A clean run seals its file: the next sync skips reading every table for damage; a file
    // written by anything else since (here: the same bytes written again) is checked again.
    let sealed = dir.path().join("sealed");
    std::fs::create_dir(&sealed).unwrap();
    let url = format!("sqlite://{}", sealed.join("canvas.db").display());
    let sync =
        ["--loglevel", "debug", "syncdb", "--namespace", "canvas", "--table", "users", "--connection-string", &url];
    ours_ok(&emu, dir.path(), &["initdb", "--namespace", "canvas", "--table", "users", "--connection-string", &url])
        .await;
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(sealed.join("state.json")).unwrap()).unwrap();
    assert!(state["seals"]["canvas.db"]["bytes"].as_u64().unwrap() > 0, "{state}");
    for round in 1..=2 {
        let err = stderr(&run_ours(&emu, dir.path(), &sync).await);
        assert!(err.contains("users: the file is as the last clean run sealed it"), "round {round}: {err}");
        assert!(!err.contains("users: checking it for damage"), "round {round}: {err}");
    }
    let bytes = std::fs::read(sealed.join("canvas.db")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(sealed.join("canvas.db"), &bytes).unwrap();
    let err = stderr(&run_ours(&emu, dir.path(), &sync).await);
    assert!(err.contains("users: checking it for damage") && !err.contains("sealed it"), "{err}");

    let blocked = dir.path().join("a-file");
    std::fs::write(&blocked, b"x").unwrap();
    let out = run_ours(
        &emu,
        dir.path(),
        &[
            "initdb",
            "--namespace",
            "canvas",
            "--table",
            "users",
            "--connection-string",
            &format!("sqlite://{}/m.db", blocked.display()),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("a-file"), "the error names the path: {}", stderr(&out));
}

/// Ctrl-C in the middle of applying changes: the first objects' rows have gone to the mirror
/// ("loading"), a later object is still on its way (held back by the emulator).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_exits_130_and_keeps_the_previous_state() {
    use dap_replica::emulator::{Endpoint, FaultKind, FaultSpec};
    let emu = emulator(EmulatorConfig { rows: 20, part_rows: 3, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("canvas.db");
    let url = format!("sqlite://{}", db.display());
    ours_ok(&emu, dir.path(), &["initdb", "--namespace", "canvas", "--table", "users", "--connection-string", &url])
        .await;
    let before = sqlite_rows(&db, &emu, "canvas", "users");
    let watermark = bookkeeping(&db);
    emu.commit("canvas", "users", ChangeCounts { inserts: 12, updates: 12, hard_deletes: 4, ..Default::default() })
        .unwrap();
    let held_back = FaultSpec { delay_ms: Some(600_000), ..FaultSpec::new(FaultKind::Slow, 1) };
    // After the first four (syncdb downloads four at once): object 0 is surely among them.
    emu.inject(held_back.on(Endpoint::Object).after(4));

    let mut sync = ours_command(&emu, dir.path());
    sync.args(["syncdb", "--namespace", "canvas", "--table", "users", "--connection-string", &url]);
    let mut sync = Watched::spawn(sync);
    sync.wait_for("users: loading").await;
    assert_eq!(send_signal(sync.pid() as i32, 2), 0, "SIGINT sent");
    let interrupted = std::time::Instant::now();
    let out = sync.finish().await;
    assert!(interrupted.elapsed() < std::time::Duration::from_secs(10), "took {:?} to stop", interrupted.elapsed());
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert_eq!(sqlite_rows(&db, &emu, "canvas", "users"), before, "nothing half-applied");
    assert_eq!(bookkeeping(&db), watermark, "the watermark did not move");

    ours_ok(&emu, dir.path(), &["syncdb", "--namespace", "canvas", "--table", "users", "--connection-string", &url])
        .await;
    let def = emu.table_def("canvas", "users").unwrap();
    assert_same_rows(
        &def,
        &sqlite_rows(&db, &emu, "canvas", "users"),
        &emu.truth("canvas", "users").unwrap(),
        "after the rerun",
    );
}

/// Sends a signal with the `kill` command (no libc binding needed).
fn send_signal(pid: i32, signal: i32) -> i32 {
    std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .map(|s| s.code().unwrap_or(1))
        .unwrap_or(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_required_names_the_fix_or_reinitialises_atomically() {
    use dap_replica::emulator::{FaultKind, FaultSpec};
    let Mirror { emu, dir, db, url } =
        Mirror::new(EmulatorConfig { rows: 20, ..EmulatorConfig::default() }, "canvas.db").await;
    let sync = ["syncdb", "--namespace", "canvas", "--table", "users", "--connection-string", url.as_str()];
    ours_ok(&emu, dir.path(), &["initdb", "--namespace", "canvas", "--table", "users", "--connection-string", &url])
        .await;
    let before = sqlite_rows(&db, &emu, "canvas", "users");
    emu.commit("canvas", "users", ChangeCounts { inserts: 2, updates: 2, hard_deletes: 1, ..Default::default() })
        .unwrap();

    emu.inject(FaultSpec::new(FaultKind::SnapshotRequired, 1));
    let out = run_ours(&emu, dir.path(), &sync).await;
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("dap initdb --replace --namespace canvas --table users"), "{}", stderr(&out));
    assert_eq!(sqlite_rows(&db, &emu, "canvas", "users"), before);

    for kind in [FaultKind::SnapshotRequired, FaultKind::OutOfRange] {
        emu.inject(FaultSpec::new(kind, 1));
        emu.expire_jobs();
        let mut args = sync.to_vec();
        args.push("--auto-reinit");
        ours_ok(&emu, dir.path(), &args).await;
        let def = emu.table_def("canvas", "users").unwrap();
        assert_same_rows(
            &def,
            &sqlite_rows(&db, &emu, "canvas", "users"),
            &emu.truth("canvas", "users").unwrap(),
            "after --auto-reinit",
        );
        emu.commit("canvas", "users", ChangeCounts { inserts: 1, updates: 1, ..Default::default() }).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_else_init_and_a_sync_through_faults_converge_to_the_truth() {
    use dap_replica::emulator::{Endpoint, FaultKind, FaultSpec};
    let Mirror { emu, dir, db, url } =
        Mirror::new(EmulatorConfig { rows: 15, part_rows: 6, ..EmulatorConfig::default() }, "catalog.db").await;
    let all =
        ["syncdb", "--namespace", "catalog", "--table", "all", "--init-missing", "--connection-string", url.as_str()];
    ours_ok(
        &emu,
        dir.path(),
        &["initdb", "--namespace", "catalog", "--table", "accounts", "--connection-string", &url],
    )
    .await;
    ours_ok(&emu, dir.path(), &all).await;
    assert_eq!(bookkeeping(&db).len(), 28, "every catalog table is initialised");

    for t in emu.tables("catalog").unwrap() {
        emu.commit("catalog", &t, ChangeCounts { inserts: 3, updates: 3, hard_deletes: 2, ..Default::default() })
            .unwrap();
    }
    for fault in [
        FaultSpec::new(FaultKind::TooManyRequests, 3).on(Endpoint::Query),
        FaultSpec::new(FaultKind::ServerError, 2).on(Endpoint::Schema),
        FaultSpec::new(FaultKind::BadGateway, 2).on(Endpoint::ObjectUrl),
        FaultSpec::new(FaultKind::Reset, 4).on(Endpoint::Object),
        FaultSpec::new(FaultKind::TruncatedGzip, 3).on(Endpoint::Object),
        FaultSpec::new(FaultKind::ExpiredUrl, 2).on(Endpoint::Object),
    ] {
        emu.inject(fault);
    }
    ours_ok(&emu, dir.path(), &all).await;
    for t in emu.tables("catalog").unwrap() {
        let def = emu.table_def("catalog", &t).unwrap();
        assert_same_rows(
            &def,
            &sqlite_rows(&db, &emu, "catalog", &t),
            &emu.truth("catalog", &t).unwrap(),
            "after a sync through faults",
        );
    }
}

/// Spooled objects are not checked while they download: the loader inflates (and CRC-checks)
/// every byte anyway. A truncated object must then be caught there and fetched again, for a
/// snapshot (which resumes after the objects already loaded) and for an incremental.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_found_corrupt_while_loading_are_fetched_again() {
    use dap_replica::emulator::{Endpoint, FaultKind, FaultSpec};
    let Mirror { emu, dir, db, url } =
        Mirror::new(EmulatorConfig { rows: 60, part_rows: 10, ..EmulatorConfig::default() }, "canvas.db").await;
    let def = emu.table_def("canvas", "courses").unwrap();
    for command in ["initdb", "syncdb"] {
        if command == "syncdb" {
            emu.commit(
                "canvas",
                "courses",
                ChangeCounts { inserts: 30, updates: 20, hard_deletes: 5, ..Default::default() },
            )
            .unwrap();
        }
        emu.inject(FaultSpec::new(FaultKind::TruncatedGzip, 2).on(Endpoint::Object).for_table("courses"));
        let argv =
            [command, "--json", "--namespace", "canvas", "--table", "courses", "--connection-string", url.as_str()];
        let out = run_ours(&emu, dir.path(), &argv).await;
        let err = stderr(&out);
        assert!(out.status.success(), "{err}");
        assert!(err.contains("is corrupt or incomplete") && err.contains("downloading it again"), "{err}");
        // The count is of the rows held, not of the attempt that finished the load.
        let results: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(results[0]["rows"], emu.truth("canvas", "courses").unwrap().len(), "{command}: {results:?}");
        if command == "syncdb" {
            assert_eq!(results[0]["changes"], 55, "{results:?}");
        }
        assert_same_rows(
            &def,
            &sqlite_rows(&db, &emu, "canvas", "courses"),
            &emu.truth("canvas", "courses").unwrap(),
            command,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_does_not_match_the_schema_is_named_and_changes_nothing() {
    use dap_replica::emulator::{Endpoint, FaultKind, FaultSpec};
    let Mirror { emu, dir, db, url } =
        Mirror::new(EmulatorConfig { rows: 20, ..EmulatorConfig::default() }, "canvas.db").await;
    ours_ok(&emu, dir.path(), &["initdb", "--namespace", "canvas", "--table", "users", "--connection-string", &url])
        .await;
    let (before, watermark) = (sqlite_rows(&db, &emu, "canvas", "users"), bookkeeping(&db));
    emu.commit("canvas", "users", ChangeCounts { inserts: 2, updates: 2, ..Default::default() }).unwrap();

    emu.inject(FaultSpec::new(FaultKind::CorruptRecord, 1).on(Endpoint::Object).for_table("users"));
    let out = run_ours(
        &emu,
        dir.path(),
        &["syncdb", "--namespace", "canvas", "--table", "users", "--connection-string", &url],
    )
    .await;
    assert_eq!(out.status.code(), Some(5));
    let err = stderr(&out);
    assert!(
        err.contains("canvas.users")
            && err.contains("object part-")
            && err.contains("line 2")
            && err.contains("column id"),
        "{err}"
    );
    assert!(err.contains("keeps its previous state"), "{err}");
    assert_eq!((sqlite_rows(&db, &emu, "canvas", "users"), bookkeeping(&db)), (before, watermark));

    emu.inject(FaultSpec::new(FaultKind::CorruptRecord, 1).on(Endpoint::Object).for_table("courses"));
    let out = run_ours(
        &emu,
        dir.path(),
        &["initdb", "--namespace", "canvas", "--table", "courses", "--connection-string", &url],
    )
    .await;
    assert_eq!(out.status.code(), Some(5));
    let conn = rusqlite::Connection::open(&db).unwrap();
    let courses: i64 =
        conn.query_row("SELECT count(*) FROM sqlite_master WHERE name = 'courses'", [], |r| r.get(0)).unwrap();
    assert_eq!(courses, 0, "no half-initialised table");
    assert_eq!(bookkeeping(&db).len(), 1);
}

/// Two processes writing two mirror files of one folder at once: state.json keeps both runs,
/// each under its own file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_of_one_folder_keep_both_state_entries() {
    let emu = emulator(EmulatorConfig { rows: 2000, part_rows: 250, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let files = ["first.db", "second.db"];
    let urls: Vec<String> = files.iter().map(|f| format!("sqlite://{}", dir.path().join(f).display())).collect();
    let runs = urls.iter().map(|url| {
        let args = ["initdb", "--namespace", "canvas", "--table", "users,courses,accounts", "--connection-string", url];
        let (emu, dir) = (&emu, dir.path());
        async move { run_ours(emu, dir, &args).await }
    });
    for out in futures_util::future::join_all(runs).await {
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let entries = state_entries(dir.path());
    for file in files {
        for table in ["users", "courses", "accounts"] {
            let e =
                entries.get(&format!("{file}:canvas.{table}")).unwrap_or_else(|| panic!("{file} {table}: {entries:?}"));
            assert_eq!(e["last_result"], "ok");
            assert_eq!(e["rows"], 2000);
            assert!(e["file"].as_str().unwrap().ends_with(file), "{e}");
        }
    }
    assert_eq!(entries.len(), 6, "{entries:?}");
}
