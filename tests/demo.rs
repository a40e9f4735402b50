//! `dap demo`, the README's first command, and `dap status`.

use std::process::Command;

use serde_json::Value;

fn dap(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dap"))
        .current_dir(dir)
        .env_remove("DAP_CLIENT_ID")
        .env_remove("DAP_CLIENT_SECRET")
        .env_remove("DAP_API_URL")
        .env_remove("DAP_CONNECTION_STRING")
        .args(args)
        .output()
        .expect("dap runs")
}

#[test]
fn demo_builds_and_syncs_a_mirror_offline_and_status_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dap(dir.path(), &["demo", "--rows", "300"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{}", stdout, String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("The mirror now")
            && stdout.contains("canvas.enrollments")
            && stdout.contains("SELECT workflow_state"),
        "{stdout}"
    );

    let mirror = dir.path().join("dap-demo");
    let out = dap(dir.path(), &["status", "--dir", mirror.to_str().unwrap(), "--json"]);
    assert!(out.status.success());
    let tables: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(tables.len(), 7);
    for t in &tables {
        // 300 rows, then 25 inserts and 5 hard deletes.
        assert_eq!(t["rows"], 320, "{t}");
        assert_eq!(t["last_result"], "ok");
        assert_eq!(t["last_command"], "syncdb");
    }

    let again = dap(dir.path(), &["demo", "--rows", "300"]);
    assert!(
        again.status.success(),
        "a second demo run syncs the same mirror: {}",
        String::from_utf8_lossy(&again.stderr)
    );
}
