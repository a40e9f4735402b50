//! The institution-scale benchmark (`bench/run scale`, run by hand at 10^8 rows) kept from
//! rotting: the same scenario at 10^5 rows with this build's `dap`, its numbers checked for
//! what must hold at any size (every row loaded and synced, each index built, each analyst
//! question answered through an index), and, with PostgreSQL, the replicate of the result.

use std::path::Path;

use crate::common::targets::{Backend, require};

#[test]
fn the_scale_benchmark_runs_at_a_hundred_thousand_rows() {
    let root = tempfile::tempdir().unwrap();
    let json = root.path().join("scale.json");
    let bench = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench").join("run");
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(&bench).args(["scale", "--scale-rows", "100000", "--bin", env!("CARGO_BIN_EXE_dap")]);
    cmd.arg("--scale-dir").arg(root.path().join("work")).arg("--scale-keep").arg("--json").arg(&json);
    let with_postgres = require(Backend::Postgres);
    if with_postgres {
        cmd.arg("--scale-postgres");
    }
    let out = cmd.output().expect("python3 runs bench/run");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench/run scale failed: {said}{}", String::from_utf8_lossy(&out.stdout));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("### Scale: canvas_logs.web_logs, 100,000 rows"), "{report}");

    let results: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let r = &results[0];
    assert_eq!(r["rows"], 100_000);
    // Every row of the snapshot, then every new row of the sync.
    assert_eq!(r["changes"], 1000);
    assert_eq!(r["mirror_rows"], 101_000, "{r}");
    // web_logs' snapshot was staged in a load file beside the mirror: it is gone, and the
    // mirror holds no pages freed by the staging.
    assert_eq!(r["load_file_left"], false, "{r}");
    assert!(r["mirror_free_bytes"].as_u64().unwrap() < 1 << 20, "{r}");
    // The load was watched while it ran: parts committed, never fewer than before (the
    // checkpoints go when the table is published; a snapshot of web_logs repeats about 1% of
    // its rows, so whole parts can count a little past 100,000).
    let samples = r["load_samples"].as_array().unwrap();
    let loaded: Vec<u64> = samples.iter().map(|s| s[1].as_u64().unwrap()).filter(|rows| *rows > 0).collect();
    assert!(!loaded.is_empty(), "no part was seen committed: {samples:?}");
    assert!(loaded.windows(2).all(|w| w[0] <= w[1]) && loaded.iter().all(|rows| *rows <= 120_000), "{samples:?}");
    let indexes: Vec<&str> = r["indexes"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(indexes.len(), 3, "{indexes:?}");
    for i in r["indexes"].as_array().unwrap() {
        assert!(i["bytes"].as_i64().unwrap() > 0, "an index takes room: {i}");
    }
    let queries = r["queries"].as_array().unwrap();
    assert_eq!(queries.len(), 3);
    for q in queries {
        assert!(q["rows"].as_u64().unwrap() >= 1, "every question has an answer: {q}");
        // The answer comes from an index, not a scan of the table.
        let sql = q["sql"].as_str().unwrap();
        let db = root.path().join("work").join("canvas_logs.db");
        let conn = rusqlite::Connection::open(&db).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map([], |row| row.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(plan.iter().any(|p| p.contains("INDEX web_logs__by_")), "{sql}: {plan:?}");
    }
    if with_postgres {
        assert_eq!(r["postgres_rows"], 101_000);
    }
}
