//! Running unattended: `dap status --max-lag` for monitoring checks (exit 3 when data is older
//! than the limit, naming the tables), and the record of every run the mirror keeps.

use std::path::Path;

use crate::common::*;
use dap_replica::emulator::{Emulator, EmulatorConfig};
use dap_replica::time::{self, MICROS_PER_SECOND};

/// An emulator whose data was exported `age_secs` ago: the mirror's watermarks are that old.
async fn emulator_aged(age_secs: i64) -> Emulator {
    emulator(EmulatorConfig {
        rows: 10,
        anchor: time::now() - age_secs * MICROS_PER_SECOND,
        ..EmulatorConfig::default()
    })
    .await
}

fn mirror_url(dir: &Path, ns: &str) -> String {
    format!("sqlite://{}", dir.join("mirror").join(format!("{ns}.db")).display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_lag_exits_3_naming_the_tables_older_than_the_limit() {
    let emu = emulator_aged(2 * 3600).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let url = mirror_url(dir, "canvas");
    ours_ok(&emu, dir, &["initdb", "--namespace", "canvas", "--table", "users,courses", "--connection-string", &url])
        .await;
    let mirror = dir.join("mirror");
    let status = |extra: &[&str]| {
        let mut args = vec!["status", "--dir", mirror.to_str().unwrap()];
        args.extend(extra);
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        let (emu, dir) = (&emu, dir);
        async move { run_ours(emu, dir, &args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    // Two hours old: within 6h, beyond 1h.
    let within = status(&["--max-lag", "6h"]).await;
    assert_eq!(within.status.code(), Some(0), "{}", String::from_utf8_lossy(&within.stderr));
    let beyond = status(&["--max-lag", "1h"]).await;
    let err = String::from_utf8_lossy(&beyond.stderr);
    assert_eq!(beyond.status.code(), Some(3), "{err}");
    assert!(err.contains("2 of 2 tables are older than 1h") && err.contains("canvas.users: data 2h"), "{err}");
    assert!(err.contains("canvas.courses") && err.contains("last run") && err.contains("succeeded"), "{err}");
    // Scripts get the report as usual, and the exit code.
    let json = status(&["--json", "--max-lag", "90m"]).await;
    assert_eq!(json.status.code(), Some(3));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["staleness_seconds"].as_i64().unwrap() > 90 * 60), "{rows:?}");
    // A limit that is not a duration is a usage error.
    let bad = status(&["--max-lag", "soon"]).await;
    assert_eq!(bad.status.code(), Some(2), "{}", String::from_utf8_lossy(&bad.stderr));
}

/// Every initdb and syncdb leaves a row in the mirror file's `dap_runs`, in order, with its
/// tables, rows, changes and result; a failed table makes a failed run naming it; `status
/// --runs` lists them newest first; `DAP_KEEP_RUNS` bounds the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_run_is_recorded_and_listed_newest_first() {
    use dap_replica::emulator::{ChangeCounts, FaultKind, FaultSpec};
    let emu = emulator_aged(3600).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let url = mirror_url(dir, "canvas");
    let mirror = dir.join("mirror");
    let run = |verb: &'static str, env: Vec<(&'static str, &'static str)>| {
        let args = ["--namespace", "canvas", "--table", "users,courses", "--connection-string", &url];
        let args: Vec<String> = std::iter::once(verb).chain(args).map(String::from).collect();
        let (emu, dir) = (&emu, dir);
        async move { run_ours_with(emu, dir, &args.iter().map(String::as_str).collect::<Vec<_>>(), &env).await }
    };
    assert!(run("initdb", vec![]).await.status.success());
    commit_round(&emu, "canvas", &["users", "courses"], ChangeCounts { inserts: 3, updates: 2, ..Default::default() });
    assert!(run("syncdb", vec![]).await.status.success());
    commit_round(&emu, "canvas", &["users", "courses"], ChangeCounts { inserts: 1, ..Default::default() });
    emu.inject(FaultSpec::new(FaultKind::SnapshotRequired, 1).for_table("courses"));
    let failed = run("syncdb", vec![]).await;
    assert!(!failed.status.success());
    emu.clear_faults();
    assert!(run("syncdb", vec![]).await.status.success());

    let listed = |extra: &[&str]| {
        let mut args = vec!["status", "--dir", mirror.to_str().unwrap(), "--runs"];
        args.extend(extra);
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        let (emu, dir) = (&emu, dir);
        async move { ours_ok(emu, dir, &args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    let runs: Vec<serde_json::Value> = serde_json::from_str(&listed(&["--json"]).await).unwrap();
    let field = |i: usize, f: &str| runs[i][f].clone();
    assert_eq!(runs.len(), 4, "{runs:#?}");
    let commands: Vec<&str> = runs.iter().map(|r| r["command"].as_str().unwrap()).collect();
    assert_eq!(commands, ["syncdb", "syncdb", "syncdb", "initdb"]);
    let results: Vec<&str> = runs.iter().map(|r| r["result"].as_str().unwrap()).collect();
    assert_eq!(results, ["succeeded", "failed", "succeeded", "succeeded"]);
    let error = field(1, "error");
    assert!(error.as_str().unwrap().starts_with("courses: "), "{error}");
    // In order, none overlapping.
    for pair in runs.windows(2) {
        assert!(pair[1]["ended"].as_str() <= pair[0]["started"].as_str(), "{pair:?}");
        assert!(pair[0]["started"].as_str() <= pair[0]["ended"].as_str());
    }
    let truth_rows =
        (emu.truth("canvas", "users").unwrap().len() + emu.truth("canvas", "courses").unwrap().len()) as u64;
    assert_eq!(field(0, "rows"), truth_rows);
    assert_eq!(field(0, "tables"), "users,courses");
    assert_eq!(field(3, "changes"), serde_json::Value::Null, "a snapshot has no changes");
    assert_eq!(field(2, "changes"), 10, "the first sync applied 5 changes to each table");
    assert_eq!(field(0, "namespace"), "canvas");

    let two: Vec<serde_json::Value> = serde_json::from_str(&listed(&["2", "--json"]).await).unwrap();
    assert_eq!(two, runs[..2]);
    let text = listed(&[]).await;
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(text.lines().nth(1).unwrap().contains("failed: courses: "), "{text}");

    // The record keeps the newest DAP_KEEP_RUNS runs.
    assert!(run("syncdb", vec![("DAP_KEEP_RUNS", "3")]).await.status.success());
    let kept: Vec<serde_json::Value> = serde_json::from_str(&listed(&["--json"]).await).unwrap();
    assert_eq!(kept.len(), 3);
    assert_eq!(kept[1..], runs[..2]);

    // dropdb is a run of the file too: the table it dropped and the rows that table held.
    let courses = emu.truth("canvas", "courses").unwrap().len();
    let dropped = ["dropdb", "--namespace", "canvas", "--table", "courses", "--connection-string", &url];
    ours_ok(&emu, dir, &dropped).await;
    let after: Vec<serde_json::Value> = serde_json::from_str(&listed(&["1", "--json"]).await).unwrap();
    assert_eq!(
        (after[0]["command"].as_str(), after[0]["tables"].as_str(), after[0]["rows"].as_u64()),
        (Some("dropdb"), Some("courses"), Some(courses as u64)),
        "{after:?}"
    );
    assert_eq!(after[0]["result"], "succeeded");

    // So is a replicate into another mirror file, recorded in that file.
    let copy = dir.join("copy");
    let to = format!("sqlite://{}", copy.join("canvas.db").display());
    ours_ok(&emu, dir, &["replicate", "--namespace", "canvas", "--table", "users", "--from", &url, "--to", &to]).await;
    let runs = ours_ok(&emu, dir, &["status", "--dir", copy.to_str().unwrap(), "--runs", "--json"]).await;
    let runs: Vec<serde_json::Value> = serde_json::from_str(&runs).unwrap();
    let users = emu.truth("canvas", "users").unwrap().len() as u64;
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(
        (runs[0]["command"].as_str(), runs[0]["tables"].as_str(), runs[0]["rows"].as_u64()),
        (Some("replicate"), Some("users"), Some(users)),
        "{runs:?}"
    );
}

/// The samples of an OpenMetrics file as a real parser (prometheus_client's) reads them:
/// `(name, labels, value)`; `None` when the parser is not installed (a failure under CI).
fn parse_openmetrics(path: &Path) -> Option<Vec<(String, serde_json::Value, f64)>> {
    let script = r#"
import json, sys
try:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
except ImportError:
    print("null"); sys.exit(0)
out = []
for family in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in family.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let py =
        std::process::Command::new(official_python()).args(["-c", script, path.to_str().unwrap()]).output().unwrap();
    assert!(py.status.success(), "the OpenMetrics parser refused the file: {}", String::from_utf8_lossy(&py.stderr));
    let parsed: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    if parsed.is_null() {
        crate::common::targets::missing("prometheus_client is not installed beside the official client");
        return None;
    }
    Some(
        parsed
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s[0].as_str().unwrap().to_string(), s[1].clone(), s[2].as_f64().unwrap()))
            .collect(),
    )
}

/// `--metrics-file` after each run: OpenMetrics text a real parser accepts, whose values are
/// `dap status --json`'s; a failed table shows as failed, and the run's failures are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_file_parses_and_equals_status() {
    use dap_replica::emulator::{ChangeCounts, FaultKind, FaultSpec};
    let emu = emulator_aged(3600).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let url = mirror_url(dir, "canvas");
    let metrics = dir.join("metrics").join("dap.prom");
    std::fs::create_dir_all(metrics.parent().unwrap()).unwrap();
    let run = |verb: &'static str| {
        let args = ["--namespace", "canvas", "--table", "users,courses", "--connection-string", &url];
        let mut args: Vec<String> = std::iter::once(verb).chain(args).map(String::from).collect();
        args.extend(["--metrics-file".to_string(), metrics.display().to_string()]);
        let (emu, dir) = (&emu, dir);
        async move { run_ours(emu, dir, &args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    assert!(run("initdb").await.status.success());
    commit_round(&emu, "canvas", &["users", "courses"], ChangeCounts { inserts: 2, updates: 1, ..Default::default() });
    emu.inject(FaultSpec::new(FaultKind::SnapshotRequired, 1).for_table("courses"));
    assert!(!run("syncdb").await.status.success());
    let Some(samples) = parse_openmetrics(&metrics) else { return };
    let status = ours_ok(&emu, dir, &["status", "--json", "--dir", dir.join("mirror").to_str().unwrap()]).await;
    let status: Vec<serde_json::Value> = serde_json::from_str(&status).unwrap();
    let value = |name: &str, table: &str| {
        samples
            .iter()
            .find(|(n, l, _)| n == name && l["table"] == table && l["namespace"] == "canvas")
            .unwrap_or_else(|| panic!("{name} of {table} in {samples:?}"))
            .2
    };
    let seconds = |text: &serde_json::Value| time::parse_rfc3339(text.as_str().unwrap()).unwrap() as f64 / 1e6;
    for row in &status {
        let table = row["table"].as_str().unwrap();
        assert_eq!(value("dap_table_rows", table), row["rows"].as_f64().unwrap(), "{table}");
        let lag = value("dap_table_lag_seconds", table) - row["staleness_seconds"].as_f64().unwrap();
        assert!(lag.abs() <= 5.0, "{table}: the lag is status's, a moment earlier ({lag})");
        assert_eq!(value("dap_table_watermark_timestamp_seconds", table), seconds(&row["watermark"]), "{table}");
        assert_eq!(value("dap_table_last_success_timestamp_seconds", table), seconds(&row["last_success"]), "{table}");
        let failed = if row["last_result"] == "ok" { 0.0 } else { 1.0 };
        assert_eq!(value("dap_table_last_run_failed", table), failed, "{table}");
    }
    assert_eq!(value("dap_table_last_run_failed", "courses"), 1.0);
    assert_eq!(value("dap_table_last_run_failed", "users"), 0.0);
    let run_sample = |name: &str| samples.iter().find(|(n, l, _)| n == name && l["command"] == "syncdb").unwrap().2;
    assert_eq!(run_sample("dap_run_failed_tables"), 1.0);
    assert!(run_sample("dap_run_duration_seconds") > 0.0);
    // The courses' last success is the initdb's; the users' the sync's.
    let courses = status.iter().find(|r| r["table"] == "courses").unwrap();
    let users = status.iter().find(|r| r["table"] == "users").unwrap();
    assert!(courses["last_success"].as_str() < users["last_success"].as_str(), "{status:?}");
    // Collectors read it as another user; no temporary file is left beside it.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&metrics).unwrap().permissions().mode() & 0o777, 0o644);
    assert_eq!(std::fs::read_dir(metrics.parent().unwrap()).unwrap().count(), 1);
}

/// A local webhook receiver: every POST body it gets, answered 200.
async fn receiver() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/T0/B0/secretpath", listener.local_addr().unwrap());
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = bodies.clone();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = socket.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    let Some(end) = text.find("\r\n\r\n") else { continue };
                    let length: usize = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + length {
                        kept.lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).into_owned());
                        let _ = socket
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .await;
                        return;
                    }
                }
            });
        }
    });
    (url, bodies)
}

/// `dap watch --every 2s --max-runs 4` with a failing run among good ones: runs never overlap
/// and start on schedule (dap_runs), the failure and the recovery are each posted once (body
/// checked, no secret), a 5xx is absorbed, the metrics parse, and the tables equal the truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_runs_on_schedule_and_posts_one_failure_and_one_recovery() {
    use dap_replica::emulator::{Endpoint, FaultKind, FaultSpec};
    let emu = emulator_aged(3600).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let url = mirror_url(dir, "canvas");
    let metrics = dir.join("dap.prom");
    let (hook, posted) = receiver().await;
    // Run 1 initialises (a snapshot); run 2's sync of courses is refused; a 5xx is retried away.
    emu.inject(FaultSpec::new(FaultKind::SnapshotRequired, 1).for_table("courses"));
    emu.inject(FaultSpec::new(FaultKind::ServerError, 1).on(Endpoint::Query).after(3));
    let mut args = vec![
        "watch",
        "--namespace",
        "canvas",
        "--table",
        "users,courses",
        "--connection-string",
        &url,
        "--every",
        "2s",
        "--jitter",
        "0",
        "--max-runs",
        "4",
        "--notify",
        &hook,
        "--metrics-file",
        metrics.to_str().unwrap(),
        "--logformat",
        "json",
    ];
    // Run 3: the fan-out's PostgreSQL is down (its address answers and hangs up).
    let fan_out = match crate::common::targets::require(crate::common::targets::Backend::Postgres) {
        true => {
            let target =
                crate::common::targets::TestTarget::fresh(crate::common::targets::Backend::Postgres, "watch_fan_out")
                    .await;
            let gate = Gate::to(&target.url).await;
            let through = gate.url(&target.url);
            Some((target, gate, through))
        }
        false => None,
    };
    if let Some((_, _, through)) = &fan_out {
        args.extend(["--replicate-to", through.as_str()]);
    }
    let mut cmd = ours_command(&emu, dir);
    cmd.args(&args);
    let mut watch = Watched::spawn(cmd);
    if let Some((_, gate, _)) = &fan_out {
        watch.wait_for("run_failed").await;
        gate.shut();
        watch.wait_for("run_failed").await;
        gate.reopen();
    }
    let out = watch.finish().await;
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "the last run succeeded: {log}");
    assert!(!log.contains(&emu.config().client_secret) && !log.contains("secretpath"), "no secret in the log: {log}");
    let events: Vec<String> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["fields"]["event"].as_str().map(String::from))
        .collect();
    assert_eq!(events.iter().filter(|e| *e == "run_started").count(), 4, "{log}");
    let down_for_one_run = fan_out.is_some();
    let failed_runs = if down_for_one_run { 2 } else { 1 };
    assert_eq!(events.iter().filter(|e| *e == "run_failed").count(), failed_runs, "{log}");

    let runs = ours_ok(&emu, dir, &["status", "--dir", dir.join("mirror").to_str().unwrap(), "--runs", "--json"]).await;
    let mut runs: Vec<serde_json::Value> = serde_json::from_str(&runs).unwrap();
    runs.reverse();
    let results: Vec<&str> = runs.iter().map(|r| r["result"].as_str().unwrap()).collect();
    let expected = match down_for_one_run {
        true => ["succeeded", "failed", "failed", "succeeded"],
        false => ["succeeded", "failed", "succeeded", "succeeded"],
    };
    assert_eq!(results, expected, "{runs:#?}");
    if let Some((target, _, _)) = &fan_out {
        // Run 3 synced the mirror and says which target it could not reach, with no password.
        let error = runs[2]["error"].as_str().unwrap();
        assert!(error.contains("→ postgresql://") && !error.contains("courses:"), "{error}");
        let password = target.url.split_once("://").unwrap().1.split_once('@').and_then(|(u, _)| u.split_once(':'));
        if let Some((_, password)) = password {
            assert!(!error.contains(password) && !log.contains(password), "no password: {error}");
        }
        assert_eq!(runs[2]["profile"], serde_json::Value::Null);
    }
    let at = |r: &serde_json::Value, f: &str| time::parse_rfc3339(r[f].as_str().unwrap()).unwrap();
    for pair in runs.windows(2) {
        assert!(at(&pair[1], "started") >= at(&pair[0], "ended"), "runs never overlap: {pair:?}");
        let gap = at(&pair[1], "started") - at(&pair[0], "started");
        assert!(gap >= 1_900_000, "runs start on schedule, 2 s apart: {gap} µs");
    }

    let posted = posted.lock().unwrap().clone();
    assert_eq!(posted.len(), 2, "one failure and one recovery: {posted:?}");
    let failure: serde_json::Value = serde_json::from_str(&posted[0]).unwrap();
    let recovery: serde_json::Value = serde_json::from_str(&posted[1]).unwrap();
    assert_eq!((failure["event"].as_str(), failure["run"].as_u64()), (Some("failed"), Some(2)), "{failure}");
    assert_eq!(failure["failures"][0]["table"], "courses", "{failure}");
    let text = failure["text"].as_str().unwrap();
    assert!(text.contains("canvas.courses") && text.contains("dap syncdb --namespace canvas"), "{text}");
    let recovered_at = if down_for_one_run { 4 } else { 3 };
    assert_eq!(
        (recovery["event"].as_str(), recovery["run"].as_u64()),
        (Some("recovered"), Some(recovered_at)),
        "{recovery}"
    );
    for body in &posted {
        assert!(!body.contains(&emu.config().client_secret) && !body.contains("secretpath"), "{body}");
    }
    if let Some(samples) = parse_openmetrics(&metrics) {
        let rows = samples.iter().find(|(n, l, _)| n == "dap_table_rows" && l["table"] == "users").unwrap().2;
        assert_eq!(rows as usize, emu.truth("canvas", "users").unwrap().len());
    }
    for table in ["users", "courses"] {
        let def = emu.table_def("canvas", table).unwrap();
        let rows = crate::common::truth::sqlite_rows(&dir.join("mirror").join("canvas.db"), &def);
        crate::common::truth::assert_same_rows_within(
            &def,
            &rows,
            &emu.truth("canvas", table).unwrap(),
            "after the watch",
            &[crate::common::truth::Limit::NoNegativeZero],
        );
        // The fan-out caught up after the run its database was down.
        if let Some((target, _, _)) = &fan_out {
            target.assert_rows(&def, &emu.truth("canvas", table).unwrap(), "the fan-out after its outage").await;
        }
    }
}

/// SIGTERM ends a watch promptly with 143: during a run (held back by DAP) with nothing half
/// written, and between runs at once. `--print-unit systemd` is a unit systemd accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_watch_promptly_and_its_unit_verifies() {
    use dap_replica::emulator::{Endpoint, FaultKind, FaultSpec};
    let emu = emulator_aged(3600).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let url = mirror_url(dir, "canvas");
    let watch = ["watch", "--namespace", "canvas", "--table", "users", "--connection-string", &url, "--every", "1h"];
    let term = |pid: u32| unsafe { libc::kill(pid as i32, libc::SIGTERM) };

    // During a run: the snapshot's objects are held back; SIGTERM once it is loading.
    emu.inject(
        FaultSpec { delay_ms: Some(15_000), ..FaultSpec::new(FaultKind::Slow, 1) }.on(Endpoint::Object).after(1),
    );
    let mut cmd = ours_command(&emu, dir);
    cmd.args(watch);
    let mut child = Watched::spawn(cmd);
    child.wait_for("users: loading").await;
    assert_eq!(term(child.pid()), 0);
    let sent = std::time::Instant::now();
    let out = child.finish().await;
    assert_eq!(out.status.code(), Some(143), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(sent.elapsed() < std::time::Duration::from_secs(10), "stopped promptly");
    let db = dir.join("mirror").join("canvas.db");
    let def = emu.table_def("canvas", "users").unwrap();
    let has_users = rusqlite::Connection::open(&db)
        .map(|c| c.query_row("SELECT count(*) FROM sqlite_master WHERE name = 'users'", [], |r| r.get::<_, i64>(0)))
        .map_or(0, |n| n.unwrap_or(0));
    assert_eq!(has_users, 0, "an initdb stopped mid-way publishes nothing");
    emu.clear_faults();

    // Between runs: the first run done, the next an hour away.
    let mut cmd = ours_command(&emu, dir);
    cmd.args(watch);
    let mut child = Watched::spawn(cmd);
    child.wait_for("next run in").await;
    assert_eq!(term(child.pid()), 0);
    let sent = std::time::Instant::now();
    let out = child.finish().await;
    assert_eq!(out.status.code(), Some(143));
    assert!(sent.elapsed() < std::time::Duration::from_secs(5), "stopped at once");
    let rows = crate::common::truth::sqlite_rows(&db, &def);
    crate::common::truth::assert_same_rows_within(
        &def,
        &rows,
        &emu.truth("canvas", "users").unwrap(),
        "the run before SIGTERM",
        &[crate::common::truth::Limit::NoNegativeZero],
    );

    // A run killed outright (SIGKILL, a machine switched off) once it has changed the mirror
    // (users committed, courses held back by DAP) reads as interrupted.
    commit_round(&emu, "canvas", &["users"], dap_replica::emulator::ChangeCounts { updates: 5, ..Default::default() });
    emu.inject(
        FaultSpec { delay_ms: Some(15_000), ..FaultSpec::new(FaultKind::Slow, 1) }
            .on(Endpoint::Object)
            .for_table("courses"),
    );
    let mut cmd = ours_command(&emu, dir);
    cmd.args(["syncdb", "--namespace", "canvas", "--table", "users,courses", "--init-missing"]);
    cmd.args(["--connection-string", &url]);
    let mut child = Watched::spawn(cmd);
    child.wait_for("courses: loading").await;
    let going = || {
        rusqlite::Connection::open(&db)
            .and_then(|c| {
                c.query_row("SELECT count(*) FROM dap_runs WHERE result = 'running'", [], |r| r.get::<_, i64>(0))
            })
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while going() == 0 {
        assert!(std::time::Instant::now() < deadline, "the run was never recorded as going");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(unsafe { libc::kill(child.pid() as i32, libc::SIGKILL) }, 0);
    let _ = child.finish().await;
    emu.clear_faults();
    let folder = dir.join("mirror");
    let runs = ours_ok(&emu, dir, &["status", "--dir", folder.to_str().unwrap(), "--runs", "1", "--json"]).await;
    let runs: Vec<serde_json::Value> = serde_json::from_str(&runs).unwrap();
    assert_eq!(
        (runs[0]["command"].as_str(), runs[0]["result"].as_str()),
        (Some("syncdb --init-missing"), Some("interrupted"))
    );
    assert!(runs[0]["ended"].is_null(), "{runs:?}");
    let shown = ours_ok(&emu, dir, &["status", "--dir", folder.to_str().unwrap(), "--runs", "1"]).await;
    assert!(shown.contains("interrupted (its process is gone"), "{shown}");

    // The service definition systemd would run.
    let mut args = watch.to_vec();
    args.extend(["--print-unit", "systemd"]);
    let unit = ours_ok(&emu, dir, &args).await;
    assert!(unit.contains("ExecStart=") && unit.contains("\"watch\"") && !unit.contains("--print-unit"), "{unit}");
    match std::process::Command::new("systemd-analyze").arg("--version").output() {
        Ok(_) => {
            let file = dir.join("dap-watch-canvas.service");
            std::fs::write(&file, &unit).unwrap();
            let verify = std::process::Command::new("systemd-analyze").arg("verify").arg(&file).output().unwrap();
            assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
            // The control: a unit whose command does not exist is refused.
            let broken = dir.join("dap-watch-broken.service");
            std::fs::write(&broken, unit.replace("ExecStart=\"", "ExecStart=\"/nonexistent")).unwrap();
            let verify = std::process::Command::new("systemd-analyze").arg("verify").arg(&broken).output().unwrap();
            assert!(!verify.status.success(), "systemd-analyze verify checks the command");
        }
        Err(_) => eprintln!("systemd-analyze is not installed: the unit was not verified"),
    }
}

/// `dap` with only what files give: no DAP variables, the configuration file and the data
/// folder (where default mirrors live) under `dir`.
fn dap_from_files(dir: &Path, args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = from_files(dir)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// The command [`dap_from_files`] runs, before its arguments.
fn from_files(dir: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dap"));
    cmd.current_dir(dir)
        .env_remove("DAP_API_URL")
        .env_remove("DAP_CLIENT_ID")
        .env_remove("DAP_CLIENT_SECRET")
        .env_remove("DAP_CLIENT_SECRET_FILE")
        .env_remove("DAP_CONNECTION_STRING")
        .env_remove("DAP_MIRROR_DIR")
        .env_remove("DAP_PROFILE")
        .env("DAP_CONFIG_FILE", dir.join("config").join("dap.json"))
        .env("XDG_DATA_HOME", dir.join("data"))
        .env("HOME", dir)
        .env("DAP_JOB_RATE", "100000/1")
        .arg("--non-interactive");
    cmd
}

/// Two Canvas instances whose ids collide, each a profile: two mirrors in folders of their
/// own, each equal to its own instance's truth; no secret printed by `configure --show` or in
/// any output; an unknown profile is refused before anything is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_profiles_keep_two_instances_apart() {
    let instance = |seed: u64, secret: &str| EmulatorConfig {
        rows: 60,
        seed,
        client_id: format!("client-{seed}"),
        client_secret: secret.to_string(),
        ..EmulatorConfig::default()
    };
    let east = emulator(instance(11, "east-secret-0123456789")).await;
    let west = emulator(instance(22, "west-secret-9876543210")).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    for (name, emu) in [("east", &east), ("west", &west)] {
        let answers = format!("{}\n{}\n{}\n", emu.base_url(), emu.config().client_id, emu.config().client_secret);
        let out = dap_from_files(dir, &["--profile", name, "configure"], &answers);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let secrets = [&east.config().client_secret, &west.config().client_secret];
    let clean = |out: &std::process::Output| {
        let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(secrets.iter().all(|s| !all.contains(s.as_str())), "a secret was printed: {all}");
        all
    };
    for name in ["east", "west"] {
        let out = dap_from_files(dir, &["--profile", name, "configure", "--show"], "");
        let shown = clean(&out);
        assert!(shown.contains("(set)") && shown.contains(&format!("profile {name}")), "{shown}");
        let sync = ["--profile", name, "syncdb", "--namespace", "canvas", "--table", "users,courses", "--init-missing"];
        let out = dap_from_files(dir, &sync, "");
        let said = clean(&out);
        assert!(out.status.success(), "{said}");
    }
    let out = dap_from_files(dir, &["configure", "--show"], "");
    assert!(clean(&out).contains("profiles:  east, west"));

    let folder = |name: &str| dir.join("data").join("dap-replica").join("profiles").join(name);
    // Each profile's mirror equals its own instance's truth.
    let each_mirror_is_its_truth = |when: &str| {
        for (name, emu) in [("east", &east), ("west", &west)] {
            for table in ["users", "courses"] {
                let def = emu.table_def("canvas", table).unwrap();
                let rows = crate::common::truth::sqlite_rows(&folder(name).join("canvas.db"), &def);
                crate::common::truth::assert_same_rows_within(
                    &def,
                    &rows,
                    &emu.truth("canvas", table).unwrap(),
                    &format!("profile {name} {when}"),
                    &[crate::common::truth::Limit::NoNegativeZero],
                );
            }
        }
    };
    each_mirror_is_its_truth("after its syncdb");
    // The ids collide, the rows do not.
    let ids =
        |emu: &Emulator| emu.truth("canvas", "users").unwrap().iter().map(|r| r["id"].clone()).collect::<Vec<_>>();
    assert_eq!(ids(&east), ids(&west), "the instances' ids collide");
    assert_ne!(east.truth("canvas", "users").unwrap(), west.truth("canvas", "users").unwrap());
    assert!(!dir.join("data").join("dap-replica").join("canvas.db").exists(), "no mirror outside the profiles");

    // Status of one profile reads its own mirror.
    let out = dap_from_files(dir, &["--profile", "west", "status", "--json"], "");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(rows.iter().all(|r| r["file"].as_str().unwrap().contains("profiles/west")), "{rows:?}");

    // An unknown profile: refused, naming the known ones, nothing created.
    let out = dap_from_files(dir, &["--profile", "north", "syncdb", "--namespace", "canvas", "--table", "users"], "");
    let err = clean(&out);
    assert!(!out.status.success() && err.contains("no profile north") && err.contains("east, west"), "{err}");
    assert!(!folder("north").exists());
    let out = dap_from_files(dir, &["--profile", "../x", "status"], "");
    assert_eq!(out.status.code(), Some(2), "{}", clean(&out));
    let out = dap_from_files(dir, &["--profile", "east", "--profile", "west", "status"], "");
    assert_eq!(out.status.code(), Some(2), "one instance per command but watch: {}", clean(&out));
    // Several profiles never share one mirror: a watch given one location for all is refused.
    let shared = dir.join("shared");
    let watch = ["--profile", "east", "--profile", "west", "watch", "--namespace", "canvas", "--table", "users"];
    let out = dap_from_files(dir, &[&watch[..], &["--dir", shared.to_str().unwrap()]].concat(), "");
    let err = clean(&out);
    assert!(out.status.code() == Some(2) && err.contains("several Canvas instances into one mirror"), "{err}");
    assert!(!shared.exists(), "nothing created");

    // East's alerts go where `dap configure --notify` saved (the host alone shown); a URL that
    // is not one is refused with nothing saved.
    let (hook, posted) = receiver().await;
    let answers = format!("\n{}\n\n", east.config().client_id);
    let out =
        dap_from_files(dir, &["--profile", "east", "configure", "--notify", "ftp://x/T0/B0/secretpath"], &answers);
    assert_eq!(out.status.code(), Some(2), "{}", clean(&out));
    assert!(!clean(&out).contains("secretpath"));
    let out = dap_from_files(dir, &["--profile", "east", "configure", "--notify", &hook], &answers);
    assert!(out.status.success(), "{}", clean(&out));
    let shown = clean(&dap_from_files(dir, &["--profile", "east", "configure", "--show"], ""));
    assert!(shown.contains("notify:    http://127.0.0.1") && !shown.contains("secretpath"), "{shown}");

    // One watch for both instances: each mirror kept current from its own instance, each run
    // recorded with its profile, each log line marked with it; east's first run fails.
    for emu in [&east, &west] {
        let counts = dap_replica::emulator::ChangeCounts { inserts: 3, updates: 4, soft_deletes: 1, hard_deletes: 1 };
        commit_round(emu, "canvas", &["users", "courses"], counts);
    }
    use dap_replica::emulator::{FaultKind, FaultSpec};
    east.inject(FaultSpec::new(FaultKind::SnapshotRequired, 1).for_table("courses"));
    let watch = [
        "--profile",
        "east",
        "--profile",
        "west",
        "watch",
        "--namespace",
        "canvas",
        "--table",
        "users,courses",
        "--every",
        "1s",
        "--jitter",
        "0",
        "--max-runs",
        "2",
        "--logformat",
        "json",
    ];
    let out = dap_from_files(dir, &watch, "");
    let log = clean(&out);
    assert!(out.status.success(), "{log}");
    let started: Vec<String> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["event"] == "run_started")
        .map(|v| v["profile"].as_str().unwrap_or("none").to_string())
        .collect();
    assert_eq!(started.iter().filter(|p| *p == "east").count(), 2, "{log}");
    assert_eq!(started.iter().filter(|p| *p == "west").count(), 2, "{log}");
    each_mirror_is_its_truth("after the watch");
    for name in ["east", "west"] {
        let out = dap_from_files(dir, &["--profile", name, "status", "--runs", "2", "--json"], "");
        let runs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let results: Vec<&str> = runs.iter().map(|r| r["result"].as_str().unwrap()).collect();
        let expected = if name == "east" { ["succeeded", "failed"] } else { ["succeeded", "succeeded"] };
        assert_eq!(results, expected, "{runs:?}");
        for run in &runs {
            assert_eq!(run["profile"].as_str(), Some(name), "{run}");
            assert_eq!(run["command"], "syncdb --init-missing");
        }
    }
    let posted = posted.lock().unwrap().clone();
    let events: Vec<String> = posted
        .iter()
        .map(|b| serde_json::from_str::<serde_json::Value>(b).unwrap()["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(events, ["failed", "recovered"], "east's failure and recovery, west's nothing: {posted:?}");

    // SIGTERM reaches both watches, and the one that started them waits for them.
    let mut cmd = tokio::process::Command::from(from_files(dir));
    cmd.args(watch.iter().map(|a| if *a == "1s" { "1h" } else { a }).filter(|a| !["--max-runs", "2"].contains(a)));
    let mut both = Watched::spawn(cmd);
    both.wait_for("next run in").await;
    both.wait_for("next run in").await;
    assert_eq!(unsafe { libc::kill(both.pid() as i32, libc::SIGTERM) }, 0);
    let sent = std::time::Instant::now();
    let out = both.finish().await;
    assert_eq!(out.status.code(), Some(143), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(sent.elapsed() < std::time::Duration::from_secs(10), "stopped promptly");
    let marker = dir.to_str().unwrap().as_bytes().to_vec();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|p| p.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .filter(|p| std::fs::read(p.path().join("environ")).is_ok_and(|e| e.windows(marker.len()).any(|w| w == marker)))
        .map(|p| p.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "no watch outlives the one that started it: pids {left:?}");
}

/// `dap watch --cron`: bad schedules are usage errors before anything runs; a run starts at a
/// minute the schedule names (here the next whole minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_on_a_cron_schedule_runs_at_its_minutes() {
    let emu = emulator_aged(3600).await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let url = mirror_url(dir, "canvas");
    let base = ["watch", "--namespace", "canvas", "--table", "users", "--connection-string", &url];
    for (extra, says) in [
        (&["--cron", "0 */4 * *"][..], "five fields are needed"),
        (&["--cron", "61 * * * *"][..], "minute"),
        (&["--cron", "0 0 30 2 *"][..], "names no time"),
        (&["--cron", "0 * * * *", "--every", "1h"][..], "cannot be used with"),
    ] {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        let out = run_ours(&emu, dir, &args).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(says), "{extra:?}: {err}");
    }
    assert!(!dir.join("mirror").exists(), "nothing ran");

    let args: Vec<&str> =
        base.iter().copied().chain(["--cron", "* * * * *", "--jitter", "0", "--max-runs", "1"]).collect();
    let out = run_ours(&emu, dir, &args).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let runs = ours_ok(&emu, dir, &["status", "--dir", dir.join("mirror").to_str().unwrap(), "--runs", "--json"]).await;
    let runs: Vec<serde_json::Value> = serde_json::from_str(&runs).unwrap();
    let started = runs[0]["started"].as_str().unwrap();
    let second: u32 = started[17..19].parse().unwrap();
    assert!(second < 5, "the run started at a whole minute: {started}");
}
