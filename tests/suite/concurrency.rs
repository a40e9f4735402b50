//! Writers at the same time: 2-4 `dap` processes run initdb, syncdb and replicate over
//! overlapping tables of one target, round after seeded round, on every backend. Afterwards every
//! table they touched equals the emulator's truth row by row, every process has exited in time,
//! and every exit code says the work was done (a second writer waits for the first, it never
//! races it). A lock held elsewhere makes a writer wait, name the holder's way out and leave the
//! table alone once `--lock-timeout` is up.
//!
//! The seed of a run is printed; `DAP_TEST_SEED=<seed>` replays it.

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::targets::{Backend, TestTarget};
use common::truth::Limit;
use common::*;
use dap_replica::emulator::{ChangeCounts, Emulator, EmulatorConfig};
use dap_replica::sink::{NonFinite, SinkOptions};

const TABLES: [&str; 4] = ["users", "submissions", "courses", "enrollments"];
const ROUNDS: usize = 5;
/// Long enough for every writer ahead in the queue on a loaded two-core machine.
const LOCK_TIMEOUT: &str = "180s";

fn seed() -> u64 {
    let seed = std::env::var("DAP_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| fastrand::u64(..));
    eprintln!("seed {seed} (DAP_TEST_SEED={seed} replays this run)");
    seed
}

/// What one process of a round does.
#[derive(Debug, Clone)]
enum Writer {
    /// `syncdb --init-missing` straight from DAP into the target.
    Sync(Vec<&'static str>),
    /// `initdb --replace` straight from DAP: a fresh snapshot replaces the table.
    Replace(Vec<&'static str>),
    /// `replicate` from the mirror into the target.
    Replicate(Vec<&'static str>),
}

impl Writer {
    fn tables(&self) -> &[&'static str] {
        match self {
            Writer::Sync(t) | Writer::Replace(t) | Writer::Replicate(t) => t,
        }
    }

    fn args(&self, target: &TestTarget, mirror: &str) -> Vec<String> {
        let tables = self.tables().join(",");
        let mut args: Vec<String> = match self {
            Writer::Sync(_) => {
                vec!["syncdb".into(), "--init-missing".into(), "--connection-string".into(), target.url.clone()]
            }
            Writer::Replace(_) => {
                vec!["initdb".into(), "--replace".into(), "--connection-string".into(), target.url.clone()]
            }
            Writer::Replicate(_) => {
                vec!["replicate".into(), "--from".into(), mirror.into(), "--to".into(), target.url.clone()]
            }
        };
        args.extend(["--namespace".into(), "canvas".into(), "--table".into(), tables]);
        args.extend(["--lock-timeout".into(), LOCK_TIMEOUT.into()]);
        args.extend(target.dap_options().iter().map(|s| s.to_string()));
        args
    }
}

/// Runs `dap` as a child that is killed if the test gives up on it.
async fn spawn(emu: &Emulator, dir: &Path, args: &[String]) -> (Output, Duration) {
    let started = Instant::now();
    let out = tokio::time::timeout(PROCESS_DEADLINE, ours_command(emu, dir).args(args).output())
        .await
        .unwrap_or_else(|_| panic!("dap {args:?} still running after {PROCESS_DEADLINE:?}: it hung"))
        .expect("our dap runs");
    (out, started.elapsed())
}

fn pick<'a>(rng: &mut fastrand::Rng) -> Vec<&'a str> {
    loop {
        let chosen: Vec<&str> = TABLES.iter().copied().filter(|_| rng.bool()).collect();
        if !chosen.is_empty() {
            return chosen;
        }
    }
}

async fn writers_at_once_leave_every_table_equal_to_the_truth(backend: Backend) {
    let mut rng = fastrand::Rng::with_seed(seed());
    let emu = emulator(EmulatorConfig {
        rows: 40,
        part_rows: 15,
        special_floats: false,
        job_waiting: Duration::from_millis(50),
        job_running: Duration::from_millis(50),
        ..EmulatorConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mirror = format!("sqlite://{}", dir.path().join("mirror.db").display());
    let target = TestTarget::fresh(backend, &format!("conc_{backend:?}").to_lowercase()).await;
    let all = TABLES.join(",");
    ours_ok(&emu, dir.path(), &["initdb", "--namespace", "canvas", "--table", &all, "--connection-string", &mirror])
        .await;
    // The target starts with bookkeeping of its own (the case that lost a table).
    ours_ok(
        &emu,
        dir.path(),
        &[
            "replicate",
            "--namespace",
            "canvas",
            "--table",
            "users",
            "--from",
            &mirror,
            "--to",
            &target.url,
            "--non-finite",
            "null",
        ],
    )
    .await;

    let mut limits = target.limits().to_vec();
    limits.push(Limit::NoNegativeZero);
    for round in 0..ROUNDS {
        for t in TABLES {
            let counts = ChangeCounts {
                inserts: rng.usize(0..6),
                updates: rng.usize(0..6),
                soft_deletes: rng.usize(0..2),
                hard_deletes: rng.usize(0..2),
            };
            emu.commit("canvas", t, counts).unwrap();
        }
        // The mirror is current before the writers start, so a replicate and a sync straight
        // from DAP agree on the watermark.
        ours_ok(
            &emu,
            dir.path(),
            &["syncdb", "--namespace", "canvas", "--table", &all, "--connection-string", &mirror],
        )
        .await;
        let writers: Vec<Writer> = (0..rng.usize(2..=4))
            .map(|_| match rng.usize(0..10) {
                0..4 => Writer::Sync(pick(&mut rng)),
                4..6 => Writer::Replace(pick(&mut rng)),
                _ => Writer::Replicate(pick(&mut rng)),
            })
            .collect();
        eprintln!("round {round}: {writers:?}");
        let mut initialised_before = BTreeSet::new();
        for t in TABLES {
            if target.initialised(t).await {
                initialised_before.insert(t);
            }
        }
        let runs = writers.iter().map(|w| {
            let args = w.args(&target, &mirror);
            let (emu, dir) = (&emu, dir.path());
            async move { spawn(emu, dir, &args).await }
        });
        let outcomes = futures_util::future::join_all(runs).await;
        let mut touched = BTreeSet::new();
        for (w, (out, took)) in writers.iter().zip(&outcomes) {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "round {round}: {w:?} failed after {took:?} ({}):\n{err}", out.status);
            assert!(!err.contains("panicked") && !err.contains("0 rows with"), "round {round}: {w:?}:\n{err}");
            touched.extend(w.tables().iter().copied());
        }
        // Tables only synced or replicated are current as soon as the writers are done.
        let snapshotted: BTreeSet<&str> = writers
            .iter()
            .filter(|w| matches!(w, Writer::Replace(_)))
            .flat_map(|w| w.tables().iter().copied())
            .chain(touched.iter().copied().filter(|t| !initialised_before.contains(t)))
            .collect();
        for t in touched.iter().filter(|t| !snapshotted.contains(*t)) {
            assert_truth(&emu, &target, t, &limits, &format!("round {round}: canvas.{t} after {writers:?}")).await;
        }
        // A snapshot may be one DAP made earlier for the same query (the emulator too), so a
        // snapshotted table is current after one more sync; one published inconsistent with its
        // watermark stays wrong through it.
        let list = touched.iter().copied().collect::<Vec<_>>().join(",");
        let mut args = vec!["syncdb", "--namespace", "canvas", "--table", &list, "--connection-string", &target.url];
        args.extend(target.dap_options());
        ours_ok(&emu, dir.path(), &args).await;
        for t in &touched {
            assert_truth(&emu, &target, t, &limits, &format!("round {round}: canvas.{t} after {writers:?} and a sync"))
                .await;
        }
    }
    // No staging, change or lock tables are left to another run: a last sync of every table
    // finds nothing to do and still equals the truth.
    let out = ours_ok(
        &emu,
        dir.path(),
        &[
            "syncdb",
            "--init-missing",
            "--namespace",
            "canvas",
            "--table",
            &all,
            "--connection-string",
            &target.url,
            "--non-finite",
            "null",
        ],
    )
    .await;
    drop(out);
    for t in TABLES {
        let def = emu.table_def("canvas", t).unwrap();
        common::truth::assert_same_rows_within(
            &def,
            &target.rows(&def).await,
            &emu.truth("canvas", t).unwrap(),
            t,
            &limits,
        );
    }
}

async fn assert_truth(emu: &Emulator, target: &TestTarget, table: &str, limits: &[Limit], what: &str) {
    let def = emu.table_def("canvas", table).unwrap();
    let what = format!("{:?} {what}", target.backend);
    common::truth::assert_same_rows_within(
        &def,
        &target.rows(&def).await,
        &emu.truth("canvas", table).unwrap(),
        &what,
        limits,
    );
    assert!(target.initialised(table).await, "{what}: no bookkeeping row");
}

/// Holds the lock of canvas.users on the target the way another `dap` would, until dropped.
enum HeldLock {
    Sqlite(#[allow(dead_code)] dap_replica::mirror::folder::WriterLock),
    Postgres(#[allow(dead_code)] tokio_postgres::Client),
    Mysql(#[allow(dead_code)] mysql_async::Conn),
    Tds(std::sync::Arc<common::tds::Shared>, String),
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        if let HeldLock::Tds(shared, name) = self {
            shared.applocks.lock().unwrap().remove(name);
        }
    }
}

fn database_of(url: &str) -> String {
    let path = url.split('?').next().unwrap();
    path.rsplit('/').next().unwrap().to_string()
}

async fn hold_users_lock(target: &TestTarget) -> HeldLock {
    use dap_replica::sink::protocol::{lock_keys, lock_name};
    let name = lock_name(&database_of(&target.url), "canvas", "users");
    match target.backend {
        Backend::Sqlite => HeldLock::Sqlite(dap_replica::mirror::folder::WriterLock::acquire(&target.file()).unwrap()),
        Backend::Postgres => {
            let (client, conn) = tokio_postgres::connect(&target.url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            let (a, b) = lock_keys(&name);
            client.execute("SELECT pg_advisory_lock($1, $2)", &[&a, &b]).await.unwrap();
            HeldLock::Postgres(client)
        }
        Backend::Mysql => {
            use mysql_async::prelude::Queryable;
            let mut conn = mysql_pool(&target.url).get_conn().await.unwrap();
            let got: Option<i64> = conn.exec_first("SELECT GET_LOCK(?, 0)", (name,)).await.unwrap();
            assert_eq!(got, Some(1));
            HeldLock::Mysql(conn)
        }
        Backend::Mssql => {
            let shared = target.tds.as_ref().expect("the TDS test server").shared.clone();
            shared.applocks.lock().unwrap().insert(name.clone(), u64::MAX);
            HeldLock::Tds(shared, name)
        }
    }
}

async fn a_held_lock_makes_a_writer_wait_then_leave_the_table_alone(backend: Backend) {
    if backend == Backend::Mssql && std::env::var_os("TEST_MSSQL_URL").is_some() {
        eprintln!("holding an applock from the test needs the TDS test server: skipped on a real server");
        return;
    }
    let emu = emulator(EmulatorConfig { rows: 20, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let target = TestTarget::fresh(backend, &format!("held_{backend:?}").to_lowercase()).await;
    let sync = |timeout: &str| {
        let mut args: Vec<String> = [
            "syncdb",
            "--init-missing",
            "--namespace",
            "canvas",
            "--table",
            "users",
            "--connection-string",
            &target.url,
            "--lock-timeout",
            timeout,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(target.dap_options().iter().map(|s| s.to_string()));
        args
    };
    // Bookkeeping first, so the lock is the only thing in the way.
    let (out, _) = spawn(&emu, dir.path(), &sync("10s")).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    emu.commit("canvas", "users", ChangeCounts { inserts: 3, updates: 3, ..Default::default() }).unwrap();
    let before = target.rows(&emu.table_def("canvas", "users").unwrap()).await;

    let held = hold_users_lock(&target).await;
    let (out, took) = spawn(&emu, dir.path(), &sync("2s")).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a locked table was written:\n{err}");
    assert!(took >= Duration::from_secs(2), "gave up after {took:?}, before its --lock-timeout");
    assert!(took < Duration::from_secs(60), "waited {took:?} for a 2 s --lock-timeout");
    assert!(err.contains("being written by") && err.contains("--lock-timeout"), "{err}");
    let def = emu.table_def("canvas", "users").unwrap();
    assert_eq!(target.rows(&def).await, before, "the table changed while another writer held it");

    // A writer that waits longer gets the table as soon as the holder lets go: let go once it
    // says it is waiting.
    let mut patient = ours_command(&emu, dir.path());
    patient.args(sync("120s"));
    let mut patient = Watched::spawn(patient);
    patient.wait_for("waiting up to").await;
    drop(held);
    let out = patient.finish().await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let mut limits = target.limits().to_vec();
    limits.push(Limit::NoNegativeZero);
    common::truth::assert_same_rows_within(
        &def,
        &target.rows(&def).await,
        &emu.truth("canvas", "users").unwrap(),
        "after the wait",
        &limits,
    );
}

/// Another writer is publishing canvas.users: its table is there, its bookkeeping row not yet
/// (PostgreSQL's and MariaDB's reads in two statements can see that), and it holds the table's
/// lock. `syncdb --init-missing` must wait for that writer and then take the table as
/// initialised (its changes), not refuse it as a table another client left half-loaded: the
/// race three replicates to one database met in CI.
async fn a_table_another_writer_is_publishing_is_waited_for_not_refused(backend: Backend) {
    let (backup, sync_table) = match backend {
        Backend::Postgres => ("public.sync_backup", "instructure_dap.table_sync"),
        Backend::Mysql => ("sync_backup", "instructure_dap__table_sync"),
        _ => return, // a mirror file is locked whole when opened; the TDS test server takes no CREATE TABLE AS
    };
    let emu = emulator(EmulatorConfig { rows: 20, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let target = TestTarget::fresh(backend, &format!("publishing_{backend:?}").to_lowercase()).await;
    let mut sync: Vec<String> =
        ["syncdb", "--init-missing", "--namespace", "canvas", "--table", "users", "--connection-string", &target.url]
            .iter()
            .map(|s| s.to_string())
            .collect();
    sync.extend(target.dap_options().iter().map(|s| s.to_string()));
    let (out, _) = spawn(&emu, dir.path(), &sync).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    emu.commit("canvas", "users", ChangeCounts { inserts: 2, updates: 2, ..Default::default() }).unwrap();

    // Mid-publish, as another writer leaves it for a moment: the lock held, the row not there.
    let held = hold_users_lock(&target).await;
    let only_users = "source_namespace = 'canvas' AND source_table = 'users'";
    target.exec(&format!("CREATE TABLE {backup} AS SELECT * FROM {sync_table} WHERE {only_users}")).await;
    target.exec(&format!("DELETE FROM {sync_table} WHERE {only_users}")).await;
    let mut writer = ours_command(&emu, dir.path());
    writer.args(&sync);
    let mut writer = Watched::spawn(writer);
    writer.wait_for("waiting up to").await;
    // The other writer's publish commits its row and lets go.
    target.exec(&format!("INSERT INTO {sync_table} SELECT * FROM {backup}")).await;
    drop(held);
    let out = writer.finish().await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{backend:?}: a table being published was refused:\n{err}");
    assert!(!err.contains("has no row for it"), "{backend:?}: {err}");
    let mut limits = target.limits().to_vec();
    limits.push(Limit::NoNegativeZero);
    assert_truth(&emu, &target, "users", &limits, "after waiting for the publish").await;
}

/// Writers that reach an empty target at the same moment (a cron job and a person, or the
/// fan-out of two syncs) each find no bookkeeping and create it: every one must open the target,
/// and the target must end with the official layout's one version row. Seen in CI as
/// `Table 'instructure_dap__database_version' already exists` from the second `replicate`.
async fn writers_opening_an_empty_target_at_once_all_open_it_and_leave_one_version(backend: Backend) {
    const OPENERS: usize = 6;
    const ROUNDS: usize = 3;
    for round in 0..ROUNDS {
        let target = TestTarget::fresh(backend, &format!("open_at_once_{round}_{backend:?}").to_lowercase()).await;
        let opened = futures_util::future::join_all((0..OPENERS).map(|_| {
            let spec = target.spec();
            async move {
                let options = SinkOptions { non_finite: NonFinite::Null, ..SinkOptions::default() };
                dap_replica::target::open(&spec, "canvas", &options).await.map(|_| ())
            }
        }))
        .await;
        for (i, result) in opened.iter().enumerate() {
            if let Err(e) = result {
                panic!("{backend:?}, round {round}: opener {i} of {OPENERS} failed on an empty target: {e}");
            }
        }
        // A SQLite target (the mirror's file) makes its bookkeeping at its first table's write,
        // under the file's writer lock: opening it writes nothing.
        let version_table = match backend {
            Backend::Sqlite => continue,
            Backend::Mysql => "instructure_dap__database_version",
            Backend::Postgres | Backend::Mssql => "\"instructure_dap\".\"database_version\"",
        };
        let versions = target.column(&format!("SELECT version FROM {version_table}")).await;
        assert_eq!(versions, vec![Some("1".to_string())], "{backend:?}, round {round}: the database's version rows");
        let watermarks = target.column(&format!("SELECT count(*) FROM {}", target.bookkeeping_table())).await;
        assert_eq!(watermarks, vec![Some("0".to_string())], "{backend:?}, round {round}: no table was synced");
    }
}

// One test per backend, so each is named, runs in parallel and fails on its own.
crate::each_backend!(
    writers_at_once_leave_every_table_equal_to_the_truth,
    a_held_lock_makes_a_writer_wait_then_leave_the_table_alone,
    a_table_another_writer_is_publishing_is_waited_for_not_refused,
    writers_opening_an_empty_target_at_once_all_open_it_and_leave_one_version
);
