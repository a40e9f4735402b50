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
