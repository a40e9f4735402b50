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
    assert!(stdout.contains("The mirror now") && stdout.contains("canvas.enrollments"), "{stdout}");
    assert_queries_answered(&stdout);

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
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "a second demo run works too: {}", String::from_utf8_lossy(&again.stderr));
    assert!(stdout.contains("Starting afresh"), "it says it starts over: {stdout}");
    assert_queries_answered(&stdout);

    // A folder that is not the demo's is refused, and left as it was.
    let other = dir.path().join("mine");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "keep me").unwrap();
    let out = dap(dir.path(), &["demo", "--rows", "300", "--dir", other.to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not an earlier demo"));
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 1);
}

/// Each of the demo's closing analyst queries prints a header, a rule and at least one row.
fn assert_queries_answered(stdout: &str) {
    for title in ["Grades per course", "Active users per day", "Enrollments by state"] {
        let section = stdout.split(title).nth(1).unwrap_or_else(|| panic!("no {title:?} in {stdout}"));
        let lines: Vec<&str> = section.lines().map(str::trim).skip_while(|l| !l.starts_with("---")).collect();
        let rows: Vec<&&str> = lines.iter().skip(1).take_while(|l| !l.is_empty()).collect();
        assert!(!rows.is_empty(), "{title}: no rows in {section}");
        if title == "Grades per course" {
            let average: f64 = rows[0].split_whitespace().last().unwrap().parse().unwrap();
            assert!((0.0..=100.0).contains(&average), "a plausible average score: {}", rows[0]);
        }
    }
}
