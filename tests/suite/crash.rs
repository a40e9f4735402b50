//! Crash safety: `dap` killed with SIGKILL at seeded random points during initdb and syncdb of
//! several tables never leaves a table half-initialised or half-synced, and reruns converge:
//! after every kill each table is, in every column of every row, its old state or the truth.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::targets::{Backend, TestTarget, backends};
use common::truth::row_lines;
use common::*;
use dap_replica::emulator::{Emulator, EmulatorConfig};

const TABLES: &[&str] = &["users", "accounts", "courses", "enrollments"];

/// Every row of a table, every column (`row_lines`), in key order, or None if it is absent.
async fn rows(t: &TestTarget, emu: &Emulator, table: &str) -> Option<Vec<String>> {
    if !t.has_table("canvas", table).await {
        return None;
    }
    let def = emu.table_def("canvas", table).unwrap();
    Some(row_lines(&def, &t.rows(&def).await, t.limits()))
}

/// The truth of a table in the form `rows` gives for this target.
fn truth(t: &TestTarget, emu: &Emulator, table: &str) -> Vec<String> {
    let def = emu.table_def("canvas", table).unwrap();
    row_lines(&def, &emu.truth("canvas", table).unwrap(), t.limits())
}

fn command(emu: &Emulator, url: &str) -> tokio::process::Command {
    command_of(emu, url, "canvas", &TABLES.join(","))
}

/// `syncdb --init-missing` of `tables` of `namespace` into `url`.
fn command_of(emu: &Emulator, url: &str, namespace: &str, tables: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_dap"));
    cmd.env("DAP_API_URL", emu.base_url())
        .env("DAP_CLIENT_ID", &emu.config().client_id)
        .env("DAP_CLIENT_SECRET", &emu.config().client_secret)
        .env("DAP_JOB_RATE", "100000/1")
        .args([
            "--non-interactive",
            "syncdb",
            "--init-missing",
            "--namespace",
            namespace,
            "--table",
            tables,
            "--connection-string",
            url,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    cmd
}

/// Runs the sync-else-init command and kills it after `after`.
async fn run_and_kill(emu: &Emulator, url: &str, after: Duration) {
    kill_after(command(emu, url), after).await
}

async fn kill_after(mut command: tokio::process::Command, after: Duration) {
    let mut child = command.stderr(std::process::Stdio::null()).spawn().unwrap();
    tokio::select! {
        _ = child.wait() => {}
        _ = tokio::time::sleep(after) => { child.start_kill().unwrap(); child.wait().await.unwrap(); }
    }
}

/// Runs the command, kills it as soon as the target holds a loaded part's checkpoint, then
/// reruns it to the end: the rerun must resume that job from its checkpoints (not download what
/// was loaded again) and end at the truth in every column. An observed point, not a timed one,
/// so that it holds however loaded the machine is.
async fn killed_after_a_checkpoint_the_rerun_resumes(backend: Backend, emu: &Emulator) {
    let t = TestTarget::fresh(backend, "crash_resume").await;
    let mut child = command(emu, &t.url).stderr(std::process::Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{backend:?}: the run ended ({status}) before any checkpoint could be seen");
        }
        if t.checkpoints().await.unwrap_or(0) > 0 {
            child.start_kill().unwrap();
            child.wait().await.unwrap();
            break;
        }
        assert!(Instant::now() < deadline, "{backend:?}: no checkpoint within 120 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    {
        // `status` shows the interrupted initdb (not "no tables yet") and how to resume it, on
        // a server as on the mirror (its checkpoints are in the target's own schema).
        let status = |json: bool| {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dap"));
            cmd.args(["status", "--connection-string", &t.url]);
            if json {
                cmd.arg("--json");
            }
            cmd.output().unwrap()
        };
        let out = status(true);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let waiting: Vec<&serde_json::Value> = rows.iter().filter(|r| r["state"] == "initdb interrupted").collect();
        assert!(
            !waiting.is_empty(),
            "{backend:?}: status --json lists the interrupted initdb: {rows:?}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for w in &waiting {
            assert!(w["objects_loaded"].as_u64().unwrap() >= 1 && w["watermark"].is_null(), "{w}");
            assert!(
                w["resume"].as_str().unwrap().contains(&format!("--table {}", w["table"].as_str().unwrap())),
                "{w}"
            );
        }
        let text = String::from_utf8_lossy(&status(false).stdout).into_owned();
        assert!(text.contains("initdb interrupted with") && !text.contains("No tables are mirrored yet"), "{text}");
    }
    let out = command(emu, &t.url).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("resuming the interrupted load"),
        "{backend:?}: the rerun did not resume from its checkpoints:\n{stderr}"
    );
    for table in TABLES {
        let (now, truth) = (rows(&t, emu, table).await.unwrap(), truth(&t, emu, table));
        assert!(
            now == truth,
            "{backend:?}: {table} after a resumed initdb\n{}",
            differences(&now, &truth, ["the replica", "the truth"])
        );
    }
}

/// Which command the kills interrupt.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// The first run: every table is initialised.
    Initdb,
    /// After an uninterrupted initdb and a round of changes: every table is synced.
    Syncdb,
}

/// One test per backend and phase, so that they overlap (most of a run is waiting on jobs and on
/// the killed process).
macro_rules! per_backend {
    ($($name:ident => $backend:expr),* $(,)?) => {$(
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn during_initdb() {
                if backends().contains(&$backend) {
                    sigkill_anywhere_keeps_every_table_whole_and_reruns_converge($backend, Phase::Initdb).await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn during_syncdb() {
                if backends().contains(&$backend) {
                    sigkill_anywhere_keeps_every_table_whole_and_reruns_converge($backend, Phase::Syncdb).await;
                }
            }
        }
    )*};
}

per_backend! {
    sigkill_on_sqlite => Backend::Sqlite,
    sigkill_on_postgres => Backend::Postgres,
    sigkill_on_mariadb => Backend::Mysql,
    sigkill_on_mssql => Backend::Mssql,
}

async fn sigkill_anywhere_keeps_every_table_whole_and_reruns_converge(backend: Backend, phase: Phase) {
    {
        let emu = emulator(EmulatorConfig { rows: 1200, part_rows: 100, ..EmulatorConfig::default() }).await;
        let t = TestTarget::fresh(backend, &format!("crash_{phase:?}").to_lowercase()).await;
        let probe = TestTarget::fresh(backend, &format!("crash_probe_{phase:?}").to_lowercase()).await;

        // How long an uninterrupted initdb takes here, to spread the kill points over it.
        let started = Instant::now();
        let out = command(&emu, &probe.url).output().await.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let span = started.elapsed();
        emu.expire_jobs();

        let mut rng = fastrand::Rng::with_seed(20261122);
        if phase == Phase::Syncdb {
            let out = command(&emu, &t.url).output().await.unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            commit_round(&emu, "canvas", TABLES, BIG_ROUND);
        }
        {
            let mut before = Vec::new();
            for table in TABLES {
                before.push(rows(&t, &emu, table).await);
            }
            // The truth does not change while the runs are killed: computed once (the
            // emulator makes every row again for each call).
            let truths: Vec<Vec<String>> = TABLES.iter().map(|table| truth(&t, &emu, table)).collect();
            for kill in 0..12 {
                let after = span.mul_f64(rng.f64() * 1.1);
                run_and_kill(&emu, &t.url, after).await;
                for ((table, old), truth) in TABLES.iter().zip(&before).zip(&truths) {
                    let now = rows(&t, &emu, table).await;
                    let what = format!("{backend:?} {phase:?} kill {kill} at {after:?}: {table}");
                    match (&now, t.initialised(table).await) {
                        (None, true) => panic!("{what} is initialised but missing"),
                        // Only MySQL, whose `RENAME TABLE` commits at once, can show a table
                        // swapped in whose bookkeeping row the next run writes: it must be whole.
                        (Some(rows), false) => assert!(
                            t.publish_pending(table).await && rows == truth,
                            "{what} exists without being initialised"
                        ),
                        _ => {}
                    }
                    if let Some(now) = now {
                        assert!(
                            Some(&now) == old.as_ref() || now == *truth,
                            "{backend:?} {phase:?} kill {kill} at {after:?}: {table} is neither its old state nor the truth\n{}",
                            differences(&now, truth, ["the replica", "the truth"])
                        );
                    }
                }
            }
            let out = command(&emu, &t.url).output().await.unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            for (table, truth) in TABLES.iter().zip(&truths) {
                let now = rows(&t, &emu, table).await.unwrap();
                assert!(
                    now == *truth,
                    "{backend:?} {phase:?}: {table} converged\n{}",
                    differences(&now, truth, ["the replica", "the truth"])
                );
            }
        }
        if phase == Phase::Initdb {
            killed_after_a_checkpoint_the_rerun_resumes(backend, &emu).await;
        }
    }
}

/// The mirror stages a snapshot with a text key (web_logs' UUIDs, some repeated as DAP repeats
/// them) in a load file beside it and copies it in key order when publishing. A kill after a
/// checkpoint leaves the staged rows in the load file and the rerun resumes from them; SIGKILL at
/// seeded points of an initdb leaves web_logs absent or equal to the truth; once the table is
/// published and a run has ended, no load file is left beside the mirror (a kill after the
/// publish and before the file's deletion is tidied by the next run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_text_keyed_initdb_keeps_the_mirror_whole_and_leaves_no_load_file() {
    let emu = emulator(EmulatorConfig {
        rows: 100,
        table_rows: [("canvas_logs.web_logs".to_string(), 4000)].into(),
        part_rows: 250,
        web_logs_duplicate_rate: 0.05,
        ..EmulatorConfig::default()
    })
    .await;
    let t = TestTarget::fresh(Backend::Sqlite, "crash_text_keys").await;
    let load_file = {
        let mut name = t.file().into_os_string();
        name.push("-load");
        std::path::PathBuf::from(name)
    };
    let run = || command_of(&emu, &t.url, "canvas_logs", "web_logs");
    let def = emu.table_def("canvas_logs", "web_logs").unwrap();
    let truth = row_lines(&def, &emu.truth("canvas_logs", "web_logs").unwrap(), t.limits());
    let rows = || async {
        if t.has_table("canvas_logs", "web_logs").await {
            Some(row_lines(&def, &t.rows(&def).await, t.limits()))
        } else {
            None
        }
    };

    // Killed once it holds a checkpoint: the load file holds the staged rows, and the rerun
    // resumes from them.
    let mut child = run().stderr(std::process::Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while t.checkpoints().await.unwrap_or(0) == 0 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before any checkpoint could be seen");
        assert!(Instant::now() < deadline, "no checkpoint within 120 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    assert!(load_file.exists(), "a load interrupted after a checkpoint keeps its staged rows in {load_file:?}");
    assert_eq!(rows().await, None, "web_logs is not published by an interrupted load");
    let out = run().output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("resuming the interrupted load"), "{stderr}");
    let equal_to_truth = |now: &_, when: &str| {
        assert!(*now == truth, "web_logs {when}\n{}", differences(now, &truth, ["the mirror", "the truth"]))
    };
    equal_to_truth(&rows().await.unwrap(), "after a resumed initdb");
    assert!(!load_file.exists(), "the load file is deleted once web_logs is published");

    // Kills at seeded points of fresh initdbs (the table dropped before each), spread over the
    // time an uninterrupted one takes.
    let drop_web_logs = || async {
        let args = ["dropdb", "--namespace", "canvas_logs", "--table", "web_logs", "--connection-string", &t.url];
        let dropped = run_ours(&emu, Path::new("."), &args).await;
        assert!(dropped.status.success(), "{}", String::from_utf8_lossy(&dropped.stderr));
    };
    drop_web_logs().await;
    let started = Instant::now();
    let out = run().output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let span = started.elapsed();
    let mut rng = fastrand::Rng::with_seed(20261206);
    for kill in 0..8 {
        drop_web_logs().await;
        let after = span.mul_f64(rng.f64() * 1.1);
        kill_after(run(), after).await;
        if let Some(now) = rows().await {
            equal_to_truth(&now, &format!("published by the run killed at {after:?} (kill {kill})"));
        }
        let out = run().output().await.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        equal_to_truth(&rows().await.unwrap(), &format!("after the rerun of kill {kill}"));
        assert!(!load_file.exists(), "kill {kill}: no load file is left once web_logs is published");
    }
}
