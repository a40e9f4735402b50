//! What initdb and syncdb tell the person running them: the phases of each table on a terminal
//! (read from a real pseudo-terminal), a log line per phase off one, nothing but errors with
//! `--no-log-to-console`, true counts (rows held, new changes only), and a job that fails on
//! DAP's side retried before the table fails.

use crate::common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;
use dap_replica::emulator::{ChangeCounts, Emulator, EmulatorConfig, Endpoint, FaultKind, FaultSpec};
use serde_json::Value;

const TABLES: &str = "users,courses,accounts";

fn config() -> EmulatorConfig {
    EmulatorConfig {
        rows: 6000,
        part_rows: 1500,
        job_waiting: Duration::from_millis(400),
        job_running: Duration::from_millis(400),
        ..EmulatorConfig::default()
    }
}

/// Whether a line of the screen has `prefix` (a table's name, padded) followed by `text`.
fn shows(screen: &str, prefix: &str, text: &str) -> bool {
    screen.match_indices(prefix).any(|(at, _)| screen[at + prefix.len()..].trim_start().starts_with(text))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_shows_each_table_in_flight_and_the_wait_for_a_job_slot() {
    let emu = emulator(config()).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("canvas.db");
    let url = format!("sqlite://{}", db.display());
    // Two jobs per 3 s: the third table waits for a slot, and the overall line says how long.
    let args = ["initdb", "--namespace", "canvas", "--table", TABLES, "--connection-string", &url];
    let dap = Path::new(env!("CARGO_BIN_EXE_dap"));
    let (ok, screen) =
        tokio::task::block_in_place(|| on_a_terminal(dap, &emu, dir.path(), &args, &[("DAP_JOB_RATE", "2/3")]));
    assert!(ok, "{screen}");
    for phase in ["waiting for a job slot", "job queued", "job running", "downloading ", "rows/s"] {
        assert!(screen.contains(phase), "no {phase:?} on the terminal:\n{screen}");
    }
    assert!(screen.contains("tables done") && screen.contains("next job slot in"), "no overall line:\n{screen}");
    for table in TABLES.split(',') {
        let line = format!("initialised, {} rows", emu.truth("canvas", table).unwrap().len());
        assert!(shows(&screen, table, &line), "{table}: no {line:?}:\n{screen}");
    }
    assert!(screen.contains("initdb: 3 tables: 3 succeeded"), "{screen}");
}

/// 28 tables on a 16-row terminal: the lines in flight are summed up rather than clipped, the
/// overall line comes last and counts each finished table as its outcome is printed, and the
/// wait names the job limit in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_terminal_sums_up_what_does_not_fit_and_the_counter_keeps_step() {
    let emu = emulator(EmulatorConfig {
        rows: 50,
        job_waiting: Duration::from_millis(300),
        job_running: Duration::from_millis(300),
        ..EmulatorConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("canvas.db").display());
    let tables: Vec<String> = emu.tables("canvas").unwrap().into_iter().take(28).collect();
    let list = tables.join(",");
    let args = ["initdb", "--namespace", "canvas", "--table", &list, "--connection-string", &url];
    let dap = Path::new(env!("CARGO_BIN_EXE_dap"));
    let (ok, screen) = tokio::task::block_in_place(|| {
        on_a_terminal_of(dap, &emu, dir.path(), &args, &[("DAP_JOB_RATE", "20/2")], (16, 100))
    });
    assert!(ok, "{screen}");
    assert!(screen.contains("more in flight"), "28 tables in flight on 16 rows are summed up:\n{screen}");
    assert!(screen.contains("(DAP allows 20 jobs every 2 s)"), "the limit in force:\n{screen}");
    assert!(!screen.contains("5 jobs a minute"), "{screen}");
    let mut finished: std::collections::BTreeSet<&str> = Default::default();
    let mut counted = 0;
    // indicatif writes the block's lines padded to the terminal's width, one after another.
    let rows: Vec<String> = screen
        .lines()
        .flat_map(|l| {
            l.chars().collect::<Vec<char>>().chunks(100).map(|c| c.iter().collect::<String>()).collect::<Vec<_>>()
        })
        .collect();
    for line in &rows {
        if let Some((name, _)) = line.split_once(" initialised, ") {
            finished.insert(name.trim());
        }
        if let Some(k) =
            line.split_once("/28 tables done").and_then(|(k, _)| k.trim().rsplit(' ').next()?.parse::<usize>().ok())
        {
            counted += 1;
            assert!(
                (finished.len()..=finished.len() + 1).contains(&k),
                "the counter says {k} with {} outcomes printed:\n{screen}",
                finished.len()
            );
        }
    }
    assert!(counted > 0, "no overall line:\n{screen}");
    assert_eq!(finished.len(), 28, "{screen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_a_terminal_each_phase_is_a_log_line_and_no_log_to_console_leaves_only_errors() {
    let emu = emulator(config()).await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("canvas.db").display());
    let args = ["initdb", "--namespace", "canvas", "--table", TABLES, "--connection-string", url.as_str()];
    let out = run_ours(&emu, dir.path(), &args).await;
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains('\u{1b}'), "escape codes off a terminal: {err}");
    for table in TABLES.split(',') {
        for phase in ["job queued", "job running", "downloading ", "loading", "initialised, 6000 rows"] {
            assert!(err.contains(&format!("{table}: {phase}")), "{table}: no {phase:?} line:\n{err}");
        }
    }

    emu.commit("canvas", "users", ChangeCounts { inserts: 3, ..Default::default() }).unwrap();
    let quiet = ["--no-log-to-console", "syncdb", "--namespace", "canvas", "--table", TABLES, "--connection-string"];
    let out = run_ours(&emu, dir.path(), &[&quiet[..], &[url.as_str()]].concat()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "", "--no-log-to-console printed more than errors");
    assert!(out.stdout.is_empty());
    // An error still shows.
    let out =
        run_ours(&emu, dir.path(), &[&quiet[..5], &["web_logs", "--connection-string", url.as_str()]].concat()).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("web_logs"), "the error is shown: {}", stderr(&out));
}

/// `--json` results of a command, by table.
async fn results(emu: &Emulator, dir: &Path, args: &[&str]) -> Vec<Value> {
    let out = run_ours(emu, dir, &[args, &["--json"]].concat()).await;
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_are_the_rows_held_and_the_new_changes() {
    let emu = emulator(EmulatorConfig {
        rows: 400,
        part_rows: 100,
        web_logs_duplicate_rate: 0.1,
        ..EmulatorConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("canvas.db").display());
    let logs = format!("sqlite://{}", dir.path().join("canvas_logs.db").display());
    let sync = ["syncdb", "--namespace", "canvas", "--table", "users", "--connection-string", url.as_str()];

    // web_logs repeats some rows in its snapshot: the count is of the rows held.
    let r = results(
        &emu,
        dir.path(),
        &["initdb", "--namespace", "canvas_logs", "--table", "web_logs", "--connection-string", &logs],
    )
    .await;
    assert_eq!(r[0]["rows"], emu.truth("canvas_logs", "web_logs").unwrap().len(), "{r:?}");
    assert_eq!((r[0]["action"].as_str(), r[0]["changes"].is_null()), (Some("initialised"), true));

    // A table created by --init-missing is initialised, not synced.
    let r = results(
        &emu,
        dir.path(),
        &["syncdb", "--init-missing", "--namespace", "canvas", "--table", "users", "--connection-string", &url],
    )
    .await;
    assert_eq!((r[0]["action"].as_str(), r[0]["rows"].as_u64()), (Some("initialised"), Some(400)), "{r:?}");

    // A commit's changes once, then none however often the sync runs.
    emu.commit("canvas", "users", ChangeCounts { inserts: 5, updates: 4, soft_deletes: 2, hard_deletes: 3 }).unwrap();
    for (round, expected) in [(1, 14), (2, 0), (3, 0)] {
        let r = results(&emu, dir.path(), &sync).await;
        assert_eq!(r[0]["action"], "synced");
        assert_eq!(r[0]["changes"], expected, "sync {round}: {r:?}");
        assert_eq!(r[0]["rows"], emu.truth("canvas", "users").unwrap().len(), "sync {round}: {r:?}");
    }
    let out = run_ours(&emu, dir.path(), &sync).await;
    assert!(stderr(&out).contains("users: synced, 0 changes, 402 rows"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_fails_on_dap_is_submitted_again_and_a_lasting_failure_names_the_server_error() {
    let emu = emulator(EmulatorConfig { rows: 300, part_rows: 100, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("canvas.db");
    let url = format!("sqlite://{}", db.display());
    let def = emu.table_def("canvas", "users").unwrap();

    // Fails once: the snapshot, and then an incremental, still succeed in one run.
    for command in ["initdb", "syncdb"] {
        if command == "syncdb" {
            emu.commit(
                "canvas",
                "users",
                ChangeCounts { inserts: 6, updates: 6, hard_deletes: 2, ..Default::default() },
            )
            .unwrap();
        }
        emu.inject(FaultSpec::new(FaultKind::FailedJob, 1).on(Endpoint::Query).for_table("users"));
        let out = run_ours(
            &emu,
            dir.path(),
            &[command, "--namespace", "canvas", "--table", "users", "--connection-string", &url],
        )
        .await;
        let err = stderr(&out);
        assert!(out.status.success(), "{command}: {err}");
        assert!(
            err.contains("failed on DAP's side (ProcessingError") && err.contains("submitting the query again"),
            "{err}"
        );
        common::truth::assert_same_rows_within(
            &def,
            &common::truth::sqlite_rows(&db, &def),
            &emu.truth("canvas", "users").unwrap(),
            command,
            &[common::truth::Limit::NoNegativeZero],
        );
    }

    // Fails every time: the table fails after --max-attempts with the server's type, message and
    // uuid, and keeps its state.
    emu.commit("canvas", "users", ChangeCounts { inserts: 2, ..Default::default() }).unwrap();
    emu.inject(FaultSpec::new(FaultKind::FailedJob, 3).on(Endpoint::Query).for_table("users"));
    let before = common::truth::sqlite_rows(&db, &def);
    let out = run_ours(
        &emu,
        dir.path(),
        &["--max-attempts", "3", "syncdb", "--namespace", "canvas", "--table", "users", "--connection-string", &url],
    )
    .await;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.matches("submitting the query again in").count(), 2, "{err}");
    let last = err.lines().find(|l| l.contains("failed") && l.contains("attempt 3")).unwrap_or_else(|| panic!("{err}"));
    assert!(
        last.contains("ProcessingError") && last.contains("the query job failed") && last.contains("uuid "),
        "{last}"
    );
    assert!(common::truth::sqlite_rows(&db, &def) == before, "a failed sync changed the mirror");
}
