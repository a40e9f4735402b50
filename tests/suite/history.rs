//! History in the mirror (`--keep-history`), checked against the emulator's truth as of each
//! sync time, never against our own history code: `dap query --as-of T` equals the truth at T
//! row by row through inserts, updates, soft and hard deletes, a re-snapshot and a schema
//! change; `dap history` lists exactly the versions a row went through; a kill mid-sync leaves
//! data and history agreeing; pack/unpack keeps it; `--history-days` prunes only ended versions.

use std::path::Path;

use dap_replica::emulator::{ChangeCounts, Emulator, EmulatorConfig, SchemaChange};
use dap_replica::schema::TableDef;
use serde_json::{Map, Value as Json};

use crate::common::truth::{Limit, assert_same_rows_within};
use crate::common::*;

const TABLES: [&str; 3] = ["scores", "enrollments", "courses"];

/// The mirror's documented limit: SQLite's REAL has no negative zero.
fn assert_same_rows(def: &TableDef, actual: &[Map<String, Json>], truth: &[Map<String, Json>], what: &str) {
    assert_same_rows_within(def, actual, truth, what, &[Limit::NoNegativeZero]);
}

/// A row as one comparable line, within the mirror's limits.
fn line(def: &TableDef, row: &Map<String, Json>) -> String {
    crate::common::truth::row_lines(def, std::slice::from_ref(row), &[Limit::NoNegativeZero]).remove(0)
}

/// A round of changes of every kind.
const ROUND: ChangeCounts = ChangeCounts { inserts: 3, updates: 4, soft_deletes: 1, hard_deletes: 2 };

/// The rows `dap query --as-of` prints as JSON Lines, with JSON columns parsed back (the
/// mirror stores them as text).
fn parsed_rows(out: &str, def: &TableDef) -> Vec<Map<String, Json>> {
    use dap_replica::schema::ColumnType;
    out.lines()
        .map(|l| {
            let mut row: Map<String, Json> = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            for c in def.columns() {
                if matches!(c.ty, ColumnType::Array(_) | ColumnType::Object(_) | ColumnType::Json)
                    && let Some(Json::String(s)) = row.get(&c.name)
                {
                    let parsed = serde_json::from_str(s).unwrap();
                    row.insert(c.name.clone(), parsed);
                }
            }
            row
        })
        .collect()
}

/// The table's watermark in the mirror (`dap status --json`).
async fn watermark(emu: &Emulator, dir: &Path, table: &str) -> String {
    let out = ours_ok(emu, dir, &["status", "--json", "--dir", dir.to_str().unwrap()]).await;
    let rows: Vec<Json> = serde_json::from_str(&out).unwrap();
    rows.iter().find(|r| r["table"] == table).unwrap_or_else(|| panic!("{table} in {out}"))["watermark"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The time of the latest sync of a mirror: the latest of its tables' watermarks (each is its
/// table's last change), so every change the sync brought is at or before it.
async fn sync_time(emu: &Emulator, dir: &Path) -> String {
    let mut latest: Option<(i64, String)> = None;
    for table in TABLES {
        let w = watermark(emu, dir, table).await;
        let t = dap_replica::time::parse_rfc3339(&w).unwrap();
        if latest.as_ref().is_none_or(|(l, _)| t > *l) {
            latest = Some((t, w));
        }
    }
    latest.unwrap().1
}

async fn as_of(emu: &Emulator, dir: &Path, at: &str, sql: &str) -> String {
    ours_ok(emu, dir, &["query", "--dir", dir.to_str().unwrap(), "--as-of", at, "--format", "jsonl", sql]).await
}

/// Every table of `TABLES` read as of each time in `times` equals the truth then.
async fn assert_as_of_is_the_truth(emu: &Emulator, dir: &Path, times: &[String], what: &str) {
    for at in times {
        let micros = dap_replica::time::parse_rfc3339(at).unwrap();
        for table in TABLES {
            let def = emu.table_def("canvas", table).unwrap();
            let out = as_of(emu, dir, at, &format!("SELECT * FROM canvas.{table}")).await;
            let truth = emu.truth_at("canvas", table, micros).unwrap();
            assert_same_rows(&def, &parsed_rows(&out, &def), &truth, &format!("{what}: {table} as of {at}"));
            assert_reads_of_some_columns_are_the_truth(emu, dir, at, &def, &truth, what).await;
        }
    }
}

/// Queries that read some columns only, for which the as-of view holds those columns alone: a
/// count, the keys, and the keys of rows where the last column (the one a schema change added,
/// for scores) is NULL.
async fn assert_reads_of_some_columns_are_the_truth(
    emu: &Emulator,
    dir: &Path,
    at: &str,
    def: &TableDef,
    truth: &[Map<String, Json>],
    what: &str,
) {
    let (table, key) = (&def.name, &def.key.name);
    let last = &def.values.last().expect("a value column").name;
    let counted = as_of(emu, dir, at, &format!("SELECT count(*) AS n FROM {table}")).await;
    let counted: Map<String, Json> = serde_json::from_str(counted.trim()).unwrap();
    assert_eq!(counted["n"], Json::from(truth.len()), "{what}: count(*) of {table} as of {at}");
    let keys = |out: &str| -> Vec<String> {
        let mut keys: Vec<String> = parsed_rows(out, def).iter().map(|r| r[key.as_str()].to_string()).collect();
        keys.sort();
        keys
    };
    let truth_keys = |rows: &mut dyn Iterator<Item = &Map<String, Json>>| -> Vec<String> {
        let mut keys: Vec<String> = rows.map(|r| r[key.as_str()].to_string()).collect();
        keys.sort();
        keys
    };
    let out = as_of(emu, dir, at, &format!("SELECT \"{key}\" FROM canvas.{table}")).await;
    assert_eq!(keys(&out), truth_keys(&mut truth.iter()), "{what}: the keys of {table} as of {at}");
    let out = as_of(emu, dir, at, &format!("SELECT \"{key}\" FROM {table} WHERE \"{last}\" IS NULL")).await;
    let nulls = truth_keys(&mut truth.iter().filter(|r| r.get(last.as_str()).is_none_or(Json::is_null)));
    assert_eq!(keys(&out), nulls, "{what}: keys of {table} where {last} is NULL as of {at}");
}

fn sync_args(dir: &Path) -> Vec<String> {
    let url = format!("sqlite://{}", dir.join("canvas.db").display());
    ["syncdb", "--namespace", "canvas", "--table", &TABLES.join(","), "--connection-string", &url]
        .map(String::from)
        .to_vec()
}

async fn ok_with(emu: &Emulator, dir: &Path, args: &[String], extra: &[&str]) -> String {
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend(extra);
    ours_ok(emu, dir, &all).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_of_every_sync_is_the_truth_then_through_deletes_a_resnapshot_and_a_schema_change() {
    let emu = emulator(EmulatorConfig { rows: 40, part_rows: 15, ..EmulatorConfig::default() }).await;
    // Two mirrors of the same data: one synced after every commit, one after every third.
    let (every, third) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let init = |dir: &Path| {
        let url = format!("sqlite://{}", dir.join("canvas.db").display());
        [
            "initdb",
            "--namespace",
            "canvas",
            "--table",
            &TABLES.join(","),
            "--connection-string",
            &url,
            "--keep-history",
            "all",
        ]
        .map(String::from)
        .to_vec()
    };
    ok_with(&emu, every.path(), &init(every.path()), &[]).await;
    ok_with(&emu, third.path(), &init(third.path()), &[]).await;
    let mut synced_every = vec![sync_time(&emu, every.path()).await];
    let mut synced_third = synced_every.clone();

    for round in 1..=6 {
        match round {
            3 => {
                emu.evolve("canvas", "scores", SchemaChange::AddColumn).unwrap();
            }
            2 | 4 => {
                // A re-snapshot of one table in the mirror synced every time: history goes on.
                // In round 2 DAP answers with its cached (older) snapshot job, which the sync
                // brings forward; in round 4 the jobs have expired and the snapshot is new.
                if round == 4 {
                    emu.expire_jobs();
                }
                let url = format!("sqlite://{}", every.path().join("canvas.db").display());
                let replace = [
                    "initdb",
                    "--replace",
                    "--namespace",
                    "canvas",
                    "--table",
                    "enrollments",
                    "--connection-string",
                    &url,
                ];
                commit_round(&emu, "canvas", &["enrollments"], ROUND);
                ours_ok(&emu, every.path(), &replace).await;
                // The re-snapshot is a time the mirror saw too: the state it brought is a version.
                synced_every.push(sync_time(&emu, every.path()).await);
            }
            _ => {}
        }
        commit_round(&emu, "canvas", &TABLES, ROUND);
        // The watched row changes in every round.
        ok_with(&emu, every.path(), &sync_args(every.path()), &[]).await;
        synced_every.push(sync_time(&emu, every.path()).await);
        if round % 3 == 0 {
            ok_with(&emu, third.path(), &sync_args(third.path()), &[]).await;
            synced_third.push(sync_time(&emu, third.path()).await);
        }
    }
    assert_as_of_is_the_truth(&emu, every.path(), &synced_every, "synced after every commit").await;
    assert_as_of_is_the_truth(&emu, third.path(), &synced_third, "synced after every third commit").await;

    // `dap export --as-of` writes the table as it was.
    let at = &synced_every[3];
    let file = every.path().join("scores.jsonl");
    let dir_arg = every.path().to_str().unwrap();
    ours_ok(
        &emu,
        every.path(),
        &["export", "--dir", dir_arg, "--table", "scores", "--as-of", at, "-o", file.to_str().unwrap()],
    )
    .await;
    let def = emu.table_def("canvas", "scores").unwrap();
    let truth = emu.truth_at("canvas", "scores", dap_replica::time::parse_rfc3339(at).unwrap()).unwrap();
    let exported = parsed_rows(&std::fs::read_to_string(&file).unwrap(), &def);
    assert_same_rows(&def, &exported, &truth, &format!("dap export --as-of {at}"));

    // A plain name reads the view too, and a join of two tables with history works.
    let at = &synced_every[2];
    let plain = as_of(&emu, every.path(), at, "SELECT count(*) AS n FROM scores").await;
    let micros = dap_replica::time::parse_rfc3339(at).unwrap();
    let expected = emu.truth_at("canvas", "scores", micros).unwrap().len();
    assert_eq!(plain.trim(), format!("{{\"n\":{expected}}}"), "a plain table name as of {at}");

    // `dap history` of the row that changed most: exactly the states it went through at the
    // sync times (a deleted row has no state; one changed twice between syncs shows its last).
    let def = emu.table_def("canvas", "enrollments").unwrap();
    let mut states: std::collections::BTreeMap<String, Vec<Option<String>>> = Default::default();
    for (i, at) in synced_every.iter().enumerate() {
        let truth = emu.truth_at("canvas", "enrollments", dap_replica::time::parse_rfc3339(at).unwrap()).unwrap();
        for row in &truth {
            let runs = states.entry(serde_json::to_string(&row["id"]).unwrap()).or_insert_with(|| vec![None; i]);
            runs.resize(i, None);
            runs.push(Some(line(&def, row)));
        }
    }
    let (watched_key, expected) = states
        .into_iter()
        .map(|(k, mut runs)| {
            runs.dedup();
            (k, runs.into_iter().flatten().collect::<Vec<String>>())
        })
        .max_by_key(|(_, versions)| versions.len())
        .unwrap();
    let watched_key: Json = serde_json::from_str(&watched_key).unwrap();
    let key = match &watched_key {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    };
    let out = ours_ok(
        &emu,
        every.path(),
        &[
            "history",
            "--dir",
            every.path().to_str().unwrap(),
            "--namespace",
            "canvas",
            "--table",
            "enrollments",
            "--key",
            &key,
            "--format",
            "jsonl",
        ],
    )
    .await;
    let versions = parsed_rows(&out, &def);
    let listed: Vec<String> = versions.iter().map(|v| line(&def, v)).collect();
    assert!(expected.len() >= 2, "the watched row changed: {expected:?}");
    assert_eq!(listed, expected, "dap history lists the versions the row went through");
    for pair in versions.windows(2) {
        assert_eq!(pair[0]["dap_valid_to"], pair[1]["dap_valid_from"], "versions follow each other: {out}");
    }

    // A table without history is named, not read as if it had one.
    let url = format!("sqlite://{}", every.path().join("canvas.db").display());
    ours_ok(&emu, every.path(), &["initdb", "--namespace", "canvas", "--table", "users", "--connection-string", &url])
        .await;
    let out = run_ours(
        &emu,
        every.path(),
        &["query", "--dir", every.path().to_str().unwrap(), "--as-of", at, "SELECT count(*) FROM canvas.users"],
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("canvas.users keeps no history") && err.contains("--keep-history"),
        "{err}"
    );
    let before = &synced_every[0];
    let out = run_ours(
        &emu,
        every.path(),
        &[
            "query",
            "--dir",
            every.path().to_str().unwrap(),
            "--as-of",
            "2001-01-01T00:00:00Z",
            "SELECT 1 FROM canvas.scores",
        ],
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&format!("begins at {}", &before[..19])), "{err}");
}

/// DAP answers a re-snapshot with its cached older job: the table goes back to that snapshot
/// (history keeps what it knows) and catches up. A row inserted after that snapshot and deleted
/// before the re-snapshot is not in the table to delete, yet its open version must end: found by
/// the test above on a loaded machine, where commit times made such a row by chance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_deleted_before_a_cached_resnapshot_ends_in_history() {
    let emu = emulator(EmulatorConfig { rows: 8, part_rows: 5, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("canvas.db").display());
    let table = ["--namespace", "canvas", "--table", "enrollments", "--connection-string", &url];
    let run = |verb: &'static str, extra: &'static [&'static str]| {
        let mut args = vec![verb];
        args.extend(extra);
        args.extend(table);
        args
    };
    ours_ok(&emu, dir.path(), &run("initdb", &["--keep-history", "all"])).await;
    // Commit (and sync) until a commit hard-deletes a row a synced commit inserted.
    let counts = ChangeCounts { inserts: 3, updates: 1, soft_deletes: 0, hard_deletes: 3 };
    let mut synced_inserts: Vec<Json> = Vec::new();
    let mut victim = None;
    for _ in 0..40 {
        let commit = emu.commit("canvas", "enrollments", counts).unwrap();
        if let Some(k) = commit.hard_deleted.iter().find(|k| synced_inserts.contains(k)) {
            victim = Some(k.clone());
            break;
        }
        ours_ok(&emu, dir.path(), &run("syncdb", &[])).await;
        synced_inserts.extend(commit.inserted);
    }
    let victim = victim.expect("within 40 commits one hard-deletes a row an earlier synced commit inserted");
    ours_ok(&emu, dir.path(), &run("initdb", &["--replace"])).await;

    let at = watermark(&emu, dir.path(), "enrollments").await;
    let def = emu.table_def("canvas", "enrollments").unwrap();
    let truth = emu.truth_at("canvas", "enrollments", dap_replica::time::parse_rfc3339(&at).unwrap()).unwrap();
    assert!(!truth.iter().any(|r| r["id"] == victim), "the truth has no row {victim} at {at}");
    let out = as_of(&emu, dir.path(), &at, "SELECT * FROM canvas.enrollments").await;
    assert_same_rows(&def, &parsed_rows(&out, &def), &truth, &format!("enrollments as of {at}"));
    let out = ours_ok(
        &emu,
        dir.path(),
        &["history", "--dir", dir.path().to_str().unwrap(), "--namespace", "canvas", "--table", "enrollments"]
            .into_iter()
            .chain(["--key", &victim.to_string(), "--format", "jsonl"])
            .collect::<Vec<_>>(),
    )
    .await;
    let versions = parsed_rows(&out, &def);
    let last = versions.last().unwrap_or_else(|| panic!("row {victim} has versions: {out}"));
    assert_eq!(last["dap_deleted"], Json::from(1), "row {victim}'s last version ended in its delete: {out}");
    assert!(!last["dap_valid_to"].is_null(), "row {victim}'s last version ended: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_survives_a_kill_mid_sync_and_pack_and_prunes_only_ended_versions() {
    use dap_replica::emulator::{Endpoint, FaultKind, FaultSpec};
    let emu = emulator(EmulatorConfig { rows: 60, part_rows: 10, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("canvas.db");
    let url = format!("sqlite://{}", db.display());
    let init = ["initdb", "--namespace", "canvas", "--table", "scores", "--connection-string", &url];
    ours_ok(&emu, dir.path(), &init).await;
    // Turned on by a sync: the rows held become the first versions.
    let sync = ["syncdb", "--namespace", "canvas", "--table", "scores", "--connection-string", &url];
    let mut keep = sync.to_vec();
    keep.extend(["--keep-history", "scores"]);
    commit_round(&emu, "canvas", &["scores"], ROUND);
    ours_ok(&emu, dir.path(), &keep).await;
    assert_history_agrees(&db, "scores");

    // SIGKILL while the sync applies (rows already written in its open transaction).
    let before_kill = watermark(&emu, dir.path(), "scores").await;
    emu.commit("canvas", "scores", ChangeCounts { inserts: 200, updates: 200, hard_deletes: 20, ..Default::default() })
        .unwrap();
    emu.inject(
        FaultSpec { delay_ms: Some(600_000), ..FaultSpec::new(FaultKind::Slow, 1) }.on(Endpoint::Object).after(4),
    );
    let mut running = ours_command(&emu, dir.path());
    running.args(sync);
    let mut running = Watched::spawn(running);
    running.wait_for("scores: loading").await;
    std::process::Command::new("kill").args(["-9", &running.pid().to_string()]).status().unwrap();
    let killed = running.finish().await;
    assert_eq!(killed.status.code(), None, "killed by the signal, not finished");
    assert_eq!(watermark(&emu, dir.path(), "scores").await, before_kill, "the killed sync committed nothing");
    assert_history_agrees(&db, "scores");
    emu.clear_faults();
    ours_ok(&emu, dir.path(), &sync).await;
    assert_history_agrees(&db, "scores");
    let def = emu.table_def("canvas", "scores").unwrap();
    let now = watermark(&emu, dir.path(), "scores").await;
    let out = as_of(&emu, dir.path(), &now, "SELECT * FROM canvas.scores").await;
    assert_same_rows(&def, &parsed_rows(&out, &def), &emu.truth("canvas", "scores").unwrap(), "after the rerun");

    // A pack carries the history whole.
    let pack = dir.path().join("mirror.dap.zst");
    ours_ok(&emu, dir.path(), &["pack", "--dir", dir.path().to_str().unwrap(), "--output", pack.to_str().unwrap()])
        .await;
    let restored = tempfile::tempdir().unwrap();
    ours_ok(&emu, dir.path(), &["unpack", pack.to_str().unwrap(), "--dir", restored.path().to_str().unwrap()]).await;
    let all = "SELECT * FROM canvas.scores__history ORDER BY id, dap_valid_from";
    let query = |d: &Path| ["query", "--dir", d.to_str().unwrap(), "--format", "jsonl", all].map(String::from).to_vec();
    assert_eq!(
        ok_with(&emu, dir.path(), &query(restored.path()), &[]).await,
        ok_with(&emu, dir.path(), &query(dir.path()), &[]).await,
        "the unpacked mirror holds the same history"
    );

    // Ten days later, versions that ended more than 7 days before the watermark go; current
    // ones stay, however old.
    let (ended_before, current_before) = version_counts(&db, "scores");
    assert!(ended_before > 0, "some versions ended");
    let later = dap_replica::time::parse_rfc3339(&now).unwrap() + 10 * 86_400_000_000;
    emu.commit_at("canvas", "scores", ChangeCounts { updates: 3, ..Default::default() }, later).unwrap();
    let mut prune = sync.to_vec();
    prune.extend(["--history-days", "7"]);
    ours_ok(&emu, dir.path(), &prune).await;
    let (ended_after, current_after) = version_counts(&db, "scores");
    assert_eq!(ended_after, 3, "only the versions the last sync ended remain of the ended ones");
    assert_eq!(current_after, current_before, "every current version stays");
    assert_history_agrees(&db, "scores");
    let status = ours_ok(&emu, dir.path(), &["status", "--json", "--dir", dir.path().to_str().unwrap()]).await;
    let rows: Vec<Json> = serde_json::from_str(&status).unwrap();
    let history = &rows.iter().find(|r| r["table"] == "scores").unwrap()["history"];
    assert_eq!(history["days"], 7, "{status}");
    assert_eq!(history["versions"].as_u64(), Some(ended_after + current_after), "{status}");
    // Its size: at least a page for each of its four b-trees (ended versions, starts, two
    // indexes), and less than the file.
    let bytes = history["bytes"].as_u64().unwrap_or_default();
    let page: u64 = rusqlite::Connection::open(&db).unwrap().query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
    let file = std::fs::metadata(&db).unwrap().len();
    assert!(bytes >= 4 * page && bytes < file, "history takes {bytes} bytes of a {file}-byte file: {status}");
}

/// The current versions of a table's history are exactly its rows, every column compared.
fn assert_history_agrees(db: &Path, table: &str) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let columns: Vec<String> = {
        let mut stmt = conn.prepare(&format!("SELECT name FROM pragma_table_info('{table}')")).unwrap();
        stmt.query_map([], |r| r.get::<_, String>(0)).unwrap().map(|c| format!("\"{}\"", c.unwrap())).collect()
    };
    let columns = columns.join(", ");
    let differ = |a: &str, b: &str| -> i64 {
        conn.query_row(
            &format!("SELECT count(*) FROM (SELECT {columns} FROM {a} EXCEPT SELECT {columns} FROM {b})"),
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    let current = format!("(SELECT * FROM \"{table}__history\" WHERE dap_valid_to IS NULL)");
    assert_eq!(differ(table, &current), 0, "{table}: rows without their current version");
    assert_eq!(differ(&current, table), 0, "{table}: current versions of rows it does not have");
    let open: i64 = conn
        .query_row(&format!("SELECT count(*) FROM \"{table}__history\" WHERE dap_valid_to IS NULL"), [], |r| r.get(0))
        .unwrap();
    let rows: i64 = conn.query_row(&format!("SELECT count(*) FROM \"{table}\""), [], |r| r.get(0)).unwrap();
    assert_eq!(open, rows, "{table}: one current version per row");
}

/// Ended and current versions of a table's history.
fn version_counts(db: &Path, table: &str) -> (u64, u64) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(
        &format!("SELECT sum(dap_valid_to IS NOT NULL), sum(dap_valid_to IS NULL) FROM \"{table}__history\""),
        [],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_choices_are_checked_first_remembered_described_and_undone() {
    let emu = emulator(EmulatorConfig { rows: 20, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("canvas.db");
    let url = format!("sqlite://{}", db.display());
    // Refused before anything is created: a server target, a table the run does not write.
    for (args, says) in [
        (
            vec![
                "initdb",
                "--namespace",
                "canvas",
                "--table",
                "scores",
                "--keep-history",
                "all",
                "--connection-string",
                "postgresql://u:p@127.0.0.1:1/db",
            ],
            "history is kept in the mirror",
        ),
        (
            vec![
                "initdb",
                "--namespace",
                "canvas",
                "--table",
                "scores",
                "--keep-history",
                "users",
                "--connection-string",
                &url,
            ],
            "--keep-history names users, which this run does not write",
        ),
        (
            vec![
                "initdb",
                "--namespace",
                "canvas",
                "--table",
                "scores",
                "--keep-history",
                "scores",
                "--no-history",
                "scores",
                "--connection-string",
                &url,
            ],
            "both name scores",
        ),
    ] {
        let out = run_ours(&emu, dir.path(), &args).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{args:?}: {err}");
        assert!(files_under(dir.path()).is_empty(), "{args:?} created {:?}", files_under(dir.path()));
    }

    let mut init = vec!["initdb", "--namespace", "canvas", "--table", "scores", "--connection-string", &url];
    init.extend(["--keep-history", "scores"]);
    ours_ok(&emu, dir.path(), &init).await;
    let sync = ["syncdb", "--namespace", "canvas", "--table", "scores", "--connection-string", &url];
    // Remembered: a sync without the flag records versions.
    let versions = || version_counts(&db, "scores");
    let (ended, current) = versions();
    assert_eq!((ended, current), (0, 20), "initdb seeds one version per row");
    commit_round(&emu, "canvas", &["scores"], ChangeCounts { updates: 4, ..Default::default() });
    ours_ok(&emu, dir.path(), &sync).await;
    assert_eq!(versions(), (4, 20), "the sync without the flag kept history");

    // Described in the data dictionary: the table's columns and history's three.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let kind: String =
        conn.query_row("SELECT kind FROM dap_tables WHERE table_name = 'scores__history'", [], |r| r.get(0)).unwrap();
    assert_eq!(kind, "history");
    let described: Vec<String> = conn
        .prepare("SELECT column_name FROM dap_columns WHERE table_name = 'scores__history' ORDER BY position")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let stored: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('scores__history') ORDER BY cid")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(described, stored, "every column of the history table is described, in order");
    let internal: Vec<String> = conn
        .prepare("SELECT table_name FROM dap_tables WHERE kind = 'internal' AND table_name LIKE 'scores\\_\\_history\\_%' ESCAPE '\\' ORDER BY 1")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(internal, ["scores__history_ended", "scores__history_since"], "the tables that store it are described");
    drop(conn);

    // Off: nothing more is recorded, what was recorded stays; then dropped on request.
    let mut off = sync.to_vec();
    off.extend(["--no-history", "scores"]);
    commit_round(&emu, "canvas", &["scores"], ChangeCounts { updates: 3, ..Default::default() });
    ours_ok(&emu, dir.path(), &off).await;
    commit_round(&emu, "canvas", &["scores"], ChangeCounts { updates: 3, ..Default::default() });
    ours_ok(&emu, dir.path(), &sync).await;
    assert_eq!(versions(), (4, 20), "no version recorded once history is off");
    let status = ours_ok(&emu, dir.path(), &["status", "--json", "--dir", dir.path().to_str().unwrap()]).await;
    assert!(status.contains("\"history\": null"), "{status}");
    off.extend(["--drop-history"]);
    ours_ok(&emu, dir.path(), &off).await;
    let conn = rusqlite::Connection::open(&db).unwrap();
    let left: i64 = conn
        .query_row(
            "SELECT (SELECT count(*) FROM sqlite_master WHERE name LIKE 'scores__history%') + (SELECT count(*) FROM dap_tables WHERE table_name LIKE 'scores__history%')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(left, 0, "--drop-history removes the table, its indexes and its description");
}

/// Rewrites a mirror's history of `table` as dap kept it before the split storage: one plain
/// `<table>__history` table holding every version, current ones with `dap_valid_to` NULL.
fn make_plain_history_as_older_versions_did(db: &Path, table: &str) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let view = format!("{table}__history");
    let columns: Vec<String> = conn
        .prepare(&format!("SELECT name, type FROM pragma_table_info('{table}__history_ended') ORDER BY cid"))
        .unwrap()
        .query_map([], |r| Ok(format!("\"{}\" {}", r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .map(|c| c.replace("\"dap_valid_to\" TEXT", "\"dap_valid_to\" TEXT_NULLABLE"))
        .collect();
    let columns = columns.join(", ").replace("TEXT_NULLABLE", "TEXT");
    conn.execute_batch(&format!(
        "BEGIN;
         CREATE TABLE old_history ({columns});
         INSERT INTO old_history SELECT * FROM \"{view}\";
         DROP VIEW \"{view}\"; DROP TABLE \"{table}__history_ended\"; DROP TABLE \"{table}__history_since\";
         ALTER TABLE old_history RENAME TO \"{view}\";
         CREATE INDEX \"{view}__by_key\" ON \"{view}\" (id);
         COMMIT;"
    ))
    .unwrap();
}

/// A mirror made by an older dap keeps one plain history table: it is read as it is, and the
/// next sync converts it to the split storage without losing or changing a version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_mirrors_history_table_is_read_then_converted_unchanged() {
    let emu = emulator(EmulatorConfig { rows: 30, part_rows: 10, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("canvas.db");
    let url = format!("sqlite://{}", db.display());
    let tables = TABLES.join(",");
    let mut init = vec!["initdb", "--namespace", "canvas", "--table", &tables, "--connection-string", &url];
    init.extend(["--keep-history", "all"]);
    let sync = ["syncdb", "--namespace", "canvas", "--table", &tables, "--connection-string", &url];
    ours_ok(&emu, dir.path(), &init).await;
    let mut times = vec![sync_time(&emu, dir.path()).await];
    for _ in 0..3 {
        commit_round(&emu, "canvas", &TABLES, ROUND);
        ours_ok(&emu, dir.path(), &sync).await;
        times.push(sync_time(&emu, dir.path()).await);
    }
    let all_versions = |d: &Path| {
        let conn = rusqlite::Connection::open(d).unwrap();
        let mut stmt = conn
            .prepare("SELECT * FROM scores__history ORDER BY id, dap_valid_from, dap_valid_to IS NULL, dap_valid_to")
            .unwrap();
        let n = stmt.column_count();
        stmt.query_map([], |r| {
            (0..n)
                .map(|i| r.get::<_, rusqlite::types::Value>(i).map(|v| format!("{v:?}")))
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap()
        .map(Result::unwrap)
        .collect::<Vec<_>>()
    };
    let before = all_versions(&db);
    for table in TABLES {
        make_plain_history_as_older_versions_did(&db, table);
    }
    assert_eq!(all_versions(&db), before, "the plain table holds the same versions");
    assert_as_of_is_the_truth(&emu, dir.path(), &times, "an older mirror's plain history").await;

    commit_round(&emu, "canvas", &TABLES, ROUND);
    ours_ok(&emu, dir.path(), &sync).await;
    times.push(sync_time(&emu, dir.path()).await);
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (views, ended): (i64, i64) = conn
        .query_row(
            "SELECT sum(type = 'view' AND name LIKE '%\\_\\_history' ESCAPE '\\'), sum(name LIKE '%\\_\\_history\\_ended' ESCAPE '\\')
             FROM sqlite_master",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((views, ended), (3, 3), "each history converted to the split storage");
    drop(conn);
    let after = all_versions(&db);
    assert!(after.len() > before.len(), "the sync after the conversion recorded versions");
    let unchanged: Vec<&Vec<String>> = before.iter().filter(|v| !after.contains(v)).collect();
    // Only versions current before the sync may have ended since (their end is new).
    assert!(
        unchanged.iter().all(|v| v.iter().rev().nth(1).is_some_and(|to| to == "Null")),
        "versions that had ended are kept as they were: {unchanged:?}"
    );
    assert_as_of_is_the_truth(&emu, dir.path(), &times, "after the conversion").await;
    for table in TABLES {
        assert_history_agrees(&db, table);
    }
}

/// History turned off keeps what it recorded (a plain table, nothing added while off); turned
/// on again it goes on from then: as of every later sync each table is the truth, each row has
/// one current version, and the versions recorded before the pause are still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_paused_then_resumed_goes_on_from_the_resumption() {
    let emu = emulator(EmulatorConfig { rows: 30, part_rows: 10, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("canvas.db");
    let url = format!("sqlite://{}", db.display());
    let tables = TABLES.join(",");
    let sync = ["syncdb", "--namespace", "canvas", "--table", &tables, "--connection-string", &url];
    let with = |extra: &[&'static str]| {
        let mut args = sync.to_vec();
        args.extend(extra);
        args
    };
    let mut init = vec!["initdb", "--namespace", "canvas", "--table", &tables, "--connection-string", &url];
    init.extend(["--keep-history", "all"]);
    ours_ok(&emu, dir.path(), &init).await;
    commit_round(&emu, "canvas", &TABLES, ROUND);
    ours_ok(&emu, dir.path(), &sync).await;
    let ended_before_pause = version_counts(&db, "scores").0;
    assert!(ended_before_pause > 0, "the first round ended versions");

    // Paused for two rounds: nothing recorded, the plain table keeps what was.
    commit_round(&emu, "canvas", &TABLES, ROUND);
    ours_ok(&emu, dir.path(), &with(&["--no-history", "all"])).await;
    commit_round(&emu, "canvas", &TABLES, ROUND);
    ours_ok(&emu, dir.path(), &sync).await;
    assert_eq!(version_counts(&db, "scores").0, ended_before_pause, "nothing recorded while paused");

    // Resumed: from this sync on, every sync time reads as the truth.
    commit_round(&emu, "canvas", &TABLES, ROUND);
    ours_ok(&emu, dir.path(), &with(&["--keep-history", "all"])).await;
    let mut times = vec![sync_time(&emu, dir.path()).await];
    for _ in 0..2 {
        commit_round(&emu, "canvas", &TABLES, ROUND);
        ours_ok(&emu, dir.path(), &sync).await;
        times.push(sync_time(&emu, dir.path()).await);
    }
    assert_as_of_is_the_truth(&emu, dir.path(), &times, "history resumed").await;
    for table in TABLES {
        assert_history_agrees(&db, table);
    }
    let (ended, _) = version_counts(&db, "scores");
    assert!(ended > ended_before_pause, "the versions before the pause are kept and new ones added");
    // Before the resumption the mirror cannot say: it names when its history begins.
    let out = run_ours(
        &emu,
        dir.path(),
        &["query", "--dir", dir.path().to_str().unwrap(), "--as-of", "2026-01-01T00:00:00Z", "SELECT 1 FROM scores"],
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("begins at"), "{err}");
}

/// The tables the tests of history on servers carry.
const CARRIED: [&str; 2] = ["scores", "enrollments"];

/// An emulator, and a mirror in `dir` of [`CARRIED`] with history on: its file and URL.
async fn mirror_with_history(dir: &Path) -> (Emulator, std::path::PathBuf, String) {
    let emu =
        emulator(EmulatorConfig { rows: 30, part_rows: 20, special_floats: false, ..EmulatorConfig::default() }).await;
    let db = dir.join("canvas.db");
    let url = format!("sqlite://{}", db.display());
    let list = CARRIED.join(",");
    let init = ["initdb", "--namespace", "canvas", "--table", &list, "--keep-history", "all"];
    ours_ok(&emu, dir, &[&init[..], &["--connection-string", &url]].concat()).await;
    (emu, db, url)
}

/// A fresh database on every server the suite has (a mirror file keeps a history of its own).
async fn server_targets(name: &str) -> Vec<crate::common::targets::TestTarget> {
    use crate::common::targets::{Backend, TestTarget, backends};
    let mut targets = Vec::new();
    for b in backends().into_iter().filter(|b| *b != Backend::Sqlite) {
        targets.push(TestTarget::fresh(b, &format!("{name}_{b:?}").to_lowercase()).await);
    }
    targets
}

/// A table's versions as a target's `<table>__history` holds them (and the mirror's view).
fn history_def(def: &TableDef) -> TableDef {
    let mut versions = dap_replica::schema::versions::versions_def(def);
    versions.name = dap_replica::schema::versions::history_name(&def.name);
    versions
}

/// The target's history of `table` is the mirror's, every version, every column (within the
/// target's documented limits); returns how many versions it holds.
async fn assert_target_history(
    emu: &Emulator,
    mirror: &Path,
    target: &crate::common::targets::TestTarget,
    table: &str,
    step: &str,
) -> usize {
    let want = mirror_history_lines(emu, mirror, target, table);
    let got = target_history_lines(emu, target, table).await;
    assert!(
        want == got,
        "{:?} {step}: {table}__history holds {} versions, the mirror's {}:\n{}",
        target.backend,
        got.len(),
        want.len(),
        differences(&want, &got, ["the mirror", "the target"])
    );
    got.len()
}

/// A carry of history that fails at its last statement (the SQL Server test server refusing the
/// removal of pruned versions) leaves the target's copy exactly as it was: one transaction.
async fn assert_failed_carry_changes_nothing(
    emu: &Emulator,
    dir: &Path,
    target: &crate::common::targets::TestTarget,
    args: &[String],
) {
    let versions = history_def(&emu.table_def("canvas", "scores").unwrap());
    let lines = |rows: &[Map<String, Json>]| crate::common::truth::row_lines(&versions, rows, &[]);
    let before = lines(&target.rows(&versions).await);
    let server = target.tds.as_ref().unwrap();
    let refused = "DELETE FROM \"canvas\".\"scores__history\" WHERE \"dap_valid_to\"";
    server.set_faults(crate::common::tds::Faults { statement_error_on: Some(refused.into()), ..Default::default() });
    let out = run_ours(emu, dir, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("scores__history"), "the carry fails, naming the table:\n{err}");
    let after = lines(&target.rows(&versions).await);
    assert!(before == after, "a failed carry changed the copy:\n{}", differences(&before, &after, ["before", "after"]));
}

/// What `replicate --json` says it carried of each table's history, per target and table: its
/// scope and the versions sent.
fn carried(out: &str) -> Vec<(String, String, String, u64)> {
    let reports: Vec<Json> = serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let mut seen = Vec::new();
    for r in &reports {
        for t in r["tables"].as_array().unwrap() {
            let scope = t["history"]["scope"].as_str().unwrap_or("none").to_string();
            let versions = t["history"]["versions"].as_u64().unwrap_or(u64::MAX);
            seen.push((
                r["target"].as_str().unwrap().to_string(),
                t["table"].as_str().unwrap().to_string(),
                scope,
                versions,
            ));
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_with_history_gives_every_server_the_mirrors_history_and_the_official_client_still_syncs() {
    use crate::common::targets::Backend;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (emu, db, url) = mirror_with_history(dir).await;
    let tables = CARRIED;
    let list = tables.join(",");
    let sync = ["syncdb", "--namespace", "canvas", "--table", &list, "--connection-string", &url];
    let targets = server_targets("with_history").await;
    let replicate = |to: Vec<String>| {
        let mut args: Vec<String> =
            ["replicate", "--namespace", "canvas", "--table", &list, "--from", &url].map(String::from).to_vec();
        args.extend(["--with-history", "--non-finite", "null", "--json"].map(String::from));
        for t in to {
            args.extend(["--to".to_string(), t]);
        }
        args
    };
    let urls: Vec<String> = targets.iter().map(|t| t.url.clone()).collect();

    // A mirror file keeps its own history: refused before anything is written.
    let other = dir.join("other.db");
    let out = run_ours(
        &emu,
        dir,
        &replicate(vec![format!("sqlite://{}", other.display())]).iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--with-history") && err.contains("keep-history"), "{err}");
    assert!(!other.exists(), "nothing was created for a refused target");

    // `dap status --to` says, per target, whether its history copy is absent, behind or current.
    let copies = |want: &'static str, step: &'static str| {
        let (emu, url, urls) = (&emu, url.clone(), urls.clone());
        async move {
            let n = urls.len();
            let mut args = vec!["status".to_string(), "--json".into(), "--namespace".into(), "canvas".into()];
            args.extend(["--connection-string".to_string(), url]);
            for u in urls {
                args.extend(["--to".to_string(), u]);
            }
            let out = ours_ok(emu, dir, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
            let report: Json = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
            let mut seen = 0;
            for row in report.as_array().unwrap().iter().filter(|r| CARRIED.contains(&r["table"].as_str().unwrap())) {
                for t in row["targets"].as_array().unwrap() {
                    assert_eq!(t["history"]["state"], want, "{step}: {} on {}: {out}", row["table"], t["target"]);
                    assert_eq!(t["history"]["latest"].is_null(), want == "absent", "{step}: {out}");
                    seen += 1;
                }
            }
            assert_eq!(seen, CARRIED.len() * n, "{step}: every table on every target: {out}");
        }
    };
    copies("absent", "before any replicate --with-history").await;

    let mut scores_held = Vec::new();
    for round in 0..5 {
        let step = match round {
            0 => "the first copy",
            1 => "a round of changes",
            2 => "a schema change of enrollments",
            3 => "ten days later, the mirror pruning versions older than 7 days",
            _ => "a re-snapshot of scores in the mirror",
        };
        match round {
            0 => {}
            1 => commit_round(&emu, "canvas", &tables, ROUND),
            2 => {
                emu.evolve("canvas", "enrollments", SchemaChange::AddColumn).unwrap();
                commit_round(&emu, "canvas", &tables, ROUND);
            }
            4 => commit_round(&emu, "canvas", &tables, ROUND),
            _ => {
                let now = watermark(&emu, dir, "scores").await;
                let later = dap_replica::time::parse_rfc3339(&now).unwrap() + 10 * 86_400_000_000;
                emu.commit_at("canvas", "scores", ChangeCounts { updates: 3, ..Default::default() }, later).unwrap();
            }
        }
        match round {
            0 => {}
            3 => {
                ours_ok(&emu, dir, &[&sync[..], &["--history-days", "7"]].concat()).await;
            }
            4 => {
                ours_ok(&emu, dir, &sync).await;
                let replace = ["initdb", "--namespace", "canvas", "--table", "scores", "--replace"];
                ours_ok(&emu, dir, &[&replace[..], &["--connection-string", &url]].concat()).await;
            }
            1 => {
                // The fan-out of the sync carries history as `replicate --with-history` does.
                let mut fan_out: Vec<&str> = vec!["--replicate-with-history", "--non-finite", "null"];
                for u in &urls {
                    fan_out.extend(["--replicate-to", u]);
                }
                ours_ok(&emu, dir, &[&sync[..], &fan_out].concat()).await;
                for t in &targets {
                    for table in tables {
                        assert_target_history(&emu, &db, t, table, "the fan-out of a syncdb").await;
                    }
                }
            }
            _ => {
                ours_ok(&emu, dir, &sync).await;
            }
        }
        if round == 3
            && let Some(t) = targets.iter().find(|t| t.tds.is_some())
        {
            assert_failed_carry_changes_nothing(&emu, dir, t, &replicate(vec![t.url.clone()])).await;
        }
        if round == 2 {
            copies("behind", "the mirror synced changes the copies lack").await;
        }
        let args = replicate(urls.clone());
        let out = ours_ok(&emu, dir, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
        if round == 0 {
            copies("current", "after the first replicate --with-history").await;
        }
        let scopes = carried(&out);
        assert_eq!(scopes.len(), targets.len() * tables.len(), "{out}");
        for (target, table, scope, versions) in &scopes {
            // After the fan-out nothing is left to carry; a MySQL copy keeps whole seconds, so
            // the keys of the last commit within its last second are carried again (the same
            // versions, replaced).
            if round == 1 && !target.starts_with("mysql:") {
                assert_eq!(*versions, 0, "after the fan-out, nothing is left to carry: {out}");
            }
            let expected = match (round, table.as_str()) {
                (0, _) | (2, "enrollments") | (4, "scores") => "whole",
                _ => "of_keys",
            };
            assert_eq!(scope, expected, "{step}: {table} to {target}: {out}");
        }
        for t in &targets {
            for table in tables {
                let held = assert_target_history(&emu, &db, t, table, step).await;
                assert!(held > 0, "{step}: {table}__history holds versions");
                if table == "scores" {
                    scores_held.push((round, held));
                }
            }
        }
    }
    // The prune reached the targets: fewer versions after it than before, though it added three.
    let at = |round: u32| scores_held.iter().filter(|(r, _)| *r == round).map(|(_, n)| *n).collect::<Vec<_>>();
    assert!(at(3).iter().zip(at(2)).all(|(after, before)| *after < before), "{scores_held:?}");

    // The official client syncs a database that holds history tables, and leaves them alone.
    for t in targets.iter().filter(|t| matches!(t.backend, Backend::Postgres | Backend::Mysql)) {
        official_ok(
            &emu,
            dir,
            &["syncdb", "--namespace", "canvas", "--table", "enrollments", "--connection-string", &t.url],
        )
        .await;
        let def = emu.table_def("canvas", "enrollments").unwrap();
        // asyncpg writes the first and last timestamps as -infinity and infinity.
        let mut limits = t.limits().to_vec();
        if t.backend == Backend::Postgres {
            limits.push(Limit::InfinityAtTheEnds);
        }
        assert_same_rows_within(
            &def,
            &t.rows(&def).await,
            &emu.truth("canvas", "enrollments").unwrap(),
            "after the official client's syncdb",
            &limits,
        );
        assert_target_history(&emu, &db, t, "enrollments", "after the official client's syncdb").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicates_with_history_at_once_leave_each_servers_copy_equal_to_the_mirrors() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (emu, db, url) = mirror_with_history(dir).await;
    let tables = CARRIED;
    let list = tables.join(",");
    commit_round(&emu, "canvas", &tables, ROUND);
    ours_ok(&emu, dir, &["syncdb", "--namespace", "canvas", "--table", &list, "--connection-string", &url]).await;
    let targets = server_targets("history_at_once").await;
    let mut args: Vec<&str> = vec!["replicate", "--namespace", "canvas", "--table", &list, "--from", &url];
    args.extend(["--with-history", "--non-finite", "null"]);
    for t in &targets {
        args.extend(["--to", &t.url]);
    }
    // Two writers of the same tables and histories, started together: each table's lock orders
    // them; the second finds the first one's copy and carries what it lacks (nothing).
    let (first, second) =
        tokio::join!(ours_command(&emu, dir).args(&args).output(), ours_command(&emu, dir).args(&args).output());
    for out in [first.unwrap(), second.unwrap()] {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    for t in &targets {
        for table in tables {
            let held = assert_target_history(&emu, &db, t, table, "after two replicates at once").await;
            assert!(held > 30, "{table}: the versions of the round are there ({held})");
        }
    }
}

/// What a target's copy of a history may differ in from the mirror's: its documented limits,
/// and no negative zero (the mirror's SQLite keeps none).
fn history_limits(target: &crate::common::targets::TestTarget) -> Vec<Limit> {
    let mut limits = target.limits().to_vec();
    limits.push(Limit::NoNegativeZero);
    limits
}

/// A target's history of `table` as comparable lines.
async fn target_history_lines(emu: &Emulator, target: &crate::common::targets::TestTarget, table: &str) -> Vec<String> {
    let versions = history_def(&emu.table_def("canvas", table).unwrap());
    crate::common::truth::row_lines(&versions, &target.rows(&versions).await, &history_limits(target))
}

/// The mirror's history of `table` in the form [`target_history_lines`] gives for `target`.
fn mirror_history_lines(
    emu: &Emulator,
    mirror: &Path,
    target: &crate::common::targets::TestTarget,
    table: &str,
) -> Vec<String> {
    let versions = history_def(&emu.table_def("canvas", table).unwrap());
    let rows = crate::common::truth::sqlite_rows(mirror, &versions);
    crate::common::truth::row_lines(&versions, &rows, &history_limits(target))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_anywhere_in_a_carry_leaves_each_copy_old_or_new_and_a_rerun_converges() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (emu, db, url) = mirror_with_history(dir).await;
    let list = CARRIED.join(",");
    let targets = server_targets("carry_kill").await;
    let mut args: Vec<String> =
        ["replicate", "--namespace", "canvas", "--table", &list, "--from", &url].map(String::from).to_vec();
    args.extend(["--with-history", "--non-finite", "null"].map(String::from));
    for t in &targets {
        args.extend(["--to".to_string(), t.url.clone()]);
    }
    // The first copy, timed to spread the kill points over a run.
    let started = std::time::Instant::now();
    ours_ok(&emu, dir, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let span = started.elapsed().max(std::time::Duration::from_millis(200));
    let mut old = Vec::new();
    for t in &targets {
        for table in CARRIED {
            old.push(target_history_lines(&emu, t, table).await);
        }
    }
    // The mirror moves on: two rounds of changes, so that every key's versions are replaced.
    for _ in 0..2 {
        commit_round(&emu, "canvas", &CARRIED, ROUND);
        ours_ok(&emu, dir, &["syncdb", "--namespace", "canvas", "--table", &list, "--connection-string", &url]).await;
    }
    let new: Vec<Vec<String>> =
        targets.iter().flat_map(|t| CARRIED.map(|table| mirror_history_lines(&emu, &db, t, table))).collect();
    assert!(old.iter().zip(&new).all(|(o, n)| o != n), "the rounds changed every history");

    let mut rng = fastrand::Rng::with_seed(20261206);
    let mut outcomes = (0, 0);
    for kill in 0..12 {
        // Every other kill at a random point of a run; the others within 30 ms of a carry's
        // start (its scratch load and its transaction are a small part of a run).
        let after = if kill % 2 == 0 {
            let after = span.mul_f64(rng.f64() * 1.2);
            let mut child = ours_command(&emu, dir).args(&args).stderr(std::process::Stdio::null()).spawn().unwrap();
            tokio::select! {
                _ = child.wait() => {}
                _ = tokio::time::sleep(after) => { child.start_kill().unwrap(); child.wait().await.unwrap(); }
            }
            format!("{after:?}")
        } else {
            let mut cmd = ours_command(&emu, dir);
            cmd.args(&args);
            let mut child = Watched::spawn(cmd);
            child.wait_for("carrying history").await;
            let after = std::time::Duration::from_millis(rng.u64(0..30));
            tokio::time::sleep(after).await;
            unsafe { libc::kill(child.pid() as i32, libc::SIGKILL) };
            child.finish().await;
            format!("{after:?} after a carry began")
        };
        let mut i = 0;
        for t in &targets {
            for table in CARRIED {
                let now = target_history_lines(&emu, t, table).await;
                if now == new[i] {
                    outcomes.1 += 1;
                } else {
                    assert!(
                        now == old[i],
                        "kill {kill} at {after}: {:?} {table}__history is neither the copy before nor the mirror's:\n{}",
                        t.backend,
                        differences(&old[i], &now, ["before", "after the kill"])
                    );
                    outcomes.0 += 1;
                }
                i += 1;
            }
        }
    }
    eprintln!("after the kills: {} copies as before, {} as the mirror's", outcomes.0, outcomes.1);
    ours_ok(&emu, dir, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    for t in &targets {
        for table in CARRIED {
            assert_target_history(&emu, &db, t, table, "the rerun after the kills").await;
        }
    }
}
