//! The SQLite mirror: initdb and rounds of syncdb for every canvas table and web_logs, compared
//! with the emulator's truth as typed values after every round.

mod common;

use std::path::Path;

use common::truth::assert_same_rows;
use common::*;
use dap_replica::emulator::{ChangeCounts, Emulator, EmulatorConfig, SchemaChange};
use dap_replica::schema::ColumnType;
use rusqlite::types::ValueRef;
use serde_json::{Map, Value};

/// Every row of a mirrored table as JSON objects, read back by column type.
fn sqlite_rows(db: &Path, emu: &Emulator, ns: &str, table: &str) -> Vec<Map<String, Value>> {
    let def = emu.table_def(ns, table).unwrap();
    let conn = rusqlite::Connection::open(db).unwrap();
    let columns: Vec<_> = def.columns().cloned().collect();
    let names: Vec<String> = columns.iter().map(|c| format!("\"{}\"", c.name)).collect();
    let mut stmt = conn
        .prepare(&format!("SELECT {} FROM \"{table}\"", names.join(", ")))
        .unwrap_or_else(|e| panic!("{ns}.{table}: {e}"));
    let rows = stmt
        .query_map([], |row| {
            let mut m = Map::new();
            for (i, c) in columns.iter().enumerate() {
                let v = match row.get_ref(i)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(n) => Value::from(n),
                    ValueRef::Real(f) if f.is_infinite() => Value::from(if f > 0.0 { "Infinity" } else { "-Infinity" }),
                    ValueRef::Real(f) => Value::from(f),
                    ValueRef::Text(t) => {
                        let s = String::from_utf8(t.to_vec()).unwrap();
                        match c.ty {
                            ColumnType::Array(_) | ColumnType::Object(_) | ColumnType::Json => {
                                serde_json::from_str(&s).unwrap()
                            }
                            _ => Value::String(s),
                        }
                    }
                    ValueRef::Blob(_) => panic!("no blobs in the mirror"),
                };
                m.insert(c.name.clone(), v);
            }
            Ok(m)
        })
        .unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

fn assert_mirror_matches(db: &Path, emu: &Emulator, ns: &str, round: &str) {
    for t in emu.tables(ns).unwrap() {
        let def = emu.table_def(ns, &t).unwrap();
        assert_same_rows(&def, &sqlite_rows(db, emu, ns, &t), &emu.truth(ns, &t).unwrap(), round);
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
    let emu = emulator(EmulatorConfig { rows: 20, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("m.db");
    let url = format!("sqlite://{}", db.display());
    ours_ok(&emu, dir.path(), &["initdb", "--namespace", "canvas", "--table", "users", "--connection-string", &url])
        .await;
    let before = sqlite_rows(&db, &emu, "canvas", "users");

    let out = run_ours(
        &emu,
        dir.path(),
        &["initdb", "--namespace", "canvas", "--table", "users", "--connection-string", &url],
    )
    .await;
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("already initialised"), "{}", stderr(&out));
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
    assert!(stderr(&out).contains("not supported yet") && !stderr(&out).contains("hunter2"), "{}", stderr(&out));
}
