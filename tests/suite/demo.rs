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
    // Step 2 initialises, step 4 syncs; the emulator says nothing of its own.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let (initdb, syncdb) = (stderr.find("initdb: 6 tables").unwrap_or(usize::MAX), stderr.find("syncdb: 6 tables"));
    assert!(syncdb.is_some_and(|s| initdb < s), "step 2 initialises, step 4 syncs: {stderr}");
    assert_eq!(stderr.matches("syncdb: ").count(), 2, "one sync per namespace, in step 4: {stderr}");
    let all = format!("{stdout}{stderr}");
    assert!(!all.contains("emulator listening"), "{all}");
    // Dates relative to today: the logs of the last two weeks, a watermark of today.
    let days: Vec<&str> = stdout
        .split("Active users per day")
        .nth(1)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next().filter(|d| d.len() == 10 && d.starts_with("20")))
        .collect();
    assert!(!days.is_empty(), "{stdout}");
    let today = chrono_free_today();
    for day in &days {
        assert!(days_between(day, &today) <= 15, "web_logs of the last two weeks, not {day} (today {today})");
    }

    let mirror = dir.path().join("dap-demo");
    let out = dap(dir.path(), &["status", "--dir", mirror.to_str().unwrap(), "--json"]);
    assert!(out.status.success());
    let tables: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(tables.len(), 7);
    for t in &tables {
        let staleness = t["staleness_seconds"].as_i64().unwrap();
        assert!((0..3600).contains(&staleness), "a watermark of today: {t}");
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

/// Today's date (UTC) as `YYYY-MM-DD`, from the system clock.
fn chrono_free_today() -> String {
    let out = Command::new("date").args(["-u", "+%F"]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Whole days from `a` to `b` (`YYYY-MM-DD`).
fn days_between(a: &str, b: &str) -> i64 {
    let day = |d: &str| -> i64 {
        let p: Vec<i64> = d.split('-').map(|x| x.parse().unwrap()).collect();
        // Days from civil (Howard Hinnant's algorithm).
        let (y, m, d) = (if p[1] <= 2 { p[0] - 1 } else { p[0] }, p[1], p[2]);
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
        era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy
    };
    day(b) - day(a)
}
