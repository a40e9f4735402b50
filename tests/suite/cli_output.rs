//! Clean output for scripts: a closed pipe ends `dap` quietly, no colour codes off a terminal,
//! the official client's `--console-theme` is accepted, and a nonsensical command line exits 2.

use crate::common;

use std::io::Read;
use std::process::{Command, Stdio};

use common::*;
use dap_replica::emulator::EmulatorConfig;

#[test]
fn a_reader_that_stops_reading_ends_dap_quietly() {
    // The pipe made as small as Linux allows (one page) before dap starts, so that the output
    // cannot fit in it and dap is still writing when the reader goes: the output is many times
    // larger (checked below), not a few kilobytes over the usual 64 KiB.
    let (mut stdout, writer) = std::io::pipe().unwrap();
    let capacity = unsafe {
        use std::os::fd::AsRawFd;
        libc::fcntl(stdout.as_raw_fd(), libc::F_SETPIPE_SZ, 4096)
    };
    assert!(capacity > 0, "the pipe's size was set: {}", std::io::Error::last_os_error());
    let whole = Command::new(env!("CARGO_BIN_EXE_dap")).args(["completions", "bash"]).output().unwrap().stdout;
    assert!(whole.len() > 8 * capacity as usize, "{} bytes of output for a pipe of {capacity}", whole.len());
    let mut child = Command::new(env!("CARGO_BIN_EXE_dap"))
        .args(["completions", "bash"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read one byte and close the pipe, as `| head -c1` does.
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let status = child.wait().unwrap();
    assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{stderr}");
    assert_ne!(status.code(), Some(101), "no panic exit");
}

#[tokio::test]
async fn logs_off_a_terminal_have_no_colour_codes_and_the_console_theme_is_accepted() {
    let emu = emulator(EmulatorConfig { rows: 5, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    for theme in ["dark", "light", "high-contrast-bw"] {
        let out = run_ours(&emu, dir.path(), &["--console-theme", theme, "list", "--namespace", "canvas"]).await;
        assert!(out.status.success(), "{theme}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = run_ours(&emu, dir.path(), &["--loglevel", "debug", "list", "--namespace", "canvas"]).await;
    assert!(!out.stderr.is_empty(), "debug logs were written");
    assert!(!out.stderr.contains(&0x1b), "escape codes in a redirected log: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn until_before_since_is_a_usage_error() {
    let emu = emulator(EmulatorConfig { rows: 5, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let out = run_ours(
        &emu,
        dir.path(),
        &[
            "incremental",
            "--namespace",
            "canvas",
            "--table",
            "users",
            "--since",
            "2025-01-02T00:00:00Z",
            "--until",
            "2025-01-01T00:00:00Z",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be later than --since"));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing was written");
}

/// Every file under `dir` with its bytes, to show that a refused run wrote nothing.
fn listing(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    files_under(dir).into_iter().map(|p| (p.clone(), std::fs::read(dir.join(&p)).unwrap())).collect()
}

#[tokio::test]
async fn bad_input_is_refused_before_anything_is_created() {
    let emu = emulator(EmulatorConfig { rows: 5, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("mirror");
    let env = [("DAP_MIRROR_DIR", mirror.to_str().unwrap())];
    // A namespace the server does not have.
    let out = run_ours_with(&emu, dir.path(), &["initdb", "--namespace", "canvass", "--table", "users"], &env).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("canvass"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!mirror.exists(), "a typo left files behind: {:?}", files_under(&mirror));
    // A table the namespace does not have: named with the nearest one and the way to list them.
    let out =
        run_ours_with(&emu, dir.path(), &["initdb", "--namespace", "canvas", "--table", "users,userz"], &env).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("userz (did you mean users?)") && err.contains("dap list --namespace canvas"), "{err}");
    assert!(!mirror.exists(), "a table typo left files behind: {:?}", files_under(&mirror));
    // dropdb of a namespace typo: nothing to drop, and nothing created.
    let out = run_ours_with(&emu, dir.path(), &["dropdb", "--namespace", "canvass", "--table", "all"], &env).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("canvass.db does not exist") && err.contains("nothing to drop"), "{err}");
    assert!(!mirror.exists(), "dropdb of a typo created {:?}", files_under(&mirror));
    // A sync with no mirror to sync.
    let out = run_ours_with(&emu, dir.path(), &["syncdb", "--namespace", "canvas", "--table", "all"], &env).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no mirror here yet") && err.contains("dap initdb"), "{err}");
    assert!(!mirror.exists(), "a sync of nothing created {:?}", files_under(&mirror));
    // Reading commands never create a mirror, nor change an empty file.
    let out = run_ours_with(&emu, dir.path(), &["status"], &env).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("No tables are mirrored yet"));
    let out = run_ours_with(&emu, dir.path(), &["listdb", "--namespace", "canvas"], &env).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("no mirror here yet"), "{out:?}");
    assert!(!mirror.exists(), "a read created {:?}", files_under(&mirror));
    std::fs::create_dir(&mirror).unwrap();
    std::fs::write(mirror.join("canvas.db"), b"").unwrap();
    let before = listing(&mirror);
    for command in [&["status"][..], &["listdb", "--namespace", "canvas", "--omit-not-replicated"]] {
        let out = run_ours_with(&emu, dir.path(), command, &env).await;
        assert!(out.status.success(), "{command:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(listing(&mirror), before, "{command:?} changed an empty mirror file");
    }
    std::fs::remove_dir_all(&mirror).unwrap();
    // A mirror file that is not a SQLite database: refused with the way out, and left as it was.
    std::fs::create_dir(&mirror).unwrap();
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(mirror.join("canvas.db"), &garbage).unwrap();
    let before = listing(&mirror);
    for command in ["syncdb", "initdb"] {
        let out = run_ours_with(&emu, dir.path(), &[command, "--namespace", "canvas", "--table", "users"], &env).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command} accepted a garbage mirror");
        assert!(err.contains("not a database") && err.contains("dap initdb"), "{command}: {err}");
        assert_eq!(listing(&mirror), before, "{command} changed the folder");
    }
}

/// The README's flow: a few tables first, then `initdb --table all`. The tables initialised
/// already are skipped with the way to bring them up to date, the rest initialised, exit 0; no
/// run record of an error is left for the skipped ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initdb_all_after_some_tables_skips_the_initialised_ones_and_succeeds() {
    let emu = emulator(EmulatorConfig { rows: 5, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("catalog.db");
    let url = format!("sqlite://{}", db.display());
    let first = ["initdb", "--namespace", "catalog", "--table", "accounts", "--connection-string", &url];
    ours_ok(&emu, dir.path(), &first).await;
    let out = run_ours(
        &emu,
        dir.path(),
        &["initdb", "--json", "--namespace", "catalog", "--table", "all", "--connection-string", &url],
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let results: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let status = |t: &str| results.iter().find(|r| r["table"] == t).map(|r| r["status"].clone());
    assert_eq!(status("accounts"), Some(serde_json::json!("skipped")), "{results:?}");
    let served = emu.tables("catalog").unwrap();
    for t in served.iter().filter(|t| *t != "accounts") {
        assert_eq!(status(t), Some(serde_json::json!("succeeded")), "{t}: {results:?}");
    }
    assert!(err.contains("already initialised") && err.contains("dap syncdb"), "{err}");
    assert!(err.contains(&format!("{} succeeded, 0 failed, 1 skipped", served.len() - 1)), "{err}");
    let out = run_ours(&emu, dir.path(), &["status", "--json", "--dir", dir.path().to_str().unwrap()]).await;
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !shown.contains("already initialised"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropdb_names_what_it_dropped_and_gives_the_space_back() {
    let emu = emulator(EmulatorConfig { rows: 3000, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("canvas.db");
    let url = format!("sqlite://{}", db.display());
    let tables = "users,courses,accounts";
    ours_ok(&emu, dir.path(), &["initdb", "--namespace", "canvas", "--table", tables, "--connection-string", &url])
        .await;
    let full = std::fs::metadata(&db).unwrap().len();
    let out = run_ours(
        &emu,
        dir.path(),
        &["dropdb", "--json", "--namespace", "canvas", "--table", "all", "--connection-string", &url],
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let results: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut dropped: Vec<&str> = results.iter().map(|r| r["table"].as_str().unwrap()).collect();
    dropped.sort();
    assert_eq!(dropped, ["accounts", "courses", "users"]);
    for t in tables.split(',') {
        let rows = emu.truth("canvas", t).unwrap().len();
        assert!(err.contains(&format!("canvas.{t}: dropped ({rows} rows)")), "{t}: {err}");
        assert!(results.iter().any(|r| r["table"] == t && r["rows"] == rows), "{results:?}");
    }
    let left = std::fs::metadata(&db).unwrap().len();
    assert!(left * 10 < full, "the file kept its size: {full} → {left} bytes");
    assert!(err.contains("MB given back"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_failures_name_their_root_cause_and_what_to_check() {
    let emu = emulator(EmulatorConfig { rows: 5, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let emulator_over_https = format!("https://{}", emu.addr());
    let cases = [
        (format!("http://127.0.0.1:{closed}"), "connection refused", 2),
        ("http://no-such-host.invalid".to_string(), "does not resolve", 2),
        // A permanent failure is not retried.
        (emulator_over_https, "TLS handshake failed", 1),
    ];
    for (url, cause, attempts) in cases {
        let env = [("DAP_API_URL", url.as_str())];
        let out =
            run_ours_with(&emu, dir.path(), &["--max-attempts", "2", "list", "--namespace", "canvas"], &env).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(5), "{url}: {err}");
        assert!(err.contains(cause) && err.contains("check"), "{url}: no {cause:?} and hint in {err}");
        assert!(!err.contains("error sending request"), "{url}: reqwest's wrapper instead of the cause: {err}");
        assert_eq!(err.matches("retrying in").count(), attempts - 1, "{url}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_table_is_reported_once() {
    use dap_replica::emulator::{FaultKind, FaultSpec};
    let emu = emulator(EmulatorConfig { rows: 5, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("canvas.db").display());
    let args = [
        "--max-attempts",
        "1",
        "initdb",
        "--namespace",
        "canvas",
        "--table",
        "users,accounts",
        "--connection-string",
        &url,
    ];
    let failure = "the query job failed (injected)";
    emu.inject(FaultSpec::new(FaultKind::FailedJob, 1).for_table("accounts"));
    let out = run_ours(&emu, dir.path(), &args).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.matches(failure).count(), 1, "{err}");
    assert!(err.contains("1 succeeded, 1 failed"), "{err}");
    // With the log in a file, the console still names the failure, once.
    let log = dir.path().join("dap.log");
    emu.inject(FaultSpec::new(FaultKind::FailedJob, 1).for_table("accounts"));
    let out = run_ours(&emu, dir.path(), &[&["--logfile", log.to_str().unwrap()], &args[..]].concat()).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches(failure).count(), 1, "{err}");
    assert!(std::fs::read_to_string(&log).unwrap().contains(failure));
}

/// A mirror on a medium nothing can write (a read-only mount, another user's folder) has no WAL
/// index beside it and cannot get one; directories in the way of `-wal` and `-shm` stand in for
/// that here (the tests run as root, who may write anywhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_cannot_be_written_can_still_be_read() {
    let emu = emulator(EmulatorConfig { rows: 50, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("mirror");
    let env = [("DAP_MIRROR_DIR", mirror.to_str().unwrap())];
    let out = run_ours_with(&emu, dir.path(), &["initdb", "--namespace", "canvas", "--table", "users"], &env).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for suffix in ["-wal", "-shm"] {
        let blocked = mirror.join(format!("canvas.db{suffix}"));
        let _ = std::fs::remove_file(&blocked);
        std::fs::create_dir(&blocked).unwrap();
    }
    let pack = dir.path().join("copy.dap");
    let reads: [&[&str]; 4] = [
        &["status"],
        &["listdb", "--namespace", "canvas", "--omit-not-replicated"],
        &["query", "SELECT count(*) AS n FROM canvas.users"],
        &["pack", "--output", pack.to_str().unwrap()],
    ];
    for args in reads {
        let out = run_ours_with(&emu, dir.path(), args, &env).await;
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{args:?}: {stderr}");
        assert!(stdout.contains("users") || stdout.contains("50") || pack.exists(), "{args:?}: {stdout}");
    }
    let out =
        run_ours_with(&emu, dir.path(), &["query", "--format", "csv", "SELECT count(*) AS n FROM canvas.users"], &env)
            .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "n\n50");
}

/// `status --to` a target that cannot be reached: the rows still print (marked unreadable), the
/// cause is said once rather than on every row, and the exit is not 0. JSON has numbers or null.
#[tokio::test]
async fn status_against_an_unreachable_target_says_so_once_and_fails() {
    let emu = emulator(EmulatorConfig { rows: 5, ..EmulatorConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let mirror = format!("sqlite:///{}", dir.path().join("canvas.db").display());
    let tables = "accounts,users,courses";
    ours_ok(&emu, dir.path(), &["initdb", "--namespace", "canvas", "--table", tables, "--connection-string", &mirror])
        .await;
    // Nothing listens on port 1: the connection is refused at once.
    let unreachable = "postgresql://someone:Secr3t@127.0.0.1:1/nowhere";
    let out = run_ours(&emu, dir.path(), &["status", "--connection-string", &mirror, "--to", unreachable]).await;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "an unreadable target exits 0:\n{stdout}\n{stderr}");
    assert_eq!(stdout.matches("unreadable").count(), 3, "one row per table is marked:\n{stdout}");
    assert_eq!(stderr.matches("127.0.0.1:1").count(), 1, "the cause is said once:\n{stderr}");
    assert!(stderr.contains("1 of 1 targets could not be read"), "{stderr}");
    assert!(!stdout.contains("Secr3t") && !stderr.contains("Secr3t"), "the password was shown");

    // JSON: the positions are numbers or null, never "-".
    let copy = format!("sqlite:///{}", dir.path().join("copy.db").display());
    ours_ok(
        &emu,
        dir.path(),
        &["replicate", "--namespace", "canvas", "--table", "users", "--from", &mirror, "--to", &copy],
    )
    .await;
    let out = ours_ok(&emu, dir.path(), &["status", "--json", "--connection-string", &mirror, "--to", &copy]).await;
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3, "{out}");
    for r in rows {
        let t = &r["targets"][0];
        if r["table"] == "users" {
            assert_eq!(
                (&t["state"], &t["lag"], &t["lag_seconds"]),
                (&"current".into(), &"0s".into(), &0.into()),
                "{r}"
            );
        } else {
            assert_eq!(t["state"], "absent", "{r}");
            assert!(t["lag"].is_null() && t["lag_seconds"].is_null(), "{r}");
        }
    }
}
