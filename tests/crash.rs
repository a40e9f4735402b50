//! Crash safety: `dap` killed with SIGKILL at seeded random points during initdb and syncdb of
//! several tables never leaves a table half-initialised or half-synced, and reruns converge.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use dap_replica::emulator::{ChangeCounts, Emulator, EmulatorConfig};
use serde_json::{Map, Value};

const TABLES: &[&str] = &["users", "accounts", "courses", "enrollments"];

/// Typed rows of a mirrored table (or None if it is absent), keyed for comparison.
fn rows(db: &Path, table: &str) -> Option<Vec<String>> {
    let conn = rusqlite::Connection::open(db).ok()?;
    let exists: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1", [table], |r| r.get(0))
        .ok()?;
    if exists == 0 {
        return None;
    }
    let mut stmt = conn.prepare(&format!("SELECT id, workflow_state FROM \"{table}\" ORDER BY id")).unwrap();
    Some(
        stmt.query_map([], |r| Ok(format!("{}:{:?}", r.get::<_, i64>(0)?, r.get::<_, Option<String>>(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect(),
    )
}

fn initialised(db: &Path, table: &str) -> bool {
    let Ok(conn) = rusqlite::Connection::open(db) else { return false };
    conn.query_row("SELECT count(*) FROM instructure_dap__table_sync WHERE source_table = ?1", [table], |r| {
        r.get::<_, i64>(0)
    })
    .map(|n| n > 0)
    .unwrap_or(false)
}

fn truth(emu: &Emulator, table: &str) -> Vec<String> {
    let mut t: Vec<(i64, String)> = emu
        .truth("canvas", table)
        .unwrap()
        .iter()
        .map(|r: &Map<String, Value>| {
            (r["id"].as_i64().unwrap(), format!("{}:{:?}", r["id"], r["workflow_state"].as_str()))
        })
        .collect();
    t.sort();
    t.into_iter().map(|(_, s)| s).collect()
}

fn command(emu: &Emulator, url: &str) -> tokio::process::Command {
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
            "canvas",
            "--table",
            &TABLES.join(","),
            "--connection-string",
            url,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    cmd
}

/// Runs the sync-else-init command and kills it after `after`; returns its stderr.
async fn run_and_kill(emu: &Emulator, url: &str, after: Duration) -> String {
    let mut child = command(emu, url).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = tokio::spawn(async move {
        let mut s = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut tokio::io::BufReader::new(stderr), &mut s).await.ok();
        s
    });
    tokio::select! {
        _ = child.wait() => {}
        _ = tokio::time::sleep(after) => { child.start_kill().unwrap(); child.wait().await.unwrap(); }
    }
    reader.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_anywhere_keeps_every_table_whole_and_reruns_converge() {
    let emu = emulator(EmulatorConfig { rows: 3000, part_rows: 250, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("canvas.db");
    let url = format!("sqlite://{}", db.display());

    // How long an uninterrupted initdb takes here, to spread the kill points over it.
    let probe = dir.path().join("probe.db");
    let started = Instant::now();
    let out = command(&emu, &format!("sqlite://{}", probe.display())).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let span = started.elapsed();
    emu.expire_jobs();

    let mut rng = fastrand::Rng::with_seed(20261122);
    let mut resumed = 0;
    for phase in ["initdb", "syncdb"] {
        if phase == "syncdb" {
            for t in TABLES {
                emu.commit(
                    "canvas",
                    t,
                    ChangeCounts { inserts: 300, updates: 300, soft_deletes: 50, hard_deletes: 50 },
                )
                .unwrap();
            }
        }
        let before: Vec<Option<Vec<String>>> = TABLES.iter().map(|t| rows(&db, t)).collect();
        for kill in 0..12 {
            let after = span.mul_f64(rng.f64() * 1.1);
            let stderr = run_and_kill(&emu, &url, after).await;
            resumed += stderr.matches("resuming job").count();
            for (t, old) in TABLES.iter().zip(&before) {
                let now = rows(&db, t);
                assert_eq!(
                    now.is_some(),
                    initialised(&db, t),
                    "{phase} kill {kill} at {after:?}: {t} exists exactly when it is initialised"
                );
                if let Some(now) = now {
                    assert!(
                        Some(&now) == old.as_ref() || now == truth(&emu, t),
                        "{phase} kill {kill} at {after:?}: {t} is neither its old state nor the truth"
                    );
                }
            }
        }
        let out = command(&emu, &url).output().await.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        for t in TABLES {
            assert_eq!(rows(&db, t).unwrap(), truth(&emu, t), "{phase}: {t} converged");
        }
    }
    assert!(resumed > 0, "at least one rerun resumed an interrupted initdb from its checkpoints");
}
