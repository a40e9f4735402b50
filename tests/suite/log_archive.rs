//! web_logs kept past DAP's 30-day window. The emulator keeps logs for 30 days as DAP does
//! (snapshots hold the window, older incrementals are out of range); over 90 days of commits
//! and syncs with `initdb --replace`, `--auto-reinit`, a re-snapshot after a schema change and a
//! 40-day pause, every target holds every log ever delivered (the emulator's full history, not
//! its window) except exactly those no sync could fetch, and the mirror names that gap. The same
//! through `dap replicate`.

use std::path::Path;

use crate::common;

use common::targets::{Backend, TestTarget, backends};
use common::truth;
use common::*;
use dap_replica::emulator::{ChangeCounts, Emulator, EmulatorConfig, FaultKind, FaultSpec, SchemaChange};
use dap_replica::time::{self, Micros};
use serde_json::{Map, Value as Json};

const DAY: Micros = 86_400_000_000;
const NS: &str = "canvas_logs";
const TABLE: &str = "web_logs";

fn config() -> EmulatorConfig {
    EmulatorConfig { rows: 40, part_rows: 25, ..EmulatorConfig::default() }
}

/// Four logs on each of `days` (days after the anchor, the emulator's clock moving with them).
fn logs_on(emu: &Emulator, days: impl IntoIterator<Item = i64>) {
    for day in days {
        let at = emu.config().anchor + day * DAY;
        emu.commit_at(NS, TABLE, ChangeCounts { inserts: 4, ..Default::default() }, at).unwrap();
    }
}

/// A log's request time.
fn time_of(row: &Map<String, Json>) -> Option<Micros> {
    row.get("timestamp").and_then(Json::as_str).and_then(|s| time::parse_rfc3339(s).ok())
}

/// Every log ever committed (logs are never deleted upstream), less those requested strictly
/// inside `missing`.
fn every_log_but(emu: &Emulator, missing: Option<(Micros, Micros)>) -> Vec<Map<String, Json>> {
    let all = emu.truth(NS, TABLE).unwrap();
    all.into_iter()
        .filter(|r| !missing.is_some_and(|(after, before)| time_of(r).is_some_and(|t| t > after && t < before)))
        .collect()
}

async fn dap(emu: &Emulator, dir: &Path, t: &TestTarget, command: &str, extra: &[&str]) -> String {
    let mut args = vec![command, "--namespace", NS, "--table", TABLE, "--connection-string", &t.url];
    args.extend(extra);
    args.extend(t.dap_options());
    ours_ok(emu, dir, &args).await
}

/// The `archive` entry of web_logs in `dap status --json`.
async fn archive_status(emu: &Emulator, dir: &Path, url: &str) -> Json {
    let out = ours_ok(emu, dir, &["status", "--json", "--namespace", NS, "--connection-string", url]).await;
    let rows: Vec<Json> = serde_json::from_str(&out).unwrap();
    rows.into_iter().find(|r| r["table"] == TABLE).unwrap_or_else(|| panic!("web_logs in {out}"))["archive"].clone()
}

async fn every_log_survives_resnapshots_and_a_pause_names_its_gap(backend: Backend) {
    let emu = emulator(config()).await;
    let dir = tempfile::tempdir().unwrap();
    let t = TestTarget::fresh(backend, "log_archive").await;
    let def = || emu.table_def(NS, TABLE).unwrap();
    dap(&emu, dir.path(), &t, "initdb", &[]).await;
    t.assert_rows(&def(), &every_log_but(&emu, None), &format!("{backend:?}: initdb")).await;

    // Syncs within the window.
    logs_on(&emu, [3, 6, 9]);
    dap(&emu, dir.path(), &t, "syncdb", &[]).await;
    logs_on(&emu, [12, 15]);
    dap(&emu, dir.path(), &t, "syncdb", &[]).await;

    // A new snapshot on day 36 holds days 6..36 only; the base logs and day 3 stay.
    logs_on(&emu, (18..=36).step_by(3));
    dap(&emu, dir.path(), &t, "initdb", &["--replace"]).await;
    t.assert_rows(&def(), &every_log_but(&emu, None), &format!("{backend:?}: after initdb --replace")).await;

    // DAP asking for a new snapshot, taken by --auto-reinit.
    logs_on(&emu, [39, 42]);
    emu.inject(FaultSpec::new(FaultKind::OutOfRange, 1));
    dap(&emu, dir.path(), &t, "syncdb", &["--auto-reinit"]).await;
    t.assert_rows(&def(), &every_log_but(&emu, None), &format!("{backend:?}: after --auto-reinit")).await;

    // A schema change, then a new snapshot: older logs stay, NULL in the new column.
    emu.evolve(NS, TABLE, SchemaChange::AddColumn).unwrap();
    logs_on(&emu, [45, 48]);
    dap(&emu, dir.path(), &t, "initdb", &["--replace"]).await;
    t.assert_rows(&def(), &every_log_but(&emu, None), &format!("{backend:?}: after a schema change")).await;
    let last_sync = emu.config().anchor + 48 * DAY;

    // 42 days without a sync: on day 90 DAP has logs from day 60 on. The sync takes a new
    // snapshot by itself (nothing is lost by it) and only days 51..57 are missing.
    logs_on(&emu, (51..=90).step_by(3));
    dap(&emu, dir.path(), &t, "syncdb", &[]).await;
    let window_start = emu.config().anchor + 60 * DAY;
    let missing = every_log_but(&emu, None).len() - every_log_but(&emu, Some((last_sync, window_start))).len();
    assert_eq!(missing, 12, "the logs of days 51, 54 and 57 left DAP's window unsynced");
    let expected = every_log_but(&emu, Some((last_sync, window_start)));
    t.assert_rows(&def(), &expected, &format!("{backend:?}: after a 42-day pause")).await;
    if backend == Backend::Sqlite {
        // The analysts' indexes, through re-snapshots and a schema change, used by the questions.
        let conn = rusqlite::Connection::open(t.file()).unwrap();
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'web_logs' AND sql IS NOT NULL ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(indexes, ["web_logs__by_course", "web_logs__by_time", "web_logs__by_user"]);
        let plan: String = conn
            .query_row("EXPLAIN QUERY PLAN SELECT * FROM web_logs WHERE user_id = 1 AND timestamp > '2026'", [], |r| {
                r.get(3)
            })
            .unwrap();
        assert!(plan.contains("web_logs__by_user"), "{plan}");
        let archive = archive_status(&emu, dir.path(), &t.url).await;
        let gaps = archive["gaps"].as_array().unwrap_or_else(|| panic!("gaps in {archive}"));
        let when = |v: &Json| v.as_str().and_then(|s| time::parse_rfc3339(s).ok());
        let gap = gaps.iter().find(|g| when(&g["after"]) == Some(last_sync));
        let gap = gap.unwrap_or_else(|| panic!("a gap after the last sync in {archive}"));
        assert_eq!(when(&gap["before"]), Some(window_start), "{archive}");
        // Exactly the period no sync could fetch: every log inside it is missing, none outside.
        let truth = every_log_but(&emu, None);
        let inside = |r: &&Map<String, Json>| time_of(r).is_some_and(|t| t > last_sync && t < window_start);
        assert_eq!(truth.iter().filter(inside).count(), missing);
        assert!(archive["newest"].is_string() && archive["oldest"].is_string(), "{archive}");
    }

    // And syncs go on as before.
    logs_on(&emu, [93]);
    dap(&emu, dir.path(), &t, "syncdb", &[]).await;
    let expected = every_log_but(&emu, Some((last_sync, window_start)));
    t.assert_rows(&def(), &expected, &format!("{backend:?}: a sync after the gap")).await;
}

crate::each_backend!(every_log_survives_resnapshots_and_a_pause_names_its_gap);

/// A re-snapshot of web_logs killed (SIGKILL) anywhere leaves every target either as it was or
/// with every log: never the window alone (the older logs carried over in the same publish),
/// never half of it; a rerun completes it.
async fn a_resnapshot_killed_anywhere_keeps_the_old_logs(backend: Backend) {
    let emu = emulator(EmulatorConfig { rows: 400, part_rows: 40, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let (t, probe) = (
        TestTarget::fresh(backend, "log_archive_kill").await,
        TestTarget::fresh(backend, "log_archive_kill_probe").await,
    );
    let def = emu.table_def(NS, TABLE).unwrap();
    let lines = |rows: &[Map<String, Json>]| truth::row_lines(&def, rows, t.limits());
    for target in [&t, &probe] {
        dap(&emu, dir.path(), target, "initdb", &[]).await;
    }
    // Synced within DAP's window (the initdb's watermark is 27 days old).
    logs_on(&emu, (3..=27).step_by(3));
    for target in [&t, &probe] {
        dap(&emu, dir.path(), target, "syncdb", &[]).await;
    }
    // Three days more, then a re-snapshot: it holds days 12..42, and carries the rest over.
    logs_on(&emu, [33, 39, 42]);
    let replace = |url: &str| {
        let mut cmd = ours_command(&emu, dir.path());
        cmd.args(["initdb", "--replace", "--namespace", NS, "--table", TABLE, "--connection-string", url]);
        cmd.args(t.dap_options()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        cmd
    };
    let started = std::time::Instant::now();
    assert!(replace(&probe.url).status().await.unwrap().success());
    let span = started.elapsed();
    let old = lines(&t.rows(&def).await);
    let every = lines(&every_log_but(&emu, None));
    assert_ne!(old, every, "the re-snapshot changes the table");
    let mut rng = fastrand::Rng::with_seed(20261205);
    let mut seen_old = false;
    for kill in 0..8 {
        let after = span.mul_f64(0.2 + rng.f64() * 0.9);
        let mut child = replace(&t.url).spawn().unwrap();
        tokio::select! {
            _ = child.wait() => {}
            _ = tokio::time::sleep(after) => { child.start_kill().unwrap(); child.wait().await.unwrap(); }
        }
        let now = lines(&t.rows(&def).await);
        seen_old |= now == old;
        assert!(
            now == old || now == every,
            "{backend:?}: kill {kill} after {after:?}: web_logs is neither as it was nor every log\n{}",
            differences(&now, &every, ["the target", "every log"])
        );
    }
    assert!(replace(&t.url).status().await.unwrap().success());
    assert_eq!(lines(&t.rows(&def).await), every, "{backend:?}: the rerun completes it");
    eprintln!("{backend:?}: a kill left the old state {seen_old}");
}

crate::each_backend!(a_resnapshot_killed_anywhere_keeps_the_old_logs);

/// Two writers at once on web_logs: two `initdb --replace` and a `syncdb`, started together on
/// the same target, end with every log (never the window alone, never a log twice), whichever
/// order the lock gives them.
async fn two_writers_on_the_log_table_keep_every_log(backend: Backend) {
    let emu = emulator(config()).await;
    let dir = tempfile::tempdir().unwrap();
    let t = TestTarget::fresh(backend, "log_archive_writers").await;
    let def = emu.table_def(NS, TABLE).unwrap();
    dap(&emu, dir.path(), &t, "initdb", &[]).await;
    logs_on(&emu, (3..=27).step_by(3));
    dap(&emu, dir.path(), &t, "syncdb", &[]).await;
    logs_on(&emu, [33, 39, 42]);
    let command = |verb: &str, extra: &[&str]| {
        let mut cmd = ours_command(&emu, dir.path());
        cmd.args([verb, "--namespace", NS, "--table", TABLE, "--connection-string", &t.url]);
        cmd.args(extra).args(t.dap_options());
        cmd
    };
    let (a, b, c) = tokio::join!(
        command("initdb", &["--replace"]).output(),
        command("initdb", &["--replace"]).output(),
        command("syncdb", &[]).output(),
    );
    for out in [a.unwrap(), b.unwrap(), c.unwrap()] {
        assert!(out.status.success(), "{backend:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    t.assert_rows(&def, &every_log_but(&emu, None), &format!("{backend:?}: after three writers at once")).await;
}

crate::each_backend!(two_writers_on_the_log_table_keep_every_log);

/// A mirror re-snapshotted by `initdb --replace` outside the window and replicated to every
/// target: each target holds every log the mirror holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_carries_every_kept_log_to_every_target() {
    let emu = emulator(config()).await;
    let dir = tempfile::tempdir().unwrap();
    let mirror = format!("sqlite://{}", dir.path().join("canvas_logs.db").display());
    let mut targets = Vec::new();
    for backend in backends() {
        targets.push(TestTarget::fresh(backend, "log_archive_replicate").await);
    }
    let replicate = |targets: &[TestTarget]| {
        let mut args: Vec<String> =
            ["replicate", "--namespace", NS, "--table", TABLE, "--from", &mirror, "--non-finite", "null"]
                .map(String::from)
                .to_vec();
        for t in targets {
            args.extend(["--to".to_string(), t.url.clone()]);
        }
        args
    };
    let on_mirror = |command: &str, extra: &[&str]| {
        let mut args = vec![command.to_string(), "--namespace".into(), NS.into(), "--table".into(), TABLE.into()];
        args.extend(["--connection-string".to_string(), mirror.clone()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let run = |args: Vec<String>| {
        let (emu, dir) = (&emu, dir.path());
        async move { ours_ok(emu, dir, &args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    run(on_mirror("initdb", &[])).await;
    run(replicate(&targets)).await;
    logs_on(&emu, [5, 10]);
    run(on_mirror("syncdb", &[])).await;
    logs_on(&emu, (15..=45).step_by(5));
    run(on_mirror("initdb", &["--replace"])).await;
    run(replicate(&targets)).await;
    let def = emu.table_def(NS, TABLE).unwrap();
    let everything = every_log_but(&emu, None);
    for t in &targets {
        t.assert_rows(&def, &everything, &format!("{:?}: replicated after initdb --replace", t.backend)).await;
    }
    // The mirror lost nothing when it started its table over: a replica file names no gap.
    let replica = targets.iter().find(|t| t.backend == Backend::Sqlite).unwrap();
    let archive = archive_status(&emu, dir.path(), &replica.url).await;
    assert_eq!(archive["gaps"], serde_json::json!([]), "{archive}");
    logs_on(&emu, [50]);
    run(on_mirror("syncdb", &[])).await;
    run(replicate(&targets)).await;
    for t in &targets {
        t.assert_rows(&def, &every_log_but(&emu, None), &format!("{:?}: replicated after a sync", t.backend)).await;
    }
}

/// Every partition of an archive as pyarrow reads it: `{day: [(id, timestamp in µs)]}`, sorted
/// by id; DuckDB's count per `date` (hive partitioning) beside it when its package is there.
fn read_archive(to: &Path) -> (Json, Option<Json>) {
    let has_parts =
        std::fs::read_dir(to).into_iter().flatten().flatten().any(|day| day.path().join("part-0.parquet").exists());
    if !has_parts {
        return (serde_json::json!({}), None);
    }
    let script = r#"
import json, sys
from datetime import datetime, timedelta, timezone
import pyarrow.dataset as ds
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
d = ds.dataset(sys.argv[1], format="parquet", partitioning="hive")
t = d.to_table(columns=["date", "id", "timestamp"])
out = {}
for r in t.to_pylist():
    ts = r["timestamp"]
    micros = None if ts is None else (ts - EPOCH) // timedelta(microseconds=1)
    out.setdefault(str(r["date"]), []).append([r["id"], micros])
for v in out.values():
    v.sort()
try:
    import duckdb
    rows = duckdb.sql(f"SELECT CAST(date AS VARCHAR), count(*) FROM read_parquet('{sys.argv[1]}/**/*.parquet', hive_partitioning = true) GROUP BY 1").fetchall()
    duck = {d: n for d, n in rows}
except ImportError:
    duck = None
print(json.dumps({"days": out, "duckdb": duck}))
"#;
    let py = std::process::Command::new(official_python()).args(["-c", script, to.to_str().unwrap()]).output().unwrap();
    let listing = || -> Vec<String> {
        let mut all = Vec::new();
        for day in std::fs::read_dir(to).into_iter().flatten().flatten() {
            all.push(day.file_name().to_string_lossy().into_owned());
            for f in std::fs::read_dir(day.path()).into_iter().flatten().flatten() {
                all.push(format!("  {}", f.file_name().to_string_lossy()));
            }
        }
        all
    };
    assert!(py.status.success(), "reading {} ({:?}): {}", to.display(), listing(), String::from_utf8_lossy(&py.stderr));
    let read: Json = serde_json::from_slice(&py.stdout).unwrap();
    let duck = Some(read["duckdb"].clone()).filter(|d| !d.is_null());
    if duck.is_none() {
        crate::common::targets::missing("DuckDB is not installed beside the official client");
    }
    (read["days"].clone(), duck)
}

/// The mirror's logs as the archive should hold them: `{day: [(id, timestamp in µs)]}`.
fn mirror_days(db: &Path) -> Json {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn.prepare("SELECT id, timestamp FROM web_logs").unwrap();
    let mut days: std::collections::BTreeMap<String, Vec<(String, Micros)>> = Default::default();
    for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).unwrap() {
        let (id, ts) = row.unwrap();
        days.entry(ts[..10].to_string()).or_default().push((id, time::parse_rfc3339(&ts).unwrap()));
    }
    for v in days.values_mut() {
        v.sort();
    }
    serde_json::to_value(days).unwrap()
}

async fn archive(emu: &Emulator, dir: &Path, mirror: &Path, to: &Path) -> Json {
    let (m, t) = (mirror.to_str().unwrap(), to.to_str().unwrap());
    let out =
        ours_ok(emu, dir, &["archive", "--namespace", NS, "--table", TABLE, "--dir", m, "--to", t, "--json"]).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn days_written(report: &Json) -> Vec<String> {
    report["written"].as_array().unwrap().iter().map(|d| d["day"].as_str().unwrap().to_string()).collect()
}

/// `dap archive` read back by pyarrow (and DuckDB when its package is installed) equals the
/// mirror day by day; a rerun writes nothing; new logs rewrite only the days they fall on; a
/// kill mid-archive leaves only whole partitions, and the next run completes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archive_equals_the_mirror_day_by_day_and_reruns_write_only_what_changed() {
    let emu = emulator(config()).await;
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("mirror");
    std::fs::create_dir_all(&mirror).unwrap();
    let db = mirror.join("canvas_logs.db");
    let url = format!("sqlite://{}", db.display());
    let on_mirror = |command: &'static str| {
        let url = url.clone();
        let (emu, dir) = (&emu, dir.path());
        async move { ours_ok(emu, dir, &[command, "--namespace", NS, "--table", TABLE, "--connection-string", &url]).await }
    };
    on_mirror("initdb").await;
    let hours = |day: i64, hour: i64| emu.config().anchor + day * DAY + hour * 3_600_000_000;
    for day in 1..=5 {
        emu.commit_at(NS, TABLE, ChangeCounts { inserts: 5, ..Default::default() }, hours(day, 3)).unwrap();
    }
    on_mirror("syncdb").await;

    let to = dir.path().join("archive");
    let first = archive(&emu, dir.path(), &mirror, &to).await;
    let (read, duck) = read_archive(&to);
    let expected = mirror_days(&db);
    assert_eq!(read, expected, "the archive holds the mirror's logs, each on its day");
    assert_eq!(days_written(&first).len(), expected.as_object().unwrap().len());
    if let Some(duck) = duck {
        for (day, rows) in expected.as_object().unwrap() {
            assert_eq!(duck[day].as_u64(), Some(rows.as_array().unwrap().len() as u64), "DuckDB's {day}");
        }
    }
    let today = time::format_wire(hours(5, 0))[..10].to_string();
    let written = first["written"].as_array().unwrap();
    let today_entry = written.iter().find(|d| d["day"] == today.as_str()).unwrap();
    assert_eq!(today_entry["complete"], false, "the watermark's own day is still filling");
    let yesterday = time::format_wire(hours(4, 0))[..10].to_string();
    assert_eq!(written.iter().find(|d| d["day"] == yesterday.as_str()).unwrap()["complete"], true);

    // Nothing new: nothing written, no file touched.
    let part = |day: &str| to.join(format!("date={day}")).join("part-0.parquet");
    let modified = |day: &str| std::fs::metadata(part(day)).unwrap().modified().unwrap();
    let before = modified(&yesterday);
    let again = archive(&emu, dir.path(), &mirror, &to).await;
    assert!(days_written(&again).is_empty(), "a rerun writes nothing: {again}");
    assert_eq!(modified(&yesterday), before);

    // Later logs of the same day and of the next: only those two days are written again.
    emu.commit_at(NS, TABLE, ChangeCounts { inserts: 3, ..Default::default() }, hours(5, 9)).unwrap();
    emu.commit_at(NS, TABLE, ChangeCounts { inserts: 3, ..Default::default() }, hours(6, 2)).unwrap();
    on_mirror("syncdb").await;
    let third = archive(&emu, dir.path(), &mirror, &to).await;
    let tomorrow = time::format_wire(hours(6, 0))[..10].to_string();
    assert_eq!(days_written(&third), [today.clone(), tomorrow], "{third}");
    assert_eq!(modified(&yesterday), before, "a complete day is written once");
    assert_eq!(read_archive(&to).0, mirror_days(&db));

    // Killed at different moments, an archive holds whole partitions only, each equal to the
    // mirror's day; the next run completes it.
    for delay_ms in [5u64, 30, 80] {
        let fresh = dir.path().join(format!("killed_{delay_ms}"));
        let (m, t) = (mirror.to_str().unwrap().to_string(), fresh.to_str().unwrap().to_string());
        let mut child = ours_command(&emu, dir.path())
            .args(["archive", "--namespace", NS, "--table", TABLE, "--dir", &m, "--to", &t])
            .spawn()
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
        let _ = child.start_kill();
        let _ = child.wait().await;
        if fresh.exists() {
            let (read, _) = read_archive(&fresh);
            let mirror_now = mirror_days(&db);
            for (day, rows) in read.as_object().unwrap() {
                assert_eq!(Some(rows), mirror_now.get(day), "killed after {delay_ms} ms: {day} is whole");
            }
        }
        archive(&emu, dir.path(), &mirror, &fresh).await;
        assert_eq!(read_archive(&fresh).0, mirror_days(&db), "completed after a kill at {delay_ms} ms");
    }
}

/// `syncdb --keep-days N` bounds the mirror without losing a log: it removes only old days the
/// archive holds whole (complete, the same rows, its file there), keeps the others saying why,
/// never sends the removed logs to targets as deletes, and a later archive leaves the removed
/// days' partitions as they are. Every log ever delivered is in the mirror or the archive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_days_removes_only_days_the_archive_holds_whole() {
    let emu = emulator(config()).await;
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("mirror");
    std::fs::create_dir_all(&mirror).unwrap();
    let db = mirror.join("canvas_logs.db");
    let url = format!("sqlite://{}", db.display());
    let replica = format!("sqlite://{}", dir.path().join("replica").join("canvas_logs.db").display());
    let run = |args: Vec<&str>| {
        let (emu, dir) = (&emu, dir.path());
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        async move { run_ours(emu, dir, &args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    let on_mirror = |command: &'static str, extra: &'static [&'static str]| {
        let mut args = vec![command, "--namespace", NS, "--table", TABLE, "--connection-string", &url];
        args.extend(extra);
        args
    };
    let ok = |out: std::process::Output| {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let hours = |day: i64, hour: i64| emu.config().anchor + day * DAY + hour * 3_600_000_000;
    let day_name = |day: i64| time::format_wire(hours(day, 0))[..10].to_string();
    ok(run(on_mirror("initdb", &[])).await);
    for day in 1..=10 {
        emu.commit_at(NS, TABLE, ChangeCounts { inserts: 5, ..Default::default() }, hours(day, 3)).unwrap();
    }
    ok(run(on_mirror("syncdb", &[])).await);
    ok(run(vec!["replicate", "--namespace", NS, "--table", TABLE, "--from", &url, "--to", &replica]).await);
    let def = emu.table_def(NS, TABLE).unwrap();
    let everything = || every_log_but(&emu, None);

    // Bad input first: a server target, a namespace without logs; nothing is created.
    let server = "postgresql://nobody@127.0.0.1:1/none";
    let out =
        run(vec!["syncdb", "--namespace", NS, "--table", TABLE, "--connection-string", server, "--keep-days", "3"])
            .await;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("bounds the local mirror"));
    let other = format!("sqlite://{}", dir.path().join("never.db").display());
    let out = run(vec![
        "syncdb",
        "--namespace",
        "canvas",
        "--table",
        "users",
        "--connection-string",
        &other,
        "--keep-days",
        "3",
    ])
    .await;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not a log namespace"));
    assert!(!dir.path().join("never.db").exists());

    // Nothing archived yet: nothing removed, and the run says how to archive.
    let said = ok(run(on_mirror("syncdb", &["--keep-days", "3"])).await);
    assert!(said.contains("kept, as no archive holds them whole") && said.contains("dap archive"), "{said}");
    let rows = |db: &Path| truth::sqlite_rows(db, &def);
    truth::assert_same_rows(&def, &rows(&db), &everything(), "nothing archived, nothing removed");

    // Archived; then day 2's partition goes missing and day 3 gets a log the archive lacks.
    let to = dir.path().join("archive");
    archive(&emu, dir.path(), &mirror, &to).await;
    std::fs::remove_file(to.join(format!("date={}", day_name(2))).join("part-0.parquet")).unwrap();
    let late = "INSERT INTO web_logs SELECT * FROM web_logs WHERE substr(timestamp, 1, 10) = ?1 LIMIT 1";
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch("CREATE TEMP TABLE late AS SELECT * FROM web_logs WHERE 0").unwrap();
    conn.execute(&late.replace("INSERT INTO web_logs", "INSERT INTO late"), [day_name(3)]).unwrap();
    conn.execute("UPDATE late SET id = '00000000-0000-4000-8000-00000000cafe'", []).unwrap();
    conn.execute("INSERT INTO web_logs SELECT * FROM late", []).unwrap();
    drop(conn);
    let archived_before = read_archive(&to).0;

    emu.commit_at(NS, TABLE, ChangeCounts { inserts: 5, ..Default::default() }, hours(11, 3)).unwrap();
    let out = run(on_mirror("syncdb", &["--keep-days", "3", "--json"])).await;
    let said = ok(out.clone());
    let report: Json = serde_json::from_slice(&out.stdout).unwrap();
    let pruned = &report[0]["pruned"];
    // The watermark is on day 11: days before day 8 are older than 3 days. Every such day goes
    // (the base logs' days before the anchor too) but day 2 (its file is gone) and day 3 (a log
    // the archive lacks).
    assert_eq!(pruned["before"], day_name(8), "{report}");
    let mut removed: Vec<String> = everything()
        .iter()
        .map(|r| r["timestamp"].as_str().unwrap()[..10].to_string())
        .filter(|d| *d < day_name(8) && *d != day_name(2) && *d != day_name(3))
        .collect();
    removed.dedup();
    removed.sort();
    removed.dedup();
    assert!(removed.len() >= 5, "{removed:?}");
    assert_eq!(pruned["days"], serde_json::json!(removed), "{report}");
    let kept: Vec<(String, String)> = pruned["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k[0].as_str().unwrap().to_string(), k[2].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(kept.len(), 2, "{report}");
    assert!(kept[0].0 == day_name(2) && kept[0].1.contains("is gone"), "{kept:?}");
    assert!(kept[1].0 == day_name(3) && kept[1].1.contains("the archive holds 5 rows of it, the mirror 6"), "{kept:?}");
    let removed_rows = everything()
        .iter()
        .filter(|r| removed.iter().any(|d| r["timestamp"].as_str().unwrap().starts_with(d.as_str())))
        .count();
    assert_eq!(pruned["rows"], removed_rows, "{report}");
    assert!(said.contains(&format!("{removed_rows} rows of {} days before", removed.len())), "{said}");

    // The mirror holds exactly the logs of the days it kept; the archive, the removed ones:
    // together every log ever delivered.
    let in_mirror =
        |row: &Map<String, Json>| !removed.iter().any(|d| row["timestamp"].as_str().unwrap().starts_with(d.as_str()));
    let expected: Vec<Map<String, Json>> = everything().into_iter().filter(in_mirror).collect();
    let mut with_late = rows(&db);
    with_late.retain(|r| r["id"] != "00000000-0000-4000-8000-00000000cafe");
    truth::assert_same_rows(&def, &with_late, &expected, "the mirror after --keep-days");
    let archived = read_archive(&to).0;
    for day in &removed {
        assert_eq!(archived[day], archived_before[day], "{day} is in the archive");
    }
    let ids =
        |rows: &Json| rows.as_array().unwrap().iter().map(|r| r[0].as_str().unwrap().to_string()).collect::<Vec<_>>();
    let archived_ids: Vec<String> = removed.iter().flat_map(|d| ids(&archived[d])).collect();
    for log in everything() {
        let id = log["id"].as_str().unwrap().to_string();
        assert!(in_mirror(&log) || archived_ids.contains(&id), "log {id} is in the mirror or the archive");
    }

    // Targets keep every log: the removed ones are not sent as deletes.
    ok(run(vec!["replicate", "--namespace", NS, "--table", TABLE, "--from", &url, "--to", &replica]).await);
    let replica_db = dir.path().join("replica").join("canvas_logs.db");
    let mut on_target = rows(&replica_db);
    on_target.retain(|r| r["id"] != "00000000-0000-4000-8000-00000000cafe");
    truth::assert_same_rows(&def, &on_target, &everything(), "the replica after the mirror removed old days");

    // A later archive leaves the removed days' partitions as they were, even when a log of such
    // a day turns up in the mirror again (it stays there).
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "UPDATE web_logs SET timestamp = ?1 || substr(timestamp, 11) WHERE id = '00000000-0000-4000-8000-00000000cafe'",
        [&removed[0]],
    )
    .unwrap();
    drop(conn);
    let part = |day: &str| to.join(format!("date={day}")).join("part-0.parquet");
    let modified: Vec<_> = removed.iter().map(|d| std::fs::metadata(part(d)).unwrap().modified().unwrap()).collect();
    archive(&emu, dir.path(), &mirror, &to).await;
    let after: Vec<_> = removed.iter().map(|d| std::fs::metadata(part(d)).unwrap().modified().unwrap()).collect();
    assert_eq!(modified, after, "removed days are not written again");
    for day in &removed {
        assert_eq!(read_archive(&to).0[day], archived_before[day], "{day} is still whole in the archive");
    }
}
