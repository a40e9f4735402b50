//! `dap ddl` provisions: its output, run as printed by each database's own client (psql, the
//! mariadb client; one batch on SQL Server, as sqlcmd sends a file), gives a database that
//! `dap initdb` accepts, and the official client's `initdb` too. The empty tables it made are
//! taken over; a table with rows and no bookkeeping row, or with other columns, is still refused
//! and keeps its rows; a database whose version row is missing gets it when it has no watermarks,
//! and is refused, named, when it has some.

use crate::common;

use std::path::Path;

use common::targets::{Backend, TestTarget, backends};
use common::truth::{Limit, assert_same_rows_within};
use common::*;
use dap_replica::emulator::{Emulator, EmulatorConfig};

const TABLES: &[&str] = &["accounts", "courses", "enrollment_terms"];

fn dialect(b: Backend) -> &'static str {
    match b {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgresql",
        Backend::Mysql => "mysql",
        Backend::Mssql => "mssql",
    }
}

/// The bookkeeping and version tables as raw SQL names them on `b`.
fn bookkeeping(b: Backend, table: &str) -> String {
    match b {
        Backend::Sqlite | Backend::Mysql => format!("\"instructure_dap__{table}\""),
        Backend::Postgres | Backend::Mssql => format!("\"instructure_dap\".\"{table}\""),
    }
}

/// Runs a DDL script as a DBA would: psql and the mariadb client read the file as printed; SQL
/// Server gets it as one batch (sqlcmd's way with a file without `GO`); SQLite as one script.
async fn run_as_printed(target: &TestTarget, script: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("provision.sql");
    std::fs::write(&file, script).unwrap();
    let out = match target.backend {
        Backend::Postgres => tokio::process::Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f"])
            .arg(&file)
            .arg(&target.url)
            .output()
            .await
            .expect("psql runs (scripts/db-up.sh installs it)"),
        Backend::Mysql => {
            let rest = target.url.strip_prefix("mysql://").unwrap();
            let rest = rest.split_once('?').map_or(rest, |(u, _)| u);
            let (cred, hostdb) = rest.split_once('@').unwrap();
            let (user, pass) = cred.split_once(':').unwrap();
            let (hostport, db) = hostdb.split_once('/').unwrap();
            let (host, port) = hostport.split_once(':').unwrap_or((hostport, "3306"));
            tokio::process::Command::new("mariadb")
                .args(["-h", host, "-P", port, "-u", user, &format!("-p{pass}"), db])
                .stdin(std::fs::File::open(&file).unwrap())
                .output()
                .await
                .expect("the mariadb client runs (scripts/db-up.sh installs it)")
        }
        Backend::Mssql => return common::mssql::exec_batch(&target.url, script).await,
        Backend::Sqlite => return target.exec(script).await,
    };
    assert!(
        out.status.success(),
        "{:?}: the DDL as printed fails: {}",
        target.backend,
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn ddl(emu: &Emulator, dir: &Path, b: Backend) -> String {
    let out =
        ours_ok(emu, dir, &["ddl", "--dialect", dialect(b), "--namespace", "canvas", "--table", &TABLES.join(",")])
            .await;
    assert!(out.contains("CREATE TABLE"), "{b:?}: {out}");
    out
}

fn args<'a>(command: &'a str, target: &'a TestTarget) -> Vec<&'a str> {
    let mut a = vec![command, "--namespace", "canvas", "--table", "accounts,courses,enrollment_terms"];
    a.extend(["--connection-string", &target.url]);
    a.extend(target.dap_options());
    a
}

async fn assert_truth(emu: &Emulator, target: &TestTarget, step: &str, limits: &[Limit]) {
    for t in TABLES {
        let def = emu.table_def("canvas", t).unwrap();
        let truth = emu.truth("canvas", t).unwrap();
        assert!(!truth.is_empty(), "{t}: the emulator has rows");
        assert_same_rows_within(&def, &target.rows(&def).await, &truth, &format!("{step}: {t}"), limits);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ddl_as_printed_gives_a_database_both_clients_initialise() {
    let emu = emulator(EmulatorConfig { rows: 12, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    for b in backends() {
        let script = ddl(&emu, dir, b).await;
        if b != Backend::Sqlite {
            assert!(script.contains("VALUES (1)"), "{b:?}: the version row is part of the DDL");
        }

        // Ours: provisioned, then initialised; the empty tables are taken over.
        let ours = TestTarget::fresh(b, &format!("ddl_ours_{}", dialect(b))).await;
        run_as_printed(&ours, &script).await;
        ours_ok(&emu, dir, &args("initdb", &ours)).await;
        assert_truth(&emu, &ours, &format!("{b:?} initdb after dap ddl"), ours.limits()).await;
        if b != Backend::Sqlite {
            let versions = ours.column(&format!("SELECT version FROM {}", bookkeeping(b, "database_version"))).await;
            assert_eq!(versions, [Some("1".to_string())], "{b:?}: one version row, 1");
        }

        // A table with rows and no bookkeeping row is still refused, and keeps its rows.
        let watermark = |t: &str| format!("DELETE FROM {} WHERE source_table = '{t}'", bookkeeping(b, "table_sync"));
        ours.exec(&watermark("courses")).await;
        let before = ours.column(&format!("SELECT count(*) FROM {}", ours.table("canvas", "courses"))).await;
        let out = run_ours(&emu, dir, &args("initdb", &ours)).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{b:?}: a table with rows and no bookkeeping row is refused");
        assert!(stderr.contains("canvas.courses exists") && stderr.contains("rows"), "{b:?}: {stderr}");
        let after = ours.column(&format!("SELECT count(*) FROM {}", ours.table("canvas", "courses"))).await;
        assert_eq!(before, after, "{b:?}: the refused table keeps its rows");
        assert_ne!(after, [Some("0".to_string())]);

        if b == Backend::Sqlite {
            continue;
        }
        // The version row gone while watermarks remain: refused, named, with the fix.
        ours.exec(&format!("DELETE FROM {}", bookkeeping(b, "database_version"))).await;
        let out = run_ours(&emu, dir, &args("syncdb", &ours)).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{b:?}: a database without its version row but with watermarks is refused");
        assert!(stderr.contains("database_version has no row") && stderr.contains("VALUES (1)"), "{b:?}: {stderr}");

        // An older DDL without the version row, and a table of other columns.
        let other = TestTarget::fresh(b, &format!("ddl_other_{}", dialect(b))).await;
        let without_version: String =
            script.split(";\n").filter(|s| !s.contains("INSERT")).map(|s| format!("{s};\n")).collect();
        run_as_printed(&other, &without_version).await;
        other.exec(&format!("ALTER TABLE {} ADD {} int", other.table("canvas", "accounts"), "\"extra\"")).await;
        let out = run_ours(&emu, dir, &args("initdb", &other)).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("not the official layout") && stderr.contains("extra"), "{b:?}: {stderr}");
        let versions = other.column(&format!("SELECT version FROM {}", bookkeeping(b, "database_version"))).await;
        assert_eq!(versions, [Some("1".to_string())], "{b:?}: the missing version row was added");

        // The official client initialises the same provisioned database.
        if matches!(b, Backend::Postgres | Backend::Mysql) {
            let theirs = TestTarget::fresh(b, &format!("ddl_theirs_{}", dialect(b))).await;
            run_as_printed(&theirs, &script).await;
            let mut a = vec!["--loglevel", "warning"];
            a.extend(args("initdb", &theirs).into_iter().filter(|a| *a != "--non-finite" && *a != "null"));
            official_ok(&emu, dir, &a).await;
            let limits: &[Limit] =
                if b == Backend::Postgres { &[Limit::InfinityAtTheEnds] } else { common::targets::MYSQL_LIMITS };
            assert_truth(&emu, &theirs, &format!("{b:?}: the official initdb after dap ddl"), limits).await;
            let synced = theirs.column(&format!("SELECT count(*) FROM {}", bookkeeping(b, "table_sync"))).await;
            assert_eq!(synced, [Some(TABLES.len().to_string())], "{b:?}: the official client recorded each table");
        }
    }
}

/// Offline, `ddl` and `listdb` answer from what the mirror stored: the DDL of its stored schemas
/// is the DDL of DAP's (the same schema version), for every dialect, and `listdb` lists the
/// mirrored tables with a note that DAP was not asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_ddl_and_listdb_answer_from_the_mirror() {
    let emu = emulator(EmulatorConfig { rows: 5, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mirror = dir.join("mirror");
    let m = mirror.to_str().unwrap();
    ours_ok(&emu, dir, &["initdb", "--dir", m, "--namespace", "canvas", "--table", "accounts,courses"]).await;
    let offline = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dap"))
            .current_dir(dir)
            .env_remove("DAP_CLIENT_ID")
            .env_remove("DAP_CLIENT_SECRET")
            .env_remove("DAP_CLIENT_SECRET_FILE")
            .env("HOME", dir)
            .env("XDG_CONFIG_HOME", dir.join("config"))
            .env("DAP_API_URL", "http://127.0.0.1:9") // nothing listens: DAP is never asked
            .env("DAP_MIRROR_DIR", m)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for b in [Backend::Sqlite, Backend::Postgres, Backend::Mysql, Backend::Mssql] {
        let args = ["ddl", "--dialect", dialect(b), "--namespace", "canvas", "--table", "accounts,courses"];
        let from_dap = ours_ok(&emu, dir, &args).await;
        let (ok, from_mirror, stderr) = offline(&args);
        assert!(ok, "{b:?}: {stderr}");
        assert_eq!(from_mirror, from_dap, "{b:?}: the stored schemas give DAP's DDL");
        assert!(stderr.contains("no DAP credentials"), "{b:?}: it says where the schemas came from: {stderr}");
        let with_dir: Vec<&str> = args.iter().copied().chain(["--dir", m]).collect();
        assert_eq!(ours_ok(&emu, dir, &with_dir).await, from_dap, "{b:?}: --dir takes the mirror's");
    }
    let (ok, _, stderr) = offline(&["ddl", "--dialect", "postgresql", "--namespace", "canvas", "--table", "users"]);
    assert!(
        !ok && stderr.contains("canvas.users is not in the mirror") && stderr.contains("--schema-file"),
        "{stderr}"
    );

    let (ok, stdout, stderr) = offline(&["listdb", "--namespace", "canvas", "--omit-record-count"]);
    assert!(ok, "{stderr}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["accounts", "courses"], "{stdout}");
    assert!(rows.iter().all(|r| r["command"] == "syncdb" && r["schema"] == 1), "{stdout}");
    assert!(stderr.contains("no DAP credentials"), "{stderr}");
}
